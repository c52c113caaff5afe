"""Everything decided before the first step: precision, the run dir, the model per method."""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from tunelab import device as dev
from tunelab.config import to_dict
from tunelab.errors import TunelabError
from tunelab.train.checkpoint import list_checkpoints
from tunelab.train.config import TrainConfig

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption (how long / how often, not what).
RESUMABLE_CHANGES = {
    "resume",
    "overwrite",
    "output_dir",
    "train.max_steps",
    "train.epochs",
    "train.save_every",
    "train.eval_every",
    "train.keep_last",
    "train.log_every",
    "train.device",
    "data.num_proc",
    "data.cache_dir",
}


@dataclass
class Precision:
    base_dtype: torch.dtype  # frozen weights are stored in this dtype
    autocast: torch.dtype | None  # compute dtype under autocast (None: plain fp32)
    loss_scaling: bool  # fp16 needs a GradScaler


def resolve_precision(name: str, device: torch.device, method: str) -> Precision:
    if name == "auto":  # fp32 on CPU: exact, and CPU autocast gains little
        half = "bf16" if dev.supports_bf16(device) else "fp16"
        name = "fp32" if device.type == "cpu" else half
    if name == "fp16" and device.type == "cpu":
        raise TunelabError(
            "train.precision fp16 is not supported on CPU (no fp16 autocast kernels); "
            "use fp32 or bf16."
        )
    if name == "bf16" and not dev.supports_bf16(device):
        raise TunelabError(f"{device} does not support bf16; use train.precision fp16 or fp32.")
    if name == "fp32":
        return Precision(torch.float32, None, False)
    half = torch.bfloat16 if name == "bf16" else torch.float16
    # Trained weights keep fp32 masters (full / freeze); frozen ones can live in half precision.
    base = torch.float32 if method in ("full", "freeze") else half
    return Precision(base, half, name == "fp16")


def refuse_multi_process() -> None:
    """Training runs in one process for now: under torchrun every rank would train the whole
    run on its own and write the same output_dir."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise TunelabError(
            f"multi-process training is not supported yet (WORLD_SIZE={world}, e.g. torchrun "
            "--nproc_per_node>1): run `tunelab train` as one process, on one device."
        )


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Return (run dir, checkpoint to resume from or None) and refuse a foreign run dir."""
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TunelabError(f"output_dir {run_dir} is a file; choose a directory path.")
    explicit = cfg.resume not in ("auto", "never")
    if explicit:
        ckpt = Path(cfg.resume).absolute()  # its run dir is two levels up
        if not (ckpt / "trainer_state.json").exists():
            raise TunelabError(
                f"--resume {cfg.resume}: not a checkpoint directory (no trainer_state.json)."
            )
        source = ckpt.parent.parent / "config.yaml"  # <run>/checkpoints/step-N
        diff = _differences(source, cfg, ckpt) if source.exists() else []
        if diff:
            raise TunelabError(
                f"--resume {ckpt}: that checkpoint's run has another config (it differs in "
                f"{', '.join(diff[:5])}); an exact resume needs the same settings (only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))} may change)."
            )
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return run_dir, (ckpt if explicit else None)
    saved = run_dir / "config.yaml"
    if not saved.exists():  # --overwrite replaces a run, never a folder of other files
        raise TunelabError(
            f"output_dir {run_dir} is not empty and holds no tunelab run (no config.yaml); "
            "choose another --output_dir (--overwrite only replaces a tunelab run)."
        )
    if cfg.overwrite and not explicit:  # Trainer.run empties it, after every check has passed
        return run_dir, None
    latest = list_checkpoints(run_dir)
    diff = _differences(saved, cfg, ckpt if explicit else (latest[-1] if latest else None))
    if explicit:
        if diff:
            raise TunelabError(
                f"output_dir {run_dir} holds another run (its config differs in "
                f"{', '.join(diff[:5])}); resume into the checkpoint's own run dir or an "
                "empty --output_dir."
            )
        return run_dir, ckpt
    if diff or cfg.resume == "never":
        why = f"its config differs in {', '.join(diff[:5])}" if diff else "resume is 'never'"
        raise TunelabError(
            f"output_dir {run_dir} holds another run ({why}); pass --overwrite to replace it "
            "or choose another --output_dir."
        )
    return run_dir, (latest[-1] if latest else None)


def _differences(saved_config: Path, cfg: TrainConfig, checkpoint: Path | None) -> list[str]:
    """How ``cfg`` differs from a run's saved config, for resuming ``checkpoint``."""
    from tunelab.train.checkpoint import read_state

    by_content = checkpoint is not None and bool(read_state(checkpoint).get("data_fingerprint"))
    old = yaml.safe_load(saved_config.read_text()) or {}
    return config_differences(old, to_dict(cfg), data_by_content=by_content)


# Compared by content, not by how the path is spelled, when the checkpoint to resume records
# the tokenized data's fingerprint (Trainer refuses a resume onto other data): a project moved
# or run from another working directory still resumes. Without one (no checkpoint yet, or
# one written before fingerprints), the paths are compared as written.
DATA_PATHS = {"data.train", "data.val"}


def config_differences(
    old: dict, new: dict, prefix: str = "", data_by_content: bool = False
) -> list[str]:
    """Dotted keys whose values differ, ignoring those that may change on resume (and the
    data paths when ``data_by_content``: the data fingerprint decides)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        name = prefix + key
        if name in RESUMABLE_CHANGES or (data_by_content and name in DATA_PATHS):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, name + ".", data_by_content)
        elif a != b and not (name == "model" and _same_directory(a, b)):
            diffs.append(name)
    return diffs


def _same_directory(old: object, new: object) -> bool:
    """Two spellings of one existing directory (e.g. relative to different working dirs)."""
    if not isinstance(old, str) or not isinstance(new, str):
        return False
    try:
        return os.path.samefile(Path(old).expanduser(), Path(new).expanduser())
    except OSError:
        return False


def build_model(cfg: TrainConfig, model_dir: Path, device: torch.device, precision: Precision):
    """Load the model and make exactly the parameters of ``cfg.method`` trainable.

    Our ``Decoder`` for the families it implements; any other architecture transformers
    knows trains through ``AutoModelForCausalLM`` (``tunelab.models.hf_fallback``), after
    probes that refuse what the fused loss or packing would get wrong.
    """
    from tunelab.models import hf_fallback
    from tunelab.models.loading import load_model

    if cfg.method == "qlora":
        dev.require("qlora_nf4", device)
    # QLoRA loads on the CPU: quantize_base_nf4 moves one weight at a time to the device, so
    # the half-precision model never has to fit there (that is what QLoRA is for).
    load_on = torch.device("cpu") if cfg.method == "qlora" else device
    if hf_fallback.needs_fallback(model_dir):
        model = hf_fallback.load_hf_model(model_dir, load_on, precision.base_dtype)
        configure_method(model, cfg, quantize=True, device=device)
        hf_fallback.check_fallback(model, cfg.data.packing)
        return model
    model = load_model(model_dir, device=load_on, dtype=precision.base_dtype)
    configure_method(model, cfg, quantize=True, device=device)
    return model


def configure_method(
    model: nn.Module, cfg: TrainConfig, quantize: bool, device: torch.device | None = None
) -> None:
    """Apply LoRA / QLoRA / freezing in place (``quantize=False`` on a meta model: dry run).

    ``model`` is our ``Decoder`` or a transformers model (the fallback). ``device``: where
    QLoRA's NF4 weights (and then the whole model) go; default: where the model is.
    """
    from tunelab.models.hf_fallback import enable_grad_checkpointing, is_hf_model, nf4_view

    if cfg.method in ("lora", "qlora"):
        from tunelab.models.lora import apply_lora, candidate_linears, lora_modules

        if is_hf_model(model) and candidate_linears(model):  # none (GPT-2's Conv1D): the
            from tunelab.models.hf_fallback import non_linear_share  # target error says so

            share = non_linear_share(model)
            if share > 0.1 and cfg.method == "qlora":
                raise TunelabError(
                    f"qlora quantizes linear layers, but {share:.0%} of this model's block "
                    "weights are other tensors (e.g. MoE experts stored as 3-D parameters), "
                    "which would stay in full precision: use method lora (or full)."
                )
            if share > 0.1:
                log.warning(
                    "LoRA adapts linear layers only; %.0f%% of this model's block weights "
                    "(e.g. MoE experts) are other tensors and stay frozen without adapters",
                    100 * share,
                )
        if cfg.method == "qlora" and quantize:
            from tunelab.models.quant import quantize_base_nf4

            target = nf4_view(model) if is_hf_model(model) else model
            quantize_base_nf4(target, device or model.device)
            model.to(device or model.device)  # what the NF4 view does not cover
        apply_lora(model, cfg.lora)
        for module in lora_modules(model).values():  # adapters train in fp32
            module.lora_A.float()
            module.lora_B.float()
    elif cfg.method == "freeze":
        _freeze_all_but(model, cfg.freeze.last_layers, cfg.freeze.modules)
    if not is_hf_model(model):
        model.model.gradient_checkpointing = cfg.train.grad_checkpointing
    elif cfg.train.grad_checkpointing:
        enable_grad_checkpointing(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise TunelabError(f"method {cfg.method} left no trainable parameter; check its settings.")


def _freeze_all_but(model: nn.Module, last_layers: int, modules: list[str]) -> None:
    from tunelab.models.hf_fallback import decoder_layers

    model.requires_grad_(False)
    prefix, layers = decoder_layers(model)
    n = len(layers)
    if last_layers > n:
        raise TunelabError(
            f"freeze.last_layers is {last_layers} but the model has {n} layers; use at most "
            f"{n} (or method full)."
        )
    keep = [f"{prefix}.{i}" for i in range(max(0, n - last_layers), n)] + list(modules)
    named = dict(model.named_modules())
    for name in keep:
        if name not in named:
            close = [m for m in named if m.endswith(name.split(".")[-1])][:3] or (
                difflib.get_close_matches(name, list(named), n=3)
            )
            raise TunelabError(
                f"freeze.modules: no module named {name!r} in the model"
                + (f" (similar: {', '.join(close)})" if close else "")
                + "."
            )
        named[name].requires_grad_(True)
