"""Rotary position embeddings and the attention op.

Attention is a plain function so backends can be swapped: ``dense`` SDPA here (causal, with an
optional boolean mask for padding, caches and sliding windows); packed and paged variants live
beside it when the trainer and the engine need them.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.models.config import ModelConfig
from tunelab.models.kv_cache import KVCache

CAUSAL = "causal"
AttnMask = torch.Tensor | str | None  # CAUSAL, None (all keys visible) or a boolean tensor


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) and the attention scaling applied to cos/sin."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = config.rope_type
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(config, scaling)
    raise AssertionError(f"unvalidated rope type {kind}")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = (
        float(s["factor"]),
        float(s["low_freq_factor"]),
        float(s["high_freq_factor"]),
    )
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(in_band, blended, scaled)


def _yarn_inv_freq(config: ModelConfig, s: dict) -> tuple[torch.Tensor, float]:
    dim, base = config.head_dim, config.rope_theta
    factor = float(s["factor"])
    old_ctx = int(s.get("original_max_position_embeddings") or config.max_position_embeddings)
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 = keep the original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, computed in fp32 and cast to the activations' dtype."""

    def __init__(self, config: ModelConfig, device: torch.device | None = None):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def reset(self, device: torch.device) -> None:
        """Recompute the table on ``device`` (after loading weights onto a meta-built model)."""
        inv_freq, self.attention_scaling = rope_inv_freq(self.config)
        self.inv_freq = inv_freq.to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        # positions: (B, T) -> cos, sin: (B, 1, T, head_dim)
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D)."""
    return x * cos + _rotate_half(x) * sin


def build_mask(
    q_slots: torch.Tensor,
    key_valid: torch.Tensor | None,
    num_keys: int,
    window: int | None,
) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S); True = may attend.

    ``q_slots`` (B, T) are the cache slots of the queries; key ``j`` is visible to a query at
    slot ``i`` when ``j <= i``, the key is valid (not padding) and, with a sliding window,
    ``j > i - window``. A query always sees itself, so padded rows never become all-masked
    (which would give NaN from softmax).
    """
    keys = torch.arange(num_keys, device=q_slots.device)
    qi = q_slots[:, None, :, None]  # (B, 1, T, 1)
    kj = keys[None, None, None, :]  # (1, 1, 1, S)
    allowed = kj <= qi
    if window is not None:
        allowed = allowed & (kj > qi - window)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :num_keys]
    return allowed | (kj == qi)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask
) -> torch.Tensor:
    """SDPA over (B, H, T, D) queries and (B, Hkv, S, D) keys/values.

    ``mask``: ``CAUSAL`` (queries and keys start together), None (every key visible) or a
    boolean (B, 1, T, S) tensor from ``build_mask``.
    """
    gqa = k.shape[1] != q.shape[1]
    if gqa and q.device.type == "cpu":
        # On CPU, expanding kv heads beats SDPA's enable_gqa (measured 2-3x); accelerator
        # kernels read the shared heads in place, so they get enable_gqa.
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        gqa = False
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class AttentionContext(Protocol):
    """How the layers of one forward pass attend: the swappable attention op.

    ``attend`` gets the layer index, its sliding window (None = full), and this step's
    queries (B, H, T, D) and keys/values (B, Hkv, T, D) after RoPE; it stores keys/values
    wherever its cache lives and returns the attention output (B, H, T, D).
    """

    def attend(
        self, layer: int, window: int | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


class DenseAttention:
    """SDPA over whole sequences, optionally after a contiguous ``KVCache``."""

    def __init__(self, masks: dict[int | None, AttnMask], cache: KVCache | None = None):
        self.masks, self.cache = masks, cache

    def attend(self, layer, window, q, k, v):
        if self.cache is not None:
            k, v = self.cache.update(layer, k, v)  # (B, n_kv, S, hd), S = cached + T
        return dense_attention(q, k, v, self.masks[window])
