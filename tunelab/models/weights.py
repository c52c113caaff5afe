"""Read and write HF-format checkpoints: (sharded) safetensors + config + tokenizer.

The decoder uses HF's parameter names, so the name table is a list of the tensors each
architecture must have; checkpoint keys outside it (old ``rotary_emb.inv_freq`` buffers, a
duplicate ``lm_head`` of tied models) are dropped, missing ones are an error naming the tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tunelab.errors import TunelabError
from tunelab.models.config import ModelConfig

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_names(config: ModelConfig) -> list[str]:
    """Every tensor name a checkpoint of this architecture holds (HF naming)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{p}self_attn.{proj}.weight")
        if config.attention_bias:
            names += [f"{p}self_attn.{x}_proj.bias" for x in "qkv"]
        if config.o_proj_bias:
            names.append(f"{p}self_attn.o_proj.bias")
        if config.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append(f"{p}mlp.{proj}.weight")
            if config.mlp_bias:
                names.append(f"{p}mlp.{proj}.bias")
    return names


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, in shard order."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise TunelabError(f"{index} is not a valid safetensors index ({e}).") from e
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise TunelabError(
                f"{index} lists shards that are missing: {', '.join(missing)}. "
                "Download the model again."
            )
        return files
    single = model_dir / SINGLE_NAME
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    hint = " (only PyTorch .bin weights found)" if list(model_dir.glob("*.bin")) else ""
    raise TunelabError(
        f"no safetensors weights in {model_dir}{hint}. Convert the model to safetensors "
        "(e.g. `tunelab convert`) or point --model at an HF-format directory."
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from each file; a damaged file is a clear error."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise TunelabError(
                f"cannot read {path}: {e}. The file is damaged or truncated; download or "
                "convert the model again."
            ) from e


def load_state_dict(
    model_dir: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Load every expected tensor of ``model_dir`` onto ``device`` in ``dtype``."""
    wanted = set(expected_names(config))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(checkpoint_files(model_dir)):
        if name in wanted:
            state[name] = tensor.to(device=device, dtype=dtype)
        elif not name.endswith(IGNORED_SUFFIXES) and name != "lm_head.weight":
            raise TunelabError(
                f"{model_dir}: unexpected tensor {name!r} for model_type {config.model_type!r}; "
                "the checkpoint does not match its config.json."
            )
    missing = sorted(wanted - state.keys())
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise TunelabError(
            f"{model_dir}: tensor {missing[0]!r}{', ' + missing[1] if len(missing) > 1 else ''}"
            f"{more} missing from the checkpoint; the download is incomplete or the config "
            "does not match the weights."
        )
    return state


def save_state_dict(
    state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 2 * 2**30
) -> None:
    """Write ``state`` as safetensors shards (+ index when more than one) into ``out_dir``."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
