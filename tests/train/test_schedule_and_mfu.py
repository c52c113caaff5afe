"""Warmup / schedule arithmetic and the MFU peak table (pure functions)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tunelab.hardware import peak_bandwidth, peak_flops
from tunelab.train.optim import lr_factor, warmup_steps


@pytest.mark.parametrize("total", [10, 16, 17, 49, 100])
def test_the_default_warmup_fraction_warms_short_runs_up(total):
    warm = warmup_steps(0.03, total)
    assert warm >= 1
    factors = [lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert 0 < factors[0] < 1  # never the full lr on the first step, never 0
    assert all(a < b for a, b in itertools.pairwise(factors[: warm + 1]))  # rising to 1
    assert factors[warm] == 1.0  # the peak right after warmup, then the cosine decays
    assert factors[-1] < factors[warm]


def test_warmup_fraction_edges():
    assert warmup_steps(0.07, 100) == 7  # not 8 from 7.000000000000001
    assert warmup_steps(0.99, 10) == 9  # at most total - 1: the full lr is reached once
    assert lr_factor(9, 10, warmup_steps(0.99, 10), "constant") == 1.0
    assert warmup_steps(0.5, 1) == 0  # one step runs at the full lr


def test_a_warmup_given_in_steps_is_kept():
    assert warmup_steps(5, 100) == 5 and warmup_steps(0, 100) == 0
    assert lr_factor(0, 10, 0, "constant") == 1.0


def test_peak_flops_by_part_and_precision():
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert peak_flops("NVIDIA H100 NVL", torch.float16) == 835e12
    assert peak_flops("NVIDIA H200 NVL", torch.bfloat16) == 835e12
    assert peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32) is None  # not the bf16 peak
    assert peak_flops("cpu", torch.bfloat16) is None


def test_peak_bandwidth_by_part():
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert peak_bandwidth("NVIDIA H200") == 4.8e12
    assert peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert peak_bandwidth("NVIDIA A100 80GB PCIe") == 1.935e12
    assert peak_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert peak_bandwidth("cpu") is None
    assert peak_bandwidth("NVIDIA GH200 480GB") is None  # not read as an H200
    assert peak_bandwidth("NVIDIA H800 PCIe") == 2.0e12


@pytest.mark.parametrize(("method", "extra"), [("full", {}), ("lora", {}),
                                               ("freeze", {"freeze__last_layers": 1})])  # fmt: skip
def test_mfu_numerator_matches_the_counted_flops(make_tiny_model, tmp_path, method, extra):
    """flops_per_token x tokens against torch's FLOP counter for one step (recompute off)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tests.train.helpers import tiny_config, write_chats
    from tunelab.train.metrics import flops_per_token
    from tunelab.train.trainer import Trainer

    path = make_tiny_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    data = write_chats(tmp_path / "chats.jsonl", 8)
    cfg = tiny_config(path, data, tmp_path / "run", tmp_path / "cache", method=method, **extra)
    trainer = Trainer(cfg, progress=False)
    batches = trainer.train_plan.iterate(0, 0)
    with FlopCounterMode(display=False) as counter:
        row = trainer._step(batches)
    lens = [n for b in [trainer.train_plan.collate(trainer.train_plan.epoch(0)[0])]
            for r in b.seq_lens for n in r]  # fmt: skip
    attn_len = sum(n * n for n in lens) / sum(lens)
    per_token = flops_per_token(trainer.flops_config, method, attn_len, trainer.freeze_plan)
    ratio = per_token * row["tokens"] / counter.get_total_flops()
    assert 0.8 < ratio < 1.15, ratio
