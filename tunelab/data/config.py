"""The ``data`` section of a config file (shared by ``tunelab data`` and ``tunelab train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Format = Literal[
    "auto", "alpaca", "sharegpt", "messages", "text", "classification", "preference", "multimodal"
]


@dataclass
class DataSource:
    """One input: a file, a glob, or a directory saved by HF ``datasets``."""

    path: str
    weight: float = 1.0  # mixing weight: examples are sampled in proportion
    format: Format | None = None  # overrides data.format for this source


@dataclass
class DataConfig:
    train: list[DataSource | str] | DataSource | str = field(default_factory=list)
    val: list[DataSource | str] | DataSource | str | None = None
    split: float = 0.0  # fraction of train held out for validation when no val is given
    format: Format = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # our field name -> column in the file
    role_tags: dict[str, str] = field(default_factory=dict)  # sharegpt "from" value -> role
    max_length: int = 2048
    truncation: Literal["truncate", "drop"] = "truncate"
    packing: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False  # train only on the last assistant answer
    template: str | None = None  # a built-in template name or a Jinja string; default: tokenizer's
    on_error: Literal["skip", "fail"] = "fail"
    num_proc: int = 1
    label_set: list[str] | None = None  # classification: allowed labels
    prompt: str | None = None  # classification: prompt template with {field} placeholders
    system: str | None = None  # a system prompt added to examples that have none
    max_samples: int | None = None  # keep at most this many training examples (after shuffle)
    max_val_samples: int | None = None  # the same for validation (a cheaper eval)
    seed: int = 42
    shuffle: bool = True
    cache_dir: str | None = None  # default: $TUNELAB_HOME/data


def check_data_config(cfg: DataConfig) -> None:
    """Refuse impossible numbers in a data section (before any file is read)."""
    from tunelab.errors import TunelabError

    checks = [
        (cfg.max_length >= 2, "data.max_length must be at least 2 (a prompt token and a target)"),
        (cfg.num_proc >= 1, "data.num_proc must be at least 1"),
        (0 <= cfg.split < 1, "data.split must be in [0, 1) (0: no held-out validation)"),
        (cfg.max_samples is None or cfg.max_samples >= 1, "data.max_samples must be at least 1"),
        (
            cfg.max_val_samples is None or cfg.max_val_samples >= 1,
            "data.max_val_samples must be at least 1",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise TunelabError(f"{message}.")


def paths_relative_to(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the relative train/val paths of a raw data section relative to ``base``."""

    def fix(item: Any) -> Any:
        if isinstance(item, list):
            return [fix(i) for i in item]
        if isinstance(item, dict) and "path" in item:
            return {**item, "path": fix(item["path"])}
        if isinstance(item, str) and not Path(item).expanduser().is_absolute():
            return str(base / item)
        return item

    return {k: fix(v) if k in ("train", "val") else v for k, v in data.items()}
