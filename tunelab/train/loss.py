"""Fused linear + cross-entropy: the loss without ever holding the full (tokens x vocab) logits.

Only positions with a target go through ``lm_head`` (SFT masks most prompt tokens), in
chunks. For each chunk the forward pass also computes the gradient of the loss with respect
to the hidden states (and to the head weight when it trains), so backward only scales those
stored gradients: no logits are kept and none are recomputed (Liger-Kernel's idea, in plain
PyTorch). Peak extra memory is one chunk of logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class OutputHead:
    """How hidden states become logits: ``softcap(scale * (h @ W^T + b))``.

    Our decoder is the plain ``h @ W^T``; architectures trained through transformers may add
    a bias, a logit scale (Cohere: ``logit_scale``, Granite: ``1 / logits_scaling``) or a
    final soft-capping ``c * tanh(z / c)`` (Gemma 2/3: ``final_logit_softcapping``).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full fp32 logits (for checks and tests; training never builds them)."""
        logits = F.linear(hidden, self.weight, self.bias).float()
        return _transform(logits, self.scale, self.softcap)[0]


def _transform(
    logits32: torch.Tensor, scale: float, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(transformed logits, d transformed / d logits): the factor that turns the gradient
    with respect to the final logits into the one with respect to ``h @ W^T + b``."""
    z = logits32 * scale if scale != 1.0 else logits32
    if softcap is None:
        return z, scale
    t = torch.tanh(z / softcap)
    return t * softcap, (1.0 - t * t) * scale


def shifted_targets(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts labels[t + 1]: (M, hidden) states and (M,) targets, ignored dropped."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != IGNORE_INDEX
    return h[keep], y[keep]


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(head(h_i), y_i), with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk_tokens: int, scale: float, softcap: float | None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        total = h.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start in range(0, h.shape[0], chunk_tokens):
            hc, yc = h[start : start + chunk_tokens], y[start : start + chunk_tokens]
            logits = F.linear(hc, weight, bias)  # autocast picks the matmul dtype, as in HF
            logits32, dz = _transform(logits.float(), scale, softcap)  # stable softmax in fp32
            target = logits32.gather(1, yc[:, None]).squeeze(1)
            # logsumexp and softmax from one exp, in place (one chunk-sized buffer in all).
            top = logits32.amax(dim=-1, keepdim=True)
            probs = logits32.sub_(top)  # logits are not needed after this
            if probs.device.type == "cpu":
                # exp below -87 gives fp32 denormals, which x86 computes ~50x slower; they
                # are < 1.7e-38, far below what a softmax or its gradient can resolve.
                probs.clamp_(min=-87.0)
            sums = probs.exp_().sum(dim=-1, keepdim=True)
            lse = (top + sums.log()).squeeze(1)
            total += (lse - target).sum()
            if need_h or need_w or need_b:
                dlogits = probs.div_(sums)  # softmax
                dlogits[torch.arange(yc.numel(), device=yc.device), yc] -= 1.0
                if not (isinstance(dz, float) and dz == 1.0):
                    dlogits *= dz  # chain rule through the scale / soft-cap
                dlogits = dlogits.to(logits.dtype)
                if need_h:
                    grad_h[start : start + chunk_tokens] = (dlogits @ weight.to(logits.dtype)).to(
                        h.dtype
                    )
                if need_w:
                    grad_w += (dlogits.t() @ hc.to(logits.dtype)).float()
                if need_b:
                    grad_b += dlogits.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(ctx.bias_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.Tensor | OutputHead,
    labels: torch.Tensor,
    chunk_tokens: int = 2048,
) -> tuple[torch.Tensor, int]:
    """Sum of token losses and the number of target tokens (normalise across micro-batches).

    hidden: (B, T, H) final hidden states; head: the ``lm_head`` weight, or an ``OutputHead``
    with bias / scale / soft-cap; labels: (B, T) aligned with the inputs (HF style: the shift
    happens here), IGNORE_INDEX where nothing is trained.
    """
    if isinstance(head, torch.Tensor):
        head = OutputHead(head)
    h, y = shifted_targets(hidden, labels)
    n = int(y.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph (and DDP) happy on an all-masked batch
    args = (h, head.weight, head.bias, y, chunk_tokens, head.scale, head.softcap)
    if not torch.is_grad_enabled():
        return _LinearCrossEntropy.forward(_NoGrad(), *args), n
    return _LinearCrossEntropy.apply(*args), n


class _NoGrad:
    """A stand-in ctx for evaluation: no gradients wanted, nothing saved."""

    needs_input_grad = (False,) * 7

    def save_for_backward(self, *tensors):
        pass
