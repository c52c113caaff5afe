"""Exact resume: a run stopped at step k and resumed repeats the uninterrupted run bit for bit."""

from __future__ import annotations

import shutil
import signal

import pytest
from safetensors.torch import load_file

from tests.train.helpers import read_rows, tiny_config, train_losses, write_chats
from tunelab.train import checkpoint as ckpt
from tunelab.train.optim import lr_factor
from tunelab.train.trainer import Trainer


def stop_after(trainer: Trainer, step: int) -> None:
    """Make the trainer behave as if SIGTERM arrived during ``step``."""
    run_step = trainer._step

    def wrapped(batches):
        row = run_step(batches)
        if trainer.state.step == step:
            trainer._stop_signal = signal.SIGTERM
        return row

    trainer._step = wrapped


def adapter(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_stop_and_resume_is_bit_identical(make_tiny_model, tmp_path, dropout, monkeypatch):
    model_dir = make_tiny_model("llama")
    # 10 train examples, 2 per micro-batch, 2 micro-batches per step: 2.5 steps per epoch, so
    # step 3 straddles the epoch boundary and the stop lands mid-epoch.
    train = write_chats(tmp_path / "train.jsonl", 10, seed=1)
    val = write_chats(tmp_path / "val.jsonl", 4, seed=2)

    def config(out):
        return tiny_config(
            model_dir,
            train,
            tmp_path / out,
            tmp_path / "cache",
            data__val=val,
            train__max_steps=6,
            train__save_every=3,
            train__batch_size=2,
            train__grad_accum=2,
            train__lr=1e-2,
            train__warmup=1,
            train__max_grad_norm=0.5,
            lora__dropout=dropout,
        )

    full = Trainer(config("a"), progress=False).run()
    losses_a = train_losses(full.run_dir)
    assert sorted(losses_a) == [1, 2, 3, 4, 5, 6]
    logged_lr = [r["lr"] for r in read_rows(full.run_dir) if "loss" in r]
    assert logged_lr == [1e-2 * lr_factor(i, 6, 1, "cosine") for i in range(6)]  # lr of the step

    first = Trainer(config("b"), progress=False)
    stop_after(first, 3)
    stopped = first.run()
    assert stopped.final_dir is None and stopped.state.step == 3
    assert (stopped.state.epoch, stopped.state.batch_in_epoch) == (1, 1)
    assert [p.name for p in ckpt.list_checkpoints(stopped.run_dir)] == ["step-3"]
    shutil.copytree(stopped.run_dir, tmp_path / "c")  # for the control below
    with open(stopped.run_dir / "metrics.jsonl", "a") as f:  # as if it died after step 4
        f.write('{"step": 4, "loss": 123.0}\n{"step": 5, "lo')

    resumed_trainer = Trainer(config("b"), progress=False)  # the same command
    assert resumed_trainer.resume_from == stopped.run_dir / "checkpoints" / "step-3"
    resumed = resumed_trainer.run()
    losses_b = train_losses(resumed.run_dir)
    steps = [r["step"] for r in read_rows(resumed.run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows after the checkpoint were dropped, not repeated
    assert losses_b == losses_a  # == on floats: bit for bit
    assert resumed.val_loss == full.val_loss
    assert resumed.state.tokens_seen == full.state.tokens_seen
    for name, tensor in adapter(full.run_dir).items():
        assert tensor.equal(adapter(resumed.run_dir)[name]), name

    if dropout:  # control: without the RNG state the dropout masks, hence the losses, differ
        monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
        control = Trainer(config("c"), progress=False).run()
        losses_c = train_losses(control.run_dir)
        assert [losses_c[s] for s in (1, 2, 3)] == [losses_a[s] for s in (1, 2, 3)]
        assert all(losses_c[s] != losses_a[s] for s in (4, 5, 6))


def test_checkpoint_keeps_the_fp16_loss_scale(tmp_path):
    """fp16 resume continues with the loss scale and growth tracker it stopped with."""
    import torch

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    for _ in range(3):  # three good steps: the scale grows 2x each time
        scaler.scale(w.sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    state = ckpt.TrainerState(step=3)
    path = ckpt.save_checkpoint(tmp_path, state, lambda d: None, opt, sched, 2, scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    ckpt.load_checkpoint(path, lambda d: None, opt, sched, fresh)
    assert fresh.get_scale() == scaler.get_scale() == 2.0**13
    assert fresh.state_dict() == scaler.state_dict()


def test_a_longer_resume_runs_the_new_schedule_not_the_finished_one(make_tiny_model, tmp_path):
    """2 steps done, then the same command with max_steps 3: step 3 gets the lr of a 3-step
    cosine at step 3, not the 0 the finished 2-step schedule left in the optimizer."""
    model_dir = make_tiny_model("llama")
    train = write_chats(tmp_path / "train.jsonl", 8, seed=1)

    def config(steps):
        return tiny_config(model_dir, train, tmp_path / "run", tmp_path / "cache",
                           train__max_steps=steps, train__lr=1e-2)  # fmt: skip

    Trainer(config(2), progress=False).run()
    Trainer(config(3), progress=False).run()
    rows = [r for r in read_rows(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["lr"] == pytest.approx(1e-2 * lr_factor(2, 3, 0, "cosine")) != 0
