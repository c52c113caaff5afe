"""Atomic file-system writes: a directory or file is complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tunelab.errors import TunelabError


class atomic_directory:  # lower-case: reads like a function in `with atomic_directory(out)`
    """Build a directory in a temp sibling, fsync it, then rename it into place.

    A crash midway leaves no partial ``out``; an existing ``out`` is refused unless
    ``overwrite``.
    """

    def __init__(self, out: Path, overwrite: bool = False):
        self.out, self.overwrite = Path(out), overwrite

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise TunelabError(f"{self.out} already exists; choose another --out or remove it.")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        # mkdtemp makes the dir private and some writers (safetensors) their files 0600:
        # the result gets the modes a plain write would have (umask applied).
        mask = _UMASK
        for f in self.tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                f.chmod(0o666 & ~mask)
            elif f.is_dir():
                f.chmod(0o777 & ~mask)
        self.tmp.chmod(0o777 & ~mask)
        old = None
        if self.out.exists() or self.out.is_symlink():  # move the old copy aside, so `out`
            old = self.out.with_name(f"{self.tmp.name}-old")  # is never missing for long
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:  # --overwrite of a file (or a link) where a directory now goes
                old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Write a file at the path this yields (a temp sibling); on success it is fsynced, given
    the modes a plain write would have and renamed to ``out``; on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o666 & ~_UMASK)  # mkstemp makes it 0600
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left after os.replace


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


# Read once at import: reading it means setting it, which would race other threads' writes.
_UMASK = _umask()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
