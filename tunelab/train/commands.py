"""``tunelab train CONFIG [--dry-run] [--section.key value ...]``."""

from __future__ import annotations

import sys
from typing import TextIO

import yaml

from tunelab import device as dev
from tunelab.config import to_dict
from tunelab.errors import TunelabError
from tunelab.train.config import load_train_config


def run_train(
    config: str | None, overrides: list[str], dry_run: bool, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    cfg = load_train_config(config, overrides)
    if dry_run:
        return _dry_run(cfg, out)
    from tunelab.train.trainer import train

    result = train(cfg, progress=out.isatty() if hasattr(out, "isatty") else False)
    if result.final_dir is None:  # stopped by a signal; the checkpoint is saved
        return 128 + (result.stop_signal or 2)  # the shell's code for that signal
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    if result.steps_run == 0:
        done = f"no steps left to train ({result.state.step} steps done{val})"
    else:
        done = f"trained {result.state.step} steps{val}"
    out.write(f"{done}; output in {result.final_dir}\n")
    return 0


def _dry_run(cfg, out: TextIO) -> int:
    from tunelab.hub import resolve_model
    from tunelab.train.estimate import estimate_for
    from tunelab.train.setup import prepare_run_dir, resolve_precision

    prepare_run_dir(cfg)  # the clash the real run would refuse (reads, never writes)
    device = dev.resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device, cfg.method)
    est = estimate_for(cfg, resolve_model(cfg.model), precision)
    free, total = dev.mem_get_info(device)
    out.write("# resolved config\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    out.write(f"\n# {cfg.method} on {device} ({dev.device_name(device)})\n")
    share = est.trainable / max(est.total, 1)
    out.write(f"trainable parameters: {est.trainable:,} of {est.total:,} ({share:.2%})\n")
    out.write("memory estimate:\n")
    for name, nbytes in est.rows():
        out.write(f"  {name:<18} {nbytes / 2**30:8.2f} GiB\n")
    out.write(f"  {'free on device':<18} {free / 2**30:8.2f} GiB of {total / 2**30:.2f}\n")
    if est.total_bytes > 0.95 * free:
        raise TunelabError(
            f"the run needs about {est.total_bytes / 2**30:.1f} GiB but {device} has "
            f"{free / 2**30:.1f} GiB free; lower train.batch_size or data.max_length"
            + ("" if cfg.train.grad_checkpointing else ", set train.grad_checkpointing true")
            + ("" if cfg.method == "qlora" else ", or use method qlora")
            + "."
        )
    out.write("fits: yes\n")
    return 0
