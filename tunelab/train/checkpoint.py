"""Atomic, exactly-resumable checkpoints.

``run_dir/checkpoints/step-N/`` holds the trainable weights (for LoRA the PEFT-format adapter
files directly inside, so ``peft`` loads a checkpoint as is), the optimizer and scheduler
states (and fp16's loss-scaler state), every RNG state and the data position. Each is
written to a temp dir and renamed, so a crash leaves the previous checkpoint intact; only the
newest ``keep_last`` are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunelab.atomic import atomic_directory
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"  # full / freeze: the trained tensors
SCALER_FILE = "scaler.pt"  # fp16 loss scaling state


@dataclass
class TrainerState:
    """Where the run is: enough to continue it exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens_seen: int = 0
    best_val_loss: float | None = None
    validated_at: int | None = None  # the step of the last validation pass (none twice)
    last_val_loss: float | None = None
    data_fingerprint: str | None = None  # of the tokenized data: a resume must see the same
    history: list[dict[str, Any]] = field(default_factory=list)  # recent log rows


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of an interrupted save are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.name.removeprefix("step-").isdigit() and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=step_of)


def save_checkpoint(
    run_dir: Path,
    state: TrainerState,
    save_weights,  # callable(dir): writes the trainable weights in the method's format
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keep_last: int,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    out = checkpoint_dir(run_dir, state.step)
    with atomic_directory(out, overwrite=True) as tmp:
        save_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:  # fp16: the loss scale and its growth tracker
            torch.save(scaler.state_dict(), tmp / SCALER_FILE)
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    existing = list_checkpoints(run_dir)
    # Checkpoints past this step are from a continuation abandoned by resuming an older one:
    # they must neither count towards keep_last nor be what `resume: auto` picks next.
    stale = [p for p in existing if step_of(p) > state.step]
    if stale:
        log.warning(
            "removing %s: newer than step %d, from the run this one resumed before",
            ", ".join(p.name for p in stale),
            state.step,
        )
    current = [p for p in existing if step_of(p) <= state.step]
    for old in stale + current[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load_checkpoint(
    path: Path,
    load_weights,  # callable(dir): loads the trainable weights into the model
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainerState:
    state = read_state(path)
    scaled = scaler is not None and (path / SCALER_FILE).exists()  # older ones: fresh scale
    try:  # reading the files: what fails here is a truncated or missing file
        load_weights(path)
        saved = {
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
            "scheduler": torch.load(path / "scheduler.pt", weights_only=False),
            "rng": torch.load(path / "rng.pt", weights_only=False),
        }
        if scaled:
            saved["scaler"] = torch.load(path / SCALER_FILE, weights_only=True)
    except TunelabError:
        raise
    except Exception as e:
        raise damaged(path, e) from e
    try:  # applying them: what fails here is a checkpoint of another model or setting
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaled:
            scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise TunelabError(
            f"checkpoint {path} does not fit this run ({type(e).__name__}: {str(e)[:120]}): "
            "it was made with another model or other settings; pass --overwrite to start "
            "afresh, or another --output_dir."
        ) from e
    return TrainerState(**state)


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json (a clear error when it is missing or damaged)."""
    if not (path / STATE_FILE).exists():
        raise TunelabError(f"{path} is not a complete checkpoint (no {STATE_FILE}).")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        known = {f.name for f in dataclasses.fields(TrainerState)}
        if not isinstance(state, dict) or not set(state) <= known:
            raise ValueError(f"unexpected content in {STATE_FILE}")
        return state
    except (OSError, ValueError) as e:
        raise damaged(path, e) from e


def damaged(path: Path, cause: Exception) -> TunelabError:
    run_dir = path.parent.parent  # <run>/checkpoints/step-N
    older = [p for p in list_checkpoints(run_dir) if step_of(p) < _step_or_max(path)]
    fix = f"resume from an older one (--resume {older[-1]})" if older else "remove it"
    return TunelabError(
        f"checkpoint {path} is damaged ({type(cause).__name__}: {str(cause)[:120]}); {fix}, "
        "or pass --overwrite to start the run afresh."
    )


def _step_or_max(path: Path) -> int:
    name = path.name.removeprefix("step-")
    return int(name) if name.isdigit() else 1 << 62


def save_tensors(model: torch.nn.Module, directory: Path, only_trainable: bool = True) -> None:
    state = {
        n: p.detach().contiguous().cpu()
        for n, p in model.named_parameters()
        if p.requires_grad or not only_trainable
    }
    save_file(state, str(directory / TRAINABLE_FILE))


def load_tensors(model: torch.nn.Module, directory: Path) -> None:
    saved = load_file(str(directory / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise TunelabError(f"{directory}: checkpoint tensor {unknown[0]!r} is not in the model.")
    for name, tensor in saved.items():
        if tensor.shape != params[name].shape:
            raise TunelabError(
                f"{directory}: checkpoint tensor {name!r} has shape {tuple(tensor.shape)} but "
                f"the model's is {tuple(params[name].shape)}: the checkpoint was made with "
                "other settings (e.g. lora.rank, lora.targets or another model)."
            )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def rng_state() -> dict[str, Any]:
    from tunelab import device as dev

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "device": dev.rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from tunelab import device as dev

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    dev.set_rng_state(state.get("device"))
