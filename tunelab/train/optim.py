"""AdamW and learning-rate schedules (warmup, then cosine / linear / constant)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from tunelab import device as dev


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused where the device supports it.

    Weight decay skips 1-D tensors (norms, biases), the usual practice.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = dev.supports("fused_adamw", device) and device.type != "cpu"
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of the run (rounded up: a short run still warms up),
    otherwise a number of steps."""
    if warmup >= 1:
        return int(warmup)
    # round(): 0.07 * 100 is 7.000000000000001; at most total-1 steps, so the lr peaks once
    return min(math.ceil(round(warmup * total_steps, 9)), max(total_steps - 1, 0))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based). Warmup ramps
    1/(w+1), 2/(w+1), ... so even one warmup step starts below the full lr (and no step
    runs at lr 0, as HF's step/w ramp makes the first one do)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule)
    )
