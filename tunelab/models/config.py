"""Architecture settings read from an HF ``config.json``.

One dataclass covers the Llama / Mistral / Qwen2 / Qwen3 families: they differ only in a few
switches (qkv bias, q/k norm, sliding window, tied embeddings, RoPE scaling). Both the
transformers 4 layout (``rope_theta`` + ``rope_scaling``) and the transformers 5 layout
(``rope_parameters``) are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Everything the decoder needs to build itself; field names follow HF's config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always, Llama optionally)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention"
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the original config.json

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type") or "default"

    def window_for_layer(self, layer: int) -> int | None:
        """Sliding-window size for ``layer``, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.o_proj_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h
        return L * layer + h + emb * (1 if self.tie_word_embeddings else 2)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise TunelabError(
                f"{source}: model_type {model_type!r} is not implemented by tunelab's decoder "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}). Use a model of one of these "
                "families, or serve it with --backend vllm."
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope_theta, rope_scaling = _read_rope(cfg)
            bias = bool(cfg.get("attention_bias", False))
            config = cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=_read_head_dim(cfg, hidden, heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # As transformers builds each family: Qwen2 always has q/k/v biases, Mistral
                # never has biases, Llama and Qwen3 follow attention_bias; only Llama mlp_bias.
                attention_bias=model_type == "qwen2" or (model_type != "mistral" and bias),
                o_proj_bias=model_type in ("llama", "qwen3") and bias,
                mlp_bias=model_type == "llama" and bool(cfg.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                sliding_window=_read_sliding_window(cfg),
                layer_types=_read_layer_types(cfg),
                hidden_act=cfg.get("hidden_act", "silu"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
                raw=dict(cfg),
            )
        except KeyError as e:
            raise TunelabError(
                f"{source}: required key {e.args[0]!r} is missing; is this a complete HF config?"
            ) from e
        except (ValueError, TypeError) as e:  # "two" layers, a list for rope_scaling...
            raise TunelabError(f"{source}: a value has the wrong type ({e}); fix the file.") from e
        config.validate(source)
        return config

    def validate(self, source: str = "config.json") -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise TunelabError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.hidden_act not in ("silu", "swish"):
            raise TunelabError(
                f"{source}: hidden_act {self.hidden_act!r} is not supported (only silu)."
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise TunelabError(
                f"{source}: rope scaling {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})."
            )
        needs = {"linear": ("factor",), "yarn": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}  # fmt: skip
        missing = [k for k in needs.get(self.rope_type, ()) if k not in (self.rope_scaling or {})]
        if missing:
            raise TunelabError(
                f"{source}: rope scaling {self.rope_type!r} needs {', '.join(missing)}; "
                "the config is incomplete."
            )
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise TunelabError(f"{source}: layer_types must have one entry per layer.")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise TunelabError(
                f"{path} not found: a model directory needs an HF config.json."
            ) from e
        except json.JSONDecodeError as e:
            raise TunelabError(f"{path} is not valid JSON ({e}).") from e
        return cls.from_dict(cfg, source=str(path))


def _read_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either config layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, (scaling if kind != "default" else None)


def _read_head_dim(cfg: dict[str, Any], hidden: int, heads: int) -> int:
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    return 128 if cfg.get("model_type") == "qwen3" else hidden // heads  # transformers' defaults


def _read_sliding_window(cfg: dict[str, Any]) -> int | None:
    """The window as transformers applies it: never for Llama (its attention has none), for
    Qwen2/3 only with use_sliding_window, for Mistral whenever set."""
    window = cfg.get("sliding_window")
    model_type = cfg.get("model_type")
    if model_type == "llama":
        return None
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _read_layer_types(cfg: dict[str, Any]) -> list[str]:
    """Which layers slide. Qwen2/3 configs saved before ``layer_types`` existed window only the
    layers from ``max_window_layers`` on (transformers' rule, default 28)."""
    if cfg.get("model_type") == "llama":
        return []
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    if cfg.get("model_type") in ("qwen2", "qwen3") and _read_sliding_window(cfg) is not None:
        first = int(cfg.get("max_window_layers", 28))
        layers = int(cfg["num_hidden_layers"])
        return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    return []
