"""Helpers for engine tests: engines on tiny models, HF greedy references (cached)."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from tunelab.engine.llm import LLM
from tunelab.models.loading import load_model, load_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared, busy CPU run much faster without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _hf_model(path: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # Like ignore_eos: never stop early, and never mask EOS (min_new_tokens would).
    model.generation_config.eos_token_id = None
    return model


@functools.cache
def _hf_greedy(path: str, prompt: tuple[int, ...], max_new: int) -> tuple[int, ...]:
    with torch.inference_mode():
        out = _hf_model(path).generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
            pad_token_id=0,
        )
    return tuple(out[0, len(prompt) :].tolist())


@pytest.fixture(scope="session")
def hf_greedy():
    """``hf_greedy(model_dir, prompt_ids, max_new)`` -> HF ``generate`` tokens (batch 1)."""

    def run(path, prompt: list[int], max_new: int) -> list[int]:
        return list(_hf_greedy(str(path), tuple(prompt), max_new))

    return run


@pytest.fixture
def tiny_llm(make_tiny_model):
    """``tiny_llm("llama", max_num_batched_tokens=8, ...)`` -> ``LLM`` on a tiny model (fp32)."""

    def make(model_type: str = "llama", **engine_kwargs) -> LLM:
        path = make_tiny_model(model_type)
        model = load_model(path, "cpu", torch.float32)
        return LLM(model, tokenizer=load_tokenizer(path), **engine_kwargs)

    return make


def prompts_of_lengths(lengths: list[int], seed: int = 0, vocab: int = 400) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
