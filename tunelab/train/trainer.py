"""The training loop: our own, readable, no HF Trainer.

One optimizer step = ``grad_accum`` micro-batches; the loss of each is its summed token loss
divided by the target tokens of the whole step, so accumulation of 4x1 equals 1x4 exactly.
SIGINT / SIGTERM finish the current step, save a checkpoint and exit; the same command
resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tunelab import device as dev
from tunelab.config import to_dict
from tunelab.errors import TunelabError
from tunelab.hardware import peak_flops
from tunelab.train import checkpoint as ckpt
from tunelab.train.batching import BatchPlan, count_targets, to_encoded
from tunelab.train.config import TrainConfig
from tunelab.train.estimate import estimate_for
from tunelab.train.forward import forward_for
from tunelab.train.loss import chunked_cross_entropy
from tunelab.train.metrics import MetricsLogger, flops_per_token, freeze_plan
from tunelab.train.optim import build_optimizer, build_scheduler, warmup_steps
from tunelab.train.setup import (
    build_model,
    prepare_run_dir,
    refuse_multi_process,
    resolve_precision,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None  # None when stopped by a signal before the end
    state: ckpt.TrainerState
    val_loss: float | None
    stop_signal: int | None = None  # the signal that stopped the run
    steps_run: int = 0  # optimizer steps taken by this call (0: the run was already done)


class Trainer:
    """Build everything from a ``TrainConfig``; ``run()`` trains, evaluates and saves."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        from tunelab.data.pipeline import prepare
        from tunelab.hub import resolve_model
        from tunelab.models.loading import load_tokenizer

        self.cfg, self.progress = cfg, progress
        refuse_multi_process()
        self.run_dir, self.resume_from = prepare_run_dir(cfg)
        self.device = dev.resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device, cfg.method)
        self.model_dir = resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(self.model_dir)
        data = prepare(cfg.data, self.tokenizer)
        if cfg.data.template:  # what the model learns to answer to travels with its weights
            from tunelab.data.templates import resolve_template

            self.tokenizer.chat_template = resolve_template(self.tokenizer, cfg.data.template)
        self.data_stats = data.stats
        self.data_fingerprint = Path(data.stats.cache_path).name  # the cache is named by it
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        t = cfg.train
        plan = dict(max_length=cfg.data.max_length, packing=cfg.data.packing, pad_id=pad_id)
        self.train_plan = BatchPlan(to_encoded(data.train), t.batch_size, seed=t.seed, **plan)
        self.val_plan = (
            BatchPlan(to_encoded(data.val), t.batch_size, seed=t.seed, **plan) if data.val else None
        )
        # A step never straddles two epochs: an epoch whose micro-batches grad_accum does not
        # divide ends with a shorter step, so `epochs: 1` trains every example exactly once.
        self.per_epoch = self.train_plan.micro_batches_per_epoch()
        steps_per_epoch = math.ceil(self.per_epoch / t.grad_accum)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        self._check_resume_point()
        # The method's settings (LoRA targets, freeze modules) on a meta model first: a typo
        # costs no model load. The same estimate --dry-run prints.
        self.estimate = estimate_for(cfg, self.model_dir, self.precision)
        dev.manual_seed(t.seed)  # LoRA init and dropout draw from here: same seed, same run
        self.model = build_model(cfg, self.model_dir, self.device, self.precision)
        self.fwd = forward_for(self.model, cfg.data.packing)
        self.flops_config = self.fwd.flops_config
        self.freeze_plan = freeze_plan(self.model) if cfg.method == "freeze" else None
        self.optimizer = build_optimizer(self.model.parameters(), t.lr, t.weight_decay, self.device)
        warmup = warmup_steps(t.warmup, self.total_steps)
        if warmup >= self.total_steps:
            log.warning(
                "train.warmup is %d steps of a %d-step run: the lr never reaches train.lr",
                warmup,
                self.total_steps,
            )
        if t.eval_every and self.val_plan is None:
            log.warning("train.eval_every is set but there is no validation data (data.val)")
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup, t.schedule)
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if self.precision.loss_scaling else None
        )
        self.state = ckpt.TrainerState(data_fingerprint=self.data_fingerprint)
        self._stop_signal: int | None = None

    # ---- public --------------------------------------------------------------------------

    def run(self) -> TrainResult:
        t = self.cfg.train
        if self.cfg.overwrite and self.resume_from is None and self.run_dir.exists():
            shutil.rmtree(self.run_dir)  # only now: a config error must not cost the old run
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            self.state = ckpt.load_checkpoint(
                self.resume_from, self._load_weights, self.optimizer, self.scheduler, self.scaler
            )
            self._resync_lr()
            log.info("resumed from %s (step %d)", self.resume_from, self.state.step)
        self._write_run_files()
        first_step = self.state.step
        metrics = MetricsLogger(self.run_dir, self.total_steps, self.state.step, self.progress)
        batches = self.train_plan.iterate(self.state.epoch, self.state.batch_in_epoch)
        val_loss, saved_at = self.state.last_val_loss, None
        # The handlers stay through the final saves: a signal there (the only checkpoint with
        # save_every 0) waits for them instead of killing the process half-way.
        with self._signals():
            try:
                while self.state.step < self.total_steps and self._stop_signal is None:
                    row = self._step(batches)
                    step = self.state.step
                    if step % t.log_every == 0 or step == self.total_steps:
                        metrics.log(row)
                    if t.eval_every and step % t.eval_every == 0:
                        val_loss = self._validate(metrics)
                    # The last step saves after the final validation, so that the
                    # checkpoint records it (a re-run must not validate it again).
                    if t.save_every and step % t.save_every == 0 and step < self.total_steps:
                        self._save_checkpoint()
                        saved_at = step
                if self._stop_signal is None and self.state.validated_at != self.state.step:
                    val_loss = self._validate(metrics)
            finally:
                metrics.close()
            path = ckpt.checkpoint_dir(self.run_dir, self.state.step)
            if saved_at != self.state.step:
                path = self._save_checkpoint()
            if self._stop_signal is not None:
                log.warning(
                    "stopped by signal %d at step %d; checkpoint %s. Run the same command to "
                    "resume.",
                    self._stop_signal,
                    self.state.step,
                    path,
                )
                ran = self.state.step - first_step
                return TrainResult(self.run_dir, None, self.state, val_loss, self._stop_signal, ran)
            final = self._save_final()
            return TrainResult(
                self.run_dir, final, self.state, val_loss, steps_run=self.state.step - first_step
            )

    def _check_resume_point(self) -> None:
        """Refuse, before the model loads, a checkpoint this run cannot continue exactly: one
        past its total steps, or one trained on other data (a file edited since)."""
        if self.resume_from is None:
            return
        saved = ckpt.read_state(self.resume_from)
        if saved.get("data_fingerprint") not in (None, self.data_fingerprint):
            raise TunelabError(
                f"the data changed since the checkpoint {self.resume_from} (the train or val "
                "files, or their tokenization), so the run cannot continue exactly: restore "
                "the data, or pass --overwrite to start afresh."
            )
        done = saved.get("step", 0)
        if done > self.total_steps:
            raise TunelabError(
                f"the checkpoint {self.resume_from} is at step {done}, past this run's "
                f"{self.total_steps} steps: raise train.max_steps (or train.epochs) to go on, "
                "or pass --overwrite to start afresh."
            )

    def _resync_lr(self) -> None:
        """Set the lr of the step to come from this run's schedule. The optimizer state holds
        the lr the checkpointed run's schedule set; a resume with a longer max_steps (a new
        total) must not keep it (a finished cosine left it at 0). Unchanged totals give the
        very value saved, so exact resume is untouched."""
        sched = self.scheduler
        for group, base, factor in zip(
            self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ---- one optimizer step ---------------------------------------------------------------

    def _step(self, batches) -> dict:
        t = self.cfg.train
        self.model.train()
        started = time.perf_counter()
        micro = []
        for _ in range(t.grad_accum):
            epoch, index, batch = next(batches)
            micro.append(batch)
            self.state.epoch, self.state.batch_in_epoch = epoch, index + 1
            if index + 1 == self.per_epoch:  # the epoch's last micro-batch ends the step
                break
        targets = sum(count_targets(b.labels) for b in micro)
        loss_total = 0.0
        for batch in micro:
            loss_sum, _ = self._forward(batch.to(self.device))
            loss = loss_sum / max(targets, 1)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_total += float(loss.detach())
        lr = self.scheduler.get_last_lr()[0]  # the lr of this step (the scheduler moves on)
        grad_norm = self._optimizer_step()
        tokens = sum(b.num_tokens for b in micro)
        self.state.step += 1
        self.state.tokens_seen += tokens
        elapsed = time.perf_counter() - started
        return self._log_row(loss_total, lr, grad_norm, tokens, elapsed, micro)

    def _forward(self, batch) -> tuple[torch.Tensor, int]:
        with self._autocast():
            hidden = self.fwd.hidden(batch)
            return chunked_cross_entropy(
                hidden, self.fwd.head(), batch.labels, self.cfg.train.loss_chunk_tokens
            )

    def _optimizer_step(self) -> float:
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _log_row(self, loss, lr, grad_norm, tokens, elapsed, micro) -> dict:
        lens = [n for b in micro for row in b.seq_lens for n in row]
        attn_len = sum(n * n for n in lens) / max(sum(lens), 1)
        tps = tokens / elapsed if elapsed > 0 else 0.0
        compute = self.precision.autocast or self.precision.base_dtype  # the matmuls run in
        peak = peak_flops(dev.device_name(self.device), compute)
        fpt = flops_per_token(self.flops_config, self.cfg.method, attn_len, self.freeze_plan)
        row = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": tps,
            "mfu": tps * fpt / peak if peak else None,
        }
        row["memory_gib"] = dev.peak_memory(self.device) / 2**30  # CPU: the process's max RSS
        self.state.history = ([*self.state.history, row])[-50:]
        return row

    # ---- validation and saving -----------------------------------------------------------

    @torch.no_grad()
    def _validate(self, metrics: MetricsLogger) -> float | None:
        if self.val_plan is None:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for micro in self.val_plan.epoch(0):
            batch = self.val_plan.collate(micro).to(self.device)
            loss_sum, n = self._forward(batch)
            total, count = total + float(loss_sum), count + n
        val = total / max(count, 1)
        metrics.log({"step": self.state.step, "val_loss": val, "val_tokens": count})
        self.state.validated_at, self.state.last_val_loss = self.state.step, val
        if self.state.best_val_loss is None or val < self.state.best_val_loss:
            self.state.best_val_loss = val
        return val

    def _save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(
            self.run_dir,
            self.state,
            self._save_weights,
            self.optimizer,
            self.scheduler,
            self.cfg.train.keep_last,
            self.scaler,
        )

    def _save_weights(self, directory: Path) -> None:
        ckpt.save_tensors(self.model, directory)  # exact trainable tensors, for resume
        if self.cfg.method in ("lora", "qlora"):
            from tunelab.hub import peft_base_name
            from tunelab.models.peft_io import write_adapter

            base_name = peft_base_name(self.cfg.model, self.model_dir)
            write_adapter(self.model, self.cfg.lora, directory, base_name)
            if self.cfg.method == "qlora":  # merge must rebuild the same NF4-rounded base
                from tunelab.export.qlora import write_marker

                write_marker(directory, self.precision.base_dtype)
        self.tokenizer.save_pretrained(str(directory))  # the template travels with the weights

    def _load_weights(self, directory: Path) -> None:
        ckpt.load_tensors(self.model, directory)

    def _save_final(self) -> Path:
        from tunelab.atomic import atomic_directory

        final = self.run_dir / "final"
        if self.cfg.method in ("lora", "qlora"):
            with atomic_directory(final, overwrite=True) as tmp:
                self._save_weights(tmp)
                (tmp / ckpt.TRAINABLE_FILE).unlink()  # final/ is the plain PEFT adapter
        else:
            from tunelab.models.loading import read_generation_config, save_pretrained

            gen = read_generation_config(self.model_dir) or None
            save_pretrained(
                self.model,
                self.tokenizer,
                final,
                torch.float32 if self.precision.autocast is None else self.precision.autocast,
                overwrite=True,
                generation_config=gen,
            )
        log.info(
            "final %s written to %s", "adapter" if "lora" in self.cfg.method else "model", final
        )
        return final

    def _write_run_files(self) -> None:
        from tunelab.env import collect

        (self.run_dir / "config.yaml").write_text(
            yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        )
        with contextlib.suppress(Exception):  # the env report is a courtesy, never fatal
            import json

            (self.run_dir / "env.json").write_text(json.dumps(collect(), indent=2, default=str))

    # ---- context helpers -----------------------------------------------------------------

    def _autocast(self):
        if self.precision.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.autocast)

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT / SIGTERM set a flag; the loop saves and exits after the current step."""

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("signal %d: finishing the current step, then saving", signum)

        try:
            previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no signal handling
            previous = {}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Python API: ``train(load_train_config("recipe.yaml", []))``."""
    if cfg.method not in ("full", "freeze", "lora", "qlora"):
        raise TunelabError(f"unknown method {cfg.method!r}")
    return Trainer(cfg, progress).run()
