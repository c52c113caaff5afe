"""``tunelab data prepare`` and ``tunelab data show``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tunelab.config import from_dict, load_yaml, merge, parse_overrides
from tunelab.data.config import DataConfig, DataSource, paths_relative_to
from tunelab.errors import TunelabError

# Top-level keys of a training config that the data verbs read past (``tunelab train`` checks
# them); every TrainConfig field but model and data (tests/data/test_data_cli.py checks that).
TRAINING_SECTIONS = (
    "method",
    "lora",
    "freeze",
    "train",
    "output_dir",
    "eval",
    "resume",
    "overwrite",
)
PLAIN_OPEN, PLAIN_CLOSE = "[[", "]]"  # marks trained text when colour is not available


@dataclass
class DataJob:
    """The part of a config file the data verbs use."""

    model: str = "default"  # whose tokenizer and chat template encode the data
    data: DataConfig = field(default_factory=DataConfig)


def load_data_job(path: str | Path, overrides: list[str]) -> DataJob:
    """Read CONFIG, resolve its data paths against the file's folder, apply --data.X overrides."""
    path = Path(path)
    raw = load_yaml(path)
    if isinstance(raw.get("data"), dict):
        raw["data"] = paths_relative_to(raw["data"], path.parent)
    raw = merge(raw, parse_overrides(overrides))
    return from_dict(DataJob, {k: v for k, v in raw.items() if k not in TRAINING_SECTIONS})


def _tokenizer(model: str):
    from tunelab.hub import resolve_model
    from tunelab.models.loading import load_tokenizer

    return load_tokenizer(resolve_model(model))


def run_prepare(config: str, overrides: list[str], out: TextIO | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from tunelab.data.pipeline import prepare

    job = load_data_job(config, overrides)
    prepared = prepare(job.data, _tokenizer(job.model))
    s = prepared.stats
    table = Table(title=f"data prepared ({'cache hit' if s.cache_hit else 'tokenized'})")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("examples read", s.examples_read),
        ("skipped", len(s.skipped)),
        ("truncated", s.truncated),
        ("dropped: too long", s.dropped_too_long),
        ("dropped: no trained tokens", s.dropped_no_target),
        ("train examples", s.train_examples),
        ("val examples", s.val_examples),
        ("tokens (train)", s.tokens),
        ("trained tokens (train)", s.trained_tokens),
        (f"packing efficiency at {job.data.max_length}", f"{(s.packing_efficiency or 0):.1%}"),
        (
            "packing (data.packing)",
            "on" if job.data.packing else "off: the row above is what it would give",
        ),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console = Console(file=out or sys.stdout)
    console.print(table)
    # soft_wrap: file:line and the cache path stay on one line (copyable, greppable).
    for skip in s.skipped[:20]:
        console.print(f"skipped {skip['source']}: {skip['reason']}", markup=False, soft_wrap=True)
    if len(s.skipped) > 20:
        console.print(f"... and {len(s.skipped) - 20} more skipped", soft_wrap=True)
    console.print(f"cache: {s.cache_path}", markup=False, soft_wrap=True)
    return 0


def run_show(config: str, n: int, overrides: list[str], out: TextIO | None = None) -> int:
    from tunelab.data.formats import read_sources
    from tunelab.data.templates import SKIP_TOO_LONG, encode_or_skip, resolve_template

    job = load_data_job(config, overrides)
    cfg = job.data
    if not cfg.train:
        raise TunelabError("data.train is empty; nothing to show.")
    tokenizer = _tokenizer(job.model)
    template = resolve_template(tokenizer, cfg.template)
    sources = cfg.train if isinstance(cfg.train, list) else [cfg.train]
    first = sources[0] if isinstance(sources[0], DataSource) else DataSource(path=sources[0])
    convs = read_sources([first], cfg).conversations[:n]
    stream = out or sys.stdout
    colour = stream.isatty() and not os.environ.get("NO_COLOR")
    legend = (
        "trained tokens in green" if colour else f"trained text inside {PLAIN_OPEN} {PLAIN_CLOSE}"
    )
    stream.write(f"# {len(convs)} example(s) from {first.path} ({legend})\n")
    options = {
        "train_on_prompt": cfg.train_on_prompt,
        "mask_history": cfg.mask_history,
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
    }
    for conv in convs:
        enc = encode_or_skip(conv, tokenizer, template, **options)
        stream.write(f"\n--- {conv.source} ---\n")
        if isinstance(enc, str):  # why it is dropped: as `prepare` would
            why = (
                f"longer than data.max_length={cfg.max_length}"
                if enc == SKIP_TOO_LONG
                else "no trained tokens"
            )
            stream.write(f"(dropped: {why})\n")
            continue
        stream.write(render_mask(tokenizer, enc.input_ids, enc.labels, colour) + "\n")
        cut = f", truncated to data.max_length={cfg.max_length}" if enc.truncated else ""
        stream.write(f"[{len(enc.input_ids)} tokens, {enc.num_trained} trained{cut}]\n")
    return 0


def render_mask(tokenizer, ids: list[int], labels: list[int], colour: bool) -> str:
    """Decode ``ids`` with the trained spans marked (ANSI green, or [[ ]] when plain)."""
    open_, close = ("\x1b[1;32m", "\x1b[0m") if colour else (PLAIN_OPEN, PLAIN_CLOSE)
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != -100) != (labels[start] != -100):
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            parts.append(f"{open_}{text}{close}" if labels[start] != -100 else text)
            start = i
    return "".join(parts)
