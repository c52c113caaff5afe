"""GGUF export: exact tensors, re-import through our reader and transformers', tokenizer.

Logit tolerances against the fp32 source, as max |diff| relative to the largest |logit|:
  f16   2e-3  (weights rounded to 11-bit mantissas; SmolLM2-135M measures 1.1e-3)
  q8_0  6e-2  (8-bit blocks of 32; SmolLM2-135M measures 3.5e-2 on a max over 1.8M logits;
              the greedy next token is unchanged)
The re-imported weights themselves are checked exactly against the expected rounding.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.errors import TunelabError
from tunelab.export.gguf import export_gguf
from tunelab.export.merge import merge_adapter
from tunelab.hub import resolve_model
from tunelab.models.convert import model_from_tensors
from tunelab.models.gguf_import import read_gguf
from tunelab.models.loading import load_model, load_tokenizer

RTOL = {"f16": 2e-3, "q8_0": 6e-2}
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 1, 2, 300, 12]])
TEXTS = ["hello world, the capital of France", "<|im_start|>user\nhi<|im_end|>\n", " 0123 ?!"]
TINY = [  # (arch, config overrides, quant)
    ("llama", {}, "f16"),
    ("llama", {}, "q8_0"),
    ("qwen2", {"tie_word_embeddings": True}, "q8_0"),
    ("qwen3", {"head_dim": 128}, "f16"),  # transformers' qwen3 GGUF reader assumes 128
]


def expected_tensor(t: torch.Tensor, quant: str) -> torch.Tensor:
    """What a GGUF reader must get back for ``t`` stored as ``quant``."""
    if t.ndim == 1 or quant == "f32":
        return t
    if quant == "f16":
        return t.half().float()
    q8 = gguf.GGMLQuantizationType.Q8_0
    data = t.numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, q8), q8))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@torch.no_grad()
def logits(model, ids=IDS) -> torch.Tensor:
    out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize(("arch", "extra", "quant"), TINY, ids=[f"{a}-{q}" for a, _, q in TINY])
def test_tiny_round_trip(make_tiny_model, tmp_path, arch, extra, quant):
    src_dir = make_tiny_model(arch, **extra)
    src = load_model(src_dir, device="cpu", dtype="fp32")
    path = export_gguf(str(src_dir), tmp_path / "model.gguf", quant=quant)

    ckpt = read_gguf(path)
    assert ckpt.config["model_type"] == arch
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim"):
        assert ckpt.config[key] == getattr(src.config, key)
    assert ckpt.config["tie_word_embeddings"] == src.config.tie_word_embeddings
    for name, tensor in src.state_dict().items():
        if name == "lm_head.weight" and src.config.tie_word_embeddings:
            continue
        assert torch.equal(ckpt.tensors[name], expected_tensor(tensor, quant)), name
    reimported = logits(model_from_tensors(ckpt.config, ckpt.tensors, str(path)))
    assert relative_error(reimported, logits(src)) <= RTOL[quant]

    where = {"pretrained_model_name_or_path": str(tmp_path), "gguf_file": path.name}
    theirs = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(theirs), reimported, atol=1e-4, rtol=0)
    tok, their_tok = load_tokenizer(src_dir), AutoTokenizer.from_pretrained(**where)
    for text in TEXTS:
        assert (
            their_tok(text)["input_ids"]
            == tok(text)["input_ids"]
            == ckpt.tokenizer(text)["input_ids"]
        )
    assert their_tok.chat_template == tok.chat_template
    assert (their_tok.eos_token_id, their_tok.bos_token_id) == (tok.eos_token_id, 1)


def test_metadata(make_tiny_model, tmp_path):
    src_dir = make_tiny_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    path = export_gguf(str(src_dir), tmp_path / "m.gguf", quant="q8_0")
    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"  # plain ByteLevel: GPT-2's split regex
    assert field("llama.rope.scaling.type") == "linear"
    assert field("llama.rope.scaling.factor") == 2.0
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == 416 and tokens[415] == "[PAD415]" and types[415] == 5  # UNUSED
    assert types[tokens.index("<|im_end|>")] == 3  # CONTROL
    assert not field("tokenizer.ggml.add_bos_token")
    assert read_gguf(path).config["rope_parameters"] == {
        "rope_theta": 10000.0,
        "rope_type": "linear",
        "factor": 2.0,
    }


def test_llama3_rope_freqs(make_tiny_model, tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    src_dir = make_tiny_model("llama", rope_scaling=scaling, rope_theta=10000.0)
    path = export_gguf(str(src_dir), tmp_path / "m.gguf", quant="f32")
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    # llama.cpp's convert_hf_to_gguf.py formula, written out independently
    dim, factors = 16, []
    for freq in 1.0 / (10000.0 ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < 32 / 4.0:
            factors.append(1.0)
        elif wavelen > 32 / 1.0:
            factors.append(8.0)
        else:
            smooth = (32 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    np.testing.assert_allclose(tensor.data, factors, rtol=1e-5)


def test_export_with_adapter_equals_merged_model(make_tiny_model, make_adapter, tmp_path):
    base = make_tiny_model("qwen2")
    adapter = make_adapter(base, std=0.05)
    path = export_gguf(str(base), tmp_path / "m.gguf", adapter=adapter, quant="f32")
    merge_adapter(str(base), adapter, tmp_path / "merged", dtype="fp32")
    ckpt = read_gguf(path)
    merged = logits(load_model(tmp_path / "merged", device="cpu", dtype="fp32"))
    torch.testing.assert_close(
        logits(model_from_tensors(ckpt.config, ckpt.tensors, "x")), merged, atol=1e-5, rtol=0
    )


def test_atomic_and_bad_input(make_tiny_model, tmp_path, monkeypatch):
    src = str(make_tiny_model("llama"))
    out = tmp_path / "m.gguf"

    def killed(self, *args, **kwargs):
        raise RuntimeError("killed while writing")

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", killed)
        with pytest.raises(RuntimeError, match="killed"):
            export_gguf(src, out)
    assert list(tmp_path.iterdir()) == []  # no file, no temp file
    out.write_bytes(b"old")
    with pytest.raises(TunelabError, match="already exists"):
        export_gguf(src, out)
    with pytest.raises(TunelabError, match="unknown GGUF quantization"):
        export_gguf(src, tmp_path / "x.gguf", quant="q4_k")
    export_gguf(src, out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_sentencepiece_tokenizer_is_refused(make_tiny_model, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "spm"
    shutil.copytree(make_tiny_model("llama"), model_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(["hello world"], trainers.BpeTrainer(special_tokens=["<unk>"]))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / f).unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(model_dir))
    with pytest.raises(TunelabError, match=r"sentencepiece-style BPE.*--format hf"):
        export_gguf(str(model_dir), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---- slow: the default model -------------------------------------------------------------


@pytest.fixture(scope="module")
def default_source():
    model_dir = resolve_model("default")
    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    return model_dir, tok, text, ids, logits(load_model(model_dir, "cpu", "fp32"), ids)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_default_model_round_trip(default_source, tmp_path, quant):
    _, tok, text, ids, source = default_source
    path = export_gguf("default", tmp_path / "smollm2.gguf", quant=quant)
    ckpt = read_gguf(path)
    ours = logits(model_from_tensors(ckpt.config, ckpt.tensors, str(path)), ids)
    assert relative_error(ours, source) <= RTOL[quant]
    assert ours[0, -1].argmax() == source[0, -1].argmax()
    where = {"pretrained_model_name_or_path": str(tmp_path), "gguf_file": path.name}
    theirs = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(theirs, ids), ours, atol=1e-3, rtol=0)
    their_tok = AutoTokenizer.from_pretrained(**where)
    assert their_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    assert their_tok.chat_template == tok.chat_template


def test_import_reads_the_gguf_vocabulary_not_a_tokenizer_beside_it(make_tiny_model, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    path = export_gguf(str(make_tiny_model("llama")), tmp_path / "m.gguf", quant="f32")
    alone = read_gguf(path).tokenizer
    other = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    other.save(str(tmp_path / "tokenizer.json"))  # another model's files in the same folder
    beside = read_gguf(path).tokenizer
    for text in TEXTS:
        assert beside(text)["input_ids"] == alone(text)["input_ids"]


def test_named_chat_templates_are_exported(make_tiny_model, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(make_tiny_model("llama"), src)
    tokenizer = load_tokenizer(src)
    default = tokenizer.chat_template
    tokenizer.chat_template = {"default": default, "tool_use": "{{ 'tools' }}"}
    tokenizer.save_pretrained(str(src))
    path = export_gguf(str(src), tmp_path / "m.gguf", quant="f32")
    fields = gguf.GGUFReader(str(path)).fields
    assert "tokenizer.chat_template.tool_use" in fields
    assert read_gguf(path).tokenizer.chat_template == default
