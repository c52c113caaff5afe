"""What a run writes: PEFT adapters (final and checkpoints), HF model dirs; packed = unpacked."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.train.helpers import read_rows, tiny_config, write_chats
from tunelab.models.loading import load_model
from tunelab.models.peft_io import load_adapter
from tunelab.train.trainer import Trainer

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 11, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
ATOL = 1e-5


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    out = model(IDS)
    return getattr(out, "logits", out)


def train(tmp_path, model_dir, **keys) -> Trainer:
    data = write_chats(tmp_path / "chats.jsonl", 8)
    cfg = tiny_config(model_dir, data, tmp_path / "run", tmp_path / "cache", **keys)
    trainer = Trainer(cfg, progress=False)
    result = trainer.run()
    assert result.final_dir == tmp_path / "run" / "final"
    trainer.model.eval()
    return trainer


def test_lora_final_and_checkpoints_load_in_peft(make_tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    model_dir = make_tiny_model("llama")
    trainer = train(
        tmp_path,
        model_dir,
        train__lr=2e-2,
        train__max_steps=3,
        train__save_every=1,
        train__keep_last=2,
    )
    run = trainer.run_dir
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (run / "final").iterdir()
    }
    assert not (run / "final" / "trainable.safetensors").exists()
    base = logits(load_model(model_dir, device="cpu", dtype="fp32"))
    trained = logits(trainer.model)
    assert (trained - base).abs().max() > 1e-3  # the adapter matters

    for adapter_dir, expected in [(run / "final", trained), (run / "checkpoints" / "step-2", None)]:
        ref = peft.PeftModel.from_pretrained(hf_model(model_dir), str(adapter_dir)).eval()
        ours = load_model(model_dir, device="cpu", dtype="fp32")
        load_adapter(ours, adapter_dir)
        got = logits(ours)
        torch.testing.assert_close(got, logits(ref), atol=ATOL, rtol=0)
        if expected is not None:  # final/ is what the trainer ended with
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        else:  # step-2 is an earlier state
            assert (got - trained).abs().max() > 1e-4


def test_the_data_template_is_saved_with_the_adapter(make_tiny_model, tmp_path):
    """Train on data.template alpaca: the adapter (and every checkpoint) carries that template,
    so generate / serve / merge prompt the model as it was trained."""
    from tunelab.data.templates import BUILTIN_TEMPLATES
    from tunelab.models.loading import load_tokenizer

    trainer = train(
        tmp_path, make_tiny_model("llama"), data__template="alpaca", data__max_length=200
    )
    assert load_tokenizer(trainer.run_dir / "final").chat_template == BUILTIN_TEMPLATES["alpaca"]
    step = trainer.run_dir / "checkpoints" / "step-2"
    assert load_tokenizer(step).chat_template == BUILTIN_TEMPLATES["alpaca"]


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: a sliding window of 8
def test_packed_and_unpacked_give_the_same_loss(make_tiny_model, tmp_path, arch):
    model_dir = make_tiny_model(arch)
    data = write_chats(tmp_path / "chats.jsonl", 8, seed=5)
    val = write_chats(tmp_path / "val.jsonl", 6, seed=6)
    rows, val_losses = {}, {}
    for packing in (False, True):
        cfg = tiny_config(
            model_dir,
            data,
            tmp_path / f"run-{packing}",
            tmp_path / "cache",
            data__val=val,
            data__packing=packing,
            train__batch_size=8,
            train__max_steps=1,
        )
        trainer = Trainer(cfg, progress=False)
        micro = trainer.train_plan.epoch(0)
        assert len(micro) == 1  # one micro-batch holds all 8 examples either way
        if packing:
            assert max(len(row) for row in micro[0]) > 1  # rows hold several documents
        result = trainer.run()
        rows[packing] = next(r for r in read_rows(result.run_dir) if "loss" in r)
        val_losses[packing] = result.val_loss
    assert rows[True]["tokens"] == rows[False]["tokens"]
    assert rows[True]["loss"] == pytest.approx(rows[False]["loss"], rel=1e-5, abs=0)
    assert rows[True]["grad_norm"] == pytest.approx(rows[False]["grad_norm"], rel=1e-5, abs=0)
    assert val_losses[True] == pytest.approx(val_losses[False], rel=1e-5, abs=0)


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_write_an_hf_model(make_tiny_model, tmp_path, method):
    model_dir = make_tiny_model("llama")
    trainer = train(
        tmp_path,
        model_dir,
        method=method,
        train__lr=1e-3,
        freeze__last_layers=1,
        freeze__modules=["model.norm"],
    )
    final = trainer.run_dir / "final"
    reloaded = hf_model(final)  # transformers reads it as is
    torch.testing.assert_close(logits(reloaded), logits(trainer.model), atol=ATOL, rtol=0)
    before, after = load_file(str(model_dir / "model.safetensors")), {}
    for f in final.glob("*.safetensors"):
        after.update(load_file(str(f)))
    assert set(after) == set(before)
    for name, tensor in before.items():
        trained = method == "full" or name.startswith(("model.layers.1.", "model.norm."))
        if trained:
            assert not after[name].equal(tensor), f"{name} did not train"
        else:
            assert after[name].equal(tensor), f"{name} changed but is frozen"


def test_qlora_trains_on_cpu_and_writes_an_adapter(make_tiny_model, tmp_path):
    pytest.importorskip("torchao")
    from tunelab.models.quant import NF4Linear

    model_dir = make_tiny_model("llama")
    trainer = train(tmp_path, model_dir, method="qlora", train__lr=1e-2)
    assert any(isinstance(m, NF4Linear) for m in trainer.model.modules())
    losses = [r["loss"] for r in read_rows(trainer.run_dir) if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    final = trainer.run_dir / "final"
    assert (final / "adapter_config.json").exists()
    ours = load_model(model_dir, device="cpu", dtype="fp32")
    load_adapter(ours, final)  # a plain LoRA adapter over the (unquantized) base
    weights = load_file(str(final / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())
    # The dry run's estimate errs high: the untied head and the norms stay unquantized.
    from tunelab.models.quant import tensor_bytes
    from tunelab.train.estimate import estimate_for

    estimate = estimate_for(trainer.cfg, trainer.model_dir, trainer.precision)
    held = sum(tensor_bytes(p) for p in trainer.model.parameters())
    assert held <= estimate.weights <= 1.1 * held, (estimate.weights, held)
