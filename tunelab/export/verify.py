"""Logit checks for a merge: the merged model must compute what base + adapter computes.

Two checks, both on a few chat-templated prompts, as the max absolute logit difference over
every position and vocabulary entry:

1. **fp32 merge check** (every dtype): the merged model in fp32 against base + adapter
   (unmerged, fp32). The two compute the same function, so they may differ only by fp32
   rounding: tolerance ``FP32_RTOL`` x the largest |logit| (1e-4 relative; measured on
   SmolLM2-135M: 1e-4 absolute on logits up to 38, i.e. 3e-6 relative). A wrong target,
   scaling or transposition shows up as the adapter's whole effect, far above it.
2. **dtype check** (bf16 / fp16): the merged model in the target dtype against the same fp32
   reference. Half precision changes logits by itself, so the yardstick is the base model's
   own cast error: ``cast_error`` = max |base in dtype - base in fp32|, and the tolerance is
   ``HALF_CAST_FACTOR`` x that (never below check 1's). "The merged model is as faithful to
   base + adapter as the base in this dtype is to the base." Measured on SmolLM2-135M with
   random adapters: ratio 0.8-1.5 (bf16 cast error 1.6, fp16 0.17); factor 4 leaves margin
   for the noise of a max while an overflow or a lost adapter is far outside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunelab.models.decoder import Decoder

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a LoRA adapter is.",
)
FP32_RTOL = 1e-4
HALF_CAST_FACTOR = 4.0


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one user turn through the chat template (plain text without one)."""
    encoded = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            encoded.append(tokenizer(prompt)["input_ids"])
    return encoded


@torch.inference_mode()
def prompt_logits(model: Decoder, prompts: list[list[int]]) -> list[torch.Tensor]:
    """fp32 CPU logits of each prompt, run one at a time (no padding to account for)."""
    device = model.device
    logits = []
    for ids in prompts:
        out = model(torch.tensor([ids], device=device))
        logits.append(getattr(out, "logits", out)[0].float().cpu())  # transformers: an output
    return logits


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest |a - b| over all prompts; inf when either side is not finite."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            return float("inf")
        worst = max(worst, float((x - y).abs().max()))
    return worst


def fp32_tolerance(reference: list[torch.Tensor]) -> float:
    """``FP32_RTOL`` x the largest |logit| of the reference (at least 1)."""
    scale = max(float(t.abs().max()) for t in reference)
    return FP32_RTOL * max(1.0, scale)


def dtype_tolerance(dtype: torch.dtype, cast_error: float, fp32_tol: float) -> float:
    """Tolerance for the merged model in ``dtype``; see the module docstring."""
    if dtype == torch.float32:
        return fp32_tol
    return max(fp32_tol, HALF_CAST_FACTOR * cast_error)


def clone_in_dtype(model: Decoder, dtype: torch.dtype) -> Decoder:
    """A copy of a plain (LoRA-free) decoder with its weights cast to ``dtype``.

    Built like ``load_model`` (meta, assign, fresh RoPE table) so it computes exactly what the
    saved directory will compute when loaded in ``dtype``.
    """
    if not isinstance(model, Decoder):  # a transformers model (hf_fallback): cast its weights
        import copy

        clone = copy.deepcopy(model)
        for p in clone.parameters():  # buffers (rotary tables) keep their dtype, as on load
            p.data = p.data.to(dtype)
        return clone.eval()
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        clone = Decoder(model.config)
    clone.load_state_dict(state, strict=False, assign=True)
    clone.tie_weights()
    clone.model.rotary.reset(model.device)
    return clone.eval()
