"""Verified LoRA merge: parity with transformers + PEFT, QLoRA base, atomicity, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tunelab.engine.simple import SimpleGenerator
from tunelab.errors import TunelabError
from tunelab.export.manifest import MANIFEST_NAME, hash_adapter, hash_model_weights
from tunelab.export.merge import merge_adapter
from tunelab.export.qlora import detect_qlora
from tunelab.models.loading import load_model
from tunelab.models.lora import lora_modules, merge_lora, unmerge_lora
from tunelab.models.peft_io import load_adapter

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])
ATTN_MLP = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def adapter(make_adapter, base):
    return make_adapter(base, std=0.05, targets=ATTN_MLP)


@pytest.fixture(scope="module")
def merged(base, adapter, tmp_path_factory):
    """``merged[dtype]`` -> (report, directory), each merged once per module."""
    cache = {}

    class Merged(dict):
        def __missing__(self, dtype):
            out = tmp_path_factory.mktemp(f"merged-{dtype}") / "merged"
            cache[dtype] = (merge_adapter(str(base), adapter, out, dtype=dtype), out)
            return cache[dtype]

    return Merged()


def hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    out = model(IDS)
    return getattr(out, "logits", out)


# ---- the merged directory is right ---------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merged_dir_matches_transformers_and_peft(base, adapter, merged, dtype):
    peft = pytest.importorskip("peft")
    report, out = merged[dtype]
    assert report.fp32_max_abs_diff <= report.fp32_tolerance
    assert report.max_abs_diff <= report.tolerance
    assert report.adapter_effect > 100 * report.fp32_tolerance  # the adapter matters

    merged_hf = logits(hf(out))  # loads in transformers (bf16 weights upcast)
    ours = logits(load_model(out, device="cpu", dtype="fp32"))
    torch.testing.assert_close(ours, merged_hf, atol=1e-5, rtol=0)  # our decoder == HF's
    reference = logits(peft.PeftModel.from_pretrained(hf(base), str(adapter)).eval())
    assert (merged_hf - reference).abs().max() <= report.tolerance
    if dtype == "fp32":
        torch.testing.assert_close(merged_hf, reference, atol=1e-4, rtol=0)


def test_merged_dir_contents(base, adapter, merged):
    from transformers import AutoTokenizer

    from tests.conftest import CHATML

    report, out = merged["bf16"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHATML
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["base"] == {"spec": str(base), "sha256": hash_model_weights(base)}
    assert manifest["adapter"] == {"path": str(adapter), "sha256": hash_adapter(adapter)}
    assert manifest["dtype"] == "bf16"
    check = manifest["verification"]
    assert check["max_abs_diff"] == report.max_abs_diff <= check["tolerance"]
    assert check["base_cast_error"] > 0 and len(check["prompts"]) == 3
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # no temp dirs left


def test_merge_then_unmerge_restores_the_base(base, adapter, merged):
    model = load_model(base, device="cpu", dtype="fp32")
    before = logits(model)
    load_adapter(model, adapter)
    originals = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    merge_lora(model)
    for name, m in lora_modules(model).items():
        assert not torch.equal(m.base.weight, originals[name])
    unmerge_lora(model)
    eps = torch.finfo(torch.float32).eps
    for name, m in lora_modules(model).items():
        # (w + d) - d rounds twice: within one ulp of |w| + |d| (fp32 add is not invertible)
        bound = eps * (originals[name].abs() + m.delta_weight().abs())
        assert ((m.base.weight - originals[name]).abs() <= bound).all(), name
    for m in lora_modules(model).values():
        m.lora_B.weight.data.zero_()
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    # merge_adapter never touches the base: its files hash as before the merge
    manifest = json.loads((merged["fp32"][1] / MANIFEST_NAME).read_text())
    assert hash_model_weights(base) == manifest["base"]["sha256"]


# ---- QLoRA ------------------------------------------------------------------------------


def qlora_run(tmp_path, adapter, precision="fp32"):
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "final")
    cfg = {"model": "x", "method": "qlora", "train": {"precision": precision}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run / "final"


def test_qlora_adapter_merges_into_the_nf4_base(base, adapter, merged, tmp_path):
    pytest.importorskip("torchao")
    from tunelab.models.quant import quantize_base_nf4

    final = qlora_run(tmp_path, adapter)
    report = merge_adapter(str(base), final, tmp_path / "merged", dtype="fp32")
    assert report.base_precision.startswith("NF4-dequantized")
    got = logits(load_model(tmp_path / "merged", device="cpu", dtype="fp32"))
    qlora = load_model(base, device="cpu", dtype="fp32")  # what QLoRA training ran
    quantize_base_nf4(qlora, "cpu")
    load_adapter(qlora, final)
    expected = logits(qlora)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    unmerged = SimpleGenerator.load(str(base), "cpu", "fp32", adapter=str(final))
    torch.testing.assert_close(logits(unmerged.model), expected, atol=1e-4, rtol=0)
    plain, plain_dir = merged["fp32"]
    assert plain.base_precision == "full-precision base"
    full = logits(load_model(plain_dir, device="cpu", dtype="fp32"))
    assert (full - expected).abs().max() > 10 * (got - expected).abs().max()


def test_detect_qlora(adapter, tmp_path):
    assert not detect_qlora(adapter).qlora  # nothing says so: full-precision base
    final = qlora_run(tmp_path / "a", adapter, precision="bf16")
    assert detect_qlora(final).base_dtype == torch.bfloat16
    assert not detect_qlora(final, "no").qlora
    auto = qlora_run(tmp_path / "b", adapter, precision="auto")
    (auto.parent / "env.json").write_text(json.dumps({"device": "cpu"}))
    assert detect_qlora(auto).base_dtype == torch.float32  # auto on CPU trains in fp32
    (auto.parent / "env.json").write_text(json.dumps({"device": "cuda:0"}))
    assert detect_qlora(auto).base_dtype == torch.bfloat16
    marked = tmp_path / "marked"
    shutil.copytree(adapter, marked)
    config = json.loads((marked / "adapter_config.json").read_text())
    config["tunelab"] = {"method": "qlora", "base_dtype": "float16"}
    (marked / "adapter_config.json").write_text(json.dumps(config))
    info = detect_qlora(marked)  # the marker inside adapter_config.json (older adapters)
    assert (info.qlora, info.base_dtype) == (True, torch.float16)
    assert detect_qlora(adapter, "yes").qlora


def test_peft_export_keeps_the_qlora_marker_as_a_side_file(base, adapter, tmp_path):
    """peft warns about unknown adapter_config.json keys: the marker travels beside it."""
    from tunelab.export.peft import export_peft

    marked = tmp_path / "marked"
    shutil.copytree(adapter, marked)
    config = json.loads((marked / "adapter_config.json").read_text())
    config["tunelab"] = {"method": "qlora", "base_dtype": "float16"}
    (marked / "adapter_config.json").write_text(json.dumps(config))
    out = export_peft(str(base), marked, tmp_path / "exported")
    assert "tunelab" not in json.loads((out / "adapter_config.json").read_text())
    info = detect_qlora(out)
    assert (info.qlora, info.base_dtype) == (True, torch.float16)


# ---- atomicity and bad input ------------------------------------------------------------


def test_merge_killed_midway_leaves_nothing(base, adapter, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr("tunelab.models.loading.save_state_dict", killed)
    with pytest.raises(RuntimeError, match="killed"):
        merge_adapter(str(base), adapter, tmp_path / "merged", dtype="fp32")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp dir
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="killed"):
        merge_adapter(str(base), adapter, tmp_path / "merged", dtype="fp32", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert (tmp_path / "merged" / "old.txt").read_text() == "previous"  # old output intact


def test_adapter_for_another_base_names_the_tensor(make_tiny_model, make_adapter, base, tmp_path):
    other = make_adapter(make_tiny_model("llama", intermediate_size=96), targets=["down_proj"])
    with pytest.raises(TunelabError, match=r"down_proj\.lora_A\.weight has shape"):
        merge_adapter(str(base), other, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_missing_adapter_files(base, adapter, tmp_path):
    with pytest.raises(TunelabError, match="does not exist"):
        merge_adapter(str(base), tmp_path / "nowhere", tmp_path / "out")
    no_config = tmp_path / "no_config"
    shutil.copytree(adapter, no_config)
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(TunelabError, match=r"adapter_config\.json is missing"):
        merge_adapter(str(base), no_config, tmp_path / "out")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(adapter, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(TunelabError, match=r"no adapter_model\.safetensors"):
        merge_adapter(str(base), no_weights, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(base, adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(TunelabError, match=r"already exists.*--overwrite"):
        merge_adapter(str(base), adapter, out)
    assert (out / "keep.txt").exists()
    merge_adapter(str(base), adapter, out, dtype="fp32", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).exists()


def test_fp16_overflow_names_the_layer(base, make_adapter, tmp_path):
    huge = make_adapter(base, std=1e6, targets=["model.layers.1.mlp.down_proj"])
    with pytest.raises(TunelabError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*bf16"):
        merge_adapter(str(base), huge, tmp_path / "merged", dtype="fp16")
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_default_model_bf16_merge(make_adapter, tmp_path):
    peft = pytest.importorskip("peft")
    from tunelab.hub import resolve_model

    base = resolve_model("default")
    adapter = make_adapter(base, std=0.01, rank=8, targets=ATTN_MLP)
    report = merge_adapter("default", adapter, tmp_path / "merged", dtype="bf16")
    assert report.fp32_max_abs_diff <= report.fp32_tolerance
    assert report.cast_error > 0 and report.max_abs_diff <= report.tolerance
    merged = logits(hf(tmp_path / "merged"))
    reference = logits(peft.PeftModel.from_pretrained(hf(base), str(adapter)).eval())
    assert (merged - reference).abs().max() <= report.tolerance
