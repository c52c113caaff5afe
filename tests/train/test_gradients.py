"""Gradient check against transformers + peft, and exact gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import one_step, randomise_lora_b, tiny_config, write_chats
from tunelab.models.peft_io import save_adapter
from tunelab.train.trainer import Trainer

REL = 1e-5  # fp32 on CPU: the decoder matches HF bit for bit; sums run in another order


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, name: str, rel: float = REL) -> None:
    scale = ref.abs().max().clamp_min(1e-12)
    err = float((ours - ref).abs().max() / scale)
    assert err <= rel, f"{name}: max |ours - ref| / max |ref| = {err:.2e}"


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def first_batch(trainer):
    plan = trainer.train_plan
    return plan.collate(plan.epoch(0)[0])


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("llama", {}),
        ("mistral", {}),  # sliding window 8: masked attention inside each row
        # chunked loss (several chunks), activation checkpointing, only some targets
        ("qwen3", {"train__loss_chunk_tokens": 7, "train__grad_checkpointing": True}),
    ],
)
def test_lora_gradients_match_peft(make_tiny_model, tmp_path, arch, extra):
    peft = pytest.importorskip("peft")
    model_dir = make_tiny_model(arch)
    data = write_chats(tmp_path / "chats.jsonl", 8)
    if extra:
        extra = {**extra, "lora__targets": ["q_proj", "k_proj", "down_proj"]}
    cfg = tiny_config(model_dir, data, tmp_path / "run", tmp_path / "cache", **extra)
    trainer = Trainer(cfg, progress=False)
    randomise_lora_b(trainer.model)  # else A's gradients are all zero
    save_adapter(trainer.model, cfg.lora, tmp_path / "init", str(model_dir))
    batch = first_batch(trainer)
    assert (batch.labels == -100).any() and batch.input_ids.shape[0] == 4  # padded, masked

    row, grads = one_step(trainer)

    ref = peft.PeftModel.from_pretrained(hf_model(model_dir), tmp_path / "init", is_trainable=True)
    ref.train()
    out = ref(input_ids=batch.input_ids, labels=batch.labels)
    out.loss.backward()
    ref_grads = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in ref.named_parameters()
        if p.requires_grad
    }
    assert abs(row["loss"] - out.loss.item()) <= REL * out.loss.item()
    assert set(grads) == set(ref_grads)
    per_layer = 3 if extra else 7  # the targets, or all-linear: q k v o gate up down
    assert len(grads) == 2 * per_layer * 2  # layers x modules x (A, B)
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        assert_rel_close(g, ref_grads[name], name)


@pytest.mark.parametrize("tied", [False, True])
def test_full_gradients_match_transformers(make_tiny_model, tmp_path, tied):
    model_dir = make_tiny_model("llama", tie_word_embeddings=tied)
    data = write_chats(tmp_path / "chats.jsonl", 8)
    cfg = tiny_config(model_dir, data, tmp_path / "run", tmp_path / "cache", method="full")
    trainer = Trainer(cfg, progress=False)
    batch = first_batch(trainer)

    row, grads = one_step(trainer)

    ref = hf_model(model_dir).train()
    out = ref(input_ids=batch.input_ids, labels=batch.labels)
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert abs(row["loss"] - out.loss.item()) <= REL * out.loss.item()
    assert set(grads) == set(ref_grads)
    assert ("lm_head.weight" in grads) != tied
    for name, g in grads.items():
        assert_rel_close(g, ref_grads[name], name)


def test_grad_accumulation_4x1_equals_1x4(make_tiny_model, tmp_path):
    """The loss is normalised by the target tokens of the whole step, not per micro-batch."""
    model_dir = make_tiny_model("llama")
    data = write_chats(tmp_path / "chats.jsonl", 4, seed=3)
    results = []
    for batch_size, accum in [(4, 1), (1, 4)]:
        cfg = tiny_config(
            model_dir,
            data,
            tmp_path / f"run-{batch_size}",
            tmp_path / "cache",
            train__batch_size=batch_size,
            train__grad_accum=accum,
            train__lr=1e-3,
        )
        trainer = Trainer(cfg, progress=False)
        randomise_lora_b(trainer.model)
        micro = trainer.train_plan.epoch(0)
        assert len(micro) == accum and sorted(i for b in micro for r in b for i in r) == [
            0,
            1,
            2,
            3,
        ]
        row, grads = one_step(trainer)
        weights = {
            n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" in n
        }
        results.append((row, grads, weights))
    targets = [sum(1 for y in e.labels[1:] if y != -100) for e in trainer.train_plan.examples]
    assert len(set(targets)) > 1  # unequal micro-batches: a per-micro-batch mean would differ

    (row_a, grads_a, weights_a), (row_b, grads_b, weights_b) = results
    assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-6, abs=0)
    assert row_a["grad_norm"] == pytest.approx(row_b["grad_norm"], rel=1e-5, abs=0)
    assert row_a["tokens"] == row_b["tokens"]
    for name, g in grads_a.items():
        assert_rel_close(grads_b[name], g, name)
    for name, w in weights_a.items():
        torch.testing.assert_close(weights_b[name], w, atol=1e-6, rtol=0, msg=name)
