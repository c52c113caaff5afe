"""Pre-packed bf16 linears for CPU decode (engine/cpu_linear.py) against the plain ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.engine import cpu_linear
from tunelab.engine.cpu_linear import PackedLinear, pack_linears, packing_supported
from tunelab.engine.llm import LLM
from tunelab.engine.sampler import SamplingParams
from tunelab.models.loading import load_model

from .conftest import prompts_of_lengths
from .lora_helpers import write_adapters

CPU = torch.device("cpu")
needs_packing = pytest.mark.skipif(
    not packing_supported(CPU, torch.bfloat16),
    reason="no bf16 matmul hardware / oneDNN ops on this CPU: the engine keeps plain linears",
)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 outputs of two matmul kernels: equal up to bf16 rounding of the result."""
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 0.02 * scale


@needs_packing
@pytest.mark.parametrize("shape", [(1, 48), (32, 48), (1, 64, 48), (2, 40, 48), (100, 48)])
def test_packed_matches_plain(shape):
    torch.manual_seed(0)
    base = nn.Linear(48, 72).to(torch.bfloat16)
    layer = PackedLinear(base)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        _close(layer(x), F.linear(x, base.weight, base.bias))
    assert layer.weight is base.weight and layer.bias is base.bias  # adopted, not copied


@needs_packing
def test_weight_changed_in_place_is_repacked():
    torch.manual_seed(0)
    layer = PackedLinear(nn.Linear(48, 72, bias=False).to(torch.bfloat16))
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(-2)  # e.g. an optimizer step, or loading new weights in place
    with torch.inference_mode():
        after = layer(x)
    _close(after, -2 * before)


@needs_packing
def test_a_replaced_weight_is_used_not_the_packed_old_one():
    torch.manual_seed(0)
    layer = PackedLinear(nn.Linear(48, 72).to(torch.bfloat16))
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    new = nn.Linear(48, 72).to(torch.bfloat16)
    layer.load_state_dict(new.state_dict(), assign=True)  # tunelab's own loading idiom
    with torch.inference_mode():
        _close(layer(x), new(x))
        layer.weight = nn.Parameter(torch.zeros(72, 48, dtype=torch.bfloat16))
        _close(layer(x), layer.bias.expand(4, 72))


@needs_packing
def test_packed_layers_copy_pickle_and_live_in_inference_mode(tmp_path):
    import copy
    import io

    torch.manual_seed(0)
    with torch.inference_mode():  # weights that are inference tensors (no version counter)
        base = nn.Linear(48, 72).to(torch.bfloat16)
        layer = PackedLinear(base)
        x = torch.randn(4, 48, dtype=torch.bfloat16)
        _close(layer(x), F.linear(x, base.weight, base.bias))
        base.weight.mul_(2)  # unseen by a version counter: so they take the plain path
        _close(layer(x), F.linear(x, base.weight, base.bias))
    clone = copy.deepcopy(PackedLinear(nn.Linear(48, 72).to(torch.bfloat16)))
    buffer = io.BytesIO()
    torch.save(clone, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        _close(loaded(x), F.linear(x, clone.weight, clone.bias))
        _close(clone(x), F.linear(x, clone.weight, clone.bias))


@needs_packing
def test_training_takes_the_plain_path_with_gradients():
    torch.manual_seed(0)
    base = nn.Linear(48, 72).to(torch.bfloat16)
    ref = nn.Linear(48, 72).to(torch.bfloat16)
    ref.load_state_dict(base.state_dict())
    layer = PackedLinear(base)
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    ref(x).float().sum().backward()
    assert torch.equal(layer.weight.grad, ref.weight.grad)


def _engine_linears(llm: LLM) -> list[nn.Module]:
    return [m for m in llm.engine.model.modules() if isinstance(m, PackedLinear)]


@needs_packing
def test_engine_packs_only_bf16_and_when_asked(make_tiny_model):
    path = make_tiny_model("llama")
    fp32 = LLM(load_model(path, "cpu", torch.float32))
    assert not _engine_linears(fp32)  # fp32 keeps exact parity with transformers
    assert _engine_linears(LLM(load_model(path, "cpu", torch.bfloat16)))
    off = LLM(load_model(path, "cpu", torch.bfloat16), cpu_packed_linears=False)
    assert not _engine_linears(off)


def test_nothing_packed_where_it_does_not_pay(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    monkeypatch.setattr(cpu_linear, "packing_supported", lambda device, dtype: False)
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


@needs_packing
def test_nothing_packed_without_room_in_ram(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    monkeypatch.setattr(cpu_linear.dev, "mem_get_info", lambda device: (100, 1000))
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


def _prompt_logprobs(llm: LLM, prompts, lora=None) -> torch.Tensor:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(prompts, params, lora=lora)
    values = []
    for prompt, out in zip(prompts, outs, strict=True):
        values += [lp[t] for t, lp in zip(prompt[1:], out.prompt_logprobs[1:], strict=True)]
    return torch.tensor(values)


@needs_packing
def test_engine_packed_matches_plain_with_and_without_lora(make_tiny_model, tmp_path, monkeypatch):
    """Prompt logprobs (every prompt token, i.e. every linear on short chunks) of a bf16
    engine with packed linears equal those of plain linears, for the base model and for
    LoRA adapters stacked on the packed layers."""
    calls = []
    packed_op = cpu_linear._packed_linear
    monkeypatch.setattr(cpu_linear, "_packed_linear", lambda *a: calls.append(1) or packed_op(*a))
    path = make_tiny_model("qwen2")  # q/k/v biases: the packed path adds them too
    adapters = write_adapters(path, tmp_path)
    prompts = prompts_of_lengths([5, 17, 30], seed=3)
    got = {}
    for packed in (True, False):
        model = load_model(path, "cpu", torch.bfloat16)
        llm = LLM(model, adapters=adapters, cpu_packed_linears=packed)
        assert bool(_engine_linears(llm)) is packed
        got[packed] = [_prompt_logprobs(llm, prompts, lora) for lora in (None, "a1", "a2")]
        assert bool(calls) is packed  # the packed kernel did the work
        calls.clear()
    for with_packed, plain in zip(got[True], got[False], strict=True):
        assert (with_packed - plain).abs().max().item() < 0.05
    assert (got[True][0] - got[True][1]).abs().max().item() > 0.1  # the adapters do act
