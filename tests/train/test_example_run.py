"""The bundled LoRA recipe end to end through the CLI (default model, tiny settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.helpers import model_available_offline, read_rows

RECIPE = Path(__file__).parents[2] / "examples" / "lora_papers.yaml"


@pytest.mark.slow
def test_lora_papers_recipe_runs(tmp_path):
    if not model_available_offline("default"):
        pytest.skip("the default model is not available offline")
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "tunelab.cli", "train", str(RECIPE),
        "--train.max_steps", "3", "--data.max_samples", "24", "--data.max_val_samples", "16",
        "--train.device", "cpu", "--train.log_every", "1",
        "--data.cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(run),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "trained 3 steps, val loss" in done.stdout
    rows = read_rows(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any("val_loss" in r for r in rows)
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert (run / "config.yaml").exists() and (run / "loss.png").exists()
