"""Benchmark scripts run end to end on a tiny shape (correctness only; times are never checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generate_throughput_tiny_runs_and_tokens_match():
    cmd = [sys.executable, str(ROOT / "bench" / "generate_throughput.py"), "--shape", "tiny"]
    cmd += ["--batch-sizes", "1,2", "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1"]
    cmd += ["--device", "cpu"]
    # One thread: tiny matmuls on a shared, busy CPU are much faster without thread hand-offs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_DEVICE": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens match: yes" in proc.stdout, proc.stdout
    assert "| batch | ours tok/s | hf tok/s | ours/hf |" in proc.stdout


def test_loss_memory_bench_runs_and_ours_needs_less():
    cmd = [sys.executable, str(ROOT / "bench" / "loss_memory.py"), "--tokens", "512"]
    cmd += ["--vocab", "8192", "--hidden", "32", "--chunk", "512"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ours")]
    assert len(rows) == 2, proc.stdout  # fp32 and bf16


def test_gpu_suite_skips_what_its_budget_cannot_fit(tmp_path):
    """`suite.sh owed` on a spent budget: every step is skipped, named, and the exit is 0."""
    env = {**os.environ, "BUDGET": "0", "OUT": str(tmp_path), "WHEELS_DIR": str(tmp_path / "no")}
    cmd = ["bash", str(ROOT / "bench" / "gpu" / "suite.sh"), "owed"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (tmp_path / "owed.log").read_text()
    assert log.count("- skipped (out of BUDGET):") == 5, log
    assert "bench/train_lora.py --shape 1b" in log
