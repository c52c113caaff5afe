"""SIGTERM to a real ``tunelab train``: it saves a checkpoint, exits 143 (128 + 15), resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train.helpers import read_rows, write_chats
from tunelab.train.checkpoint import list_checkpoints

STEPS = 60


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(make_tiny_model, tmp_path):
    data = write_chats(tmp_path / "chats.jsonl", 16)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "tunelab.cli", "train",
        "--model", str(make_tiny_model("llama")),
        "--data.train", str(data), "--data.cache_dir", str(tmp_path / "cache"),
        "--data.max_length", "64", "--lora.rank", "4",
        "--train.device", "cpu", "--train.precision", "fp32", "--train.batch_size", "2",
        "--train.max_steps", str(STEPS), "--train.save_every", "0",
        "--output_dir", str(run),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not read_rows_safe(run):  # training has started: the handlers are installed
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    [checkpoint] = list_checkpoints(run)
    stopped_at = int(checkpoint.name.removeprefix("step-"))
    assert 1 <= stopped_at < STEPS
    assert not (run / "final").exists()
    assert "Run the same command to resume" in err

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"trained {STEPS} steps" in done.stdout
    assert [r["step"] for r in read_rows(run) if "loss" in r] == list(range(1, STEPS + 1))
    assert (run / "final" / "adapter_model.safetensors").exists()


def read_rows_safe(run) -> list[dict]:
    try:
        return [r for r in read_rows(run) if "loss" in r]
    except (OSError, ValueError):  # not written yet, or a line half written
        return []


def test_a_signal_during_the_final_save_waits_for_it(make_tiny_model, tmp_path):
    """With save_every 0 the final checkpoint is the only one: a SIGTERM arriving while it is
    written is held until it is complete (the handlers stay installed through the saves)."""
    from tests.train.helpers import tiny_config
    from tunelab.train.trainer import Trainer

    data = write_chats(tmp_path / "chats.jsonl", 8)
    trainer = Trainer(tiny_config(make_tiny_model("llama"), data, tmp_path / "run",
                                  tmp_path / "cache"), progress=False)  # fmt: skip
    save = trainer._save_checkpoint

    def save_with_a_signal():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written
        return save()

    trainer._save_checkpoint = save_with_a_signal
    result = trainer.run()
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["step-2"]
    assert result.state.step == 2
