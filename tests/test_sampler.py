"""Sampler and incremental detokenizer: filtering, penalties, seeds, stop strings."""

from __future__ import annotations

import pytest
import torch

from tunelab.engine.detokenizer import TextStream
from tunelab.engine.sampler import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
    sample_next,
)
from tunelab.errors import TunelabError


def test_greedy_picks_argmax_and_ignores_seed():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0)] * 2
    assert sample_next(logits, params, [[], []], [None, None]) == [1, 0]


def test_top_k_keeps_k_best():
    out = filter_top_k_top_p(torch.tensor([1.0, 4.0, 3.0, 2.0]), top_k=2, top_p=1.0)
    assert torch.isinf(out[[0, 3]]).all() and torch.isfinite(out[[1, 2]]).all()


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=0.7))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=0.1))
    assert kept.tolist() == [True, False, False, False]  # the best token always survives


def test_repetition_penalty_matches_ctrl_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_seeded_sampling_is_reproducible_and_batch_independent():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    other = SamplingParams(temperature=1.0, seed=99)

    def draw(rows, params):
        gens = [pp.make_generator(torch.device("cpu")) for pp in params]
        return [sample_next(logits[rows], params, [[]] * len(rows), gens) for _ in range(5)]

    alone = [step[0] for step in draw([0], [p])]
    in_batch = [step[1] for step in draw([1, 0], [other, p])]
    assert alone == in_batch


def test_sampling_follows_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = SamplingParams(seed=0).make_generator(torch.device("cpu"))
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[sample_next(logits, [SamplingParams()], [[]], [gen])[0]] += 1
    torch.testing.assert_close(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -1},
        {"max_tokens": 0},
        {"stop": [""]},
        {"repetition_penalty": 0},
    ],
)
def test_invalid_params_name_the_field(kwargs):
    with pytest.raises(TunelabError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


class CharTokenizer:
    """One token per character; ids >= 1000 are multi-byte halves decoding to U+FFFD alone."""

    def decode(self, ids, skip_special_tokens=True):
        text, i = "", 0
        while i < len(ids):
            if ids[i] == 1000:  # first half of "é"
                if i + 1 < len(ids) and ids[i + 1] == 1001:
                    text, i = text + "é", i + 2
                    continue
                text += "\ufffd"
            else:
                text += chr(ids[i])
            i += 1
        return text


def feed(stream: TextStream, text: str) -> list[str]:
    out = []
    for ch in text:
        out.append(stream.add(ord(ch)))
        if stream.stopped:
            break
    return out


def test_stop_string_across_tokens_is_never_shown():
    stream = TextStream(CharTokenizer(), stop=["END"])
    deltas = feed(stream, "abcENxEND tail")
    shown = "".join(deltas)
    assert stream.stopped and shown == "abcENx" and stream.text == "abcENx"
    assert deltas[3:5] == ["", ""]  # "E", "N" held back until "x" proves they are not a stop


def test_no_stop_flushes_held_text_at_finish():
    stream = TextStream(CharTokenizer(), stop=["ENDX"])
    shown = "".join(feed(stream, "abEND")) + stream.finish()
    assert shown == "abEND" and not stream.stopped


def test_earliest_of_several_stops_wins():
    stream = TextStream(CharTokenizer(), stop=["zz", "b"])
    assert "".join(feed(stream, "abzz")) == "a"


def test_incomplete_utf8_is_held_back():
    stream = TextStream(CharTokenizer())
    assert stream.add(ord("a")) == "a"
    assert stream.add(1000) == ""
    assert stream.add(1001) == "é"
