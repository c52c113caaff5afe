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
