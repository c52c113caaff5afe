"""``tunelab export --format gguf``: a llama.cpp / Ollama GGUF file from any model spec.

Written with the ``gguf`` package's ``GGUFWriter`` as llama.cpp's ``convert_hf_to_gguf.py``
does: architecture metadata (``llama`` for Llama and Mistral, ``qwen2``, ``qwen3``), the
tokenizer and chat template (``gguf_vocab``), and the tensors under GGUF names, with Llama's
q/k rows permuted for llama.cpp's interleaved RoPE (``gguf_import`` undoes the same).

Quantization: ``f32``; ``f16`` (1-D norms and biases stay f32, as llama.cpp does); ``q8_0``
(2-D weights in 32-value blocks with an f16 scale via ``gguf.quants.quantize``; weights whose
rows are not a multiple of 32 fall back to f16). The file is written aside and renamed into
place. RoPE scaling: linear and YaRN as metadata, Llama 3 as llama.cpp's ``rope_freqs``
tensor (llama.cpp reads it; transformers' and tunelab's GGUF readers do not).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import gguf
import numpy as np

from tunelab.atomic import atomic_file
from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder
from tunelab.models.gguf_import import TENSOR_NAME_MAP

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "f32")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
Q8_BLOCK = 32
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_EXTRA_NAMES = {  # optional biases llama.cpp's llama graph reads; absent from the import map
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}
_HF_TO_GGUF = [
    (re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), g)
    for g, hf in {**TENSOR_NAME_MAP, **_EXTRA_NAMES}.items()
]


def export_gguf(
    model: str | Path,
    out_file: str | Path,
    adapter: str | Path | None = None,
    quant: str = "f16",
    overwrite: bool = False,
    qlora: str = "auto",
) -> Path:
    """Write ``model`` (any spec; ``adapter`` merged in first, checked) as a GGUF file."""
    from tunelab.export.merge import adapter_tokenizer, check_adapter_files, load_base, merge_into
    from tunelab.export.qlora import QloraInfo, detect_qlora
    from tunelab.export.verify import DEFAULT_PROMPTS, encode_prompts
    from tunelab.hub import resolve_model
    from tunelab.models.hf_fallback import needs_fallback, read_model_type
    from tunelab.models.loading import load_tokenizer, read_generation_config

    out_file = Path(out_file)
    if quant not in QUANTS:
        raise TunelabError(f"unknown GGUF quantization {quant!r}; use one of {', '.join(QUANTS)}.")
    if out_file.is_dir():
        raise TunelabError(
            f"{out_file} is a directory; a GGUF export writes one file: give --out a path "
            "ending in .gguf."
        )
    if out_file.exists() and not overwrite:
        raise TunelabError(f"{out_file} already exists; choose another --out or pass --overwrite.")
    if adapter is not None:
        check_adapter_files(Path(adapter))
    model_dir = resolve_model(model)
    if needs_fallback(model_dir):
        raise TunelabError(
            f"GGUF export covers the architectures of tunelab's decoder, not model_type "
            f"{read_model_type(model_dir)!r} (trained through transformers); write an HF "
            "directory with --format hf and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    if adapter is None:
        tokenizer = load_tokenizer(model_dir)
        decoder = load_base(model_dir, "cpu", QloraInfo(False, None, ""))
    else:
        tokenizer = adapter_tokenizer(Path(adapter), model_dir)
        decoder = load_base(model_dir, "cpu", detect_qlora(Path(adapter), qlora))
        merge_into(decoder, Path(adapter), encode_prompts(tokenizer, DEFAULT_PROMPTS))
    eos = read_generation_config(model_dir).get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return write_gguf(decoder, tokenizer, out_file, quant, model_dir.name, eos_fallback=eos)


def write_gguf(
    model: Decoder,
    tokenizer,
    out_file: Path,
    quant: str = "f16",
    name: str = "model",
    eos_fallback: int | None = None,
) -> Path:
    """Write a loaded decoder and its tokenizer to ``out_file`` atomically."""
    from tunelab.export.gguf_vocab import add_tokenizer

    config = model.config
    arch = GGUF_ARCH[config.model_type]
    with atomic_file(out_file) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_arch_metadata(writer, model)
        pre = add_tokenizer(writer, tokenizer, config.vocab_size, eos_fallback)
        counts = _add_tensors(writer, model, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    log.info(
        "wrote %s (%s, pre-tokenizer %s, tensors %s, %.1f MB)",
        out_file,
        quant,
        pre,
        counts,
        out_file.stat().st_size / 1e6,
    )
    return out_file


def _add_arch_metadata(writer, model: Decoder) -> None:
    c = model.config
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.num_attention_heads != c.hidden_size or c.model_type == "qwen3":
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    scaling = c.rope_scaling or {}
    if c.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif c.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        orig = scaling.get("original_max_position_embeddings")
        if orig:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
    if c.sliding_window is not None:
        log.warning(
            "llama.cpp's %s graph has no sliding-window attention; the GGUF attends to the "
            "whole context (exact up to %d tokens)",
            GGUF_ARCH[c.model_type],
            c.sliding_window,
        )


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name of an HF parameter (``blk.3.ffn_up.weight`` for ``...3.mlp.up_proj...``)."""
    for regex, gguf_name in _HF_TO_GGUF:
        match = regex.match(hf_name)
        if match:
            return gguf_name.replace("{i}", match[1]) if match.groups() else gguf_name
    raise TunelabError(f"tensor {hf_name} has no GGUF equivalent; export --format hf instead.")


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: RoPE's rotate-half pairs (i, i + d/2) made adjacent."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tensors(writer, model: Decoder, quant: str) -> dict[str, int]:
    c = model.config
    counts: dict[str, int] = {}
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp ties when output.weight is absent
    for hf_name, tensor in state.items():
        gguf_name = gguf_tensor_name(hf_name)
        data = tensor.detach().float().cpu().numpy()
        if GGUF_ARCH[c.model_type] == "llama" and ".attn_q." in gguf_name:
            data = llama_permute(data, c.num_attention_heads)
        elif GGUF_ARCH[c.model_type] == "llama" and ".attn_k." in gguf_name:
            data = llama_permute(data, c.num_key_value_heads)
        kind = _encode(writer, gguf_name, np.ascontiguousarray(data), quant)
        counts[kind] = counts.get(kind, 0) + 1
    if c.rope_type == "llama3":
        _encode(writer, "rope_freqs.weight", _llama3_rope_factors(model), "f32")
        counts["f32"] = counts.get("f32", 0) + 1
    return counts


def _encode(writer, name: str, data: np.ndarray, quant: str) -> str:
    """Add one tensor in the storage type ``quant`` asks for; return that type's name."""
    if data.ndim == 1 or quant == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return "f32"
    if quant == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return "q8_0"
    peak = float(np.abs(data).max()) if data.size else 0.0
    if peak > np.finfo(np.float16).max:
        raise TunelabError(
            f"tensor {name} reaches {peak:.3g}, beyond the f16 maximum 65504; export with "
            "--quant f32 (or q8_0, whose scales fit)."
        )
    writer.add_tensor(name, data.astype(np.float16))
    return "f16"


def _llama3_rope_factors(model: Decoder) -> np.ndarray:
    """llama.cpp's ``rope_freqs``: the factor dividing each default RoPE frequency."""
    from tunelab.models.attention import rope_inv_freq

    config = model.config
    plain, _ = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    scaled, _ = rope_inv_freq(config)
    return (plain / scaled).float().numpy()
