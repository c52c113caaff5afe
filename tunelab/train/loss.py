"""Chunked cross-entropy: the loss without ever holding the full (tokens x vocab) logits.

Only positions with a target are projected through ``lm_head`` (SFT masks most prompt
tokens), in chunks; each chunk is checkpointed so its logits are recomputed in backward
instead of stored. Peak extra memory is one chunk of logits instead of B x T x vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shifted_targets(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts labels[t + 1]: (M, hidden) states and (M,) targets, ignored dropped."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    return h[keep], y[keep]


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).float()  # upcast for a stable softmax, like HF
    return F.cross_entropy(logits, y, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 2048,
) -> tuple[torch.Tensor, int]:
    """Sum of token losses and the number of target tokens (normalise across micro-batches).

    hidden: (B, T, H) final hidden states; labels: (B, T) aligned with the inputs (HF style:
    the shift happens here), IGNORE_INDEX where nothing is trained.
    """
    h, y = shifted_targets(hidden, labels)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph (and DDP) happy on an all-masked batch
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        hc, yc = h[start : start + chunk_tokens], y[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, hc, lm_head_weight, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(hc, lm_head_weight, yc)
    return total, n
