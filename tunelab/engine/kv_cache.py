"""The paged KV cache: per layer, keys and values as (num_blocks, block_size, n_kv, head_dim).

Its size comes from the device: on accelerators a fraction of the memory left after loading
the model (``memory_fraction`` of the total stays the most the process may use, like vLLM's
``gpu_memory_utilization``), minus room for activations; on CPU a token budget
(``max_cache_tokens``), capped at half of the available RAM.
"""

from __future__ import annotations

import logging

import torch

from tunelab import device as dev
from tunelab.engine.block_manager import blocks_for
from tunelab.errors import TunelabError
from tunelab.models.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_CPU_CACHE_TOKENS = 16384
CPU_RAM_FRACTION = 0.5


class PagedKVCache:
    """Key and value tensors of every layer; a token's slot is ``block * block_size + offset``."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        # zeros, not empty: padded gathers read unused slots, and NaN * 0 is still NaN.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(_layers(config))]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(_layers(config))]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def _layers(config: ModelConfig) -> int:
    return config.num_hidden_layers


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Keys + values of ``block_size`` tokens over all layers."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * _layers(config)
    return per_token * block_size * dtype.itemsize


def activation_bytes(
    config: ModelConfig, max_num_batched_tokens: int, max_num_seqs: int, dtype: torch.dtype
) -> int:
    """A generous estimate of one step's activations: hidden states, MLP and fp32 logits."""
    widths = 4 * config.hidden_size + 3 * config.intermediate_size
    widths += 2 * config.num_attention_heads * config.head_dim
    hidden = max_num_batched_tokens * widths * dtype.itemsize
    logits = max_num_seqs * config.vocab_size * 4 * 4  # logits, probs, noise, filters (fp32)
    return hidden + logits


def plan_num_blocks(
    config: ModelConfig,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    max_cache_tokens: int | None = None,
    memory_fraction: float = 0.9,
    reserve_bytes: int = 0,
) -> int:
    """How many blocks the cache gets on ``device`` (call it after the model is loaded)."""
    if not 0 < memory_fraction <= 1:
        raise TunelabError(f"memory_fraction must be in (0, 1], got {memory_fraction}.")
    per_block = bytes_per_block(config, block_size, dtype)
    free, total = dev.mem_get_info(device)
    if device.type in ("cpu", "mps"):
        wanted = max_cache_tokens or DEFAULT_CPU_CACHE_TOKENS
        budget = min(blocks_for(wanted, block_size) * per_block, int(free * CPU_RAM_FRACTION))
    else:
        budget = int(free - (1 - memory_fraction) * total) - reserve_bytes
        if max_cache_tokens:
            budget = min(budget, blocks_for(max_cache_tokens, block_size) * per_block)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise TunelabError(
            f"no memory left for the KV cache on {device} ({free / 2**30:.1f} GiB free of "
            f"{total / 2**30:.1f} GiB after loading the model): use a smaller model or dtype, "
            "lower max_num_batched_tokens / max_num_seqs, or raise memory_fraction."
        )
    log.info(
        "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB) on %s",
        num_blocks,
        block_size,
        num_blocks * block_size,
        num_blocks * per_block / 2**30,
        device,
    )
    return int(num_blocks)
