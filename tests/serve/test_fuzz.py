"""OpenAPI-based fuzzing (schemathesis against our /openapi.json, loopback): no 500s."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")


@pytest.mark.slow
def test_fuzz_finds_no_server_error(launch, tmp_path):
    # a small cache bounds the work any one fuzzed request can ask for
    server = launch("--max-cache-tokens", "1024", "--max-queue", "64")
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    cmd = [exe, "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
           "--max-examples", "25", "--request-timeout", "60", "--seed", "1",
           "--phases", "examples,coverage,fuzzing", "--workers", "1"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert server.proc.poll() is None  # no crash
