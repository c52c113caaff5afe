"""QLoRA adapters: tell whether an adapter was trained on an NF4 base, and rebuild that base.

A QLoRA adapter learned to correct ``dequant(nf4(W))``, not ``W``. Merging it into the
full-precision ``W`` gives a model that neither training nor QLoRA inference ever ran, so a
detected QLoRA adapter is merged into the base it saw: each decoder-layer linear weight is
cast to the dtype training loaded it in, quantized to NF4 exactly as training does
(``quantize_base_nf4``), dequantized, and the merge happens in fp32 on top of that. NF4 codes
depend on that dtype (bf16 and fp32 copies of a weight round to different codes), hence the
care to find it.

Detection, first match wins:
  1. the adapter's ``tunelab_adapter.json`` holds ``{"method": "qlora", "base_dtype":
     "bfloat16"}`` (a side file: peft warns about keys it does not know in
     ``adapter_config.json``, where adapters trained before it carry the same under
     ``"tunelab"``);
  2. a tunelab run's ``config.yaml`` one or two levels up (``RUN/final``,
     ``RUN/checkpoints/step-N``) says ``method: qlora``; the base dtype is its
     ``train.precision`` (``auto``: fp32 when the run's device was the CPU, else bf16);
  3. nothing: the adapter is treated as plain LoRA and merged into the full-precision base
     (what PEFT's ``merge_and_unload`` does). Pass ``qlora="yes"`` to force the NF4 base
     (dtype: the base checkpoint's stored dtype) or ``"no"`` to force the full one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder

log = logging.getLogger(__name__)

MARKER_FILE = "tunelab_adapter.json"
MARKER_KEY = "tunelab"  # the same marker inside adapter_config.json (older adapters)
_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QloraInfo:
    """Whether to merge into the NF4 base, the dtype it was quantized from, and why."""

    qlora: bool
    base_dtype: torch.dtype | None
    source: str

    def describe(self) -> str:
        """What the adapter is merged into, for the report and manifest."""
        if not self.qlora:
            return "full-precision base"
        dtype = str(self.base_dtype).removeprefix("torch.") if self.base_dtype else "its dtype"
        return f"NF4-dequantized base (quantized from {dtype}, {self.source})"


def detect_qlora(adapter_dir: Path, setting: str = "auto") -> QloraInfo:
    """Resolve ``setting`` (auto / yes / no) for the adapter in ``adapter_dir``."""
    if setting not in ("auto", "yes", "no"):
        raise TunelabError(f"qlora must be auto, yes or no (got {setting!r}).")
    if setting == "no":
        return QloraInfo(False, None, "qlora=no")
    found = _from_marker(Path(adapter_dir)) or _from_run_config(Path(adapter_dir))
    if found is not None:
        return found if setting == "auto" else QloraInfo(True, found.base_dtype, "qlora=yes")
    if setting == "yes":
        return QloraInfo(True, None, "qlora=yes")
    return QloraInfo(False, None, "no QLoRA marker found")


def read_marker(adapter_dir: Path) -> dict | None:
    """The adapter's tunelab marker (``{"method", "base_dtype"}``), from the side file or,
    for older adapters, from ``adapter_config.json``; None when there is none."""
    for path, key in ((adapter_dir / MARKER_FILE, None), (adapter_dir / "adapter_config.json",
                                                          MARKER_KEY)):  # fmt: skip
        try:
            data = json.loads(path.read_text())
            marker = data if key is None else data.get(key)
        except (OSError, json.JSONDecodeError, AttributeError):
            continue  # read_adapter_config reports a broken config with a better message
        if isinstance(marker, dict) and "method" in marker:
            return marker
    return None


def write_marker(adapter_dir: Path, base_dtype: torch.dtype) -> None:
    """Mark the adapter in ``adapter_dir`` as trained on an NF4 base quantized from
    ``base_dtype``."""
    marker = {"method": "qlora", "base_dtype": str(base_dtype).removeprefix("torch.")}
    (adapter_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2))


def _from_marker(adapter_dir: Path) -> QloraInfo | None:
    marker = read_marker(adapter_dir)
    if marker is None:
        return None
    if marker["method"] != "qlora":
        return QloraInfo(False, None, "tunelab marker")
    dtype = _DTYPES.get(str(marker.get("base_dtype")), torch.bfloat16)
    return QloraInfo(True, dtype, "tunelab marker")


def _from_run_config(adapter_dir: Path) -> QloraInfo | None:
    import yaml

    for run_dir in (adapter_dir.parent, adapter_dir.parent.parent):
        path = run_dir / "config.yaml"
        if not path.is_file():
            continue
        try:
            cfg = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(cfg, dict) or "method" not in cfg:
            continue
        if cfg["method"] != "qlora":
            return QloraInfo(False, None, f"run config {path}")
        precision = str((cfg.get("train") or {}).get("precision", "auto"))
        dtype = _PRECISIONS.get(precision)
        if dtype is None:  # auto: what resolve_precision picked on the run's device
            on_cpu = (cfg.get("device") or _run_device(run_dir)) == "cpu"
            dtype = torch.float32 if on_cpu else torch.bfloat16
        return QloraInfo(True, dtype, f"run config {path}")
    return None


def _run_device(run_dir: Path) -> str | None:
    try:
        device = json.loads((run_dir / "env.json").read_text()).get("device")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return str(device).split(":")[0] if device else None


@torch.no_grad()
def nf4_round_trip(model: Decoder, base_dtype: torch.dtype) -> int:
    """Replace each decoder-layer linear weight by ``dequant(nf4(W in base_dtype))``, in place.

    The weights come back in the model's dtype (fp32 for a merge). Returns the layer count.
    """
    from tunelab.models.hf_fallback import is_hf_model, nf4_view
    from tunelab.models.lora import candidate_linears, lora_modules
    from tunelab.models.quant import dequantize_nf4, quantize_base_nf4

    assert not lora_modules(model), "rebuild the NF4 base before applying the adapter"
    dtype = model.dtype
    for linear in candidate_linears(model).values():
        linear.weight.data = linear.weight.data.to(base_dtype)
    layers = nf4_view(model) if is_hf_model(model) else model  # where the layers are
    report = quantize_base_nf4(layers, model.device, announce=False)  # logged below
    dequantize_nf4(layers, dtype)
    for linear in candidate_linears(model).values():  # layers NF4 skipped (size % 64 != 0)
        linear.weight.data = linear.weight.data.to(dtype)
    log.info("rebuilt the NF4 base of %d layers (from %s)", len(report.quantized), base_dtype)
    return len(report.quantized)
