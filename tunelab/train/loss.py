"""Fused linear + cross-entropy: the loss without ever holding the full (tokens x vocab) logits.

Only positions with a target go through ``lm_head`` (SFT masks most prompt tokens), in
chunks. For each chunk the forward pass also computes the gradient of the loss with respect
to the hidden states (and to the head weight when it trains), so backward only scales those
stored gradients: no logits are kept and none are recomputed (Liger-Kernel's idea, in plain
PyTorch). Peak extra memory is one chunk of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_targets(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts labels[t + 1]: (M, hidden) states and (M,) targets, ignored dropped."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    return h[keep], y[keep]


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i), with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk_tokens: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = h.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for start in range(0, h.shape[0], chunk_tokens):
            hc, yc = h[start : start + chunk_tokens], y[start : start + chunk_tokens]
            logits = F.linear(hc, weight)  # autocast picks the matmul dtype, as in HF
            logits32 = logits.float()  # a stable softmax in fp32
            lse = torch.logsumexp(logits32, dim=-1)
            total += (lse - logits32.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                dlogits = torch.exp(logits32 - lse[:, None])  # softmax
                dlogits[torch.arange(yc.numel(), device=yc.device), yc] -= 1.0
                dlogits = dlogits.to(logits.dtype)
                if need_h:
                    grad_h[start : start + chunk_tokens] = (dlogits @ weight.to(logits.dtype)).to(
                        h.dtype
                    )
                if need_w:
                    grad_w += (dlogits.t() @ hc.to(logits.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None


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
    if not torch.is_grad_enabled():
        return _LinearCrossEntropy.forward(_NoGrad(), h, lm_head_weight, y, chunk_tokens), n
    return _LinearCrossEntropy.apply(h, lm_head_weight, y, chunk_tokens), n


class _NoGrad:
    """A stand-in ctx for evaluation: no gradients wanted, nothing saved."""

    needs_input_grad = (False, False, False, False)

    def save_for_backward(self, *tensors):
        pass
