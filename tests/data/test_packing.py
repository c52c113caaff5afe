"""Packing and collation: property tests (hypothesis) over random example lengths and masks."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.data.packing import (
    PackedBatch,
    collate_packed,
    collate_padded,
    document_mask,
    length_grouped_order,
    pack_greedy,
    packing_efficiency,
    padding_free,
)
from tunelab.data.templates import IGNORE_INDEX, Encoded

PAD = 0
FAST = settings(max_examples=60, deadline=None)


def make_examples(specs: list[tuple[int, int]]) -> list[Encoded]:
    """Example k has ids k*1000 + j + 1 (unique, never PAD), a random mask from its seed."""
    out = []
    for k, (n, seed) in enumerate(specs):
        ids = [k * 1000 + j + 1 for j in range(n)]
        rng = random.Random(seed)
        out.append(Encoded(ids, [x if rng.random() < 0.6 else IGNORE_INDEX for x in ids]))
    return out


example_specs = st.lists(
    st.tuples(st.integers(1, 40), st.integers(0, 2**16)), min_size=1, max_size=25
)


def reference_ffd(lengths: list[int], max_length: int) -> list[list[int]]:
    """The textbook O(n * bins) first-fit decreasing."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        j = next((j for j, f in enumerate(free) if f >= lengths[i]), None)
        if j is None:
            bins.append([])
            free.append(max_length)
            j = len(bins) - 1
        bins[j].append(i)
        free[j] -= lengths[i]
    return [sorted(b) for b in bins]


def check_batch(batch: PackedBatch, rows: list[list[Encoded]], length: int) -> None:
    """Every invariant shared by the collates, against the examples each row should hold."""
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape
    assert batch.input_ids.shape == (len(rows), length)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.long
    segments, doc_of = [], torch.full((len(rows), length), -1)
    for r, docs in enumerate(rows):
        ids, labels = batch.input_ids[r].tolist(), batch.labels[r].tolist()
        pos = batch.position_ids[r].tolist()
        at = 0
        for d, e in enumerate(docs):
            n = len(e.input_ids)
            assert ids[at : at + n] == e.input_ids  # no token lost, duplicated or moved
            # Aligned labels; the first token of a document is never a target (shifted view).
            assert labels[at : at + n] == [IGNORE_INDEX, *e.labels[1:]]
            assert pos[at : at + n] == list(range(n))  # position ids restart per example
            doc_of[r, at : at + n] = d
            at += n
        pad = length - at
        assert ids[at:] == [PAD] * pad and labels[at:] == [IGNORE_INDEX] * pad
        assert pos[at:] == list(range(pad))  # padding is its own segment
        doc_of[r, at:] = len(docs)
        assert batch.seq_lens[r] == [len(e.input_ids) for e in docs]
        segments += batch.seq_lens[r] + ([pad] if pad else [])
    cu = [0, *itertools.accumulate(segments)]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == cu
    assert cu[-1] == len(rows) * length
    assert batch.max_seqlen == max(segments)
    assert batch.num_tokens == sum(len(e.input_ids) for docs in rows for e in docs)
    check_shifted_targets(batch, doc_of)
    check_document_mask(batch, doc_of)


def check_shifted_targets(batch: PackedBatch, doc_of: torch.Tensor) -> None:
    """Position t predicts labels[t + 1]: a target always comes from t's own document."""
    target = batch.labels[:, 1:] != IGNORE_INDEX
    same_doc = doc_of[:, 1:] == doc_of[:, :-1]
    assert bool((same_doc | ~target).all())


def check_document_mask(batch: PackedBatch, doc_of: torch.Tensor) -> None:
    mask = document_mask(batch.position_ids)
    n, length = doc_of.shape
    assert mask.shape == (n, 1, length, length) and mask.dtype == torch.bool
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    expected = (doc_of[:, :, None] == doc_of[:, None, :]) & (k <= q)
    assert torch.equal(mask[:, 0], expected)  # causal and never across documents
    assert bool(mask[:, 0].diagonal(dim1=-2, dim2=-1).all())  # no all-masked query row


@FAST
@given(st.lists(st.integers(1, 64), max_size=60), st.integers(64, 200))
def test_pack_greedy_is_first_fit_decreasing(lengths, max_length):
    bins = pack_greedy(lengths, max_length)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins)
    assert bins == reference_ffd(lengths, max_length)
    if lengths:
        eff = packing_efficiency(lengths, bins, max_length)
        assert 0 < eff <= 1
        assert eff == pytest.approx(sum(lengths) / (len(bins) * max_length))
        # First fit: no two rows could have been merged (so rows < 2 * optimum).
        totals = [sum(lengths[i] for i in b) for b in bins]
        assert all(x + y > max_length for x, y in itertools.combinations(totals, 2))


@FAST
@given(example_specs, st.integers(40, 120))
def test_collate_packed(specs, max_length):
    examples = make_examples(specs)
    bins = pack_greedy([len(e.input_ids) for e in examples], max_length)
    batch = collate_packed(examples, bins, max_length, PAD)
    check_batch(batch, [[examples[i] for i in b] for b in bins], max_length)
    assert sorted(x for x in batch.input_ids.flatten().tolist() if x != PAD) == sorted(
        x for e in examples for x in e.input_ids
    )


@FAST
@given(example_specs, st.sampled_from([None, 1, 8, 16]))
def test_collate_padded(specs, multiple):
    examples = make_examples(specs)
    batch = collate_padded(examples, PAD, pad_to_multiple_of=multiple)
    longest = max(len(e.input_ids) for e in examples)
    length = batch.input_ids.shape[1]
    assert length >= longest and length - longest < (multiple or 1)
    assert length % (multiple or 1) == 0
    check_batch(batch, [[e] for e in examples], length)


@FAST
@given(example_specs)
def test_padding_free(specs):
    examples = make_examples(specs)
    batch = padding_free(examples)
    total = sum(len(e.input_ids) for e in examples)
    check_batch(batch, [examples], total)
    assert batch.cu_seqlens.tolist() == [
        0,
        *itertools.accumulate(len(e.input_ids) for e in examples),
    ]


@FAST
@given(st.lists(st.integers(1, 500), max_size=300), st.integers(1, 8), st.integers(0, 99))
def test_length_grouped_order(lengths, batch_size, seed):
    order = length_grouped_order(lengths, batch_size, seed)
    assert sorted(order) == list(range(len(lengths)))
    assert order == length_grouped_order(lengths, batch_size, seed)
    if lengths:
        assert max(lengths) in [lengths[i] for i in order[:batch_size]]


def test_length_grouping_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.randint(1, 1000) for _ in range(2000)]

    def padded(order: list[int], bs: int = 8) -> int:
        chunks = [order[i : i + bs] for i in range(0, len(order), bs)]
        return sum(max(lengths[i] for i in c) * len(c) for c in chunks)

    shuffled = list(range(len(lengths)))
    random.Random(1).shuffle(shuffled)
    grouped = length_grouped_order(lengths, 8, seed=1)
    assert padded(grouped) < 0.6 * padded(shuffled)
    assert grouped != length_grouped_order(lengths, 8, seed=2)


def test_pack_greedy_rejects_untruncated_examples():
    with pytest.raises(ValueError, match="lengths"):
        pack_greedy([10, 300], 256)
    with pytest.raises(ValueError, match="lengths"):
        pack_greedy([0], 256)
    assert pack_greedy([], 256) == []
    assert packing_efficiency([], [], 256) == 0.0


def test_collate_packed_rejects_overfull_bin():
    examples = make_examples([(30, 0), (30, 1)])
    with pytest.raises(ValueError, match="more than 40"):
        collate_packed(examples, [[0, 1]], 40, PAD)


def test_document_mask_with_sdpa_matches_separate_documents():
    """Packed attention through the mask equals attending each document on its own."""
    examples = make_examples([(5, 0), (3, 1), (6, 2)])
    batch = collate_packed(examples, [[0, 1], [2]], 10, PAD)
    mask = document_mask(batch.position_ids)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 4) for _ in range(3))
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not packed.isnan().any()
    for r, start, n in ((0, 0, 5), (0, 5, 3), (1, 0, 6)):
        sl = slice(start, start + n)
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[r : r + 1, :, sl], k[r : r + 1, :, sl], v[r : r + 1, :, sl], is_causal=True
        )
        torch.testing.assert_close(packed[r : r + 1, :, sl], alone)
