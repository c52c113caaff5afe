"""The order of micro-batches in each epoch, derived only from (seed, epoch).

Because the plan is a pure function of the seed and the epoch, a checkpoint only stores
(epoch, micro-batches consumed) and a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tunelab.data.packing import (
    PackedBatch,
    collate_packed,
    collate_padded,
    document_mask,
    length_grouped_order,
    pack_greedy,
)
from tunelab.data.templates import Encoded
from tunelab.models.attention import CAUSAL, DenseAttention, build_mask


@dataclass
class BatchPlan:
    """Micro-batches of example indices for one dataset (rows of a packed batch are bins)."""

    examples: list[Encoded]
    batch_size: int
    max_length: int
    packing: bool
    pad_id: int
    seed: int

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """Micro-batches for ``epoch``: each a list of rows, each row a list of example ids."""
        lengths = [len(e.input_ids) for e in self.examples]
        if self.packing:
            rows = pack_greedy(lengths, self.max_length)
            random.Random(self.seed * 1000 + epoch).shuffle(rows)
        else:
            order = length_grouped_order(lengths, self.batch_size, self.seed * 1000 + epoch)
            rows = [[i] for i in order]
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def collate(self, micro_batch: list[list[int]]) -> PackedBatch:
        if self.packing:
            return collate_packed(self.examples, micro_batch, self.max_length, self.pad_id)
        return collate_padded([self.examples[row[0]] for row in micro_batch], self.pad_id, 8)

    def micro_batches_per_epoch(self) -> int:
        return len(self.epoch(0))

    def iterate(self, start_epoch: int, start_batch: int) -> Iterator[tuple[int, int, PackedBatch]]:
        """Endless (epoch, index in epoch, batch) from a resume point."""
        epoch, index = start_epoch, start_batch
        while True:
            batches = self.epoch(epoch)
            for i in range(index, len(batches)):
                yield epoch, i, self.collate(batches[i])
            epoch, index = epoch + 1, 0


def attention_for(batch: PackedBatch, windows: set[int | None], packed: bool) -> DenseAttention:
    """Causal attention for padded rows (right padding never leaks backwards); a document
    mask for packed rows, so no token attends across examples."""
    if not packed and windows == {None}:
        return DenseAttention({None: CAUSAL})
    masks = {}
    doc = document_mask(batch.position_ids) if packed else None
    length = batch.input_ids.shape[1]
    slots = torch.arange(length, device=batch.input_ids.device).expand_as(batch.input_ids)
    for w in windows:
        base = build_mask(slots, None, length, w) if w is not None else None
        if doc is None:
            masks[w] = base if base is not None else CAUSAL
        else:
            masks[w] = doc if base is None else doc & base
    return DenseAttention(masks)


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry a loss (after the shift: position t predicts labels[t + 1])."""
    return int((labels[:, 1:] != -100).sum())


def to_encoded(dataset) -> list[Encoded]:
    """Arrow rows (input_ids, labels) -> Encoded, kept in memory for fast collation."""
    return [
        Encoded(ids, labels)
        for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True)
    ]
