"""QLoRA: NF4 base weights (torchao) under LoRA — accuracy, training, memory, dequantize."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import TunelabError
from tunelab.models.loading import load_model
from tunelab.models.lora import LoraConfig, apply_lora, lora_modules, merge_lora
from tunelab.models.quant import (
    NF4Linear,
    base_weight_bytes,
    dequantize_nf4,
    quantize_base_nf4,
)

IDS = torch.randint(0, 416, (4, 16), generator=torch.Generator().manual_seed(0))
# NF4 keeps ~9% relative error per linear on Gaussian weights (4 bits, absmax per 64 values).
LAYER_REL_ERR = 0.12
# Errors of 14 quantized linears add up; logits of the tiny random model stay this close.
LOGIT_REL_ERR, LOGIT_COSINE = 0.25, 0.98


@pytest.fixture(autouse=True)
def _needs_torchao(request):
    if "no_torchao" not in request.node.name:
        pytest.importorskip("torchao")


@pytest.fixture
def tiny(make_tiny_model):
    return make_tiny_model("llama")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nf4_forward_close_to_base(tiny, dtype):
    model = load_model(tiny, "cpu", dtype)
    ref_q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, dtype=model.dtype)
    with torch.no_grad():
        ref_layer, ref = ref_q(x), model(IDS)
    report = quantize_base_nf4(model, "cpu")
    assert len(report.quantized) == 14 and not report.skipped
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear) and not q.weight.requires_grad
    assert type(model.lm_head) is nn.Linear  # lm_head, embeddings and norms stay
    with torch.no_grad():
        assert rel_err(q(x), ref_layer) < LAYER_REL_ERR
        out = model(IDS)
    assert out.dtype == model.dtype
    assert rel_err(out, ref) < LOGIT_REL_ERR
    assert F.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0) > LOGIT_COSINE


def test_memory_about_4x_smaller_than_bf16(tiny):
    model = load_model(tiny, "cpu", "bf16")
    bf16_bytes = base_weight_bytes(model)
    report = quantize_base_nf4(model, "cpu")
    assert report.bytes_before == bf16_bytes
    assert report.bytes_after == base_weight_bytes(model)
    # 0.5 byte per value + 1 scale byte per 64; tiny tensors pay a fixed 16-entry table each
    assert 3.5 < report.ratio < 4.0


def test_qlora_trains_only_lora(tiny):
    model = load_model(tiny, "cpu", "fp32")
    quantize_base_nf4(model, "cpu")
    apply_lora(model, LoraConfig(rank=8, alpha=16))
    model.train()
    frozen = model.model.layers[0].mlp.up_proj.base.weight.get_original_weight().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    losses = []
    for _ in range(6):
        logits = model(IDS[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    after = model.model.layers[0].mlp.up_proj.base.weight.get_original_weight()
    assert torch.equal(frozen, after)


def test_lora_then_quantize_wraps_same_layers(tiny):
    model = load_model(tiny, "cpu", "fp32")
    names = apply_lora(model, LoraConfig(rank=4))
    report = quantize_base_nf4(model, "cpu")
    assert report.quantized == names
    assert all(isinstance(m.base, NF4Linear) for m in lora_modules(model).values())


def test_dequantize_then_merge(tiny):
    model = load_model(tiny, "cpu", "fp32")
    quantize_base_nf4(model, "cpu")
    apply_lora(model, LoraConfig(rank=4))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.2)
        qlora = model(IDS)
    with pytest.raises(TunelabError, match="dequantize"):
        merge_lora(model)
    assert dequantize_nf4(model, torch.float32) == 14
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    with torch.no_grad():
        # linear_nf4 multiplies by the same dequantized weight: equal up to fp32 rounding
        torch.testing.assert_close(model(IDS), qlora, atol=1e-5, rtol=0)
        merge_lora(model)
        torch.testing.assert_close(model(IDS), qlora, atol=1e-5, rtol=0)


def test_device_without_nf4_support(tiny):
    model = load_model(tiny, "cpu", "fp32")
    with pytest.raises(TunelabError, match="qlora_nf4 is not available on npu"):
        quantize_base_nf4(model, "npu")


def test_no_torchao(tiny, monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchao", None)  # also when it was never imported
    model = load_model(tiny, "cpu", "fp32")
    with pytest.raises(TunelabError, match="pip install torchao"):
        quantize_base_nf4(model, "cpu")
