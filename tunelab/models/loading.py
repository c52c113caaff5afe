"""Build a ``Decoder`` from an HF-format directory, and save one back in HF format."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from tunelab import device as dev
from tunelab.atomic import atomic_directory
from tunelab.errors import TunelabError
from tunelab.models.config import ModelConfig
from tunelab.models.decoder import Decoder
from tunelab.models.weights import load_state_dict, save_state_dict

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def load_model(
    model_dir: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Decoder:
    """Load the decoder from ``model_dir`` onto ``device`` (auto) in ``dtype`` (device default)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_file(model_dir / "config.json")
    device = dev.resolve_device(device)
    if isinstance(dtype, str):
        dtype = dev.parse_dtype(dtype)
    dtype = dtype or dev.default_dtype(device)
    if dtype == torch.bfloat16 and not dev.supports_bf16(device):
        raise TunelabError(f"{device} does not support bf16; use --dtype fp16 or fp32 instead.")
    state = load_state_dict(model_dir, config, device, dtype)
    with torch.device("meta"):
        model = Decoder(config)
    _check_shapes(model, state, model_dir)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary.reset(device)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not meta, f"parameters left on meta: {meta[:3]}"
    log.info(
        "loaded %s (%s, %.0fM params) on %s as %s",
        model_dir,
        config.model_type,
        config.num_params / 1e6,
        device,
        dtype,
    )
    return model.eval()


def _check_shapes(model: Decoder, state: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Every checkpoint tensor has the shape config.json implies; else one clear error."""
    expected = model.state_dict()
    for name, tensor in state.items():
        want = expected.get(name)
        if want is not None and tuple(want.shape) != tuple(tensor.shape):
            raise TunelabError(
                f"{model_dir}: tensor {name} has shape {tuple(tensor.shape)}, but config.json "
                f"implies {tuple(want.shape)}: the config does not match the weights (check "
                "vocab_size, hidden_size, intermediate_size, num_attention_heads, "
                "num_key_value_heads and head_dim)."
            )


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved with the model (it carries the chat template)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise TunelabError(
            f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Copy the "
            "tokenizer files of the base model into it."
        )
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types (a bad config.json too)
        why = " ".join((str(e) or type(e).__name__).split())  # one line
        why = why if len(why) <= 240 else why[:240] + "..."
        fix = (
            ""
            if (model_dir / "tokenizer.json").exists()
            else "; tokenizer.json is missing: copy the tokenizer files of the base model into it"
        )
        raise TunelabError(
            f"cannot load the tokenizer in {model_dir}{fix} (transformers says: {why}; it "
            "reads config.json too)"
        ) from e


def save_pretrained(
    model: Decoder | torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    generation_config: dict | None = None,
    max_shard_bytes: int = 2 * 2**30,
) -> Path:
    """Write ``model`` + ``tokenizer`` as an HF directory that ``transformers`` loads unchanged.

    The directory is built aside and renamed into place, so it is complete or absent.
    ``model`` may also be a transformers model (the training fallback for other
    architectures): it is saved by its own ``save_pretrained``.
    """
    out_dir = Path(out_dir)
    dtype = dtype or model.dtype
    if not isinstance(model, Decoder):
        from tunelab.models.hf_fallback import save_hf_model

        return save_hf_model(model, tokenizer, out_dir, dtype, overwrite, generation_config)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_state_dict(state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model.config, dtype), indent=2))
        gen = generation_config or default_generation_config(model.config)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tokenizer.save_pretrained(str(tmp))
    return out_dir


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict:
    cfg = dict(config.raw)
    arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    cfg.setdefault("architectures", [f"{arch[config.model_type]}ForCausalLM"])
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = DTYPE_NAMES[dtype]
    return cfg


def default_generation_config(config: ModelConfig) -> dict:
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    return {k: v for k, v in gen.items() if v is not None}


def read_generation_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TunelabError(
            f"{path} is not valid JSON ({e}); fix or delete it (it only holds generation "
            "defaults such as the EOS ids)."
        ) from None
    if not isinstance(config, dict):
        raise TunelabError(f"{path} must hold a JSON object; fix or delete it.")
    return config


def copy_extra_files(src: Path, dst: Path, names: tuple[str, ...] = ("README.md", "LICENSE")):
    """Carry licence and model card along on conversion."""
    for name in names:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
