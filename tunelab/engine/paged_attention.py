"""Attention over the paged KV cache, behind one backend interface.

A step is a ragged batch: the scheduled tokens of every sequence flattened into one row
(B=1), single-token queries (decodes) first, then prefill chunks. ``StepMetadata`` describes
it in the varlen layout paged kernels want (query lengths, context lengths, block tables, the
cache slot of each token). A backend turns it into an ``AttentionContext`` for the decoder.

``sdpa`` is the portable backend (CPU, NPU, CUDA) and the correctness oracle: it stores this
step's keys/values into their slots, gathers each sequence's keys/values from its blocks and
calls PyTorch's scaled_dot_product_attention. The ``triton`` backend (``triton_attention.py``:
paged prefill/decode kernels, CUDA) plugs in behind the same interface.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from tunelab import device as dev
from tunelab.engine.kv_cache import PagedKVCache
from tunelab.errors import TunelabError
from tunelab.models.attention import CAUSAL, AttentionContext, AttnMask, build_mask
from tunelab.models.attention import dense_attention as _dense
from tunelab.models.config import ModelConfig

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "triton")


@dataclass
class StepMetadata:
    """The layout of one step's flattened tokens (host lists for shapes, device tensors).

    Entry ``i`` has ``query_lens[i]`` tokens starting at ``query_starts[i]`` in the flat batch;
    after this step its sequence has ``context_lens[i]`` tokens in the cache, so its queries
    sit at positions ``[context_lens[i] - query_lens[i], context_lens[i])``. The first
    ``num_decodes`` entries have one query each, shortest context first.
    """

    query_lens: list[int]
    context_lens: list[int]
    num_decodes: int
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of every flattened token
    block_tables: torch.Tensor  # (num_entries, max_blocks) int64, padded with block 0
    query_starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        starts, total = [], 0
        for n in self.query_lens:
            starts.append(total)
            total += n
        self.query_starts = starts


def decode_groups(lens: list[int], max_groups: int = 4, min_size: int = 8) -> list[range]:
    """Split decodes (sorted by context length) into groups padded to their own longest.

    Padding every decode to the longest context wastes most of the gathered keys when
    lengths vary; a few groups of similar lengths cost a few more calls and read far less.
    """
    n = len(lens)
    if n == 0:
        return []
    k = max(1, min(max_groups, n // min_size))
    bounds = [round(i * n / k) for i in range(k + 1)]
    groups: list[range] = []
    for a, b in itertools.pairwise(bounds):
        if groups and lens[b - 1] <= 1.25 * lens[groups[-1].stop - 1]:  # hardly longer: merge
            groups[-1] = range(groups[-1].start, b)
        else:
            groups.append(range(a, b))
    return groups


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as SDPA's additive one (0 / -inf) in the queries' dtype.

    Same result as the boolean mask, but SDPA uses it as is: a boolean one is converted on
    every call, i.e. once per layer (measured 70 us of 250 per CPU decode call).
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


class PagedAttentionBackend(Protocol):
    """Makes the per-step attention context; one instance lives as long as the engine."""

    name: str

    def context(self, cache: PagedKVCache, meta: StepMetadata) -> AttentionContext: ...


class SdpaBackend:
    """Gather pages + PyTorch SDPA: runs everywhere, and is what faster backends must match."""

    name = "sdpa"

    def context(self, cache: PagedKVCache, meta: StepMetadata) -> AttentionContext:
        return SdpaPagedAttention(cache, meta)


def select_backend(
    name: str,
    device: torch.device,
    config: ModelConfig | None = None,
    dtype: torch.dtype | None = None,
) -> PagedAttentionBackend:
    """The attention backend for ``name`` ("auto", "sdpa", "triton") on ``device``.

    "auto" takes triton where it can run (CUDA, triton installed, the model's head dim and
    ``dtype`` supported: ``config`` is needed to tell), sdpa otherwise; asking for triton
    where it cannot run raises a TunelabError saying why.
    """
    if name not in BACKENDS:
        raise TunelabError(
            f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}."
        )
    if name == "sdpa" or (name == "auto" and config is None):
        return SdpaBackend()
    from tunelab.engine import triton_attention

    head_dim = config.head_dim if config is not None else None
    reason = triton_attention.unavailable_reason(device, head_dim, dtype)
    if reason is None and config is not None:
        backend = triton_attention.TritonPagedBackend(device, config.max_position_embeddings)
        try:  # compiled once here at the model's shapes, against sdpa
            triton_attention.self_check(backend, config, dtype or torch.float32)
            return backend
        except Exception as e:  # untested GPU / triton combination: say so, stay correct
            reason = f"the triton kernels failed their self-check ({type(e).__name__}: {e})"
            log.warning("attention backend: %s", reason)
    if name == "auto":
        log.info("attention backend: sdpa (%s)", reason)
        return SdpaBackend()
    dev.require("triton_kernels", device)  # the capability table's message, off CUDA
    raise TunelabError(
        f"{reason or 'the triton backend needs the model config'}: use the sdpa backend "
        "(attention_backend='sdpa' or 'auto')."
    )


class SdpaPagedAttention:
    """``AttentionContext`` of one step for the sdpa backend (masks built once per step)."""

    def __init__(self, cache: PagedKVCache, meta: StepMetadata):
        self.cache, self.meta = cache, meta
        self._masks: dict[tuple[int, int | None], AttnMask] = {}
        self._groups = decode_groups(meta.context_lens[: meta.num_decodes])

    def attend(self, layer, window, q, k, v):
        # q: (1, H, T, D); k, v: (1, Hkv, T, D) after RoPE
        meta, kc, vc = self.meta, self.cache.k[layer], self.cache.v[layer]
        n_kv, D = kc.shape[2], kc.shape[3]
        kc.view(-1, n_kv, D).index_copy_(0, meta.slot_mapping, k[0].transpose(0, 1))
        vc.view(-1, n_kv, D).index_copy_(0, meta.slot_mapping, v[0].transpose(0, 1))
        pieces = []
        nd = meta.num_decodes
        for group in self._groups:
            pieces.append(self._decodes(group, window, q[:, :, group.start : group.stop], kc, vc))
        for i in range(nd, len(meta.query_lens)):
            pieces.append(self._prefill(i, window, q, k, v, kc, vc))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def _gather(self, cache: torch.Tensor, rows: range | int, num_keys: int) -> torch.Tensor:
        """Keys (or values) of the first ``num_keys`` positions: (N, Hkv, num_keys, D)."""
        bs = cache.shape[1]
        rows = slice(rows.start, rows.stop) if isinstance(rows, range) else rows
        tables = self.meta.block_tables[rows, : -(-num_keys // bs)]
        tables = tables.reshape(-1, tables.shape[-1])  # (N, blocks)
        pages = cache.index_select(0, tables.reshape(-1))  # (N * blocks, bs, Hkv, D)
        pages = pages.view(tables.shape[0], -1, *cache.shape[2:])[:, :num_keys]
        return pages.transpose(1, 2)

    def _decodes(self, group: range, window, q, kc, vc):
        """A group of single-token queries at once, keys padded to its longest context."""
        nd, lens = len(group), self.meta.context_lens[group.start : group.stop]
        H, D, n_kv = q.shape[1], q.shape[3], kc.shape[2]
        num_keys = max(lens)
        keys = self._gather(kc, group, num_keys)
        values = self._gather(vc, group, num_keys)
        # Query heads of one kv head become that head's "query rows": no kv expansion needed.
        qg = q[0].transpose(0, 1).reshape(nd, n_kv, H // n_kv, D)
        mask = self._decode_mask(group, window, num_keys, q.device, q.dtype)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        return out.reshape(nd, H, D).transpose(0, 1)[None]  # (1, H, nd, D)

    def _decode_mask(
        self, group: range, window: int | None, num_keys: int, device, dtype
    ) -> AttnMask:
        key = (-1 - group.start, window)  # negative: prefill entries use their index >= 0
        if key not in self._masks:
            lens = self.meta.context_lens[group.start : group.stop]
            ctx = torch.tensor(lens, device=device)[:, None]  # (nd, 1)
            j = torch.arange(num_keys, device=device)[None, :]
            allowed = j < ctx
            if window is not None:
                allowed &= j > ctx - 1 - window
            all_visible = min(lens) == num_keys and (window is None or window >= num_keys)
            self._masks[key] = None if all_visible else additive(allowed[:, None, None, :], dtype)
        return self._masks[key]

    def _prefill(self, i, window, q, k, v, kc, vc):
        """One prefill chunk: its queries against its cached prefix plus itself."""
        meta = self.meta
        s, n, ctx = meta.query_starts[i], meta.query_lens[i], meta.context_lens[i]
        start = ctx - n
        qi = q[:, :, s : s + n]
        if start == 0:  # nothing cached before it: this step's keys are all it sees
            keys, values = k[:, :, s : s + n], v[:, :, s : s + n]
        else:
            keys, values = self._gather(kc, i, ctx), self._gather(vc, i, ctx)
        key = (i, window)
        if key not in self._masks:
            if start == 0 and (window is None or window >= n):
                self._masks[key] = CAUSAL
            else:
                pos = torch.arange(start, ctx, device=q.device)[None]
                self._masks[key] = additive(build_mask(pos, None, ctx, window), q.dtype)
        return _dense(qi, keys, values, self._masks[key])
