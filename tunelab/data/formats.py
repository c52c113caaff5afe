"""Readers: data files in any supported format -> ``Conversation`` examples.

The format is detected per file from its column names (``detect_format``) unless
``data.format`` or a source's ``format`` names it; ``data.columns`` maps our field names to the
file's columns. A bad example raises ``TunelabError`` naming ``path:line`` under
``on_error: fail``, or becomes a ``Skipped`` under ``on_error: skip`` (counted, never silent).
Configuration problems (unknown format, columns that fit no format, missing files, a source
without examples) always raise.

Mixing weights are applied deterministically per source: the integer part repeats every
example that many times and the fractional part adds a sample of that fraction of the
examples drawn with a ``random.Random`` seeded from ``data.seed`` and the source's position
(weight 2.0: each example twice; 0.5: a seeded half, in file order). Repeats are the same
``Conversation`` objects.
"""

from __future__ import annotations

import logging
import math
import random
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.config import DataConfig, DataSource, Format
from tunelab.data.conversation import ROLES, Conversation
from tunelab.data.files import BadRecord, expand_paths, files_of, iter_records
from tunelab.data.parsers import BadExample, Ctx, parse
from tunelab.errors import TunelabError

__all__ = ["ReadResult", "Skipped", "detect_format", "expand_paths", "read_sources"]

log = logging.getLogger(__name__)

FORMATS = tuple(f for f in typing.get_args(Format) if f != "auto")
# Detection order and the columns each format needs (classification: label + text fields).
REQUIRED: dict[str, tuple[str, ...]] = {
    "preference": ("chosen", "rejected"),
    "multimodal": ("messages", "images"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "classification": ("label", "<text fields>"),
    "text": ("text",),
}


@dataclass
class Skipped:
    """An example left out under ``on_error: skip``: where it is and why."""

    source: str  # "path:line" (JSON Lines) or "path:row N"
    reason: str


@dataclass
class ReadResult:
    """What ``read_sources`` produced: examples (weights applied), skips, and files read."""

    conversations: list[Conversation]
    skipped: list[Skipped]
    files: list[Path]  # every file read, for the pipeline's fingerprint


def detect_format(columns: set[str]) -> str:
    """The format whose required columns ``columns`` holds (already mapped to our names)."""
    for fmt, required in REQUIRED.items():
        if fmt == "classification":
            if "label" in columns and len(columns) > 1:
                return fmt
        elif set(required) <= columns:
            return fmt
    needs = "; ".join(f"{f}: {', '.join(r)}" for f, r in REQUIRED.items())
    raise TunelabError(
        f"the columns {sorted(columns)} fit no data format ({needs}); rename the columns with "
        "data.columns (our name: file column) or set data.format."
    )


def read_sources(sources: list[DataSource | str] | DataSource | str, cfg: DataConfig) -> ReadResult:
    """Read every source (file, glob, directory) into conversations, weights applied.

    A source's weight repeats its examples ``int(weight)`` times and adds a seeded sample of the
    fractional part (see the module docstring). A source without examples is an error.
    """
    _check_config(cfg)
    result = ReadResult([], [], [])
    for index, source in enumerate(_as_sources(sources)):
        before = len(result.skipped)
        convs = _read_source(source, cfg, result)
        if not convs:
            raise TunelabError(_empty_message(source.path, result.skipped[before:]))
        rng = random.Random(f"{cfg.seed}:{index}")
        result.conversations += _apply_weight(convs, source.weight, rng)
    if result.skipped:
        first = result.skipped[0]
        log.warning(
            "skipped %d bad example(s), first: %s: %s",
            len(result.skipped),
            first.source,
            first.reason,
        )
    return result


def _as_sources(sources: list[DataSource | str] | DataSource | str) -> list[DataSource]:
    items = sources if isinstance(sources, list) else [] if sources is None else [sources]
    if not items:
        raise TunelabError("no data given; set data.train to a file, glob or list of files.")
    out = [DataSource(s) if isinstance(s, str) else _source(s) for s in items]
    for s in out:
        if not (math.isfinite(s.weight) and s.weight > 0):
            raise TunelabError(f"data source {s.path!r} has weight {s.weight}; use a number > 0.")
    return out


def _source(item: DataSource | dict[str, Any]) -> DataSource:
    if isinstance(item, dict):  # {path, weight, format} straight from YAML
        try:
            return DataSource(**item)
        except TypeError as e:
            raise TunelabError(f"bad data source {item}: {e}; use {{path, weight, format}}.") from e
    return item


def _check_config(cfg: DataConfig) -> None:
    bad = {k: v for k, v in cfg.role_tags.items() if v not in ROLES}
    if bad:
        raise TunelabError(f"data.role_tags {bad} map to unknown roles; use one of {ROLES}.")
    if cfg.on_error not in ("fail", "skip"):
        raise TunelabError(f"data.on_error is {cfg.on_error!r}; use 'fail' or 'skip'.")


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise TunelabError(f"unknown data format {fmt!r}; use one of auto, {', '.join(FORMATS)}.")


def _empty_message(spec: str, skipped: list[Skipped]) -> str:
    msg = f"no examples in {spec!r}"
    if skipped:
        msg += f" ({len(skipped)} skipped, e.g. {skipped[-1].source}: {skipped[-1].reason})"
    return msg + "; check the path and the format."


def _apply_weight(convs: list[Conversation], weight: float, rng: random.Random) -> list:
    whole = int(weight)
    extra = round((weight - whole) * len(convs))
    picked = sorted(rng.sample(range(len(convs)), extra)) if extra else []
    return convs * whole + [convs[i] for i in picked]


def _read_source(source: DataSource, cfg: DataConfig, result: ReadResult) -> list[Conversation]:
    fmt = source.format or cfg.format
    _check_format(fmt)
    convs: list[Conversation] = []
    for path in expand_paths(source.path):
        result.files += files_of(path)
        convs += _read_file(path, fmt, cfg, result.skipped)
    return convs


def _read_file(path: Path, fmt: str, cfg: DataConfig, skipped: list[Skipped]) -> list:
    ctx: Ctx | None = None
    out: list[Conversation] = []
    for src, rec in iter_records(path):
        try:
            if isinstance(rec, BadRecord):
                raise BadExample(rec.reason)
            if ctx is None:
                ctx = Ctx.create(cfg, _file_format(path, fmt, rec, cfg), _base_dir(path))
            conv = parse(rec, ctx)
        except BadExample as e:
            if cfg.on_error == "fail":
                raise TunelabError(
                    f"{src}: {e}; fix the example, or set data.on_error: skip to skip bad ones."
                ) from None
            skipped.append(Skipped(src, str(e)))
            continue
        conv.source = src
        out.append(conv)
    return out


def _file_format(path: Path, fmt: str, rec: dict[str, Any], cfg: DataConfig) -> str:
    if fmt != "auto":
        return fmt
    inverse = {col: ours for ours, col in cfg.columns.items()}
    try:
        return detect_format({inverse.get(k, k) for k in rec})
    except TunelabError as e:
        raise TunelabError(f"{path}: {e}") from None


def _base_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent
