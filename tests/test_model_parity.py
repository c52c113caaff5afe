"""The decoder against HF transformers on tiny random models: logits, greedy tokens, round trip."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tunelab.engine.sampler import SamplingParams
from tunelab.engine.simple import SimpleGenerator
from tunelab.models.loading import load_model, load_tokenizer, save_pretrained

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_scaling": LLAMA3_ROPE}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    ("mistral", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
    ("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
]
IDS = [f"{t}-{'-'.join(sorted(o)) or 'base'}-{i}" for i, (t, o) in enumerate(VARIANTS)]


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize(("model_type", "overrides"), VARIANTS, ids=IDS)
def test_logits_match_transformers(make_tiny_model, model_type, overrides):
    path = make_tiny_model(model_type, **overrides)
    ours = load_model(path, device="cpu", dtype=torch.float32)
    ids = torch.randint(3, 400, (2, 40))  # longer than mistral's sliding window of 8
    with torch.no_grad():
        expected = hf_model(path)(ids).logits
        actual = ours(ids)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_generation_matches_transformers(make_tiny_model, model_type):
    path = make_tiny_model(model_type)
    gen = SimpleGenerator(load_model(path, "cpu", torch.float32), load_tokenizer(path))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = gen.generate_ids(prompts, params)  # one left-padded batch
    reference = hf_model(path)
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert out.token_ids == expected
        assert out.finish_reason == "length"


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_save_round_trip_loads_in_transformers(make_tiny_model, tmp_path, model_type):
    path = make_tiny_model(model_type, tie_word_embeddings=model_type == "qwen3")
    ours = load_model(path, "cpu", torch.float32)
    out = save_pretrained(ours, load_tokenizer(path), tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected a sharded checkpoint"
    assert (out / "generation_config.json").exists()
    ids = torch.randint(3, 400, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(ids).logits, ours(ids), rtol=0, atol=0)
        torch.testing.assert_close(load_model(out, "cpu", torch.float32)(ids), ours(ids))
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert reloaded_tok.chat_template == load_tokenizer(path).chat_template


def test_bf16_save_keeps_dtype(make_tiny_model, tmp_path):
    path = make_tiny_model("llama")
    out = save_pretrained(
        load_model(path, "cpu", torch.float32),
        load_tokenizer(path),
        tmp_path / "bf16",
        dtype=torch.bfloat16,
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(out, "cpu", "bf16").dtype == torch.bfloat16


def _edited_copy(src, tmp_path, edit) -> str:
    """A copy of a tiny model dir whose config.json went through ``edit(dict)``."""
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize(
    ("model_type", "overrides", "edit"),
    [
        # Qwen2/3 configs from before layer_types: windows only from max_window_layers on
        ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
         lambda c: c.pop("layer_types")),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
         lambda c: c.pop("layer_types")),
        # keys transformers ignores for a family are ignored here too
        ("llama", {}, lambda c: c.update(sliding_window=8)),
        ("mistral", {}, lambda c: c.update(attention_bias=True)),
        ("qwen2", {}, lambda c: c.update(mlp_bias=True)),
        # Qwen3's head_dim defaults to 128, not hidden_size / heads
        ("qwen3", {"head_dim": 128}, lambda c: c.pop("head_dim")),
    ],
    ids=["qwen2-old-window", "qwen3-old-window", "llama-window-key", "mistral-bias-key",
         "qwen2-mlp-bias-key", "qwen3-default-head-dim"],
)  # fmt: skip
def test_config_keys_read_as_transformers_reads_them(
    make_tiny_model, tmp_path, model_type, overrides, edit
):
    path = _edited_copy(make_tiny_model(model_type, **overrides), tmp_path, edit)
    ours = load_model(path, device="cpu", dtype=torch.float32)
    ids = torch.randint(3, 400, (2, 40))  # longer than the window of 8
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_model(path)(ids).logits, rtol=1e-5, atol=1e-5)


def test_config_that_does_not_match_the_weights_is_one_clear_error(make_tiny_model, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.models.config import ModelConfig

    path = _edited_copy(make_tiny_model("llama"), tmp_path, lambda c: c.update(vocab_size=500))
    with pytest.raises(TunelabError, match=r"lm_head.weight has shape \(416, 64\).*\(500, 64\)"):
        load_model(path, device="cpu", dtype=torch.float32)
    base = json.loads((make_tiny_model("llama") / "config.json").read_text())
    rope = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}
    broken = {**base, "rope_parameters": rope}
    with pytest.raises(TunelabError, match="needs low_freq_factor, high_freq_factor"):
        ModelConfig.from_dict(broken)
    with pytest.raises(TunelabError, match="wrong type"):
        ModelConfig.from_dict({**base, "num_hidden_layers": "two"})
