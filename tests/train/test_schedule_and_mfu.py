"""Warmup / schedule arithmetic and the MFU peak table (pure functions)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tunelab.train.metrics import peak_flops
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
