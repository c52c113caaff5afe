"""Training architectures our decoder does not implement, through transformers.

A model whose ``config.json`` names a ``model_type`` outside ``SUPPORTED_MODEL_TYPES`` but
known to ``transformers.AutoModelForCausalLM`` (gpt_neox, phi3, gemma2, falcon, ...) is
loaded with transformers and trained by the same loop. What the loop needs from a model is
small, and this module provides it for transformers models:

- ``HFForward``: hidden states from the decoder body (``get_decoder()``) and the output head
  (``get_output_embeddings()`` + the config's logit scale / soft-capping) for the fused
  linear + cross-entropy; packed rows pass their per-document ``position_ids``, from which
  transformers builds the same-document causal mask (``masking_utils``) itself;
- ``decoder_layers``: the list of transformer blocks (freeze, LoRA targets, NF4), found
  generically;
- ``check_fallback``: probes run once at setup, because an architecture may compute its
  logits or masks in ways we cannot see: the fused head must reproduce the model's own
  logits, and a packed row must give each document the hidden states it gets alone.
  Either failing is a ``TunelabError`` before the first step, never a silently wrong run.

The dispatch is ``needs_fallback(model_dir)``; nothing here runs for llama / mistral / qwen.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.models.config import SUPPORTED_MODEL_TYPES
from tunelab.models.decoder import Decoder

log = logging.getLogger(__name__)

LIMITS = (
    "generate / chat / serve / the paged engine and GGUF export need tunelab's decoder; "
    "packing only where transformers honours per-document position_ids (checked)"
)


def read_model_type(model_dir: str | Path) -> str | None:
    """``model_type`` of ``model_dir/config.json`` (None when unreadable: the decoder's loader
    reports that with a better message)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def needs_fallback(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` must train through transformers; raises when nothing can load it."""
    model_type = read_model_type(model_dir)
    if model_type is None or model_type in SUPPORTED_MODEL_TYPES:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    import transformers

    raise TunelabError(
        f"{model_dir}: model_type {model_type!r} is implemented neither by tunelab's decoder "
        f"({', '.join(SUPPORTED_MODEL_TYPES)}) nor by transformers {transformers.__version__}'s "
        "AutoModelForCausalLM (remote code is not run); upgrade transformers or use a model "
        "of a supported family."
    )


def is_hf_model(model: nn.Module) -> bool:
    """A transformers model (the fallback), as opposed to our ``Decoder``."""
    return not isinstance(model, Decoder) and hasattr(model, "get_output_embeddings")


def load_hf_model(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype, purpose: str = "training"
) -> nn.Module:
    """``AutoModelForCausalLM`` from ``model_dir`` in ``dtype`` on ``device`` (sdpa attention
    where the architecture has it, else eager); logs that the fallback is used for
    ``purpose`` (training, merging)."""
    from transformers import AutoModelForCausalLM

    def load(attn: str) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation=attn
        )

    try:
        with _no_progress_bars():
            try:
                model = load("sdpa")
            except ValueError as e:  # this architecture has no sdpa path
                if "sdpa" not in str(e) and "scaled_dot_product" not in str(e):
                    raise
                model = load("eager")
    except (OSError, ValueError) as e:
        raise TunelabError(f"transformers cannot load {model_dir}: {e}") from e
    model.to(device)
    log.warning(
        "%s (model_type %s) is not implemented by tunelab's decoder: %s through "
        "transformers.AutoModelForCausalLM (%s attention).%s",
        model_dir,
        model.config.model_type,
        purpose,
        model.config._attn_implementation,
        f" Not available for it: {LIMITS}." if purpose == "training" else "",
    )
    return model.eval()


@contextlib.contextmanager
def _no_progress_bars():
    """transformers draws a bar per load / save; our logs and progress bar are enough."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def meta_hf_model(model_dir: str | Path) -> nn.Module:
    """The transformers model of ``model_dir`` on the meta device: shapes and names only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def text_config(model: nn.Module) -> Any:
    """The language model's config (multimodal configs nest it)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module list) of the transformer blocks: ``model.layers`` for our decoder;
    for a transformers model the ``ModuleList`` of ``num_hidden_layers`` blocks, preferring
    one whose blocks are of a class in ``_no_split_modules`` (transformers' name for them)."""
    if isinstance(model, Decoder):
        return "model.layers", model.model.layers
    n = getattr(text_config(model), "num_hidden_layers", None)
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
    ]
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    typed = [(name, m) for name, m in lists if type(m[0]).__name__ in blocks]
    found = typed or lists
    if not found:
        raise TunelabError(
            f"cannot find the list of transformer blocks in {type(model).__name__}; use "
            "method full, or lora with targets given as full module names."
        )
    return found[0]


def non_linear_share(model: nn.Module) -> float:
    """The share of the blocks' matrix weights that live outside ``nn.Linear`` layers (e.g.
    MoE experts stored as 3-D parameters): LoRA and NF4 only reach linear layers."""
    _, layers = decoder_layers(model)
    in_linear = {id(m.weight) for m in layers.modules() if isinstance(m, nn.Linear)}
    total = other = 0
    for p in layers.parameters():
        if p.ndim >= 2:
            total += p.numel()
            other += p.numel() if id(p) not in in_linear else 0
    return other / total if total else 0.0


def nf4_view(model: nn.Module) -> Any:
    """What ``quantize_base_nf4`` walks (``.model.layers``, ``.to``) for a transformers model."""
    _, layers = decoder_layers(model)
    return SimpleNamespace(model=SimpleNamespace(layers=layers), to=model.to)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (frozen inputs need no hooks)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TunelabError(
            f"{type(model).__name__} does not support gradient checkpointing in transformers; "
            "set train.grad_checkpointing false."
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def output_head(model: nn.Module):
    """The ``OutputHead`` that turns the body's hidden states into the model's logits."""
    from tunelab.train.loss import OutputHead

    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TunelabError(
            f"{type(model).__name__}'s output head is a {type(head).__name__}, not a linear "
            "layer; tunelab's fused loss needs one. Use a model with a plain lm_head."
        )
    config = text_config(model)
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)  # Granite
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 / 3
    return OutputHead(head.weight, head.bias, scale, float(softcap) if softcap else None)


def model_shape(model: nn.Module) -> SimpleNamespace:
    """The dimensions MFU needs (``metrics.flops_per_token``), read from a transformers model."""
    config = text_config(model)
    hidden, heads = config.hidden_size, config.num_attention_heads
    seen, total = set(), 0
    for name, p in model.named_parameters():  # tied weights once, adapters not at all
        if id(p) not in seen and ".lora_" not in name:
            seen.add(id(p))
            total += p.numel()
    return SimpleNamespace(
        num_params=total,
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
    )


def memory_dims(config: Any) -> SimpleNamespace:
    """hidden / intermediate / layers / vocab for the dry-run estimate (``estimate``)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = config.hidden_size
    inner = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "ffn_hidden_size", None)
        or getattr(config, "n_inner", None)
        or 4 * hidden
    )
    return SimpleNamespace(
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
    )


def _accepts(module: nn.Module, name: str) -> bool:
    params = inspect.signature(module.forward).parameters
    return name in params


@dataclass
class HFForward:
    """The trainer's view of a transformers model: hidden states and the output head.

    Unpacked rows are right-padded: causal attention never lets a real token see padding,
    so they go in without a mask (sdpa's causal fast path), as in our decoder. Packed rows
    pass ``position_ids`` that restart at 0 per document; transformers reads the document
    boundaries from them (``find_packed_sequence_indices``) and masks across documents.
    """

    model: nn.Module
    packing: bool

    def hidden(self, batch) -> torch.Tensor:
        extra = {"position_ids": batch.position_ids} if self.packing else {}
        out = self.model.get_decoder()(input_ids=batch.input_ids, use_cache=False, **extra)
        return out.last_hidden_state

    def head(self):
        return output_head(self.model)

    @property
    def flops_config(self) -> SimpleNamespace:
        return model_shape(self.model)


@torch.no_grad()
def check_fallback(model: nn.Module, packing: bool) -> None:
    """Refuse, before training, what the fused loss or packing would get wrong (module doc)."""
    body, head = model.get_decoder(), output_head(model)
    if packing and not _accepts(body, "position_ids"):
        raise TunelabError(
            f"{type(model).__name__} takes no position_ids, so packed documents would attend "
            "to each other; set data.packing false."
        )
    sliding = getattr(text_config(model), "sliding_window", None)
    was_training = model.training
    model.eval()
    try:
        device = head.weight.device
        vocab = head.weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, 14), generator=gen).to(device)
        reference = model(input_ids=ids, use_cache=False).logits.float()
        ours = head.logits(body(input_ids=ids, use_cache=False).last_hidden_state)
        tol = _tolerance(head.weight.dtype) * max(1.0, float(reference.abs().max()))
        diff = float((ours - reference).abs().max())
        if not diff <= tol:
            raise TunelabError(
                f"{type(model).__name__} computes its logits in a way tunelab's fused loss "
                f"does not reproduce (lm_head of the hidden states differs by {diff:.3g} from "
                "the model's logits); it cannot be trained here. Use a model of a supported "
                "family."
            )
        if packing:
            _check_packing(body, ids, sliding)
    finally:
        model.train(was_training)


def _check_packing(body: nn.Module, ids: torch.Tensor, sliding: int | None) -> None:
    """Two documents and a padding segment in one row must see what they see alone.

    The first document cannot see another one (attention is causal), so its difference from
    running alone is the noise of the masked attention path; the second document may differ
    by little more than that. A leak across documents or positions that do not restart
    changes it by tens of percent.
    """
    lengths = (6, 5, 3)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(ids.device)
    packed = body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    errors, start = [], 0
    for n in lengths[:2]:
        alone = body(input_ids=ids[:, start : start + n], use_cache=False).last_hidden_state
        part = packed[:, start : start + n]
        err = (part - alone).float().norm(dim=-1) / alone.float().norm(dim=-1).clamp_min(1e-6)
        errors.append(float(err.max()))
        start += n
    floor = 1e-3 if packed.dtype == torch.float32 else 5e-2
    if not errors[1] <= max(floor, 10 * errors[0]):
        window = f" (sliding window {sliding})" if sliding else ""
        raise TunelabError(
            f"packing with {type(body).__name__}{window} through transformers mixes documents: "
            f"a packed document's hidden states differ by {errors[1]:.2g} (relative) from the "
            "document alone, so this architecture ignores per-document position_ids; set "
            "data.packing false."
        )


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def save_hf_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: Path,
    dtype: torch.dtype,
    overwrite: bool,
    generation_config: dict | None,
) -> Path:
    """``save_pretrained`` of a transformers model in ``dtype``, atomically, with tokenizer."""
    from tunelab.atomic import atomic_directory

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        cast: dict[tuple, torch.Tensor] = {}  # tied weights stay one tensor, saved once
        state = {
            k: cast.setdefault((v.data_ptr(), v.shape, v.stride()), v.to(dtype))
            for k, v in model.state_dict().items()
        }
        with _no_progress_bars():
            model.save_pretrained(str(tmp), state_dict=state)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("torch_dtype", None)
        config["dtype"] = str(dtype).removeprefix("torch.")
        config_path.write_text(json.dumps(config, indent=2))
        if generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
        tokenizer.save_pretrained(str(tmp))
    return out_dir
