"""LoRA: parity with PEFT in both directions, merge/unmerge, targets, bad adapter inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.models.loading import load_model
from tunelab.models.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    lora_modules,
    lora_state_dict,
    merge_lora,
    remove_lora,
    trainable_parameters,
    unmerge_lora,
)
from tunelab.models.peft_io import load_adapter, save_adapter

ATOL = 1e-5  # fp32 on CPU: the decoder matches HF bit for bit; LoRA adds a few matmuls
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture
def tiny(make_tiny_model):
    return make_tiny_model("llama")


def ours(path):
    return load_model(path, device="cpu", dtype="fp32")


def hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def randomise_lora_b(model: nn.Module) -> None:
    """B starts at zero; give it values so the adapter changes the logits."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.2)


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    out = model(IDS)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_into_ours(tiny, tmp_path, rslora):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, task_type="CAUSAL_LM"
    )
    pm = peft.get_peft_model(hf(tiny), pcfg).eval()
    randomise_lora_b(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = logits(pm)

    model = ours(tiny)
    base = logits(model)
    cfg = load_adapter(model, tmp_path / "peft")
    assert (cfg.rank, cfg.alpha, cfg.use_rslora) == (4, 8, rslora)
    assert sorted(cfg.targets) == sorted(targets)
    assert len(lora_modules(model)) == 3 * 2  # 3 targets x 2 layers
    got = logits(model)
    assert (got - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft(tiny, tmp_path, rslora):
    peft = pytest.importorskip("peft")
    model = ours(tiny)
    cfg = LoraConfig(rank=4, alpha=8, use_rslora=rslora)
    names = apply_lora(model, cfg)
    assert len(names) == 7 * 2  # all-linear: q k v o gate up down, 2 layers
    randomise_lora_b(model)
    save_adapter(model, cfg, tmp_path / "ad", base_model_name_or_path=str(tiny))

    written = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4
    assert written["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    pm = peft.PeftModel.from_pretrained(hf(tiny), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(pm), logits(model), atol=ATOL, rtol=0)


def test_roundtrip_regex_targets(tiny, tmp_path):
    model = ours(tiny)
    cfg = LoraConfig(rank=2, alpha=4, targets=r"model\.layers\.1\.mlp\.(up|down)_proj")
    assert apply_lora(model, cfg) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    randomise_lora_b(model)
    save_adapter(model, cfg, tmp_path / "ad", "tiny")
    # short names would also pick layer 0, so an exact regex is written instead
    target = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(target, str)
    other = ours(tiny)
    load_adapter(other, tmp_path / "ad")
    assert list(lora_modules(other)) == list(lora_modules(model))
    torch.testing.assert_close(logits(other), logits(model), atol=0, rtol=0)


def test_targets_and_freezing(tiny):
    model = ours(tiny)
    names = apply_lora(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    assert names == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    trainable, total = trainable_parameters(model)
    assert trainable == sum(t.numel() for t in lora_state_dict(model).values())
    assert trainable == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # q: 64->64, v: 64->32
    assert total > trainable
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    with pytest.raises(TunelabError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


def test_a_single_name_given_as_text_is_that_name_not_a_pattern(tiny):
    """`--lora.targets q_proj` (a string): as a regex it matches no full name."""
    model = ours(tiny)
    assert apply_lora(model, LoraConfig(rank=4, targets="q_proj")) == [
        f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)
    ]


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["qproj"], r"nothing\.matches"])
def test_unknown_targets(tiny, targets):
    with pytest.raises(TunelabError, match="gate_proj") as e:
        apply_lora(ours(tiny), LoraConfig(targets=targets))
    assert "all-linear" in str(e.value)


def test_merge_unmerge(tiny):
    model = ours(tiny)
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.1))
    model.eval()  # dropout off: merged and unmerged must agree
    randomise_lora_b(model)
    base_weights = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    unmerged = logits(model)

    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    torch.testing.assert_close(logits(model), unmerged, atol=ATOL, rtol=0)

    unmerge_lora(model)
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(m.base.weight, base_weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=ATOL, rtol=0)

    remove_lora(model, merge=True)
    assert not lora_modules(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(".base." in k or "lora_" in k for k in model.state_dict())  # HF names again
    torch.testing.assert_close(logits(model), unmerged, atol=ATOL, rtol=0)


def test_remove_without_merge_restores_base(tiny):
    model = ours(tiny)
    base = logits(model)
    apply_lora(model, LoraConfig(rank=4))
    randomise_lora_b(model)
    merge_lora(model)
    remove_lora(model, merge=False)  # unmerges first
    torch.testing.assert_close(logits(model), base, atol=ATOL, rtol=0)


def test_merge_refuses_inf_and_rolls_back(tiny):
    model = ours(tiny)
    apply_lora(model, LoraConfig(rank=4))
    randomise_lora_b(model)
    before = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    bad = model.model.layers[1].mlp.up_proj
    assert isinstance(bad, LoraLinear)
    with torch.no_grad():
        bad.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(TunelabError, match=r"model\.layers\.1\.mlp\.up_proj"):
        merge_lora(model)
    for n, m in lora_modules(model).items():
        assert not m.merged
        torch.testing.assert_close(m.base.weight, before[n], atol=1e-6, rtol=0)


# --- bad adapter inputs ---------------------------------------------------------------------


@pytest.fixture
def saved_adapter(tiny, tmp_path):
    model = ours(tiny)
    cfg = LoraConfig(rank=4, targets=["q_proj", "o_proj"])
    apply_lora(model, cfg)
    return save_adapter(model, cfg, tmp_path / "ad", "tiny")


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_config(tiny, tmp_path):
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(TunelabError, match=r"adapter_config\.json is missing"):
        load_adapter(ours(tiny), tmp_path / "x")


def test_an_adapter_path_that_is_not_an_adapter_says_what_it_is(tiny, tmp_path):
    with pytest.raises(TunelabError, match=r"adapter directory .* does not exist"):
        load_adapter(ours(tiny), tmp_path / "nope")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(TunelabError, match="is a file; give the adapter's directory"):
        load_adapter(ours(tiny), tmp_path / "file.json")
    with pytest.raises(TunelabError, match=r"holds a whole model .* pass it as --model"):
        load_adapter(ours(tiny), tiny)  # a model directory


def test_missing_weights(tiny, saved_adapter):
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(TunelabError, match=r"adapter_model\.safetensors"):
        load_adapter(ours(tiny), saved_adapter)


def test_wrong_peft_type(tiny, saved_adapter):
    edit_config(saved_adapter, peft_type="IA3")
    with pytest.raises(TunelabError, match="IA3 adapter; tunelab loads LoRA"):
        load_adapter(ours(tiny), saved_adapter)


def test_unsupported_option(tiny, saved_adapter):
    edit_config(saved_adapter, use_dora=True)
    with pytest.raises(TunelabError, match="use_dora=True"):
        load_adapter(ours(tiny), saved_adapter)


def test_shape_mismatch_names_tensor(make_tiny_model, tiny, tmp_path):
    other = ours(make_tiny_model("llama", hidden_size=32))
    cfg = LoraConfig(rank=4, targets=["q_proj"])
    apply_lora(other, cfg)
    save_adapter(other, cfg, tmp_path / "ad", "other")
    model = ours(tiny)
    pattern = r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 32\).*\(4, 64\)"
    with pytest.raises(TunelabError, match=pattern):
        load_adapter(model, tmp_path / "ad")
    assert not lora_modules(model)  # checked before the model was touched


def test_unknown_module(make_tiny_model, tiny, tmp_path):
    deeper = ours(make_tiny_model("llama", num_hidden_layers=3))
    cfg = LoraConfig(rank=4, targets=["v_proj"])
    apply_lora(deeper, cfg)
    save_adapter(deeper, cfg, tmp_path / "ad", "deeper")
    with pytest.raises(TunelabError, match=r"model\.layers\.2\.self_attn\.v_proj.*another model"):
        load_adapter(ours(tiny), tmp_path / "ad")


def test_bad_config_values():
    with pytest.raises(TunelabError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(TunelabError, match="dropout"):
        LoraConfig(dropout=1.0)
    assert LoraConfig(rank=16, alpha=32).scaling == 2.0
    assert LoraConfig(rank=16, alpha=32, use_rslora=True).scaling == 8.0
