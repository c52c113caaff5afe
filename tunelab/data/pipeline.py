"""Read -> encode (template + loss mask) -> cache as memory-mapped Arrow -> train/val split.

The cache key is a fingerprint of everything that changes the tokens: the bytes of every
input file, the tokenizer, the chat template and the data options. A second ``prepare`` on
unchanged inputs loads the Arrow files from disk (memory-mapped, no re-tokenization).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.atomic import atomic_directory
from tunelab.data.config import DataConfig
from tunelab.data.conversation import Conversation, Turn
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # bump when the encoding logic changes, so old caches are not reused
# DataConfig fields that do not change the tokens (and so stay out of the fingerprint).
NOT_IN_FINGERPRINT = {"num_proc", "cache_dir", "packing", "on_error"}


@dataclass
class DataStats:
    examples_read: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason"}
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    train_examples: int = 0
    val_examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    packing_efficiency: float | None = None
    cache_hit: bool = False
    cache_path: str = ""


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with columns input_ids, labels, length
    val: Any | None
    stats: DataStats


def prepare(cfg: DataConfig, tokenizer: Any) -> PreparedData:
    """Tokenize the data described by ``cfg`` (cached) and split it into train / val."""
    from tunelab.data.config import check_data_config
    from tunelab.data.formats import read_sources
    from tunelab.data.templates import resolve_template

    if not cfg.train:
        raise TunelabError("data.train is empty; give a file, glob or list of files to train on.")
    check_data_config(cfg)
    template = resolve_template(tokenizer, cfg.template)
    cache = cache_root(cfg) / fingerprint(cfg, tokenizer, template)
    if (cache / "stats.json").exists():
        prepared = _load_cached(cache)
        _check_skips(prepared.stats, cfg)  # a cache made under on_error: skip
        return prepared

    train_read = read_sources(cfg.train, cfg)
    val_read = read_sources(cfg.val, cfg) if cfg.val else None
    reads = [r for r in (train_read, val_read) if r is not None]
    stats = DataStats(
        examples_read=sum(len(r.conversations) for r in reads),
        skipped=[dataclasses.asdict(s) for r in reads for s in r.skipped],
    )
    train = _encode_all(train_read.conversations, tokenizer, template, cfg, stats)
    val = _encode_all(val_read.conversations, tokenizer, template, cfg, stats) if val_read else None
    if len(train) == 0:  # before the split, whose own message would hide the reason
        raise TunelabError(
            f"no training examples left after encoding ({_drops(stats)}); raise data.max_length "
            "or check the data with `tunelab data show`."
        )
    with _no_progress_bars():
        if cfg.shuffle:
            train = train.shuffle(seed=cfg.seed)  # save_to_disk applies the order once
        if val is None and cfg.split > 0:
            train, val = _split(train, cfg.split, cfg.seed)
        train = _limit(train, cfg.max_samples)
        val = _limit(val, cfg.max_val_samples) if val is not None else None
        _fill_counts(stats, train, val, cfg)
        with atomic_directory(cache, overwrite=True) as tmp:
            train.save_to_disk(str(tmp / "train"))
            if val is not None:
                val.save_to_disk(str(tmp / "val"))
            (tmp / "stats.json").write_text(json.dumps(dataclasses.asdict(stats), indent=2))
    log.info(
        "cached %d train / %d val examples in %s", stats.train_examples, stats.val_examples, cache
    )
    prepared = _load_cached(cache)
    prepared.stats.cache_hit = False
    return prepared


def _check_skips(stats: DataStats, cfg: DataConfig) -> None:
    """Under ``on_error: fail`` a cached result with skipped examples fails like a fresh read."""
    if cfg.on_error == "fail" and stats.skipped:
        first = stats.skipped[0]
        raise TunelabError(
            f"{first['source']}: {first['reason']}; fix the example, or set data.on_error: skip "
            "to skip bad ones."
        )


def _drops(stats: DataStats) -> str:
    return (
        f"{stats.dropped_too_long} longer than data.max_length with data.truncation: drop, "
        f"{stats.dropped_no_target} with no trained tokens left"
    )


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide ``datasets`` progress bars (filter, save, load: noise next to tokenizing's)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def cache_root(cfg: DataConfig) -> Path:
    from tunelab.default_model import tunelab_home

    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else tunelab_home() / "data"


def fingerprint(cfg: DataConfig, tokenizer: Any, template: str) -> str:
    """A stable hash of file bytes, tokenizer, template and the options that shape tokens.

    Sources enter by their files' names and bytes, weight and format, not by their path
    strings: the same file reached through another path (relative, absolute, from another
    folder) is the same data.
    """
    h = hashlib.sha256(f"tunelab-data-v{CACHE_VERSION}".encode())
    skip = NOT_IN_FINGERPRINT | {"train", "val"}
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    h.update(json.dumps(_typed_keys(options), sort_keys=True, default=str).encode())
    h.update(template.encode())
    h.update(_tokenizer_identity(tokenizer).encode())
    for split, sources in (("train", cfg.train), ("val", cfg.val)):
        for item in _source_list(sources):
            weight, fmt = _source_field(item, "weight", 1.0), _source_field(item, "format", None)
            files = _source_files(item, f"data.{split}")
            h.update(json.dumps([split, weight, fmt, len(files)]).encode())
            for path in files:
                h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
                with open(path, "rb") as f:
                    for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()[:20]


def _source_list(sources: Any) -> list[Any]:
    return sources if isinstance(sources, list) else [] if sources is None else [sources]


def _typed_keys(value: Any) -> Any:
    """Dict keys as "type:key" strings: role_tags may mix 0 and "gpt" (json cannot sort that)
    and {0: ...} must not share a cache with {"0": ...} (they match different data)."""
    if isinstance(value, dict):
        return {f"{type(k).__name__}:{k}": _typed_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_typed_keys(v) for v in value]
    return value


def _source_field(item: Any, name: str, default: Any) -> Any:
    """A field of a source given as a path, a DataSource or a {path, weight, format} dict."""
    if isinstance(item, str):
        return default
    return item.get(name, default) if isinstance(item, dict) else getattr(item, name, default)


def _source_files(item: Any, key: str) -> list[Path]:
    from tunelab.data.files import files_of
    from tunelab.data.formats import expand_paths

    path = item if isinstance(item, str) else _source_field(item, "path", None)
    return [f for p in expand_paths(str(path), key) for f in files_of(p)]


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True)
    return hashlib.sha256((body + specials).encode()).hexdigest()


def conversation_to_json(conv: Conversation) -> str:
    # vars(), not dataclasses.asdict: asdict deep-copies and costs more than the JSON itself.
    data = {**vars(conv), "turns": [vars(t) for t in conv.turns]}
    return json.dumps(data, ensure_ascii=False)


def conversation_from_json(text: str) -> Conversation:
    data = json.loads(text)
    data["turns"] = [Turn(**t) for t in data["turns"]]
    return Conversation(**data)


def _encode_all(convs: list[Conversation], tokenizer, template: str, cfg: DataConfig, stats):
    """Encode with ``datasets.map`` (``num_proc`` workers); count truncations and drops."""
    import datasets

    raw = datasets.Dataset.from_dict({"conv": [conversation_to_json(c) for c in convs]})
    encoder = _Encoder(tokenizer, template, cfg)
    # Explicit types: a batch (or worker shard) of dropped examples alone would be list<null>.
    seq = getattr(datasets, "List", None) or datasets.Sequence  # List: datasets >= 4
    features = datasets.Features(
        {
            "input_ids": seq(datasets.Value("int32")),
            "labels": seq(datasets.Value("int64")),
            "length": datasets.Value("int64"),
            "status": datasets.Value("string"),
        }
    )
    encoded = raw.map(
        encoder,
        batched=True,  # fewer datasets round trips per example
        batch_size=256,
        features=features,
        remove_columns=["conv"],
        num_proc=cfg.num_proc if cfg.num_proc > 1 and len(convs) >= 2 * cfg.num_proc else None,
        desc="tokenizing",
    )
    status = _column(encoded, "status").to_pylist()
    stats.truncated += status.count("truncated")
    stats.dropped_too_long += status.count("too_long")
    stats.dropped_no_target += status.count("no_target")
    keep = [i for i, s in enumerate(status) if s in ("ok", "truncated")]
    with _no_progress_bars():
        kept = encoded.select(keep) if len(keep) < len(encoded) else encoded
        return kept.remove_columns("status")


class _Encoder:
    """Picklable map function for ``datasets`` workers."""

    def __init__(self, tokenizer, template: str, cfg: DataConfig):
        self.tokenizer, self.template, self.cfg = tokenizer, template, cfg

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        from tunelab.data.templates import encode_or_skip

        cfg = self.cfg
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "status": []}
        for text in batch["conv"]:
            enc = encode_or_skip(
                conversation_from_json(text),
                self.tokenizer,
                self.template,
                train_on_prompt=cfg.train_on_prompt,
                mask_history=cfg.mask_history,
                max_length=cfg.max_length,
                truncation=cfg.truncation,
            )
            dropped = isinstance(enc, str)  # then enc is the reason
            out["input_ids"].append([] if dropped else enc.input_ids)
            out["labels"].append([] if dropped else enc.labels)
            out["length"].append(0 if dropped else len(enc.input_ids))
            out["status"].append(enc if dropped else "truncated" if enc.truncated else "ok")
        return out


def _limit(dataset, n: int | None):
    return dataset.select(range(n)) if n is not None and n < len(dataset) else dataset


def _split(train, fraction: float, seed: int):
    """Hold out a seeded random ``fraction`` of the distinct examples; both parts keep the
    incoming (shuffled or file) order.

    Distinct by their tokens: a source's weight repeats examples (and two files may share
    one), so every copy of a held-out example leaves training and val holds it once.
    """
    if not 0 < fraction < 1:
        raise TunelabError(f"data.split must be between 0 and 1 (got {fraction}).")
    groups: dict[bytes, list[int]] = {}
    for i, key in enumerate(_row_digests(train)):
        groups.setdefault(key, []).append(i)
    distinct = list(groups.values())  # first-occurrence order
    n_val = max(1, round(len(distinct) * fraction))
    if n_val >= len(distinct):
        raise TunelabError(
            f"data.split={fraction} leaves no training examples out of {len(distinct)}; "
            "lower it or give data.val."
        )
    held_out = random.Random(seed).sample(range(len(distinct)), n_val)
    val_rows = sorted(distinct[g][0] for g in held_out)
    dropped = {i for g in held_out for i in distinct[g]}
    rest = [i for i in range(len(train)) if i not in dropped]
    return train.select(rest), train.select(val_rows)


def _row_digests(dataset) -> Iterator[bytes]:
    """A 16-byte digest of each row's input_ids and labels, read straight from Arrow's
    buffers (a Python list per row would cost ~70 bytes a token)."""
    import numpy as np

    columns = []
    for name in ("input_ids", "labels"):
        array = _column(dataset, name).combine_chunks()
        offsets = np.asarray(array.offsets)
        values = np.asarray(array.values)
        columns.append((offsets, values))
    (id_off, ids), (lab_off, labels) = columns
    for i in range(len(id_off) - 1):
        h = hashlib.blake2b(ids[id_off[i] : id_off[i + 1]].tobytes(), digest_size=16)
        h.update(labels[lab_off[i] : lab_off[i + 1]].tobytes())
        yield h.digest()


def _column(dataset, name: str):
    """One column as a pyarrow ChunkedArray: ``dataset[name]`` is a lazy Column whose every
    index is a table lookup, far too slow to loop over."""
    return dataset.with_format("arrow")[name]


def _fill_counts(stats: DataStats, train, val, cfg: DataConfig) -> None:
    import pyarrow.compute as pc

    from tunelab.data.packing import pack_greedy, packing_efficiency
    from tunelab.data.templates import IGNORE_INDEX

    stats.train_examples, stats.val_examples = len(train), len(val) if val is not None else 0
    lengths = _column(train, "length").to_pylist()
    stats.tokens = sum(lengths)
    labels = pc.list_flatten(_column(train, "labels"))
    stats.trained_tokens = int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)
    bins = pack_greedy(lengths, cfg.max_length)
    stats.packing_efficiency = packing_efficiency(lengths, bins, cfg.max_length)


def _load_cached(cache: Path) -> PreparedData:
    import datasets

    stats = DataStats(**json.loads((cache / "stats.json").read_text()))
    stats.cache_hit, stats.cache_path = True, str(cache)
    with _no_progress_bars():
        train = datasets.load_from_disk(str(cache / "train"))
        val = datasets.load_from_disk(str(cache / "val")) if (cache / "val").exists() else None
    return PreparedData(train, val, stats)
