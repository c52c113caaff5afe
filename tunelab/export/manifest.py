"""``tunelab.json``: what a merged / exported model was made from, and how it was checked.

Hashes are sha256 over the full bytes of the weight files (safetensors shards in shard order,
or the adapter's config + weights), each prefixed by its file name and size, so a renamed or
re-sharded copy of the same weights hashes differently but a copied directory hashes the same.
Full bytes cost about one second per GB; a merge reads every byte anyway.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tunelab import __version__

MANIFEST_NAME = "tunelab.json"
_CHUNK = 8 * 2**20


def hash_files(files: list[Path]) -> str:
    """sha256 over ``name:size`` and the bytes of each file, in the given order."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def hash_model_weights(model_dir: Path) -> str:
    """Hash of an HF directory's safetensors weights (shard order)."""
    from tunelab.models.weights import checkpoint_files

    return hash_files(checkpoint_files(Path(model_dir)))


def hash_adapter(adapter_dir: Path) -> str:
    """Hash of a PEFT adapter: ``adapter_config.json`` + its weights file."""
    from tunelab.models.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN

    adapter_dir = Path(adapter_dir)
    files = [adapter_dir / ADAPTER_CONFIG]
    weights = adapter_dir / ADAPTER_WEIGHTS
    files.append(weights if weights.is_file() else adapter_dir / ADAPTER_WEIGHTS_BIN)
    return hash_files([f for f in files if f.is_file()])


def write_manifest(directory: Path, content: dict[str, Any]) -> Path:
    """Write ``tunelab.json`` (with tool version and UTC time) into ``directory``."""
    data = {
        "tunelab_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **content,
    }
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    """The ``tunelab.json`` of a directory, or {} when there is none."""
    path = Path(directory) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else {}
