"""``tunelab train --dry-run``: trainable parameters and a memory estimate before loading.

The estimate is deliberately simple (documented terms, rounded up) so it errs on the side
of refusing: weights + gradients + AdamW states + activations + one chunk of logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.models.config import ModelConfig
from tunelab.models.decoder import Decoder
from tunelab.train.config import TrainConfig
from tunelab.train.setup import Precision, configure_method


@dataclass
class MemoryEstimate:
    trainable: int
    total: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total_bytes(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("gradients", self.grads),
            ("optimizer (AdamW)", self.optimizer),
            ("activations", self.activations),
            ("logits chunk", self.logits),
            ("total", self.total_bytes),
        ]


def estimate_for(cfg: TrainConfig, model_dir: Path, precision: Precision) -> MemoryEstimate:
    """The estimate for the model in ``model_dir``: our decoder's config, or, for an
    architecture trained through transformers, its model instantiated on the meta device."""
    from tunelab.models import hf_fallback

    if not hf_fallback.needs_fallback(model_dir):
        return estimate(cfg, ModelConfig.from_file(model_dir / "config.json"), precision)
    model = hf_fallback.meta_hf_model(model_dir)
    model.to(precision.base_dtype)
    configure_method(model, cfg, quantize=False)
    return _estimate(cfg, model, hf_fallback.memory_dims(model.config), precision)


def estimate(cfg: TrainConfig, config: ModelConfig, precision: Precision) -> MemoryEstimate:
    with torch.device("meta"):
        model = Decoder(config)
        model.to(precision.base_dtype)
        configure_method(model, cfg, quantize=False)
    return _estimate(cfg, model, config, precision)


def _estimate(cfg: TrainConfig, model: nn.Module, config: Any, precision: Precision):
    """``config`` gives hidden_size, intermediate_size, num_hidden_layers and vocab_size."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    frozen = total - trainable
    base_bytes = torch.finfo(precision.base_dtype).bits // 8
    if cfg.method == "qlora":  # the layers' 4-bit linears (+ ~6% scales); the rest stays
        from tunelab.models.hf_fallback import is_hf_model, nf4_view
        from tunelab.models.quant import nf4_numel

        nf4 = nf4_numel(nf4_view(model) if is_hf_model(model) else model)
        weights = int(nf4 * 0.53) + (frozen - nf4) * base_bytes
    else:
        weights = frozen * base_bytes
    weights += trainable * 4  # trained tensors are fp32 masters
    act_bytes = 2 if precision.autocast is not None else 4
    tokens = cfg.train.batch_size * cfg.data.max_length
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    # qkv, attn out, norms, MLP pieces, x1.5: what autograd actually keeps per layer measured
    # 1.4x (LoRA) to 1.6x (full) that count (saved_tensors_hooks on a bf16 autocast step).
    per_layer = int(1.5 * tokens * (10 * h + 3 * i) * act_bytes)
    if cfg.train.grad_checkpointing:
        activations = L * tokens * h * act_bytes + per_layer  # layer inputs + one live layer
    else:
        activations = L * per_layer
    if precision.autocast is not None and cfg.method in ("full", "freeze"):
        activations += trainable * 2  # autocast's half-precision copies of the fp32 masters
    if cfg.data.packing:  # the boolean document mask of SDPA
        activations += cfg.train.batch_size * cfg.data.max_length**2
    # The loss keeps one chunk of logits: 16-bit logits + their fp32 copy (softmax in place)
    # + the 16-bit gradient under autocast, i.e. two fp32-sized buffers (one in fp32).
    logits = min(cfg.train.loss_chunk_tokens, tokens) * config.vocab_size * 4 * 2
    return MemoryEstimate(
        trainable, total, weights, trainable * 4, trainable * 8, activations, logits
    )
