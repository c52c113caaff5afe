"""Batched multi-adapter LoRA linear: one base weight, many adapters, one step.

Every targeted ``nn.Linear`` of the decoder is replaced by a ``MultiLoraLinear`` that keeps
the base weight and bias (the same Parameters, never modified) and holds every loaded
adapter's A and B stacked by slot, zero-padded to the largest rank. Before each step the
engine describes which rows of the flattened (T, hidden) batch use which slot
(``LoraStep``); the forward adds ``(x[rows] @ A[slot]^T @ B[slot]^T) * scaling[slot]`` to
those rows of the base output, one group per slot present. A step without adapter tokens
costs only the base linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.engine.cpu_linear import linear as base_linear

Rows = slice | torch.Tensor  # a contiguous range of rows, or their indices (int64)


@dataclass
class LoraStep:
    """The adapter groups of the step being run: ``(slot, rows)`` pairs; empty = base only."""

    groups: list[tuple[int, Rows]] = field(default_factory=list)

    def set(self, token_slots: list[int], device: torch.device) -> None:
        """Group the step's tokens by slot (-1 = no adapter) from their per-token slots."""
        ranges: dict[int, list[list[int]]] = {}
        for row, slot in enumerate(token_slots):
            if slot < 0:
                continue
            spans = ranges.setdefault(slot, [])
            if spans and spans[-1][1] == row:
                spans[-1][1] = row + 1
            else:
                spans.append([row, row + 1])
        self.groups = []
        for slot, spans in ranges.items():
            if len(spans) == 1:  # contiguous: a slice needs no gather or scatter
                rows: Rows = slice(*spans[0])
            else:
                ids = [r for a, b in spans for r in range(a, b)]
                rows = torch.tensor(ids, dtype=torch.int64, device=device)
            self.groups.append((slot, rows))

    def clear(self) -> None:
        self.groups = []


class MultiLoraLinear(nn.Linear):
    """A linear layer that adds the LoRA update of each row's adapter slot.

    It adopts the base layer's ``weight`` and ``bias`` Parameters (no copy), so module names,
    ``state_dict`` keys and anything reading ``.weight`` see the base layer unchanged.
    """

    def __init__(self, base: nn.Linear, step: LoraStep):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.packed = getattr(base, "packed", None)  # a PackedLinear's packed weight (CPU bf16)
        self.step = step
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        # (slots, rank, in) and (slots, out, rank); not in state_dict (they are not the model's)
        self.register_buffer("lora_a", torch.zeros(0, 0, self.in_features, **kw), False)
        self.register_buffer("lora_b", torch.zeros(0, self.out_features, 0, **kw), False)
        self.scaling: list[float | None] = []  # per slot; None: the adapter skips this layer

    def extra_repr(self) -> str:
        loaded = sum(s is not None for s in self.scaling)
        return f"{super().extra_repr()}, adapters={loaded}, rank={self.lora_a.shape[1]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = base_linear(x, self)
        groups = self.step.groups
        if not groups:
            return out
        x2, out2 = x.reshape(-1, self.in_features), out.view(-1, self.out_features)
        for slot, rows in groups:
            scaling = self.scaling[slot] if slot < len(self.scaling) else None
            if scaling is None:
                continue
            # out[rows] += scaling * (x[rows] @ A^T) @ B^T, the scaling and the addition fused
            # into one op (PEFT's order: lora_B(lora_A(x)) * scaling, then added).
            h = x2[rows] @ self.lora_a[slot].T
            if isinstance(rows, slice):
                out2[rows].addmm_(h, self.lora_b[slot].T, alpha=scaling)
            else:
                out2.index_add_(0, rows, h @ self.lora_b[slot].T, alpha=scaling)
        return out

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Put an adapter's A (r, in) and B (out, r) in ``slot``, growing the stacks as needed."""
        rank = max(self.lora_a.shape[1], a.shape[0])
        slots = max(self.lora_a.shape[0], slot + 1)
        if (slots, rank) != tuple(self.lora_a.shape[:2]):
            grow_a = (0, 0, 0, rank - self.lora_a.shape[1], 0, slots - self.lora_a.shape[0])
            grow_b = (0, rank - self.lora_b.shape[2], 0, 0, 0, slots - self.lora_b.shape[0])
            self.lora_a = F.pad(self.lora_a, grow_a)  # zero rows/columns: no contribution
            self.lora_b = F.pad(self.lora_b, grow_b)
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, : a.shape[0]] = a.to(self.lora_a.dtype)
        self.lora_b[slot, :, : b.shape[1]] = b.to(self.lora_b.dtype)
        self.scaling += [None] * (slots - len(self.scaling))
        self.scaling[slot] = scaling

    def clear_slot(self, slot: int) -> None:
        """Drop the adapter in ``slot`` from this layer."""
        if slot < len(self.scaling):
            self.scaling[slot] = None
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
