"""The training config: one YAML with model, method, lora, freeze, data, train, output_dir.

Every key can be overridden on the command line (``--train.max_steps 3 --output_dir runs/x``);
unknown keys are errors that suggest the closest valid key. Checks that can fail before the
model loads (unsupported combinations, missing files, a foreign run dir) live in
``validate`` so a mistake costs seconds, not a model load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tunelab.config import from_dict, load_yaml, merge, parse_overrides
from tunelab.data.config import DataConfig, check_data_config, paths_relative_to
from tunelab.errors import TunelabError
from tunelab.models.lora import LoraConfig

Method = Literal["full", "freeze", "lora", "qlora"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass
class FreezeConfig:
    """``method: freeze``: train only the last N decoder layers and/or named modules."""

    last_layers: int = 2
    modules: list[str] = field(default_factory=list)  # e.g. ["lm_head", "model.norm"]


@dataclass
class TrainArgs:
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 4  # rows per micro-batch (packed rows hold several examples)
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = 0.03  # a fraction of the steps when < 1, else a number of steps
    max_grad_norm: float = 1.0  # 0 = no clipping
    precision: Precision = "auto"  # auto: bf16 where supported, fp32 on CPU
    grad_checkpointing: bool = False
    save_every: int = 0  # steps between checkpoints; 0 = only the final one
    eval_every: int = 0  # steps between validation passes; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (older ones deleted)
    seed: int = 42
    log_every: int = 1
    loss_chunk_tokens: int = 2048  # cross-entropy chunk: never the full logits tensor
    device: str | None = None


@dataclass
class TrainConfig:
    model: str = "default"
    method: Method = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainArgs = field(default_factory=TrainArgs)
    output_dir: str = "runs/default"
    resume: Literal["auto", "never"] | str = "auto"  # auto: continue a matching run dir
    overwrite: bool = False  # start afresh in a run dir that holds another run


def load_train_config(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    """CONFIG file (data paths relative to it) + ``--section.key value`` overrides."""
    raw = {}
    if path is not None:
        raw = load_yaml(path)
        if isinstance(raw.get("data"), dict):
            raw["data"] = paths_relative_to(raw["data"], Path(path).parent)
    cfg = from_dict(TrainConfig, merge(raw, parse_overrides(overrides)))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Refuse impossible settings before anything heavy happens."""
    t = cfg.train
    checks = [
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (t.lr > 0, "train.lr must be > 0"),
        (t.epochs > 0 or t.max_steps, "train.epochs must be > 0 (or set train.max_steps)"),
        (t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1"),
        (t.warmup >= 0, "train.warmup must be >= 0"),
        (
            t.warmup < 1 or float(t.warmup).is_integer(),
            f"train.warmup {t.warmup} is neither a fraction below 1 nor a whole number of steps",
        ),
        (t.keep_last >= 1, "train.keep_last must be >= 1"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.save_every >= 0, "train.save_every must be >= 0 (0: only the final checkpoint)"),
        (t.eval_every >= 0, "train.eval_every must be >= 0 (0: only at the end)"),
        (t.loss_chunk_tokens >= 1, "train.loss_chunk_tokens must be >= 1"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0: no clipping)"),
        (cfg.lora.rank >= 1, "lora.rank must be >= 1"),
        (cfg.freeze.last_layers >= 0, "freeze.last_layers must be >= 0"),
        (bool(cfg.data.train), "data.train is empty: give the training data file(s)"),
    ]
    for ok, message in checks:
        if not ok:
            raise TunelabError(message + ".")
    _check_lora_extra(cfg.lora.extra)
    check_data_config(cfg.data)
    if cfg.method == "freeze" and cfg.freeze.last_layers == 0 and not cfg.freeze.modules:
        raise TunelabError(
            "method: freeze trains nothing with freeze.last_layers 0 and no freeze.modules; "
            "set one of them."
        )


def _check_lora_extra(extra: dict) -> None:
    """lora.extra carries other adapter_config.json fields; it must not ask for a LoRA
    variant tunelab does not train (it would silently train plain LoRA) nor restate a field
    that has its own key."""
    from tunelab.models.peft_io import PEFT_FIXED, unsupported_options

    bad = unsupported_options(extra)
    if bad:
        raise TunelabError(
            f"lora.extra asks for PEFT options tunelab does not train: {', '.join(bad)} "
            "(DoRA and the other LoRA variants are not supported); drop them."
        )
    own = {"r": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
           "target_modules": "lora.targets", "use_rslora": "lora.use_rslora",
           "peft_type": None, "task_type": None, "base_model_name_or_path": None}  # fmt: skip
    clash = sorted(k for k in extra if k in own or (k in PEFT_FIXED and extra[k] != PEFT_FIXED[k]))
    if clash:
        hint = ", ".join(f"{k} (use {own[k]})" if own.get(k) else k for k in clash)
        raise TunelabError(
            f"lora.extra sets adapter_config.json fields that tunelab writes itself: {hint}; "
            "drop them."
        )
