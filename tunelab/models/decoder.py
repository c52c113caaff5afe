"""The one decoder used for training, generation and serving (Llama / Mistral / Qwen2 / Qwen3).

Module names mirror HF transformers (``model.layers.N.self_attn.q_proj`` ...) so checkpoints,
PEFT adapters and exports need no renaming; see docs/architecture.md (Decisions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.models.attention import (
    CAUSAL,
    AttentionContext,
    AttnMask,
    DenseAttention,
    RotaryEmbedding,
    apply_rope,
    build_mask,
)
from tunelab.models.config import ModelConfig
from tunelab.models.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back before the weight (HF's order, for bit-level parity).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            d,
        )
        self.layer = layer
        self.window = config.window_for_layer(layer)
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionContext
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attn.attend(self.layer, self.window, q, k, v)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, attn: AttentionContext):
        x = x + self.self_attn(self.input_layernorm(x), rope, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """Embeddings, layers and final norm: token ids -> hidden states."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False  # recompute each layer in backward (training)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn: AttentionContext | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> hidden states (B, T, hidden).

        ``positions`` (B, T) default to ``cached + arange(T)``. ``key_valid`` (B, S) marks
        non-padding tokens over the whole cache + new tokens (False for left padding); None
        means there is no padding. ``attn`` replaces the dense attention (packed training,
        the paged engine); it then owns the cache, and ``positions`` must be given.
        """
        B, T = input_ids.shape
        if attn is None:
            start = cache.length if cache is not None else 0
            slots = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            positions = slots if positions is None else positions
            attn = DenseAttention(self._masks(slots, key_valid, start, T), cache)
        assert positions is not None, "an attention context needs explicit positions"
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, rope, attn, use_reentrant=False)
            else:
                x = layer(x, rope, attn)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def _masks(self, slots, key_valid, start: int, T: int) -> dict[int | None, AttnMask]:
        """One mask per distinct window size (key None = full attention).

        Without padding and with the window wider than the keys, no tensor is needed: a fresh
        sequence is plain causal, and a single new token after the cache sees every key.
        """
        num_keys = start + T
        masks: dict[int | None, AttnMask] = {}
        for w in {layer.self_attn.window for layer in self.layers}:
            if key_valid is None and (w is None or w >= num_keys) and (start == 0 or T == 1):
                masks[w] = CAUSAL if start == 0 and T > 1 else None
            else:
                masks[w] = build_mask(slots, key_valid, num_keys, w)
        return masks


class Decoder(nn.Module):
    """Causal LM: ``DecoderBody`` + ``lm_head`` (tied to the embedding when configured)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        attn: AttentionContext | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position with ``last_only``."""
        hidden = self.model(input_ids, positions, key_valid, cache, attn)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
