"""Everything that knows about cuda / npu / mps / cpu lives here, and only here.

Other modules ask it which device to use, how much memory is free, which collective backend
and default dtype to use, and whether a feature works on a device (`supports` / `require`).

Ascend NPUs come from the out-of-tree `torch_npu` package: importing it registers the "npu"
device type and `torch.npu` (a mirror of `torch.cuda`). It is imported lazily, and only when
installed, so CPU and CUDA hosts never pay for it.

Why not route everything through `torch.accelerator` (torch >= 2.6)? It only knows the one
accelerator this torch build targets, and its memory queries arrived in later releases. So
per-device calls go to `torch.cuda` / `torch.npu` / `torch.mps`, which torch_npu keeps
API-compatible; `torch.accelerator` is what `tunelab env` reports as the build's accelerator.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType

import psutil
import torch

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

DEVICE_TYPES = ("cuda", "npu", "mps", "cpu")
_PREFERENCE = ("npu", "cuda", "mps", "cpu")  # what "auto" picks first
_VISIBLE_DEVICES_VARS = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
_DISTRIBUTED_BACKENDS = {"cuda": "nccl", "npu": "hccl", "mps": "gloo", "cpu": "gloo"}

DeviceLike = torch.device | str


# --- which devices exist ------------------------------------------------------------------


def _import_torch_npu() -> bool:
    """Import torch_npu if installed (this registers "npu" with torch); False if unusable."""
    if sys.modules.get("torch_npu") is not None:  # None there means "blocked", like not installed
        return True
    try:
        importlib.import_module("torch_npu")
    except ModuleNotFoundError:
        return False
    except Exception as e:  # a broken install, e.g. CANN libraries not on the path
        log.debug("torch_npu is installed but failed to import: %s", e)
        return False
    return True


def npu_available() -> bool:
    """True when torch_npu imports and sees at least one Ascend NPU."""
    return _import_torch_npu() and hasattr(torch, "npu") and bool(torch.npu.is_available())


def _is_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    if device_type == "npu":
        return npu_available()
    if device_type == "cuda":
        return torch.cuda.is_available()
    return torch.backends.mps.is_available()


def available_device_types() -> list[str]:
    """Usable device types in preference order (npu, cuda, mps, cpu); "cpu" is always last."""
    return [t for t in _PREFERENCE if _is_available(t)]


def _backend(device_type: str) -> ModuleType:
    """The torch submodule with the cuda-style API for an accelerator: torch.cuda / npu / mps."""
    if device_type == "npu":
        _import_torch_npu()
    return getattr(torch, device_type)


def device_count(device_type: str) -> int:
    """Number of visible devices of this type (1 for cpu, 0 when the type is unavailable)."""
    _check_type(device_type)
    if device_type == "cpu":
        return 1
    if not _is_available(device_type):
        return 0
    if device_type == "mps":
        return 1
    return int(_backend(device_type).device_count())


# --- choosing a device --------------------------------------------------------------------


def _check_type(device_type: str) -> None:
    if device_type not in DEVICE_TYPES:
        raise TunelabError(
            f"Unknown device type {device_type!r}: choose one of auto, {', '.join(DEVICE_TYPES)} "
            "(optionally with an index, e.g. cuda:1)."
        )


def _split(device: DeviceLike) -> tuple[str, int | None]:
    """("npu", 1) from "npu:1" or torch.device("npu", 1); works before "npu" is registered."""
    if isinstance(device, torch.device):
        _check_type(device.type)
        return device.type, device.index
    device_type, _, index = device.strip().lower().partition(":")
    _check_type(device_type)
    if not index:
        return device_type, None
    if not index.isdigit():
        raise TunelabError(
            f"Bad device {device!r}: the index must be a number, like {device_type}:0"
        )
    return device_type, int(index)


def resolve_device(spec: DeviceLike | None = None) -> torch.device:
    """Turn "auto" / "cuda" / "npu:1" / ... into a usable torch.device, or explain why not.

    None or "auto" reads TUNELAB_DEVICE, then picks the best available type. An automatic
    accelerator pick takes the index from LOCAL_RANK, so each torchrun worker gets its own.
    """
    source = ""
    if spec is None or str(spec).strip().lower() == "auto":
        spec = os.environ.get("TUNELAB_DEVICE", "").strip() or "auto"
        source = " (from TUNELAB_DEVICE)" if spec != "auto" else ""
    if str(spec).lower() == "auto":
        device_type = available_device_types()[0]
        index = None if device_type == "cpu" else _local_rank()
    else:
        device_type, index = _split(spec)
    if not _is_available(device_type):
        raise TunelabError(
            f"Device {str(spec)!r}{source} is not available here (available: "
            f"{', '.join(available_device_types())}). {_unavailable_hint(device_type)}"
        )
    if device_type in ("cpu", "mps") and index not in (None, 0):
        raise TunelabError(
            f"Device {device_type}:{index} does not exist: there is one {device_type} device; "
            f"use {device_type}."
        )
    count = device_count(device_type)
    if index is not None and index >= count and device_type != "cpu":
        var = visible_devices_var(device_type)
        value = visible_devices(device_type)
        seen = f" with {var}={value!r}" if value else ""
        raise TunelabError(
            f"Device {device_type}:{index} does not exist: {count} {device_type} device(s) are "
            f"visible{seen}. Use an index below {count}, or check {var}."
        )
    return torch.device(device_type, index) if index is not None else torch.device(device_type)


def _unavailable_hint(device_type: str) -> str:
    if device_type == "cuda":
        if torch.version.cuda is None:
            return (
                f"This torch ({torch.__version__}) is built without CUDA: install a CUDA build of "
                "torch (see https://pytorch.org/get-started/locally/)."
            )
        return "torch has CUDA but sees no GPU: check `nvidia-smi` and CUDA_VISIBLE_DEVICES."
    if device_type == "npu":
        return (
            "Install the torch_npu release matching your torch, run "
            "`source /usr/local/Ascend/ascend-toolkit/set_env.sh`, and check `npu-smi info` and "
            "ASCEND_RT_VISIBLE_DEVICES. `tunelab env` shows what is missing."
        )
    return "MPS needs macOS on Apple silicon and a torch build with MPS; use --device cpu instead."


def visible_devices_var(device_type: str) -> str | None:
    """The env var that limits which devices a process sees (None for cpu / mps)."""
    return _VISIBLE_DEVICES_VARS.get(device_type)


def visible_devices(device_type: str) -> str | None:
    """The current value of `visible_devices_var(device_type)`, None if unset."""
    var = visible_devices_var(device_type)
    return os.environ.get(var) if var else None


def distributed_backend(device_type: str) -> str:
    """torch.distributed backend for a device type: nccl (cuda), hccl (npu), gloo (cpu, mps)."""
    _check_type(device_type)
    return _DISTRIBUTED_BACKENDS[device_type]


# --- memory, sync, seeds ------------------------------------------------------------------


def mem_get_info(device: DeviceLike) -> tuple[int, int]:
    """(free, total) bytes. CPU and MPS (unified memory) report system RAM."""
    device_type, index = _split(device)
    if device_type in ("cpu", "mps"):
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    free, total = _backend(device_type).mem_get_info(index)
    return int(free), int(total)


def synchronize(device: DeviceLike) -> None:
    """Wait for queued kernels (no-op on cpu); needed before timing anything."""
    device_type, index = _split(device)
    if device_type == "mps":
        torch.mps.synchronize()
    elif device_type != "cpu":
        _backend(device_type).synchronize(index)


def empty_cache(device: DeviceLike) -> None:
    """Return cached allocator blocks to the device (no-op on cpu)."""
    device_type, _ = _split(device)
    if device_type != "cpu":
        _backend(device_type).empty_cache()


def peak_memory(device: DeviceLike) -> int:
    """Peak bytes allocated by tensors since the last reset; on cpu, the process's max RSS."""
    device_type, index = _split(device)
    if device_type == "cpu":
        return _max_rss()
    if device_type == "mps":
        return int(torch.mps.driver_allocated_memory())  # MPS keeps no peak: report current
    return int(_backend(device_type).max_memory_allocated(index))


def _max_rss() -> int:
    try:
        import resource
    except ImportError:  # Windows: no getrusage, current RSS is the best we have
        return int(psutil.Process().memory_info().rss)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS bytes, Linux KiB


def reset_peak_memory(device: DeviceLike) -> None:
    """Start a new peak for `peak_memory` (cpu max RSS and mps cannot be reset)."""
    device_type, index = _split(device)
    if device_type in ("cuda", "npu"):
        _backend(device_type).reset_peak_memory_stats(index)


def manual_seed(seed: int) -> None:
    """Seed the CPU generator and every accelerator's generators."""
    torch.manual_seed(seed)  # also seeds cuda / mps / the current accelerator's generators
    if npu_available():  # explicit: older torch_npu releases do not hook torch.manual_seed
        torch.npu.manual_seed_all(seed)


def _local_rank() -> int:
    raw = os.environ.get("LOCAL_RANK", "0").strip() or "0"
    if not raw.isdigit():
        raise TunelabError(
            f"LOCAL_RANK={raw!r} is not a device index (a number >= 0); unset it, or let "
            "torchrun set it."
        )
    return int(raw)


def rng_state() -> dict | None:
    """RNG states of every visible accelerator of the active type (saved in checkpoints)."""
    for device_type in ("npu", "cuda", "mps"):  # the selection order
        if not _is_available(device_type):
            continue
        if device_type == "mps":  # one generator, no *_all variant
            return {"type": "mps", "states": torch.mps.get_rng_state()}
        return {"type": device_type, "states": _backend(device_type).get_rng_state_all()}
    return None


def set_rng_state(state: dict | None) -> None:
    """Restore what ``rng_state`` saved (ignored when the accelerator type differs)."""
    if not state or not _is_available(state["type"]):
        return
    if state["type"] == "mps":
        torch.mps.set_rng_state(state["states"])
    else:
        _backend(state["type"]).set_rng_state_all(state["states"])


def device_name(device: DeviceLike) -> str:
    """Human name of the device, e.g. "NVIDIA H100 80GB HBM3", "Ascend910B2", "cpu"."""
    device_type, index = _split(device)
    if device_type == "cpu":
        return "cpu"
    if device_type == "mps":
        return "Apple MPS"
    return str(_backend(device_type).get_device_name(index))


# --- dtypes -------------------------------------------------------------------------------

_DTYPE_NAMES = {
    **dict.fromkeys(("bf16", "bfloat16"), torch.bfloat16),
    **dict.fromkeys(("fp16", "float16", "half"), torch.float16),
    **dict.fromkeys(("fp32", "float32", "float"), torch.float32),
}


def parse_dtype(name: str) -> torch.dtype | None:
    """bf16 / fp16 / fp32 and their aliases to a torch.dtype; "auto" gives None (caller picks)."""
    key = name.strip().lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPE_NAMES:
        raise TunelabError(f"Unknown dtype {name!r}: use one of auto, bf16, fp16, fp32.")
    return _DTYPE_NAMES[key]


def supports_bf16(device: DeviceLike) -> bool:
    """bf16 compute is supported (cpu: yes; cuda: Ampere+; npu: 910B+; mps: treated as no)."""
    device_type, _ = _split(device)
    if device_type not in CAPABILITIES["bf16"]:
        return False
    if device_type == "cpu":
        return True
    check = getattr(_backend(device_type), "is_bf16_supported", None)
    if check is None:
        return True
    if device_type == "cuda":  # native only: pre-Ampere GPUs emulate bf16, slowly
        try:
            return bool(check(including_emulation=False))
        except TypeError:  # an older torch without the argument
            return bool(check())
    return bool(check())


def cpu_bf16_matmul() -> str | None:
    """How this CPU multiplies bf16 matrices in hardware: "amx", "avx512_bf16" or None.

    With AMX (Xeon Sapphire Rapids and later) bf16 inference runs about twice as fast as
    fp32 (docs/engine.md); without either, bf16 matmuls are converted in software and are
    usually no faster than fp32.
    """
    for name, check in (
        ("amx", "_is_amx_tile_supported"),
        ("avx512_bf16", "_is_avx512_bf16_supported"),
    ):
        probe = getattr(torch.cpu, check, None)
        try:
            if probe is not None and probe():
                return name
        except Exception:  # private torch API: a missing or failing probe just means "unknown"
            return None
    return None


def supports_fp16(device: DeviceLike) -> bool:
    """fp16 autocast works on this device type."""
    return supports("fp16_autocast", device)


def default_dtype(device: DeviceLike) -> torch.dtype:
    """bf16 where supported on accelerators, else fp16; fp32 on cpu (fast and exact there)."""
    device_type, _ = _split(device)
    if device_type == "cpu":
        return torch.float32
    return torch.bfloat16 if supports_bf16(device) else torch.float16


# --- capability table ---------------------------------------------------------------------

# feature -> (device types that support it, what to do instead elsewhere)
_CAPABILITY_TABLE: dict[str, tuple[frozenset[str], str]] = {
    "triton_kernels": (frozenset({"cuda"}), "use --attention-backend sdpa instead"),
    "cuda_graphs": (frozenset({"cuda"}), "run decode eagerly (turn CUDA graphs off)"),
    "flash_attn": (frozenset({"cuda"}), "use --attention-backend sdpa instead"),
    "qlora_nf4": (frozenset({"cuda", "cpu"}), "use LoRA on 16-bit weights instead of QLoRA"),
    "fused_adamw": (frozenset({"cuda", "npu", "cpu"}), "use the default (foreach) AdamW"),
    "reduce_op_avg": (
        frozenset({"cuda", "cpu"}),
        "all-reduce with ReduceOp.SUM and divide by the world size (HCCL has no AVG)",
    ),
    "bf16": (frozenset({"cuda", "npu", "cpu"}), "use --dtype fp16 or fp32 instead"),
    "fp16_autocast": (frozenset({"cuda", "npu", "mps", "cpu"}), "use --dtype fp32 instead"),
}
CAPABILITIES: dict[str, frozenset[str]] = {f: d for f, (d, _) in _CAPABILITY_TABLE.items()}
ALTERNATIVES: dict[str, str] = {f: hint for f, (_, hint) in _CAPABILITY_TABLE.items()}


def supports(feature: str, device: DeviceLike) -> bool:
    """Whether `feature` (a key of CAPABILITIES) works on this device's type."""
    if feature not in CAPABILITIES:
        raise ValueError(f"unknown feature {feature!r}; known: {sorted(CAPABILITIES)}")
    return _split(device)[0] in CAPABILITIES[feature]


def require(feature: str, device: DeviceLike) -> None:
    """Raise TunelabError saying what to use instead when `feature` does not work on `device`."""
    if not supports(feature, device):
        device_type = _split(device)[0]
        where = ", ".join(t for t in DEVICE_TYPES if t in CAPABILITIES[feature])
        raise TunelabError(
            f"{feature} is not available on {device_type} (only on {where}): "
            f"{ALTERNATIVES[feature]}."
        )
