"""Read a llama.cpp GGUF file into a Hugging Face checkpoint (config, fp32 tensors, tokenizer).

Every tensor is dequantized to float32 with the ``gguf`` package and renamed through one table
(:data:`TENSOR_NAME_MAP`). Supported GGUF architectures: ``llama`` (which also covers Mistral
files, as llama.cpp writes them as ``llama``), ``qwen2`` and ``qwen3``.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    import gguf
    import transformers

logger = logging.getLogger(__name__)

# GGUF tensor name -> HF parameter name; "{i}" stands for the layer index.
TENSOR_NAME_MAP: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

_BASE_TENSORS = frozenset(
    {"token_embd.weight", "output_norm.weight", "output.weight"}
    | {f"blk.{{i}}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")}
    | {f"blk.{{i}}.{n}.weight" for n in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
)
_QKV_BIAS = frozenset({"blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"})
_QK_NORM = frozenset({"blk.{i}.attn_q_norm.weight", "blk.{i}.attn_k_norm.weight"})
_PATTERNS = [
    (re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), g) for g in TENSOR_NAME_MAP
]


@dataclass(frozen=True)
class _Arch:
    model_type: str
    hf_class: str
    tensors: frozenset[str]
    # llama.cpp runs these with interleaved-pair RoPE, so its converter permuted q/k rows;
    # qwen uses half-split ("neox") RoPE like HF and is stored unpermuted.
    unpermute_qk: bool


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("llama", "LlamaForCausalLM", _BASE_TENSORS, unpermute_qk=True),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", _BASE_TENSORS | _QKV_BIAS, unpermute_qk=False),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", _BASE_TENSORS | _QK_NORM, unpermute_qk=False),
}


@dataclass
class GGUFCheckpoint:
    """A GGUF file converted to Hugging Face form.

    ``config`` is the content of a ``config.json``, ``tensors`` are float32 with HF names
    (``lm_head.weight`` only when not tied), ``tokenizer`` carries the file's chat template and
    ``generation_config`` is the content of a ``generation_config.json``.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: transformers.PreTrainedTokenizerFast
    generation_config: dict[str, Any] = field(default_factory=dict)


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Read a GGUF file and return its config, fp32 tensors and tokenizer in HF form.

    Raises :class:`TunelabError` for a missing, invalid or truncated file, an unsupported
    architecture or an unknown tensor.
    """
    path = Path(path).expanduser()
    reader = _open_reader(path)
    meta = _read_metadata(reader)
    arch_name = str(meta.get("general.architecture", "<missing>"))
    arch = _ARCHS.get(arch_name)
    if arch is None:
        raise TunelabError(
            f"{path}: GGUF architecture {arch_name!r} is not supported (supported: "
            f"{', '.join(sorted(_ARCHS))}); convert the original Hugging Face checkpoint instead."
        )
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = _build_config(path, meta, arch_name, arch, shapes)
    logger.info("Dequantizing %d tensors from %s", len(reader.tensors), path)
    tensors = _read_tensors(path, reader, arch_name, arch, config)
    tokenizer = _load_tokenizer(path, meta)
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return GGUFCheckpoint(
        config, tensors, tokenizer, {k: v for k, v in ids.items() if v is not None}
    )


def _open_reader(path: Path) -> gguf.GGUFReader:
    import gguf

    if not path.is_file():
        raise TunelabError(f"GGUF file {path} does not exist; check the path.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises bare ValueError/IndexError on bad bytes
        raise TunelabError(
            f"{path} is not a readable GGUF file ({exc}); it may be truncated or not GGUF at all: "
            "download it again."
        ) from exc
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise TunelabError(
                f"{path} is truncated (tensor {tensor.name} is incomplete); download it again."
            )
    return reader


def _read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Scalar and string fields by key; arrays (vocabularies, merges) as their length."""
    from gguf import GGUFValueType

    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        kind = fld.types[0] if fld.types else None
        if kind == GGUFValueType.ARRAY:
            meta[key] = len(fld.data)
        elif kind == GGUFValueType.STRING:
            meta[key] = bytes(fld.parts[fld.data[0]]).decode("utf-8")
        elif kind == GGUFValueType.FLOAT32:
            # shortest float32 repr, so 1e-5 stays 1e-05 and not 9.999999747378752e-06
            meta[key] = float(str(fld.parts[fld.data[0]][0]))
        elif kind is not None:
            meta[key] = fld.parts[fld.data[0]][0].item()
    return meta


def _build_config(
    path: Path,
    meta: dict[str, Any],
    arch_name: str,
    arch: _Arch,
    shapes: dict[str, tuple[int, ...]],
) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch_name}.{name}", default)
        if value is None:
            raise TunelabError(
                f"{path}: GGUF metadata lacks {arch_name}.{name}; the file is broken."
            )
        return value

    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        raise TunelabError(
            f"{path}: per-layer head counts are not supported; convert the original HF checkpoint."
        )
    head_dim = key("attention.key_length", hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise TunelabError(
            f"{path}: partial rotary embeddings are not supported for {arch_name}; convert the "
            "original Hugging Face checkpoint instead."
        )
    if "token_embd.weight" not in shapes:
        raise TunelabError(f"{path} has no token_embd.weight tensor; the file is broken.")
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_parameters": _rope_parameters(path, meta, arch_name),
        "max_position_embeddings": key("context_length"),
        # the embedding's rows, which may exceed the tokenizer's vocabulary (padded vocabularies)
        "vocab_size": shapes["token_embd.weight"][0],
        # llama.cpp writes output.weight only when it differs from the embedding
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
    }
    if arch_name == "llama":
        config |= {"attention_bias": False, "mlp_bias": False}
    elif arch_name == "qwen2" and head_dim * heads != hidden:
        # Qwen2Config has no head_dim: it is always hidden_size // num_attention_heads
        raise TunelabError(f"{path}: qwen2 with head_dim {head_dim} is not supported.")
    return config


def _rope_parameters(path: Path, meta: dict[str, Any], arch_name: str) -> dict[str, Any]:
    theta = meta.get(f"{arch_name}.rope.freq_base", 10000.0)
    scaling = meta.get(f"{arch_name}.rope.scaling.type", "none")
    if scaling == "none":
        return {"rope_theta": theta, "rope_type": "default"}
    if scaling == "linear":
        factor = meta[f"{arch_name}.rope.scaling.factor"]
        return {"rope_theta": theta, "rope_type": "linear", "factor": factor}
    raise TunelabError(
        f"{path}: RoPE scaling {scaling!r} is not supported; convert the original Hugging Face "
        "checkpoint instead."
    )


def _read_tensors(
    path: Path, reader: gguf.GGUFReader, arch_name: str, arch: _Arch, config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    layers = config["num_hidden_layers"]
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(path, tensor.name, arch_name, arch, layers)
        values = _dequantize(path, tensor)
        if arch.unpermute_qk and ".attn_q." in tensor.name:
            values = _unpermute(values, config["num_attention_heads"])
        elif arch.unpermute_qk and ".attn_k." in tensor.name:
            values = _unpermute(values, config["num_key_value_heads"])
        tensors[hf_name] = torch.from_numpy(np.array(values, dtype=np.float32))  # owned copy
    expected = {
        TENSOR_NAME_MAP[g].replace("{i}", str(i)) for g in arch.tensors for i in range(layers)
    }
    expected -= {"lm_head.weight"} if config["tie_word_embeddings"] else set()
    if missing := sorted(expected - tensors.keys()):
        raise TunelabError(f"{path} lacks tensors {missing[:4]}...; the file is incomplete.")
    return tensors


def _hf_name(path: Path, gguf_name: str, arch_name: str, arch: _Arch, layers: int) -> str:
    for regex, pattern in _PATTERNS:
        match = regex.match(gguf_name)
        if match is None:
            continue
        if pattern not in arch.tensors or (match.groups() and int(match[1]) >= layers):
            break
        return TENSOR_NAME_MAP[pattern].replace("{i}", match[1] if match.groups() else "")
    raise TunelabError(
        f"{path}: tensor {gguf_name!r} is not supported for GGUF architecture {arch_name!r}; "
        "convert the original Hugging Face checkpoint instead."
    )


def _dequantize(path: Path, tensor: gguf.ReaderTensor) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise TunelabError(
            f"{path}: tensor {tensor.name} uses {tensor.tensor_type.name}, which the installed "
            "gguf package cannot dequantize; upgrade gguf or use a file with another quantization."
        ) from exc
    # GGUF lists dims fastest-first (ne0, ne1, ...); numpy/torch want them slowest-first
    return values.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate_half halves)."""
    rows = weights.shape[0]
    grouped = weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def _load_tokenizer(path: Path, meta: dict[str, Any]) -> transformers.PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    try:
        # From a folder holding only (a link to) the GGUF: from_pretrained would otherwise
        # prefer a tokenizer.json that happens to sit beside the file, another model's maybe.
        with tempfile.TemporaryDirectory(prefix="tunelab-gguf-tok-") as alone:
            link = Path(alone) / path.name
            try:
                link.symlink_to(path.resolve())
            except OSError:  # no symlinks on this filesystem: read it in place
                link = path
            tokenizer = PreTrainedTokenizerFast.from_pretrained(
                str(link.parent), gguf_file=link.name, local_files_only=True
            )
    except (ValueError, KeyError, OSError) as exc:
        raise TunelabError(
            f"{path}: transformers cannot build a tokenizer from this GGUF ({exc}); convert the "
            "original Hugging Face checkpoint instead."
        ) from exc
    # Make the special tokens and the template follow the file even if transformers' mapping drifts.
    for attr, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    if "tokenizer.chat_template" in meta:
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    arch_name = meta["general.architecture"]
    if f"{arch_name}.context_length" in meta:
        tokenizer.model_max_length = meta[f"{arch_name}.context_length"]
    return tokenizer
