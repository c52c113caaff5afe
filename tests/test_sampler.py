"""Sampler and incremental detokenizer: filtering, penalties, seeds, stop strings."""

from __future__ import annotations

import pytest
import torch

from tunelab.engine.detokenizer import TextStream
from tunelab.engine.sampler import (
    SampleInput,
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
    sample_batch,
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


def test_a_row_without_top_p_samples_the_same_next_to_one_with_it():
    """A top_p=1.0 row keeps its whole tail when another row of the step uses top_p: in fp32
    the rule `cumsum - p >= 1.0` would cut the tail once the running sum rounds to 1."""
    vocab = 151936
    logits = torch.full((vocab,), -17.0)
    logits[0] = 0.0  # one likely token, ~0.4% of the mass in a flat tail
    nucleus = SamplingParams(temperature=1.0, top_p=0.9, seed=99)
    for seed in (1031, 6113, 6982, *range(20)):  # the first three differed before the fix
        plain = SamplingParams(temperature=1.0, seed=seed)

        def draw(params):
            rows = [SampleInput(pp, [], 0, pp.make_generator(torch.device("cpu"))) for pp in params]
            return sample_batch(logits.expand(len(params), -1), rows)[0]

        assert draw([plain])[0] == draw([plain, nucleus])[0], seed


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
        {"seed": 2**64 - 1, "n": 2},  # sample 1 would need seed 2**64
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


def _stream_text(tokenizer, ids: list[int], stop: list[str] | None = None) -> tuple[str, str]:
    stream = TextStream(tokenizer, stop)
    shown = ""
    for t in ids:
        shown += stream.add(t)
        if stream.stopped:
            break
    return shown + stream.finish(), stream.text


def test_incremental_decode_equals_full_decode_on_real_tokenizers(tiny_tokenizer):
    """Byte-level BPE split inside multi-byte characters, special tokens, long outputs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    text = "Grüße, 東京 ☃ naïve café — ok! " * 3 + "plain ascii tail"
    ids = tok.encode(text, add_special_tokens=False)
    ids = [*ids[:5], tok.eos_token_id, *ids[5:]]  # a special token inside is skipped
    expected = tok.decode(ids, skip_special_tokens=True)
    assert _stream_text(tok, ids) == (expected, expected)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # random ids: arbitrary byte sequences, incomplete characters
        ids = torch.randint(0, len(tok), (60,), generator=g).tolist()
        expected = tok.decode(ids, skip_special_tokens=True)
        assert _stream_text(tok, ids)[0] == expected


def test_stop_string_found_with_incremental_decode(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    ids = tok.encode("café one STOP two", add_special_tokens=False)
    shown, text = _stream_text(tok, ids, stop=["STOP"])
    assert shown == text == "café one "


def test_long_stream_decodes_a_window_not_the_whole_output():
    class Counting(CharTokenizer):
        decoded = 0

        def decode(self, ids, skip_special_tokens=True):
            Counting.decoded += len(ids)
            return super().decode(ids, skip_special_tokens)

    stream = TextStream(Counting())
    n = 2000
    out = "".join(stream.add(ord("a") + i % 26) for i in range(n)) + stream.finish()
    assert out == "".join(chr(ord("a") + i % 26) for i in range(n))
    assert Counting.decoded < 4 * n  # linear: a full re-decode per token would be n^2 / 2


def test_incremental_decode_keeps_sentencepiece_spaces():
    """A Metaspace (SentencePiece-style) decoder drops a window's leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = fast.encode("hello the lazy fox, over there", add_special_tokens=False)
    expected = fast.decode(ids, skip_special_tokens=True)
    assert " " in expected and _stream_text(fast, ids) == (expected, expected)


def test_stop_string_completed_by_held_tokens_is_cut_at_finish():
    """ "ab" then half a character: held back; generation ends there, the stop is still cut."""
    stream = TextStream(CharTokenizer(), stop=["b\ufffd"])
    assert stream.add(ord("a")) == "a"
    assert stream.add(ord("b")) == ""  # could be the start of the stop string
    assert stream.add(1000) == ""  # half of "é": waits for the next token
    assert stream.finish() == "" and stream.stopped and stream.text == "a"


class ByteTokenizer:
    """Byte-level tokens decoded like HF's (an incomplete UTF-8 sequence shows as U+FFFD)."""

    def __init__(self):
        self.vocab = {0: b"x", 1: b"STOP\xe3", 2: b"\x81\x82", 3: b"y"}

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def test_stop_string_before_half_a_character_stops_at_once():
    """A token that ends a stop string and starts a multi-byte character stops right away."""
    stream = TextStream(ByteTokenizer(), stop=["STOP"])
    assert stream.add(0) == "x"
    assert stream.add(1) == "" and stream.stopped and stream.text == "x"
    plain = TextStream(ByteTokenizer())  # no stop: the half character is still held back
    assert plain.add(1) == "" and plain.add(2) == "STOP\u3042"


def test_a_tiny_positive_temperature_samples_the_best_token_not_nan():
    torch.manual_seed(0)
    logits = torch.randn(2, 50) * 10
    best = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=t, seed=i) for i, t in enumerate((1e-40, 1e-300))]
    rows = [SampleInput(p, [], 0, p.make_generator(torch.device("cpu"))) for p in params]
    assert sample_batch(logits, rows)[0] == best
    gens = [p.make_generator(torch.device("cpu")) for p in params]
    assert sample_next(logits, params, [[], []], gens) == best
