"""Fixtures for merge / export tests: tiny models and random LoRA adapters saved as PEFT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tunelab.models.loading import load_model
from tunelab.models.lora import LoraConfig, apply_lora
from tunelab.models.peft_io import save_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory) -> Callable[..., Path]:
    """``make_adapter(model_dir, std=0.05)`` -> PEFT adapter dir with random A and B."""

    def make(
        model_dir: Path,
        std: float = 0.05,
        rank: int = 4,
        targets: list[str] | str = "all-linear",
        seed: int = 0,
        tokenizer: bool = False,
    ) -> Path:
        torch.manual_seed(seed)
        model = load_model(model_dir, device="cpu", dtype="fp32")
        cfg = LoraConfig(rank=rank, alpha=2 * rank, targets=targets)
        apply_lora(model, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, std)
        out = tmp_path_factory.mktemp("adapter") / "adapter"
        save_adapter(model, cfg, out, str(model_dir))
        if tokenizer:
            from tunelab.models.loading import load_tokenizer

            load_tokenizer(model_dir).save_pretrained(str(out))
        return out

    return make
