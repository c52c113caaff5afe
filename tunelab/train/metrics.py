"""Training metrics: progress bar, metrics.jsonl, TensorBoard (when installed), loss plot, MFU.

MFU follows the project's formula: FLOPs per token = k·N_mm + 12·L·H·Q·T, with k = 6 for
full fine-tuning and 4 for LoRA / QLoRA (frozen weights get no weight gradient), N_mm the
parameters taking part in matmuls (all but the input embedding; an untied lm_head counts),
and T the attention length (Σl²/Σl over the documents of a packed batch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.models.config import ModelConfig

log = logging.getLogger(__name__)


def matmul_params(config: ModelConfig) -> int:
    """N_mm: all parameters minus the input embedding (an untied lm_head counts)."""
    return config.num_params - config.vocab_size * config.hidden_size


@dataclass(frozen=True)
class FreezePlan:
    """What backward reaches in a ``freeze`` run: it stops at the lowest trained layer."""

    layers_above: int  # decoder layers from the lowest trained one up
    through_params: int  # matmul parameters backward passes activation gradients through
    trained_params: int  # matmul parameters that get weight gradients


def flops_per_token(
    config: ModelConfig, method: str, attn_len: float, freeze: FreezePlan | None = None
) -> float:
    """Model FLOPs per token (docs: performance.md): full ``6·N_mm + 12·L·H·Q·T``, LoRA /
    QLoRA ``4·N_mm + 12·L·H·Q·T``; ``freeze`` counts what its backward does: ``2·N_mm``
    forward, ``2·`` the parameters gradients flow through, ``2·`` the trained ones."""
    per_layer_attn = 4 * config.num_attention_heads * config.head_dim * attn_len  # one pass
    n_mm = matmul_params(config)
    if method == "freeze" and freeze is not None:
        attn = per_layer_attn * (config.num_hidden_layers + 2 * freeze.layers_above)
        return 2 * n_mm + 2 * freeze.through_params + 2 * freeze.trained_params + attn
    k = 6 if method in ("full", "freeze") else 4
    return k * n_mm + 3 * per_layer_attn * config.num_hidden_layers


def freeze_plan(model: torch.nn.Module) -> FreezePlan:
    """Where a freeze run's backward goes: from the lowest layer holding a trained weight up
    (the output head included), weight gradients only for the trained matrices."""
    from tunelab.models.hf_fallback import decoder_layers

    _, layers = decoder_layers(model)
    trained_layers = [
        i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())
    ]
    lowest = trained_layers[0] if trained_layers else len(layers)
    above = {id(p) for layer in list(layers)[lowest:] for p in layer.parameters()}
    through = trained = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embed" in name:  # N_mm leaves the input embedding out
            continue
        if id(p) in above or "lm_head" in name or name.endswith(("head.weight", "score.weight")):
            through += p.numel()
        trained += p.numel() if p.requires_grad else 0
    return FreezePlan(len(layers) - lowest, through, trained)


class MetricsLogger:
    """One row per log step into metrics.jsonl (+ TensorBoard), and a progress bar."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool = True):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self.start_step = start_step
        _drop_rows_after(self.path, start_step)  # steps of an attempt that did not checkpoint
        self._tb = _tensorboard_writer(run_dir / "tensorboard")
        self._progress = _Progress(total_steps, start_step) if progress else None

    def log(self, row: dict[str, Any]) -> None:
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key not in ("step", "time"):
                    self._tb.add_scalar(key, value, row["step"])
        if self._progress is not None and "loss" in row:
            self._progress.update(row)
        elif "loss" in row:  # no terminal: one log line per logged step
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s",
                row["step"],
                self.total_steps,
                row["loss"],
                row["lr"],
                row["tokens_per_s"],
            )
        if "val_loss" in row:
            log.info("step %d: val_loss %.4f", row["step"], row["val_loss"])

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        plot_losses(self.path, self.run_dir / "loss.png")


class _Progress:
    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        parts = [
            f"loss {row['loss']:.4f}",
            f"lr {row['lr']:.2e}",
            f"{row['tokens_per_s']:.0f} tok/s",
        ]
        if row.get("mfu") is not None:
            parts.append(f"MFU {row['mfu']:.1%}")
        if row.get("memory_gib") is not None:
            parts.append(f"{row['memory_gib']:.1f} GiB")
        self.bar.update(self.task, completed=row["step"], info="  ".join(parts))

    def stop(self) -> None:
        self.bar.stop()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl is enough
        return None
    return SummaryWriter(str(path))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _drop_rows_after(path: Path, step: int) -> None:
    """Resuming at ``step``: rows logged after it (by a run that died before its next
    checkpoint) are repeated by the resumed run, so they go."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Train (and validation) loss against step, as a PNG; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no loss plot")
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
