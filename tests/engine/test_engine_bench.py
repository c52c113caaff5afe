"""The engine benchmarks run end to end on a tiny shape (times are never checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_throughput_tiny_runs_and_tokens_match():
    cmd = [sys.executable, str(ROOT / "bench" / "engine_throughput.py"), "--shape", "tiny"]
    cmd += ["--num-prompts", "4", "--output-len", "4", "--min-prompt-len", "4"]
    cmd += ["--max-prompt-len", "20", "--max-num-batched-tokens", "16", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_DEVICE": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens match: 4 of 4 rows" in proc.stdout, proc.stdout
    assert "| side | out tok/s | total s | TTFT mean s | TTFT p50 s | ITL mean ms |" in proc.stdout
    assert "no peak bandwidth known for this device" in proc.stdout, proc.stdout


def test_engine_throughput_reports_the_roofline_share_with_a_given_bandwidth():
    cmd = [sys.executable, str(ROOT / "bench" / "engine_throughput.py"), "--shape", "tiny"]
    cmd += [
        "--num-prompts",
        "1",
        "--output-len",
        "4",
        "--min-prompt-len",
        "8",
        "--max-prompt-len",
        "8",
    ]
    cmd += ["--which", "ours", "--peak-bandwidth", "2e10", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_DEVICE": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "% of " in proc.stdout and "at 0.02 TB/s)" in proc.stdout, proc.stdout


def test_engine_lora_bench_tiny_runs_and_base_tokens_match():
    cmd = [sys.executable, str(ROOT / "bench" / "engine_lora.py"), "--shape", "tiny"]
    cmd += ["--num-prompts", "4", "--output-len", "4", "--min-prompt-len", "4"]
    cmd += ["--max-prompt-len", "20", "--adapters", "2", "--rank", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_DEVICE": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "base tokens identical with adapters loaded: yes" in proc.stdout, proc.stdout
    assert "| 2 adapters mixed |" in proc.stdout
