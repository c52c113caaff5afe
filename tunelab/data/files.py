"""File reading for the data readers: path specs -> files -> raw records (dicts).

Supported inputs: JSON (a list of objects), JSON Lines, CSV / TSV, Parquet, and a directory
written by HF ``datasets`` (``save_to_disk``). Every record comes with its source, ``path:line``
for JSON Lines and ``path:row N`` (1-based) otherwise, so every later error can point at it.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")
# Files `save_to_disk` writes: a Dataset holds the first two, a DatasetDict the third.
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class BadRecord:
    """A record that could not be parsed (a malformed JSON line, a non-object row)."""

    reason: str


Record = dict[str, Any] | BadRecord


def is_datasets_dir(path: Path) -> bool:
    """True for a directory written by ``datasets.Dataset(Dict).save_to_disk``."""
    return path.is_dir() and any((path / m).is_file() for m in _DATASETS_MARKERS)


def expand_paths(spec: str, key: str = "data.train") -> list[Path]:
    """A file, a glob (``data/*.jsonl``, ``**`` allowed) or a directory -> sorted paths.

    A plain directory expands to the supported files directly inside it; a directory saved by
    HF ``datasets`` is returned as is. Errors name the spec and the config ``key`` it is in.
    """
    text = str(Path(spec).expanduser())
    if glob.has_magic(text) and not Path(text).exists():  # "a[1].jsonl" may be a real name
        matches = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
        # Skip the files inside a `datasets` directory: the directory is the unit.
        paths = [p for p in matches if _readable(p) and not is_datasets_dir(p.parent)]
        if not paths:
            raise TunelabError(
                f"no data files match {spec!r}: "
                + (f"{len(matches)} matches but none is a data file " if matches else "")
                + f"(supported: {', '.join(SUFFIXES)} files or a `datasets` directory)."
            )
        return paths
    path = Path(text)
    if not path.exists():
        raise TunelabError(f"data path {spec!r} does not exist; check the path in {key}.")
    if path.is_dir() and not is_datasets_dir(path):
        paths = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not paths:
            raise TunelabError(
                f"data directory {spec!r} holds no data files ({', '.join(SUFFIXES)}) "
                "and was not written by `datasets.save_to_disk`."
            )
        return paths
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        raise TunelabError(
            f"data file {spec!r} has an unsupported type {path.suffix!r}; "
            f"use one of {', '.join(SUFFIXES)} or a `datasets` directory."
        )
    return [path]


def _readable(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() in SUFFIXES) or is_datasets_dir(path)


def files_of(path: Path) -> list[Path]:
    """The files behind ``path``, for fingerprinting (every file of a ``datasets`` dir)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def iter_records(path: Path) -> Iterator[tuple[str, Record]]:
    """Yield ``(source, record)`` for every example in ``path``, in file order."""
    if path.is_dir():
        yield from _datasets_records(path)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_records(path)
    elif suffix == ".json":
        yield from _json_records(path)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_records(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        yield from _parquet_records(path)


def _jsonl_records(path: Path, text: str | None = None) -> Iterator[tuple[str, Record]]:
    text = _read_text(path) if text is None else text
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield source, BadRecord(f"malformed JSON line: {e}")
            continue
        yield source, _object_or_bad(record)


def _json_records(path: Path) -> Iterator[tuple[str, Record]]:
    text = _read_text(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if not text.lstrip().startswith("["):  # many published ".json" files are JSON Lines
            yield from _jsonl_records(path, text)
            return
        raise TunelabError(
            f"{path}:{e.lineno}: the file is not valid JSON ({e.msg} at column {e.colno}); "
            "fix it, or write one object per line as JSON Lines so bad lines can be skipped."
        ) from e
    if not isinstance(rows, list):  # one example, possibly pretty-printed
        yield f"{path}:row 1", _object_or_bad(rows)
        return
    for i, row in enumerate(rows, start=1):
        yield f"{path}:row {i}", _object_or_bad(row)


def _object_or_bad(record: Any) -> Record:
    if isinstance(record, dict):
        return record
    return BadRecord(f"expected a JSON object per example, got {type(record).__name__}")


def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[str, Record]]:
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB a cell) is too small for documents
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = enumerate(reader, start=1)
        while True:
            try:
                i, row = next(rows)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                where = f"{path}:{reader.line_num}" if reader.line_num else str(path)
                raise TunelabError(f"{where}: not valid UTF-8 CSV ({e}); fix the file.") from e
            if None in row:  # more cells than header columns
                yield f"{path}:row {i}", BadRecord("the row has more cells than the header")
            else:
                yield f"{path}:row {i}", dict(row)


def _parquet_records(path: Path) -> Iterator[tuple[str, Record]]:
    pq = _import("pyarrow.parquet", "pyarrow")
    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise TunelabError(f"{path} is not a readable Parquet file: {e}") from e
    i = 0
    for batch in pfile.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            i += 1
            yield f"{path}:row {i}", row


def _datasets_records(path: Path) -> Iterator[tuple[str, Record]]:
    datasets = _import("datasets", "datasets")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, path)
    # ClassLabel columns hold ints; readers want the label names.
    names = {
        col: feat.names
        for col, feat in ds.features.items()
        if isinstance(feat, datasets.ClassLabel)
    }
    for i, row in enumerate(ds, start=1):
        for col, labels in names.items():
            if isinstance(row.get(col), int) and 0 <= row[col] < len(labels):
                row[col] = labels[row[col]]
        yield f"{path}:row {i}", row


def _pick_split(ds: Any, path: Path) -> Any:
    if "train" in ds:
        return ds["train"]
    if len(ds) == 1:
        return next(iter(ds.values()))
    raise TunelabError(
        f"{path} holds the splits {sorted(ds)} and none is 'train'; point data.train at one "
        "split's sub-directory instead."
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TunelabError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8.") from e


def _import(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TunelabError(
            f"reading this data needs the {package!r} package: pip install {package}"
        ) from e
