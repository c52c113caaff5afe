"""`tunelab env`: the report on this machine, and the diagnoses on made-up hosts."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

from tunelab import env

GiB = 2**30
HEALTHY = {  # a CUDA host where everything is right; tests break one thing at a time
    "python": "3.11.9",
    "platform": "Linux-6.8-x86_64",
    "torch": {"version": "2.8.0+cu128", "cuda": "12.8", "hip": None, "accelerator": "cuda"},
    "torch_npu": {"installed": False, "version": None, "import_error": None, "matches_torch": None},
    "cann": {"home": None, "version": None},
    "devices": [
        {
            "type": "cuda",
            "index": 0,
            "name": "NVIDIA H100",
            "free_bytes": 70 * GiB,
            "total_bytes": 80 * GiB,
        },
        {
            "type": "cpu",
            "index": None,
            "name": "cpu",
            "free_bytes": 100 * GiB,
            "total_bytes": 128 * GiB,
        },
    ],
    "visible_devices": {"CUDA_VISIBLE_DEVICES": None, "ASCEND_RT_VISIBLE_DEVICES": None},
    "device": "cuda:0",
    "distributed_backend": "nccl",
    "device_error": None,
    "packages": {"transformers": "5.1.0", "peft": None, "safetensors": "0.6.2"},
    "optional_backends": {"vllm": None, "flash-attn": "2.8.3"},
}


def fake_report(**changes: dict) -> dict:
    """HEALTHY with some sections updated, e.g. fake_report(torch={"cuda": None})."""
    report = copy.deepcopy(HEALTHY)
    for section, values in changes.items():
        if isinstance(report[section], dict):
            report[section].update(values)
        else:
            report[section] = values
    return report


def npu_host(**torch_npu) -> dict:
    """An Ascend host: CPU torch, torch_npu installed, CANN sourced, two NPUs."""
    return fake_report(
        torch={"version": "2.5.1+cpu", "cuda": None, "accelerator": "npu"},
        torch_npu={"installed": True, "version": "2.5.1", "matches_torch": True, **torch_npu},
        cann={"home": "/usr/local/Ascend/ascend-toolkit/latest", "version": "8.0.0"},
        devices=[
            {
                "type": "npu",
                "index": i,
                "name": "Ascend910B2",
                "free_bytes": GiB,
                "total_bytes": GiB,
            }
            for i in range(2)
        ],
        device="npu:0",
        distributed_backend="hccl",
    )


def severities(report: dict) -> list[tuple[str, str]]:
    return [(p.severity, p.message) for p in env.diagnose(report)]


# --- this machine -------------------------------------------------------------------------


def test_collect_on_this_machine_is_json_serialisable():
    report = env.collect()
    assert json.loads(json.dumps(report)) == report
    assert report["torch"]["version"] == torch.__version__
    assert any(d["type"] == "cpu" for d in report["devices"])
    assert report["device"] or report["device_error"]
    assert report["packages"]["transformers"] is not None
    assert set(report["optional_backends"]) == set(env.OPTIONAL_BACKENDS)
    assert torch.__version__ in env.render_text(report, env.diagnose(report))


def test_run_as_json_on_this_machine():
    out = io.StringIO()
    code = env.run(as_json=True, out=out)
    data = json.loads(out.getvalue())
    assert {"torch", "devices", "packages", "problems"} <= set(data)
    assert code == int(any(p["severity"] == "error" for p in data["problems"]))


# --- diagnoses on made-up hosts -----------------------------------------------------------


def test_healthy_hosts_have_no_problems():
    assert env.diagnose(fake_report()) == []
    assert env.diagnose(npu_host()) == []


@pytest.mark.parametrize(
    ("torch_version", "npu_version"), [("2.5.1+cpu", "2.1.0.post3"), ("2.6.0", "2.5.1")]
)
def test_torch_npu_version_mismatch_is_an_error(torch_version, npu_version):
    report = npu_host(version=npu_version, matches_torch=False)
    report["torch"]["version"] = torch_version
    problems = env.diagnose(report)
    assert [p.severity for p in problems] == ["error"]
    assert npu_version in problems[0].message
    want = ".".join(torch_version.split(".")[:2])
    assert f"torch_npu release matching torch {want}" in problems[0].fix


@pytest.mark.parametrize(
    "error",
    [
        "ImportError: libhccl.so: cannot open shared object file: No such file or directory",
        "ImportError: DLL load failed while importing _C: The specified module could not be found",
        "OSError: libascendcl.so: wrong ELF class",
        "ImportError: libgraph.so: cannot open shared object file: No such file or directory",
    ],
)
def test_torch_npu_library_load_failures_point_to_set_env(error):
    problems = env.diagnose(npu_host(import_error=error))
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) == 1
    assert "set_env.sh" in errors[0].fix
    assert error in errors[0].message


def test_other_torch_npu_import_failures_are_reported_verbatim():
    problem = env.check_torch_npu_import("AttributeError: module 'torch' has no attribute 'x'")
    assert problem is not None and problem.severity == "error"
    assert "no attribute 'x'" in problem.message
    assert env.check_torch_npu_import(None) is None


def test_cuda_torch_on_npu_host_is_a_warning():
    report = npu_host()
    report["torch"].update(version="2.5.1+cu124", cuda="12.4")
    problems = env.diagnose(report)
    assert [p.severity for p in problems] == ["warning"]
    assert "CUDA 12.4" in problems[0].message
    assert "pip install torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu" in (
        problems[0].fix
    )
    # CANN sourced but torch_npu not installed yet: still an Ascend host
    cann_only = fake_report(cann={"home": "/usr/local/Ascend/ascend-toolkit/latest"})
    assert any("Ascend NPU host" in message for _, message in severities(cann_only))


@pytest.mark.parametrize("value", ["", "-1", "none", "NoDevFiles"])
def test_cuda_visible_devices_hiding_every_gpu_is_a_warning(value):
    report = fake_report(
        visible_devices={"CUDA_VISIBLE_DEVICES": value}, devices=[HEALTHY["devices"][1]]
    )
    problems = env.diagnose(report)
    assert any("CUDA_VISIBLE_DEVICES" in p.message and p.severity == "warning" for p in problems)
    assert env.check_cuda_visible_devices("12.8", "0,1", 0) is None  # no GPU, not the var's fault
    assert env.check_cuda_visible_devices(None, "-1", 0) is None  # CPU torch: nothing to hide


def test_cpu_only_host_gets_a_slow_warning():
    report = fake_report(torch={"cuda": None}, devices=[HEALTHY["devices"][1]], device="cpu")
    problems = env.diagnose(report)
    assert [p.severity for p in problems] == ["warning"]
    assert "CPU" in problems[0].message
    assert "bf16" not in problems[0].fix  # no CPU bf16 fact in the report: no AMX advice


def test_cpu_only_host_with_amx_is_told_about_bf16():
    report = fake_report(torch={"cuda": None}, devices=[HEALTHY["devices"][1]], device="cpu")
    report["cpu_bf16_matmul"] = "amx"
    (problem,) = env.diagnose(report)
    assert "--dtype bf16" in problem.fix
    assert "cpu bf16" in env.render_text(report, [problem])


def test_cpu_bf16_matmul_probe_tolerates_missing_torch_probes(monkeypatch):
    import torch

    from tunelab import device as dev

    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert dev.cpu_bf16_matmul() == "avx512_bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: 1 / 0, raising=False)
    assert dev.cpu_bf16_matmul() is None


@pytest.mark.parametrize(
    ("version", "found"),
    [
        ("4.46.3", [("error", "transformers 4.46.3 is too old (need >= 5.0).")]),
        (None, [("error", "transformers is not installed.")]),
        ("5.0.0", []),
        ("unknown", []),
    ],
)
def test_transformers_must_be_5(version, found):
    assert severities(fake_report(packages={"transformers": version})) == found


def test_errors_come_before_warnings():
    report = npu_host(version="2.1.0", matches_torch=False)
    report["torch"].update(version="2.5.1+cu124", cuda="12.4")
    assert [p.severity for p in env.diagnose(report)] == ["error", "warning"]


def test_cann_version_from_toolkit_files(tmp_path):
    assert env.cann_version(None) is None
    assert env.cann_version(str(tmp_path)) is None
    info = tmp_path / "aarch64-linux" / "ascend_toolkit_install.info"
    info.parent.mkdir()
    info.write_text("package_name=Ascend-cann-toolkit\nversion=8.0.RC2\nversion_dir=8.0.RC2\n")
    assert env.cann_version(str(tmp_path)) == "8.0.RC2"
    (tmp_path / "version.cfg").write_text(
        "# version: 1.0\nruntime_running_version=[7.6.0.1.220:8.0.0]\n"
        "toolkit_running_version=[7.6.0.1.220:8.0.0]\n"
    )
    assert env.cann_version(str(tmp_path)) == "8.0.0"


# --- output -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "code"),
    [
        (fake_report(), 0),
        (fake_report(torch={"cuda": None}, devices=[HEALTHY["devices"][1]]), 0),  # warning only
        (npu_host(version="2.1.0", matches_torch=False), 1),
        (fake_report(device_error="Unknown device type 'foo'"), 1),  # TUNELAB_DEVICE=foo
    ],
)
def test_run_exit_code_follows_error_severity(monkeypatch, report, code):
    monkeypatch.setattr(env, "collect", lambda: report)
    out = io.StringIO()
    assert env.run(as_json=True, out=out) == code
    data = json.loads(out.getvalue())
    assert [p["severity"] for p in data["problems"]] == [p.severity for p in env.diagnose(report)]
    text = io.StringIO()
    assert env.run(out=text) == code
    assert "cuda:0" in text.getvalue() or "npu:0" in text.getvalue()


def test_render_text_lists_problems_with_fixes():
    report = npu_host(import_error="ImportError: libhccl.so: cannot open shared object file")
    text = env.render_text(report, env.diagnose(report))
    assert "Ascend910B2" in text
    assert "ERROR: torch_npu cannot load" in text
    assert "fix: Load the CANN toolkit environment" in text
    assert "No problems found." in env.render_text(fake_report(), [])
