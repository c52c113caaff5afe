"""Batching encoded examples: bin packing, padding, padding-free rows, length grouping.

Every collate returns a ``PackedBatch`` with the same conventions:

- **Segments.** A row holds one or more documents (examples) followed, when the row is not
  full, by one padding segment. ``position_ids`` restart at 0 at every segment (padding too),
  so segment boundaries can be read from ``position_ids == 0`` (HF's padding-free convention).
- ``seq_lens[r]`` are the *document* lengths of row r (padding excluded); ``cu_seqlens`` are
  the varlen-attention boundaries over the flattened (B * L) batch *including* each padding
  segment, so ``cu_seqlens[-1] == B * L`` and it indexes the flattened tensors directly.
- **Labels are aligned with input_ids** (HF convention; the trainer shifts: position t predicts
  ``labels[t + 1]``). ``IGNORE_INDEX`` on padding, and on the *first token of every document*:
  in a packed row the last token of document A would otherwise be trained to predict the first
  token of document B. (At a row start that label is never used by the shifted loss anyway.)
- ``document_mask`` gives the (B, 1, L, L) causal, same-segment boolean mask for SDPA.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tunelab.data.templates import IGNORE_INDEX, Encoded


@dataclass
class PackedBatch:
    """Input ids, aligned labels, per-document position ids and boundaries of one batch."""

    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, IGNORE_INDEX on padding and each document's first token
    position_ids: torch.Tensor  # (B, L) long, restarting at 0 per segment
    seq_lens: list[list[int]]  # per row: document lengths, padding excluded
    cu_seqlens: torch.Tensor  # (S + 1,) int32 over the flattened batch, padding segments included
    max_seqlen: int  # the longest segment (flash-attention varlen argument)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return sum(sum(r) for r in self.seq_lens)

    def to(self, device: torch.device | str) -> PackedBatch:
        t = {k: getattr(self, k).to(device) for k in ("input_ids", "labels", "position_ids")}
        cu = self.cu_seqlens.to(device)
        return PackedBatch(**t, seq_lens=self.seq_lens, cu_seqlens=cu, max_seqlen=self.max_seqlen)


def pack_greedy(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of example indices into rows of ``max_length`` tokens.

    Deterministic; O(n log n) with a max-segment-tree over bins' free space. Each bin lists its
    indices in ascending order. Lengths must be in [1, max_length] (truncate first).
    """
    bad = [n for n in lengths if not 0 < n <= max_length]
    if bad:
        raise ValueError(f"example lengths must be in [1, {max_length}], got {bad[:3]}")
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * size + [max_length] * size  # leaves: free space of bin j (unopened = full)
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        node = 1
        while node < size:  # descend to the leftmost bin with room: first fit
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        j = node - size
        if j == len(bins):
            bins.append([])
        bins[j].append(i)
        free[node] -= lengths[i]
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return [sorted(b) for b in bins]


def packing_efficiency(lengths: list[int], bins: list[list[int]], max_length: int) -> float:
    """Real tokens / (rows * max_length), in (0, 1]; 0.0 when there are no rows."""
    if not bins:
        return 0.0
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * max_length)


def collate_packed(
    examples: list[Encoded], bins: list[list[int]], max_length: int, pad_id: int
) -> PackedBatch:
    """One row of exactly ``max_length`` tokens per bin (static shapes), documents in bin order."""
    return _collate([[examples[i] for i in b] for b in bins], max_length, pad_id)


def collate_padded(
    examples: list[Encoded], pad_id: int, pad_to_multiple_of: int | None = None
) -> PackedBatch:
    """One example per row, right-padded to the longest (rounded up to a multiple)."""
    longest = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return _collate([[e] for e in examples], longest, pad_id)


def padding_free(examples: list[Encoded]) -> PackedBatch:
    """All examples concatenated into one row (B = 1) with document boundaries; no padding."""
    total = sum(len(e.input_ids) for e in examples)
    return _collate([examples], total, pad_id=0)


def _collate(rows: list[list[Encoded]], length: int, pad_id: int) -> PackedBatch:
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    seq_lens: list[list[int]] = []
    segments: list[int] = []  # all segment lengths over the flattened batch
    for r, docs in enumerate(rows):
        pos = 0
        for e in docs:
            k = len(e.input_ids)
            if pos + k > length:
                raise ValueError(f"row {r} holds more than {length} tokens")
            input_ids[r, pos : pos + k] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[r, pos + 1 : pos + k] = torch.tensor(e.labels[1:], dtype=torch.long)
            position_ids[r, pos : pos + k] = torch.arange(k)
            pos += k
        position_ids[r, pos:] = torch.arange(length - pos)
        seq_lens.append([len(e.input_ids) for e in docs])
        segments += seq_lens[-1] + ([length - pos] if pos < length else [])
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(segments, dtype=torch.int64), 0)
    return PackedBatch(input_ids, labels, position_ids, seq_lens, cu, max(segments, default=0))


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) index of each token's segment within its row (a segment starts at position 0)."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: query t may attend key s iff s <= t and both are in the same segment.

    Built from ``position_ids`` (segments restart at 0), so it works for every collate here.
    Every query sees at least itself, so SDPA never gets an all-masked row.
    """
    seg = segment_ids(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def length_grouped_order(
    lengths: list[int], batch_size: int, seed: int, mega_batches: int = 50
) -> list[int]:
    """A shuffled order where consecutive ``batch_size`` chunks have similar lengths.

    Indices are shuffled, cut into mega-batches of ``batch_size * mega_batches`` and each is
    sorted by length (longest first), so padded batches waste little while the order stays
    random across mega-batches. The batch holding the longest example goes first so an
    out-of-memory error shows up at step one, not hours later.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    mega = max(1, batch_size * mega_batches)
    order = [
        i
        for start in range(0, len(order), mega)
        for i in sorted(order[start : start + mega], key=lambda k: -lengths[k])
    ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), max(1, batch_size))]
    if batches:
        top = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[top] = batches[top], batches[0]
    return [i for b in batches for i in b]
