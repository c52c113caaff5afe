"""``tunelab convert``: any loadable model spec (GGUF included) -> HF-format directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunelab import device as dev
from tunelab.errors import TunelabError
from tunelab.models.config import ModelConfig
from tunelab.models.decoder import Decoder
from tunelab.models.loading import (
    load_model,
    load_tokenizer,
    read_generation_config,
    save_pretrained,
)

log = logging.getLogger(__name__)


def convert(spec: str, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the model named by ``spec`` as an HF directory in ``dtype`` (default: as stored)."""
    if Path(out).exists() and not overwrite:  # before loading a possibly huge model
        raise TunelabError(f"{out} already exists; choose another --out or pass --overwrite.")
    if str(spec).endswith(".gguf") and Path(spec).expanduser().is_file():
        return convert_gguf(Path(spec).expanduser(), out, dtype, overwrite)
    from tunelab.hub import resolve_model

    src = resolve_model(spec)
    torch_dtype = dev.parse_dtype(dtype) if dtype else None
    tokenizer = load_tokenizer(src)
    model = load_model(src, device="cpu", dtype=torch_dtype or torch.float32)
    if torch_dtype is None:  # keep the source's dtype
        stored = model.config.raw.get("dtype") or model.config.raw.get("torch_dtype") or "float32"
        torch_dtype = dev.parse_dtype(stored)
    gen = read_generation_config(src) or None
    from tunelab.export.merge import check_range

    check_range(model, torch_dtype, "weight")  # fp16 overflows to inf: refuse, don't write it
    return save_pretrained(model, tokenizer, out, torch_dtype, overwrite, generation_config=gen)


def convert_gguf(
    gguf: Path, out: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Dequantize a GGUF file into an HF directory (default fp32: the exact dequantized values)."""
    from tunelab.models.gguf_import import read_gguf

    ckpt = read_gguf(gguf)
    torch_dtype = dev.parse_dtype(dtype) if dtype else torch.float32
    model = model_from_tensors(ckpt.config, ckpt.tensors, source=str(gguf))
    from tunelab.export.merge import check_range

    check_range(model, torch_dtype, "weight")
    return save_pretrained(
        model, ckpt.tokenizer, out, torch_dtype, overwrite, generation_config=ckpt.generation_config
    )


def model_from_tensors(config: dict, tensors: dict[str, torch.Tensor], source: str) -> Decoder:
    """A CPU ``Decoder`` holding ``tensors`` (HF names), without a random init first."""
    cfg = ModelConfig.from_dict(config, source=source)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary.reset(torch.device("cpu"))
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    assert not missing, f"{source}: tensors missing after conversion: {missing[:3]}"
    return model.eval()
