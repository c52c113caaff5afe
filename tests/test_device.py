"""The device layer on this CPU box, and on a fake Ascend NPU (a stand-in torch_npu)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from tunelab import device as dev
from tunelab.errors import TunelabError

GiB = 2**30


class FakeNpu(types.ModuleType):
    """Stands in for the `torch.npu` module that torch_npu installs (the torch.cuda-style API)."""

    def __init__(self, count: int = 2):
        super().__init__("torch.npu")
        self.count = count
        self.calls: list[tuple[str, object]] = []

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def mem_get_info(self, device=None) -> tuple[int, int]:
        self.calls.append(("mem_get_info", device))
        return 3 * GiB, 32 * GiB

    def synchronize(self, device=None) -> None:
        self.calls.append(("synchronize", device))

    def empty_cache(self) -> None:
        self.calls.append(("empty_cache", None))

    def max_memory_allocated(self, device=None) -> int:
        return 5 * GiB

    def reset_peak_memory_stats(self, device=None) -> None:
        self.calls.append(("reset_peak_memory_stats", device))

    def manual_seed_all(self, seed: int) -> None:
        self.calls.append(("manual_seed_all", seed))

    def get_device_name(self, device=None) -> str:
        return "Ascend910B2"

    def is_bf16_supported(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _cpu_only_host(monkeypatch):
    """Every test starts on a host with no accelerator and no device env vars, whatever runs it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # None blocks a real torch_npu import
    for var in (
        "TUNELAB_DEVICE",
        "LOCAL_RANK",
        "CUDA_VISIBLE_DEVICES",
        "ASCEND_RT_VISIBLE_DEVICES",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake_npu(monkeypatch) -> FakeNpu:
    """A host with two Ascend NPUs: torch_npu "imported" and `torch.npu` installed."""
    npu = FakeNpu(count=2)
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1")
    return npu


# --- CPU host -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "auto", "cpu", "CPU", torch.device("cpu")])
def test_cpu_is_chosen_without_accelerators(spec):
    assert dev.available_device_types() == ["cpu"]
    assert dev.resolve_device(spec) == torch.device("cpu")


def test_tunelab_device_env_var_is_honoured_for_auto(monkeypatch):
    monkeypatch.setenv("TUNELAB_DEVICE", "cpu")
    assert dev.resolve_device() == torch.device("cpu")
    monkeypatch.setenv("TUNELAB_DEVICE", "cuda")
    with pytest.raises(TunelabError, match="TUNELAB_DEVICE"):
        dev.resolve_device("auto")
    assert dev.resolve_device("cpu") == torch.device("cpu")  # an explicit spec wins


@pytest.mark.parametrize("spec", ["tpu", "gpu:0", "cuda:x", "cuda:-1"])
def test_unknown_device_names_the_choices(spec):
    with pytest.raises(TunelabError, match="cuda") as err:
        dev.resolve_device(spec)
    assert "cuda:0" in str(err.value) or "npu, mps, cpu" in str(err.value)


def test_unavailable_cuda_says_what_is_available_and_how_to_fix():
    with pytest.raises(TunelabError, match=r"available: cpu") as err:
        dev.resolve_device("cuda:0")
    assert "CUDA" in str(err.value)


def test_unavailable_npu_points_to_torch_npu_and_cann():
    with pytest.raises(TunelabError, match="torch_npu") as err:
        dev.resolve_device("npu")
    assert "set_env.sh" in str(err.value)
    assert not dev.npu_available()
    assert dev.device_count("npu") == 0


def test_visible_devices_and_distributed_backends(monkeypatch):
    assert dev.visible_devices_var("cuda") == "CUDA_VISIBLE_DEVICES"
    assert dev.visible_devices_var("npu") == "ASCEND_RT_VISIBLE_DEVICES"
    assert dev.visible_devices_var("cpu") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert dev.visible_devices("cuda") == "2,3"
    assert dev.visible_devices("npu") is None
    backends = {t: dev.distributed_backend(t) for t in dev.DEVICE_TYPES}
    assert backends == {"cuda": "nccl", "npu": "hccl", "mps": "gloo", "cpu": "gloo"}


def test_cpu_memory_and_no_op_helpers():
    free, total = dev.mem_get_info("cpu")
    assert 0 < free <= total
    assert dev.peak_memory(torch.device("cpu")) > 0
    for helper in (dev.synchronize, dev.empty_cache, dev.reset_peak_memory):
        helper("cpu")
    assert dev.device_name("cpu") == "cpu"
    assert dev.device_count("cpu") == 1


def test_manual_seed_makes_cpu_draws_repeat():
    dev.manual_seed(7)
    first = torch.rand(3)
    dev.manual_seed(7)
    torch.testing.assert_close(torch.rand(3), first)


def test_dtypes_on_cpu():
    assert dev.default_dtype("cpu") == torch.float32
    assert dev.supports_bf16("cpu")
    assert dev.supports_fp16("cpu")
    assert not dev.supports_bf16("mps")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("half", torch.float16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("float", torch.float32),
        (" BF16 ", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("auto", None),
    ],
)
def test_parse_dtype(name, dtype):
    assert dev.parse_dtype(name) == dtype


@pytest.mark.parametrize("name", ["int8", "fp8", "", "double"])
def test_parse_dtype_rejects_others(name):
    with pytest.raises(TunelabError, match="bf16, fp16, fp32"):
        dev.parse_dtype(name)


def test_capability_table():
    assert set(dev.CAPABILITIES) >= {
        "triton_kernels",
        "cuda_graphs",
        "flash_attn",
        "qlora_nf4",
        "fused_adamw",
        "reduce_op_avg",
        "bf16",
        "fp16_autocast",
    }
    assert set(dev.ALTERNATIVES) == set(dev.CAPABILITIES)
    assert all(types_ <= set(dev.DEVICE_TYPES) for types_ in dev.CAPABILITIES.values())
    assert dev.supports("triton_kernels", "cuda:1")
    assert not dev.supports("reduce_op_avg", "npu")
    assert dev.supports("qlora_nf4", torch.device("cpu"))
    dev.require("fused_adamw", "cpu")  # supported: no error
    with pytest.raises(TunelabError, match="qlora_nf4 is not available on mps"):
        dev.require("qlora_nf4", "mps")
    with pytest.raises(ValueError, match="unknown feature"):
        dev.supports("warp_drive", "cpu")


# --- fake Ascend host ---------------------------------------------------------------------


def test_fake_npu_is_preferred_and_reported(fake_npu):
    assert dev.npu_available()
    assert dev.available_device_types() == ["npu", "cpu"]
    assert dev.device_count("npu") == 2
    assert dev.distributed_backend("npu") == "hccl"
    assert dev.visible_devices_var("npu") == "ASCEND_RT_VISIBLE_DEVICES"
    assert dev.visible_devices("npu") == "0,1"
    assert dev.device_name("npu:0") == "Ascend910B2"
    assert dev.default_dtype("npu") == torch.bfloat16


def test_fake_npu_calls_are_routed_to_torch_npu(fake_npu):
    assert dev.mem_get_info("npu:1") == (3 * GiB, 32 * GiB)
    dev.synchronize("npu:1")
    dev.empty_cache("npu")
    dev.reset_peak_memory("npu:0")
    assert dev.peak_memory("npu:0") == 5 * GiB
    dev.manual_seed(3)
    assert fake_npu.calls == [
        ("mem_get_info", 1),
        ("synchronize", 1),
        ("empty_cache", None),
        ("reset_peak_memory_stats", 0),
        ("manual_seed_all", 3),
    ]


def test_fake_npu_index_beyond_count(fake_npu):
    with pytest.raises(TunelabError, match="2 npu device") as err:
        dev.resolve_device("npu:5")
    assert "ASCEND_RT_VISIBLE_DEVICES='0,1'" in str(err.value)


def test_triton_kernels_are_refused_on_npu_with_a_way_out(fake_npu):
    assert not dev.supports("triton_kernels", "npu:0")
    with pytest.raises(TunelabError, match="triton_kernels is not available on npu") as err:
        dev.require("triton_kernels", "npu:0")
    assert "--attention-backend sdpa" in str(err.value)


# `torch.device("npu")` only parses once torch_npu has renamed torch's "privateuse1" device,
# which cannot be undone in a process; so resolve_device is checked in a fresh interpreter.
_RESOLVE_ON_FAKE_NPU = """
    import sys, types, torch
    sys.path.insert(0, {tests!r})
    from test_device import FakeNpu, GiB
    npu = FakeNpu(count=2)
    torch.utils.rename_privateuse1_backend("npu")  # what importing torch_npu does
    torch._register_device_module("npu", npu)
    sys.modules["torch_npu"] = types.ModuleType("torch_npu")
    from tunelab import device as dev
    auto = dev.resolve_device()
    assert auto == torch.device("npu", 0), auto
    assert dev.resolve_device("npu:1") == torch.device("npu", 1)
    assert dev.mem_get_info(auto) == (3 * GiB, 32 * GiB)
    assert npu.calls == [("mem_get_info", 0)], npu.calls
    assert dev.distributed_backend(auto.type) == "hccl"
    import os
    os.environ["LOCAL_RANK"] = "1"
    assert dev.resolve_device("auto") == torch.device("npu", 1)
    from tunelab.errors import TunelabError
    for bad in ("-1", "x"):
        os.environ["LOCAL_RANK"] = bad
        try:
            dev.resolve_device("auto")
            raise AssertionError("LOCAL_RANK=" + bad + " accepted")
        except TunelabError as e:
            assert "is not a device index" in str(e), e
    print("ok")
"""


def test_resolve_device_picks_fake_npu_in_a_fresh_process():
    tests = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k not in ("TUNELAB_DEVICE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), env.get("PYTHONPATH", "")])
    code = textwrap.dedent(_RESOLVE_ON_FAKE_NPU).format(tests=str(tests))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cuda_bf16_counts_native_support_only(monkeypatch):
    """Pre-Ampere GPUs emulate bf16 slowly: the default there is fp16."""
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # a T4: emulated only

    monkeypatch.setattr(dev, "_is_available", lambda t: t in ("cuda", "cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert not dev.supports_bf16("cuda") and calls == [False]
    assert dev.default_dtype("cuda") == torch.float16


def test_the_cpu_has_one_index():
    assert dev.resolve_device("cpu:0") == torch.device("cpu", 0)
    with pytest.raises(TunelabError, match="there is one cpu device; use cpu"):
        dev.resolve_device("cpu:1")
