"""``tunelab merge`` / ``export`` / ``generate --adapter``, and the PEFT export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunelab.cli import main
from tunelab.engine.sampler import SamplingParams
from tunelab.engine.simple import SimpleGenerator
from tunelab.errors import TunelabError
from tunelab.export.manifest import MANIFEST_NAME
from tunelab.export.peft import export_peft
from tunelab.models.loading import load_model
from tunelab.models.peft_io import load_adapter

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])


@pytest.fixture(scope="module")
def base(make_tiny_model):
    return make_tiny_model("qwen3")


@pytest.fixture(scope="module")
def adapter(make_adapter, base):
    return make_adapter(base, std=0.05, tokenizer=True)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    out = model(IDS)
    return getattr(out, "logits", out)


def test_generate_with_adapter_matches_merged(base, adapter, tmp_path, capsys):
    argv = ["merge", "--model", str(base), "--adapter", str(adapter), "--dtype", "fp32"]
    assert main([*argv, "--out", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == str(tmp_path / "merged")
    assert printed.err.count("merged into") == 1, printed.err  # the figures, once
    unmerged = SimpleGenerator.load(str(base), "cpu", "fp32", adapter=str(adapter))
    merged = SimpleGenerator.load(str(tmp_path / "merged"), "cpu", "fp32")
    torch.testing.assert_close(logits(unmerged.model), logits(merged.model), atol=1e-4, rtol=0)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = [unmerged.encode_text("hello world")]
    assert unmerged.generate_ids(prompt, params)[0].token_ids == (
        merged.generate_ids(prompt, params)[0].token_ids
    )
    argv = ["generate", "--model", str(base), "--adapter", str(adapter), "--device", "cpu"]
    assert main([*argv, "--prompt", "hi", "--temperature", "0", "--max-tokens", "4"]) == 0


def test_cli_errors_are_one_line(base, adapter, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    argv = ["export", "--model", str(base), "--format", "peft", "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    assert "--adapter" in capsys.readouterr().err
    argv = ["generate", "--model", str(base), "--adapter", str(tmp_path), "--prompt", "hi"]
    assert main(argv) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
    argv = ["export", "--model", str(base), "--format", "gguf", "--out", str(out), "--overwrite"]
    assert main(argv) == 2
    assert "is a directory; a GGUF export writes one file" in capsys.readouterr().err


def test_convert_to_fp16_refuses_a_weight_beyond_its_range(base, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.models.convert import convert

    big = tmp_path / "big"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5  # fp16 tops out at 65504
    model.save_pretrained(str(big))
    for f in base.iterdir():  # the tokenizer
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy2(f, big / f.name)
    with pytest.raises(TunelabError, match=r"up_proj.weight has inf.*beyond fp16.s range"):
        convert(str(big), tmp_path / "half", dtype="fp16")
    assert not (tmp_path / "half").exists()


def test_export_hf_with_and_without_adapter(base, adapter, tmp_path):
    argv = ["export", "--model", str(base), "--format", "hf"]
    assert main([*argv, "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    manifest = json.loads((tmp_path / "merged" / MANIFEST_NAME).read_text())
    assert manifest["dtype"] == "bf16"  # merging defaults to bf16
    assert main([*argv, "--out", str(tmp_path / "plain"), "--dtype", "fp32"]) == 0
    torch.testing.assert_close(
        logits(load_model(tmp_path / "plain", "cpu", "fp32")),
        logits(load_model(base, "cpu", "fp32")),
        atol=0,
        rtol=0,
    )
    assert main([*argv, "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_export_peft_normalises_and_checks(base, adapter, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    # an old-style adapter: keys without the PEFT prefix, stored as adapter_model.bin
    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    tensors = load_file(str(old / "adapter_model.safetensors"))
    stripped = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    torch.save(stripped, old / "adapter_model.bin")
    (old / "adapter_model.safetensors").unlink()

    out = export_peft(str(base), old, tmp_path / "peft")
    written = load_file(str(out / "adapter_model.safetensors"))
    assert written.keys() == tensors.keys()
    assert all(torch.equal(written[k], tensors[k]) for k in tensors)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert (out / "tokenizer.json").exists()

    ours = load_model(base, "cpu", "fp32")
    load_adapter(ours, out)
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    with pytest.raises(TunelabError, match="already exists"):
        export_peft(str(base), old, out)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--format", "gguf", "--dtype", "fp32"], "--dtype does not apply here"),
        (["--format", "hf", "--quant", "q8_0"], "--quant does not apply here"),
        (["--format", "gguf", "--device", "cuda:7"], "--device does not apply here"),
        (["--format", "gguf", "--adapter", "a", "--device", "cuda"], "gguf merges on the CPU"),
        (["--format", "hf", "--qlora", "yes"], "--qlora does not apply here"),
    ],
)
def test_export_refuses_flags_its_format_does_not_read(base, tmp_path, capsys, flags, message):
    argv = ["export", "--model", str(base), "--out", str(tmp_path / "x"), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_run_directory_given_as_adapter_points_at_its_final(base, adapter, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "final")
    argv = ["generate", "--model", str(base), "--adapter", str(run), "--prompt", "hi"]
    assert main(argv) == 2
    assert f"this looks like a training run: use {run / 'final'}" in capsys.readouterr().err
