"""Acceptance: greedy engine outputs are token-identical to HF ``generate`` (fp32, CPU).

Also with prefix-cache hits, with chunked prefill forced small, and with preemption forced by
a tiny cache. Mistral's sliding window is 8 in the tiny model, so prompts are longer.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.engine.conftest import prompts_of_lengths
from tunelab.engine.llm import LLM
from tunelab.engine.paged_attention import decode_groups
from tunelab.engine.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LENGTHS = [3, 11, 17, 33, 5]


def check(llm, path, prompts, hf_greedy, params=GREEDY):
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.error is None
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, params.max_tokens)
        assert out.outputs[0].finish_reason == "length"
    return outs


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_hf(tiny_llm, make_tiny_model, hf_greedy, model_type):
    llm = tiny_llm(model_type)
    check(llm, make_tiny_model(model_type), prompts_of_lengths(LENGTHS), hf_greedy)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_greedy_matches_hf_with_small_prefill_chunks(
    tiny_llm, make_tiny_model, hf_greedy, model_type
):
    llm = tiny_llm(model_type, max_num_batched_tokens=8)
    check(llm, make_tiny_model(model_type), prompts_of_lengths(LENGTHS, seed=1), hf_greedy)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3"])
def test_greedy_matches_hf_with_prefix_cache_hits(tiny_llm, make_tiny_model, hf_greedy, model_type):
    llm = tiny_llm(model_type, block_size=4, max_num_batched_tokens=16)
    shared = prompts_of_lengths([21], seed=2)[0]
    tails = prompts_of_lengths([1, 6, 9], seed=3)
    prompts = [shared + t for t in tails] + [shared[:16]]
    path = make_tiny_model(model_type)
    check(llm, path, prompts[:1], hf_greedy)  # computes and caches the shared prefix
    outs = check(llm, path, prompts, hf_greedy)
    assert all(o.metrics.num_cached_tokens >= 20 for o in outs[:3])
    assert outs[3].metrics.num_cached_tokens == 12  # the last block is always recomputed
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # everything released (cached, evictable)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_greedy_matches_hf_under_preemption(tiny_llm, make_tiny_model, hf_greedy, model_type):
    # 12 blocks of 4 tokens: each sequence needs up to 8 blocks, so they preempt each other.
    llm = tiny_llm(model_type, block_size=4, max_cache_tokens=48, max_num_batched_tokens=16)
    prompts = prompts_of_lengths([9, 14, 17, 6], seed=4)
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    outs = check(llm, make_tiny_model(model_type), prompts, hf_greedy, params)
    assert sum(o.outputs[0].num_preemptions for o in outs) > 0


def test_prefix_caching_off_gives_same_tokens(tiny_llm, make_tiny_model, hf_greedy):
    llm = tiny_llm("qwen2", enable_prefix_caching=False, block_size=4)
    prompts = prompts_of_lengths([13, 13], seed=5)
    prompts[1][:8] = prompts[0][:8]
    outs = check(llm, make_tiny_model("qwen2"), prompts, hf_greedy)
    assert all(o.metrics.num_cached_tokens == 0 for o in outs)


@pytest.mark.slow
def test_default_model_matches_hf(hf_greedy):
    from tunelab.hub import resolve_model

    path = resolve_model("default")
    llm = LLM(path, device="cpu", dtype="fp32", max_num_batched_tokens=32)
    tok = llm.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land"]
    prompts = [tok(t)["input_ids"] for t in texts]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompts.append(
        tok(
            tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
    )
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    check(llm, path, prompts, hf_greedy, params)
    with torch.no_grad():  # and again from the prefix cache
        check(llm, path, prompts, hf_greedy, params)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_greedy_matches_hf_with_many_lengths(tiny_llm, make_tiny_model, hf_greedy, model_type):
    # 24 decodes of very different lengths: served as several padded groups per step.
    llm = tiny_llm(model_type, max_num_batched_tokens=128)
    lengths = [2 + 5 * i for i in range(24)]
    check(llm, make_tiny_model(model_type), prompts_of_lengths(lengths, seed=6), hf_greedy)


def test_decode_groups_split_by_length():
    assert decode_groups([]) == []
    assert decode_groups([5] * 7) == [range(0, 7)]
    assert decode_groups([10] * 32) == [range(0, 32)]  # equal lengths: one group
    lens = sorted([10 * i for i in range(1, 33)])
    groups = decode_groups(lens)
    assert len(groups) == 4 and groups[0].start == 0 and groups[-1].stop == 32
    assert all(a.stop == b.start for a, b in itertools.pairwise(groups))
