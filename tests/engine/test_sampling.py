"""The engine's sampler: filters, penalties, min_tokens, logprobs, seeds, n, stop strings."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import prompts_of_lengths
from tunelab.engine.sampler import (
    SampleInput,
    SamplingParams,
    _filter_rows,
    filter_top_k_top_p,
    sample_batch,
    sample_next,
)


def rows(*params, history=(), banned=()):
    return [SampleInput(p, list(history), 0, None, list(banned)) for p in params]


def test_batched_filters_match_the_per_row_filter():
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.6),
        SamplingParams(top_k=10, top_p=0.3),
        SamplingParams(),
    ]
    batched = _filter_rows(logits, params)
    for i, p in enumerate(params):
        expected = filter_top_k_top_p(logits[i], p.top_k, p.top_p)
        assert torch.equal(torch.isinf(batched[i]), torch.isinf(expected))


def test_min_p_keeps_tokens_near_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    kept = torch.isfinite(_filter_rows(probs.log(), [SamplingParams(min_p=0.2)]))
    assert kept.tolist() == [[True, True, True, False]]  # 0.08 < 0.2 * 0.5


def test_greedy_matches_sample_next_with_repetition_penalty():
    logits = torch.randn(3, 40)
    p = SamplingParams(temperature=0, repetition_penalty=1.5)
    history = [[1, 2, 3], [5], []]
    ours, _ = sample_batch(logits, [SampleInput(p, h, 0) for h in history])
    assert ours == sample_next(logits, [p] * 3, history, [None] * 3)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, 6)
    logits[0, 4] = 1.0
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.4)
    # Prompt [4]; generated [4, 4]: 1 - 0.5 - 2 * 0.4 = -0.3 < 0 -> token 0 wins the argmax.
    row = SampleInput(p, [4, 4, 4], num_prompt_tokens=1)
    assert sample_batch(logits, [row])[0] == [0]
    row = SampleInput(SamplingParams(temperature=0, presence_penalty=0.5), [4, 4, 4], 1)
    assert sample_batch(logits, [row])[0] == [4]  # 1 - 0.5 still beats 0


def test_banned_tokens_are_never_drawn():
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=2.0)):
        row = SampleInput(params, [], 0, gen, banned=[1])
        assert all(sample_batch(logits, [row])[0] != [1] for _ in range(20))


def test_logprobs_are_the_raw_distribution():
    logits = torch.randn(2, 30)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)]
    tokens, lps = sample_batch(logits, rows(*params))
    expected = logits[0].log_softmax(-1)
    assert lps[1] is None and len(lps[0]) == 3  # the argmax is also in the top 3
    top = expected.topk(3)
    for tok, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
        assert lps[0][tok] == pytest.approx(value, abs=1e-6)
    assert tokens[0] == int(top.indices[0])


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=1.0, seed=3)

    def draw(order):
        gens = [torch.Generator().manual_seed(3 if i == 0 else 100 + i) for i in order]
        inputs = [SampleInput(p, [], 0, g) for g in gens]
        return sample_batch(logits[order], inputs)[0][order.index(0)]

    assert draw([0]) == draw([2, 1, 0]) == draw([1, 0])


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(3000, 1)
    tokens, _ = sample_batch(logits, rows(*[SamplingParams(temperature=1.0)] * 3000))
    freq = torch.bincount(torch.tensor(tokens), minlength=3) / 3000
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.04, rtol=0)


# ---- through the engine ----------------------------------------------------------------


def test_seeded_sampling_same_alone_and_in_a_busy_batch(tiny_llm):
    llm = tiny_llm("qwen2", max_num_batched_tokens=12, block_size=4)
    prompt = prompts_of_lengths([10], seed=7)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].outputs[0]
    others = prompts_of_lengths([3, 25, 7, 14, 30], seed=8)
    params = [SamplingParams(temperature=1.2, max_tokens=20, ignore_eos=True)] * 2
    params += [SamplingParams(temperature=0.7, seed=s, max_tokens=9) for s in (1, 2, 3)]
    busy = llm.generate([*others[:3], prompt, *others[3:]], [*params[:3], seeded, *params[3:]])
    assert busy[3].outputs[0].token_ids == alone.token_ids
    assert busy[3].outputs[0].text == alone.text


def test_n_samples_are_seeded_one_by_one(tiny_llm):
    llm = tiny_llm("llama")
    prompt = prompts_of_lengths([6], seed=9)[0]
    both = llm.generate([prompt], SamplingParams(n=2, seed=5, max_tokens=10, ignore_eos=True))
    outs = both[0].outputs
    assert [o.index for o in outs] == [0, 1] and outs[0].token_ids != outs[1].token_ids
    second = llm.generate([prompt], SamplingParams(seed=6, max_tokens=10, ignore_eos=True))
    assert second[0].outputs[0].token_ids == outs[1].token_ids


def test_stop_tokens_min_tokens_and_stop_strings(tiny_llm):
    llm = tiny_llm("llama")
    prompt = prompts_of_lengths([8], seed=10)[0]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = llm.generate([prompt], greedy)[0].outputs[0]
    first = ref.token_ids[0]
    stopped = llm.generate([prompt], SamplingParams(temperature=0, stop_token_ids=[first]))
    assert stopped[0].outputs[0].token_ids == [] and stopped[0].outputs[0].finish_reason == "stop"
    held = SamplingParams(temperature=0, stop_token_ids=[first], min_tokens=3, max_tokens=5)
    out = llm.generate([prompt], held)[0].outputs[0]
    assert first not in out.token_ids[:3] and len(out.token_ids) >= 3
    text = ref.text
    cut = text[len(text) // 2 : len(text) // 2 + 2]
    if cut.strip():
        by_text = llm.generate([prompt], SamplingParams(**{**vars(greedy), "stop": [cut]}))[0]
        assert by_text.outputs[0].text == text[: text.index(cut)]
        assert by_text.outputs[0].finish_reason == "stop"


def test_logprobs_and_prompt_logprobs_match_a_full_forward(tiny_llm):
    llm = tiny_llm("qwen3", max_num_batched_tokens=8, block_size=4)
    prompt = prompts_of_lengths([13], seed=11)[0]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=1)
    out = llm.generate([prompt], params)[0]
    ids = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        full = llm.engine.model(torch.tensor([ids]))[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        lp = out.prompt_logprobs[pos]
        assert lp[ids[pos]] == pytest.approx(float(full[pos - 1, ids[pos]]), abs=1e-4)
        assert len(lp) <= 2
    for i, lp in enumerate(out.outputs[0].logprobs):
        pos = len(prompt) + i
        assert lp[ids[pos]] == pytest.approx(float(full[pos - 1, ids[pos]]), abs=1e-4)
        assert lp[ids[pos]] == pytest.approx(max(lp.values()))  # greedy picks the best


def test_context_limit_ends_with_length(tiny_llm):
    llm = tiny_llm("llama")  # max_position_embeddings 256
    prompt = prompts_of_lengths([250], seed=12)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6 and out[0].outputs[0].finish_reason == "length"
