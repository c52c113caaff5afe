"""``tunelab export --format peft``: an adapter checked against its base, rewritten as PEFT.

Normalising means: keys with PEFT's ``base_model.model.`` prefix, safetensors (also from an
old ``adapter_model.bin``), every PEFT option written explicitly, ``base_model_name_or_path``
set to the base it was checked against, and the tokenizer (with its chat template) beside it.
The tensors keep their stored values and dtype. The base is built on the meta device: only
its shapes are needed, so this costs no memory whatever the model's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tunelab.atomic import atomic_directory
from tunelab.errors import TunelabError


def export_peft(
    model: str, adapter_dir: str | Path, out: str | Path, overwrite: bool = False
) -> Path:
    """Check ``adapter_dir`` fits ``model`` and write it to ``out`` in PEFT's format."""
    from tunelab.export.merge import adapter_tokenizer, check_adapter_files
    from tunelab.hub import peft_base_name, resolve_model
    from tunelab.models.config import ModelConfig
    from tunelab.models.decoder import Decoder
    from tunelab.models.hf_fallback import meta_hf_model, needs_fallback
    from tunelab.models.lora import lora_modules
    from tunelab.models.peft_io import (
        load_adapter,
        lora_key_parts,
        read_adapter_weights,
        write_adapter,
    )

    out, adapter_dir = Path(out), Path(adapter_dir)
    if out.exists() and not overwrite:
        raise TunelabError(f"{out} already exists; choose another --out or pass --overwrite.")
    check_adapter_files(adapter_dir)
    base_dir = resolve_model(model)
    if needs_fallback(base_dir):  # an architecture trained through transformers
        decoder = meta_hf_model(base_dir)
    else:
        with torch.device("meta"):
            decoder = Decoder(ModelConfig.from_file(base_dir / "config.json"))
    cfg = load_adapter(decoder, adapter_dir)  # every name and shape checked against the base
    stored = {}
    for key, tensor in read_adapter_weights(adapter_dir).items():
        stored[lora_key_parts(key)] = tensor  # load_adapter vetted every key
    for name, module in lora_modules(decoder).items():
        module.lora_A.weight = nn.Parameter(stored[(name, "A")], requires_grad=False)
        module.lora_B.weight = nn.Parameter(stored[(name, "B")], requires_grad=False)
    tokenizer = adapter_tokenizer(adapter_dir, base_dir)
    base_name = peft_base_name(model, base_dir)
    from tunelab.export.qlora import MARKER_FILE, MARKER_KEY, read_marker

    marker = read_marker(adapter_dir)  # a QLoRA adapter stays one (as the side file)
    cfg.extra.pop(MARKER_KEY, None)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_adapter(decoder, cfg, tmp, base_name)
        tokenizer.save_pretrained(str(tmp))
        if marker is not None:
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    return out
