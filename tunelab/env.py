"""`tunelab env`: report the software and devices this host has, and diagnose known breakages.

`collect()` gathers facts into a JSON-friendly dict without importing heavy packages (versions
come from installed metadata). `diagnose()` turns a report into `Problem`s, each with a fix;
the checks take plain arguments so tests can feed them made-up hosts (an NPU box with the
wrong torch_npu, a CUDA torch left on an Ascend host, ...).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TextIO

import torch

from tunelab import device as dev
from tunelab.errors import TunelabError

CORE_PACKAGES = ("transformers", "peft", "safetensors", "tokenizers", "datasets", "huggingface_hub")
# distribution name -> import name, for backends we only report (never import)
OPTIONAL_BACKENDS = {
    "vllm": "vllm",
    "sglang": "sglang",
    "lmdeploy": "lmdeploy",
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "flash-attn": "flash_attn",
    "deepspeed": "deepspeed",
    "triton": "triton",
}
CANN_HOME_VARS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
SET_ENV_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"


@dataclass
class Problem:
    """Something wrong with the environment, and how to fix it."""

    severity: Literal["error", "warning"]
    message: str
    fix: str


# --- collecting facts ---------------------------------------------------------------------


def package_version(dist: str, module: str | None = None) -> str | None:
    """Installed version of a distribution, "unknown" if importable without metadata, else None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        found = importlib.util.find_spec(module or dist.replace("-", "_")) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules without a __spec__
        found = False
    return "unknown" if found else None


def major_minor(version: str | None) -> tuple[int, int] | None:
    """(2, 5) from "2.5.1+cu124" or "2.5.1.post3"; None when it does not parse."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match[1]), int(match[2])) if match else None


def cann_version(home: str | None) -> str | None:
    """CANN version from the toolkit's version files under `home`, if any can be read."""
    if not home:
        return None
    root = Path(home)
    # version.cfg: toolkit_running_version=[7.6.0.1.220:8.0.0]; *.info: version=8.0.RC2
    files = [root / "version.cfg", root / "ascend_toolkit_install.info"]
    files += sorted(root.glob("*-linux/ascend_toolkit_install.info"))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        fields = dict(re.findall(r"(?m)^\s*(\w+)\s*=\s*\[?([^\]\s]+)", text))
        for key in ("toolkit_running_version", "version", "runtime_running_version"):
            if key in fields:
                return fields[key].rsplit(":", 1)[-1]  # "7.6.0.1.220:8.0.0" -> CANN "8.0.0"
    return None


def _torch_npu_info(torch_version: str) -> dict:
    version = package_version("torch_npu")
    error = None
    if version is not None:
        try:
            importlib.import_module("torch_npu")
        except Exception as e:  # any failure is worth reporting verbatim
            error = f"{type(e).__name__}: {e}"
    npu_mm, torch_mm = major_minor(version), major_minor(torch_version)
    return {
        "installed": version is not None,
        "version": version,
        "import_error": error,
        "matches_torch": (npu_mm == torch_mm) if npu_mm and torch_mm else None,
    }


def _devices() -> list[dict]:
    found = []
    for device_type in dev.available_device_types():
        indices = [None] if device_type in ("cpu", "mps") else range(dev.device_count(device_type))
        for index in indices:
            spec = device_type if index is None else f"{device_type}:{index}"
            entry: dict = {"type": device_type, "index": index}
            try:
                free, total = dev.mem_get_info(spec)
                entry.update(name=dev.device_name(spec), free_bytes=free, total_bytes=total)
            except Exception as e:  # a flaky device must not hide the rest of the report
                entry["error"] = f"{type(e).__name__}: {e}"
            found.append(entry)
    return found


def collect() -> dict:
    """Facts about this host as a JSON-serialisable dict (see `diagnose`)."""
    torch_npu = _torch_npu_info(torch.__version__)  # first: importing it registers "npu"
    cann_home = next((os.environ[v] for v in CANN_HOME_VARS if os.environ.get(v)), None)
    accelerator = torch.accelerator.current_accelerator()
    report: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None),
            "accelerator": accelerator.type if accelerator is not None else None,
        },
        "torch_npu": torch_npu,
        "cann": {"home": cann_home, "version": cann_version(cann_home)},
        "devices": _devices(),
        "cpu_bf16_matmul": dev.cpu_bf16_matmul(),
        "visible_devices": {
            var: os.environ.get(var)
            for var in (dev.visible_devices_var("cuda"), dev.visible_devices_var("npu"))
            if var
        },
        "device": None,
        "distributed_backend": None,
        "device_error": None,
        "packages": {name: package_version(name) for name in CORE_PACKAGES},
        "optional_backends": {d: package_version(d, m) for d, m in OPTIONAL_BACKENDS.items()},
    }
    try:
        chosen = dev.resolve_device()
        report["device"] = str(chosen)
        report["distributed_backend"] = dev.distributed_backend(chosen.type)
    except TunelabError as e:
        report["device_error"] = str(e)
    return report


# --- diagnosing ---------------------------------------------------------------------------

_LIBRARY_LOAD_ERRORS = ("dll load failed", "libascend", "libhccl", "cannot open shared object")
_HIDING_VALUES = ("", "-1", "none", "void", "nodevfiles")


def check_torch_npu_version(torch_version: str, torch_npu_version: str | None) -> Problem | None:
    """torch_npu is built against one torch X.Y; any other torch fails at import or at runtime."""
    npu_mm, torch_mm = major_minor(torch_npu_version), major_minor(torch_version)
    if not npu_mm or not torch_mm or npu_mm == torch_mm:
        return None
    want = "{}.{}".format(*torch_mm)
    return Problem(
        "error",
        f"torch_npu {torch_npu_version} is built for torch {npu_mm[0]}.{npu_mm[1]}, "
        f"but torch {torch_version} is installed.",
        f"Install the torch_npu release matching torch {want} (pip install 'torch_npu=={want}.*'),"
        " or the torch version your torch_npu expects.",
    )


def check_torch_npu_import(import_error: str | None) -> Problem | None:
    """A torch_npu that is installed but does not import: usually CANN is not on the path."""
    if not import_error:
        return None
    if any(s in import_error.lower() for s in _LIBRARY_LOAD_ERRORS):
        return Problem(
            "error",
            f"torch_npu cannot load the Ascend CANN libraries: {import_error}",
            f"Load the CANN toolkit environment first: `{SET_ENV_HINT}` (or your install's "
            "set_env.sh), then check `npu-smi info`.",
        )
    return Problem(
        "error",
        f"torch_npu is installed but fails to import: {import_error}",
        "Reinstall the torch_npu release that matches your torch and CANN versions.",
    )


def check_cuda_torch_on_npu_host(
    torch_version: str, torch_cuda: str | None, ascend_host: bool
) -> Problem | None:
    """On Ascend, torch_npu expects the CPU torch wheel; a CUDA one drags in unused libraries."""
    if not ascend_host or torch_cuda is None:
        return None
    base = torch_version.split("+")[0]
    return Problem(
        "warning",
        f"This looks like an Ascend NPU host, but torch {torch_version} is a CUDA {torch_cuda} "
        "build (CUDA libraries left behind).",
        f"Install the CPU torch wheel that torch_npu expects: pip install torch=={base} "
        "--index-url https://download.pytorch.org/whl/cpu",
    )


def check_cuda_visible_devices(
    torch_cuda: str | None, cuda_visible: str | None, cuda_devices: int
) -> Problem | None:
    """CUDA_VISIBLE_DEVICES set so that a CUDA torch sees no GPU at all."""
    if torch_cuda is None or cuda_visible is None or cuda_devices > 0:
        return None
    if cuda_visible.strip().lower() not in _HIDING_VALUES and not cuda_visible.startswith("-"):
        return None
    return Problem(
        "warning",
        f"CUDA_VISIBLE_DEVICES={cuda_visible!r} hides every GPU from torch (built with CUDA "
        f"{torch_cuda}).",
        "Unset CUDA_VISIBLE_DEVICES or set it to GPU indices that `nvidia-smi -L` lists.",
    )


def check_accelerator(device_types: list[str], cpu_bf16: str | None = None) -> Problem | None:
    """Nothing but the CPU: everything works, training is just slow."""
    if any(t != "cpu" for t in device_types):
        return None
    fix = (
        "On NVIDIA install a CUDA build of torch; on Ascend install torch_npu and source the "
        "CANN set_env.sh. Small models and tests are fine on CPU."
    )
    if cpu_bf16 == "amx":
        fix += (
            " This CPU has AMX: --dtype bf16 runs generate / infer / serve about 2x faster "
            "than the fp32 default (not bit-identical to fp32)."
        )
    return Problem(
        "warning", "No GPU or NPU found: training and serving run on the CPU and will be slow.", fix
    )


def check_transformers(version: str | None) -> Problem | None:
    """tunelab loads tokenizers, chat templates and fallback models through transformers 5."""
    mm = major_minor(version)
    if version is not None and (mm is None or mm >= (5, 0)):
        return None
    what = "is not installed" if version is None else f"{version} is too old (need >= 5.0)"
    return Problem("error", f"transformers {what}.", "pip install -U 'transformers>=5.0'")


def check_device_choice(device_error: str | None) -> Problem | None:
    """The device that `auto` / TUNELAB_DEVICE picks cannot be used: every verb would fail."""
    if not device_error:
        return None
    return Problem(
        "error",
        f"No usable device: {device_error}",
        "Fix or unset TUNELAB_DEVICE (auto picks npu, cuda, mps, then cpu), or pass --device.",
    )


def diagnose(report: dict) -> list[Problem]:
    """Known problems found in a `collect()` report, errors first."""
    torch_info, npu = report["torch"], report["torch_npu"]
    device_types = [d["type"] for d in report["devices"]]
    visible = report["visible_devices"]
    ascend_env = (
        bool(report["cann"]["home"]) or visible.get("ASCEND_RT_VISIBLE_DEVICES") is not None
    )
    ascend_host = npu["installed"] or ascend_env
    cuda_visible = visible.get("CUDA_VISIBLE_DEVICES")
    found = [
        check_torch_npu_version(torch_info["version"], npu["version"]),
        check_torch_npu_import(npu["import_error"]),
        check_transformers(report["packages"].get("transformers")),
        check_cuda_torch_on_npu_host(torch_info["version"], torch_info["cuda"], ascend_host),
        check_cuda_visible_devices(torch_info["cuda"], cuda_visible, device_types.count("cuda")),
        check_accelerator(device_types, report.get("cpu_bf16_matmul")),
        check_device_choice(report.get("device_error")),
    ]
    problems = [p for p in found if p is not None]
    return sorted(problems, key=lambda p: p.severity != "error")


# --- output -------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _versions(packages: Mapping[str, str | None]) -> str:
    return ", ".join(f"{name} {v or '-'}" for name, v in packages.items())


def _device_rows(devices: list[dict]) -> list[tuple[str, str]]:
    rows = []
    for d in devices:
        label = d["type"] if d["index"] is None else f"{d['type']}:{d['index']}"
        if "error" in d:
            rows.append((label, f"error: {d['error']}"))
        else:
            mem = f"{_gib(d['free_bytes'])} free / {_gib(d['total_bytes'])}"
            rows.append((label, f"{d['name']}, {mem}"))
    return rows


def render_text(report: dict, problems: list[Problem]) -> str:
    """A plain-text report (no colours or box drawing, so it reads fine in logs and pipes)."""
    t, npu, cann = report["torch"], report["torch_npu"], report["cann"]
    if not npu["installed"]:
        npu_line = "not installed"
    else:
        npu_line = f"{npu['version']} (matches torch: {npu['matches_torch']})"
        npu_line += f", import failed: {npu['import_error']}" if npu["import_error"] else ""
    rows = [
        ("python", f"{report['python']} on {report['platform']}"),
        ("torch", f"{t['version']} (cuda {t['cuda'] or '-'}, hip {t['hip'] or '-'})"),
        ("torch_npu", npu_line),
        ("CANN", f"{cann['version'] or '?'} at {cann['home']}" if cann["home"] else "not found"),
    ]
    rows += _device_rows(report["devices"])
    rows.append(("cpu bf16", report.get("cpu_bf16_matmul") or "no hardware bf16 matmul"))
    rows += [
        (var, value if value is not None else "(unset)")
        for var, value in report["visible_devices"].items()
    ]
    if report["device"]:
        rows.append(
            ("device", f"{report['device']} (distributed: {report['distributed_backend']})")
        )
    else:
        rows.append(("device", f"none: {report['device_error']}"))
    rows += [
        ("packages", _versions(report["packages"])),
        ("optional", _versions(report["optional_backends"])),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}" for label, value in rows]
    lines.append("")
    if not problems:
        lines.append("No problems found.")
    for p in problems:
        lines += [f"{p.severity.upper()}: {p.message}", f"  fix: {p.fix}"]
    return "\n".join(lines) + "\n"


def run(as_json: bool = False, out: TextIO | None = None) -> int:
    """Print the report (text or JSON with a "problems" list); 1 if any error was found."""
    out = out or sys.stdout  # resolved late so redirected/captured stdout is honoured
    report = collect()
    problems = diagnose(report)
    if as_json:
        out.write(json.dumps({**report, "problems": [asdict(p) for p in problems]}, indent=2))
        out.write("\n")
    else:
        out.write(render_text(report, problems))
    return 1 if any(p.severity == "error" for p in problems) else 0
