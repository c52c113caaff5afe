"""Model spec -> local HF-format directory.

Specs, tried in this order:
  ``default``               the embedded SmolLM2-135M-Instruct, converted once and cached
  ``path/to/dir``           a local HF-format directory (must hold config.json)
  ``path/to/model.gguf``    a GGUF file, converted once and cached
  ``modelscope://org/name`` ModelScope (``pip install 'tunelab[modelscope]'``)
  ``hf://org/name``, ``org/name``  the Hugging Face hub (honours HF_ENDPOINT, HF_HUB_OFFLINE)
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from tunelab.default_model import default_gguf_path, tunelab_home
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

DEFAULT_NAME = "SmolLM2-135M-Instruct"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Mistral-format copies of the weights (consolidated.safetensors) and Meta's originals: the HF
# shards beside them are what we load, and these would double the download.
HUB_IGNORE = ["consolidated*.safetensors", "original/*"]


def models_dir() -> Path:
    return tunelab_home() / "models"


def resolve_model(spec: str | os.PathLike) -> Path:
    """Return a local directory holding config.json, weights and tokenizer for ``spec``."""
    spec = str(spec).strip()
    if not spec:
        raise TunelabError("empty model spec; pass --model default, a directory or a hub id.")
    if spec == "default":
        return _cached_conversion(default_gguf_path(), models_dir() / DEFAULT_NAME)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise TunelabError(
                f"model directory {path} has no config.json; point --model at an HF-format "
                "model directory (or convert it with `tunelab convert`)."
            )
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunelabError(f"GGUF file {path} does not exist; check the path.")
        return _cached_conversion(path, models_dir() / f"gguf-{_file_key(path)}")
    if spec.startswith("modelscope://"):
        return _from_modelscope(spec.removeprefix("modelscope://"))
    if spec.startswith("hf://"):
        return _from_hf_hub(spec, spec.removeprefix("hf://"))
    if path.is_file():
        raise TunelabError(
            f"model path {spec!r} is a file, not a model directory or a .gguf file; point "
            "--model at an HF-format directory (with config.json) or a .gguf file."
        )
    if looks_like_path(spec) or path.exists():
        raise TunelabError(
            f"model path {spec!r} does not exist (or is not a directory or .gguf file); "
            "check the path, or use `default` or a hub id such as org/name."
        )
    return _from_hf_hub(spec, spec)


def peft_base_name(spec: str | os.PathLike, resolved: Path) -> str:
    """An adapter's ``base_model_name_or_path`` for a model loaded from ``spec``.

    A Hugging Face hub id stays a bare ``org/name`` (peft fetches it anywhere); anything
    else (``default``, a directory, a .gguf, ModelScope) is the resolved local directory,
    absolute, since peft knows none of our spec forms.
    """
    spec = str(spec).strip()
    if spec.startswith("hf://"):
        return spec.removeprefix("hf://")
    local = spec == "default" or spec.startswith("modelscope://") or spec.endswith(".gguf")
    if not local and not Path(spec).expanduser().exists() and not looks_like_path(spec):
        return spec
    return str(Path(resolved).resolve())


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` reads as a local path rather than a hub ``org/name``."""
    return spec.startswith((".", "/", "~")) or spec.count("/") != 1


def _file_key(path: Path) -> str:
    st = path.resolve().stat()
    raw = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(raw).hexdigest()[:12]}"


def _cached_conversion(gguf: Path, out: Path) -> Path:
    """Convert ``gguf`` into ``out`` once; later calls reuse the directory."""
    if (out / "config.json").exists():
        return out
    from tunelab.models.convert import convert_gguf

    log.info("converting %s to %s (first use only)", gguf, out)
    convert_gguf(gguf, out, dtype=None, overwrite=True)
    return out


def _from_hf_hub(spec: str, repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a core dependency
        raise TunelabError("huggingface_hub is not installed: pip install huggingface_hub") from e
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE)
        )
    except Exception as e:  # the hub client raises many types; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = str(e) or type(e).__name__  # some errors have an empty message
        if offline:
            why = "offline mode (HF_HUB_OFFLINE=1) and not in the local cache"
        raise TunelabError(
            f"model {spec!r}: not a local directory or .gguf file, and the Hugging Face hub "
            f"({endpoint}) could not provide {repo_id!r}: {why.splitlines()[0]}. Check the "
            "name, set HF_ENDPOINT to a reachable mirror, or download the model and pass its "
            "directory."
        ) from e


def _from_modelscope(repo_id: str) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise TunelabError(
            f"modelscope://{repo_id} needs the modelscope package: "
            "pip install 'tunelab[modelscope]'."
        ) from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        why = str(e) or type(e).__name__  # some errors have an empty message
        raise TunelabError(
            f"ModelScope could not provide {repo_id!r}: {why.splitlines()[0]}. Check the "
            "name and your network, or download the model and pass its directory."
        ) from e
