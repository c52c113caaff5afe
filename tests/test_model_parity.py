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
