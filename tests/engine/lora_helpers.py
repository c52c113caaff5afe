"""Two different random LoRA adapters for a tiny model (shared by engine and server tests).

"a1" is written by peft itself (rank 4 on q/v/down, random A and B); "a2" by our trainer's
LoRA + ``save_adapter`` (rank 8, rsLoRA, every linear).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tunelab.models.loading import load_model
from tunelab.models.lora import LoraConfig, apply_lora
from tunelab.models.peft_io import save_adapter


def hf_model(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def write_adapters(path: Path, out: Path) -> dict[str, str]:
    """Write adapters "a1" and "a2" for the model at ``path`` under ``out``; name -> dir."""
    import peft

    torch.manual_seed(7)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # random B too: the adapter changes the outputs
        task_type="CAUSAL_LM",
    )
    peft.get_peft_model(hf_model(path), cfg).save_pretrained(str(out / "a1"))
    torch.manual_seed(8)
    model = load_model(path, "cpu", torch.float32)
    ours = LoraConfig(rank=8, alpha=4, use_rslora=True)
    apply_lora(model, ours)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    save_adapter(model, ours, out / "a2", base_model_name_or_path=str(path))
    return {"a1": str(out / "a1"), "a2": str(out / "a2")}
