"""A contiguous KV cache for simple (non-paged) generation.

Every row of the batch shares one write position: prompts are left-padded to the same length
and padding is masked out, so a decode step appends one slot for all rows. The paged cache of
the engine replaces this for serving.
"""

from __future__ import annotations

import torch

from tunelab.models.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [
            torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.v = [
            torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.max_len = max_len
        self.length = 0  # slots filled before the current forward

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, n_kv, T, hd) keys/values; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} slots")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called once per forward, after every layer has stored its keys/values."""
        self.length += num_tokens
