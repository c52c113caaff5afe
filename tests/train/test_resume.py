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
    # 10 train examples, 2 per micro-batch, 2 micro-batches per step: step 3 is epoch 0's
    # short last step (one micro-batch), and the stop after step 4 lands mid-epoch 1.
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
    stop_after(first, 4)
    stopped = first.run()
    assert stopped.final_dir is None and stopped.state.step == 4
    assert (stopped.state.epoch, stopped.state.batch_in_epoch) == (1, 2)
    assert [p.name for p in ckpt.list_checkpoints(stopped.run_dir)] == ["step-3", "step-4"]
    shutil.copytree(stopped.run_dir, tmp_path / "c")  # for the control below
    with open(stopped.run_dir / "metrics.jsonl", "a") as f:  # as if it died after step 5
        f.write('{"step": 5, "loss": 123.0}\n{"step": 6, "lo')

    resumed_trainer = Trainer(config("b"), progress=False)  # the same command
    assert resumed_trainer.resume_from == stopped.run_dir / "checkpoints" / "step-4"
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
        assert [losses_c[s] for s in (1, 2, 3, 4)] == [losses_a[s] for s in (1, 2, 3, 4)]
        assert all(losses_c[s] != losses_a[s] for s in (5, 6))


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


def test_one_epoch_trains_every_example_once_when_grad_accum_does_not_divide_it(
    make_tiny_model, tmp_path
):
    """11 examples, 2 per micro-batch (6 micro-batches), grad_accum 4: two steps, the second
    short; the tokens trained are exactly one epoch's."""
    model_dir = make_tiny_model("llama")
    train = write_chats(tmp_path / "train.jsonl", 11, seed=1)
    cfg = tiny_config(model_dir, train, tmp_path / "run", tmp_path / "cache",
                      train__epochs=1, train__batch_size=2, train__grad_accum=4)  # fmt: skip
    cfg.train.max_steps = None  # epochs decide
    trainer = Trainer(cfg, progress=False)
    epoch_tokens = sum(
        trainer.train_plan.collate(m).num_tokens for m in trainer.train_plan.epoch(0)
    )
    result = trainer.run()
    assert trainer.total_steps == 2 and result.state.step == 2
    assert sum(r["tokens"] for r in read_rows(result.run_dir) if "loss" in r) == epoch_tokens
    assert (result.state.epoch, result.state.batch_in_epoch) == (0, 6)


def with_val(make_tiny_model, tmp_path, **keys):
    """A tiny-llama config with 8 training and 3 validation conversations."""
    train = write_chats(tmp_path / "train.jsonl", 8, seed=1)
    val = write_chats(tmp_path / "val.jsonl", 3, seed=2)
    return tiny_config(make_tiny_model("llama"), train, tmp_path / "run", tmp_path / "cache",
                       data__val=val, **keys)  # fmt: skip


def test_the_same_command_on_a_finished_run_validates_no_step_twice(make_tiny_model, tmp_path):
    cfg = with_val(make_tiny_model, tmp_path, train__max_steps=4, train__eval_every=2)
    first = Trainer(cfg, progress=False)
    stop_after(first, 4)  # the signal comes during the last step, after its validation
    assert first.run().final_dir is None
    again = Trainer(cfg, progress=False).run()
    assert again.final_dir is not None and again.val_loss is not None
    assert Trainer(cfg, progress=False).run().val_loss == again.val_loss  # finished: as is
    assert [r["step"] for r in read_rows(tmp_path / "run") if "val_loss" in r] == [2, 4]


def test_a_finished_run_whose_last_step_is_a_save_step_validates_once(make_tiny_model, tmp_path):
    cfg = with_val(make_tiny_model, tmp_path, train__max_steps=2, train__save_every=1)
    Trainer(cfg, progress=False).run()
    Trainer(cfg, progress=False).run()  # the same command again: nothing to do
    assert [r["step"] for r in read_rows(tmp_path / "run") if "val_loss" in r] == [2]


def test_resuming_an_older_checkpoint_drops_the_newer_ones(make_tiny_model, tmp_path):
    """Checkpoints past the resumed step belong to the abandoned continuation: they must not
    push the new checkpoints out under keep_last, nor be what `resume: auto` takes next."""
    model_dir = make_tiny_model("llama")
    train = write_chats(tmp_path / "train.jsonl", 11, seed=1)

    def config(**keys):
        return tiny_config(model_dir, train, tmp_path / "run", tmp_path / "cache",
                           train__max_steps=6, train__save_every=2, train__batch_size=2,
                           **keys)  # fmt: skip

    Trainer(config(train__keep_last=3), progress=False).run()
    run = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-2", "step-4", "step-6"]
    older = Trainer(config(train__keep_last=1, resume=str(run / "checkpoints/step-2")), False)
    stop_after(older, 3)
    older.run()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-3"]
    resumed = Trainer(config(train__keep_last=1), progress=False)
    assert resumed.resume_from == run / "checkpoints" / "step-3"
    resumed.run()
    assert [r["step"] for r in read_rows(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_tensor_of_another_shape_is_one_clear_error(tmp_path):
    import torch

    from tunelab.errors import TunelabError

    model = torch.nn.Linear(4, 8, bias=False)
    ckpt.save_tensors(torch.nn.Linear(4, 6, bias=False), tmp_path)
    with pytest.raises(TunelabError, match=r"'weight' has shape \(6, 4\) but the model's is"):
        ckpt.load_tensors(model, tmp_path)


def test_a_resume_onto_changed_data_is_refused(make_tiny_model, tmp_path):
    from tunelab.errors import TunelabError

    model_dir = make_tiny_model("llama")
    train = write_chats(tmp_path / "train.jsonl", 8, seed=1)

    def config(steps):
        return tiny_config(model_dir, train, tmp_path / "run", tmp_path / "cache",
                           train__max_steps=steps)  # fmt: skip

    Trainer(config(2), progress=False).run()
    write_chats(train, 8, seed=2)  # the file is edited between the runs
    with pytest.raises(TunelabError, match="the data changed since the checkpoint"):
        Trainer(config(3), progress=False)
    write_chats(train, 8, seed=1)  # restored: the run goes on
    assert Trainer(config(3), progress=False).run().state.step == 3


@pytest.mark.parametrize("damage", ["weights", "state", "optimizer", "scheduler"])
def test_a_damaged_checkpoint_is_one_clear_error_naming_an_older_one(
    make_tiny_model, tmp_path, damage
):
    from tunelab.errors import TunelabError

    model_dir = make_tiny_model("llama")
    train = write_chats(tmp_path / "train.jsonl", 8, seed=1)

    def config(steps):
        return tiny_config(model_dir, train, tmp_path / "run", tmp_path / "cache",
                           train__max_steps=steps, train__save_every=1)  # fmt: skip

    Trainer(config(2), progress=False).run()
    newest = tmp_path / "run" / "checkpoints" / "step-2"
    if damage == "weights":
        (newest / ckpt.TRAINABLE_FILE).write_bytes(b"\x00" * 10)
    elif damage == "state":
        (newest / ckpt.STATE_FILE).write_text("{")
    elif damage == "optimizer":
        data = (newest / "optimizer.pt").read_bytes()
        (newest / "optimizer.pt").write_bytes(data[: len(data) // 2])
    else:
        (newest / "scheduler.pt").unlink()
    with pytest.raises(TunelabError, match=r"step-2 is damaged .*--resume .*step-1\)"):
        Trainer(config(3), progress=False).run()
