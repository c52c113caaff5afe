"""Merge and export of LoRA runs on architectures trained through transformers (gpt_neox)."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import make_hf_model, tiny_config, write_chats
from tunelab.errors import TunelabError
from tunelab.export.merge import merge_adapter
from tunelab.train.trainer import Trainer

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 11, 300]])


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    return make_hf_model(tmp_path_factory.mktemp("base"), tiny_tokenizer, "gpt_neox")


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def trained(base, tmp_path, method: str) -> Trainer:
    """A finished LoRA / QLoRA run (lr high enough that the adapter matters)."""
    data = write_chats(tmp_path / "chats.jsonl", 8)
    cfg = tiny_config(
        base, data, tmp_path / method, tmp_path / "cache", method=method, train__lr=2e-2
    )
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return trained(base, tmp_path_factory.mktemp("lora"), "lora").run_dir / "final"


def test_merge_matches_peft_and_loads_in_transformers(base, adapter, tmp_path):
    peft = pytest.importorskip("peft")
    ref = peft.PeftModel.from_pretrained(hf_model(base), str(adapter)).eval()
    expected = logits(ref)
    assert (expected - logits(hf_model(base))).abs().max() > 1e-3  # the adapter matters
    for dtype, atol in (("fp32", 1e-4), ("bf16", 0.1)):
        report = merge_adapter(str(base), adapter, tmp_path / dtype, dtype=dtype)
        assert report.max_abs_diff <= report.tolerance
        merged = hf_model(tmp_path / dtype)
        assert merged.config.model_type == "gpt_neox"
        torch.testing.assert_close(logits(merged), expected, atol=atol, rtol=0)
        assert (tmp_path / dtype / "tunelab.json").exists()
        assert (tmp_path / dtype / "tokenizer_config.json").exists()


def test_qlora_run_merges_into_the_nf4_base_it_trained_on(base, tmp_path):
    pytest.importorskip("torchao")
    trainer = trained(base, tmp_path, "qlora")
    trainer.model.eval()
    with torch.no_grad():  # what training computed: NF4 base + adapter
        expected = trainer.model(input_ids=IDS).logits
    report = merge_adapter(str(base), trainer.run_dir / "final", tmp_path / "m", dtype="fp32")
    assert "NF4" in report.base_precision
    torch.testing.assert_close(logits(hf_model(tmp_path / "m")), expected, atol=1e-4, rtol=0)


def test_export_peft_and_gguf(base, adapter, tmp_path, capsys):
    from safetensors.torch import load_file

    from tunelab.cli import main

    out = tmp_path / "peft"
    argv = ["export", "--model", str(base), "--adapter", str(adapter), "--format", "peft"]
    assert main([*argv, "--out", str(out)]) == 0
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)

    capsys.readouterr()
    gguf = ["export", "--model", str(base), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]
    assert main(gguf) == 2
    assert "convert_hf_to_gguf.py" in capsys.readouterr().err
    with pytest.raises(TunelabError, match="--format hf"):
        from tunelab.export.gguf import export_gguf

        export_gguf(str(base), tmp_path / "y.gguf")
