"""The ``triton`` paged-attention backend: KV store, paged decode and paged varlen prefill
kernels (``triton_kernels.py``) behind the same interface as the ``sdpa`` backend.

Per layer a step costs at most three launches (plus a combine pass for split decodes): store
this step's keys/values into their slots, one decode launch for all single-token queries,
one prefill launch for all chunks. Nothing is gathered or padded in memory, and every shape
a kernel sees comes from the step's device tensors, so decode steps can be captured in CUDA
graphs (``cuda_graph.py``) with fixed-size buffers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tunelab import device as dev
from tunelab.engine.kv_cache import PagedKVCache
from tunelab.engine.paged_attention import SdpaBackend, StepMetadata

MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason(
    device: torch.device, head_dim: int | None = None, dtype: torch.dtype | None = None
) -> str | None:
    """Why the triton backend cannot run here (None when it can)."""
    if not dev.supports("triton_kernels", device):
        return f"the triton attention backend runs on CUDA only, not on {device.type}"
    try:
        import triton
    except Exception as e:  # not installed, or a broken install
        return f"the triton attention backend needs the `triton` package ({e})"
    if int(triton.__version__.split(".")[0]) < 3:
        return f"the triton attention backend needs triton >= 3.0, found {triton.__version__}"
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"the triton kernels take head dims up to {MAX_HEAD_DIM}, the model has {head_dim}"
    if dtype is not None and dtype not in DTYPES:
        return f"the triton kernels take fp16, bf16 or fp32, the model is {dtype}"
    return None


@dataclass
class TritonStep:
    """What the kernels read for one step (device tensors) and the launch sizes (host)."""

    slot_mapping: torch.Tensor  # (T,) int64, -1 = skip (padding)
    block_tables: torch.Tensor  # (entries, max_blocks) int64
    context_lens: torch.Tensor  # (entries,) int32
    query_starts: torch.Tensor | None  # (entries + 1,) int32; None: decodes only
    num_decodes: int
    num_entries: int
    max_prefill_len: int
    decode_chunk: int  # keys per decode split
    decode_splits: int


class TritonPagedBackend:
    """Paged attention with Triton kernels (CUDA). ``max_context`` is the model's context;
    ``num_sms`` sizes decode splits (default: the device's multiprocessor count)."""

    name = "triton"

    def __init__(self, device: torch.device, max_context: int, num_sms: int | None = None):
        from tunelab.engine import triton_kernels  # imports triton: only once it is chosen

        self.kernels = triton_kernels
        self.device, self.max_context = device, max_context
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.num_sms = num_sms

    def context(self, cache: PagedKVCache, meta: StepMetadata) -> TritonPagedAttention:
        nd, n = meta.num_decodes, len(meta.query_lens)
        starts = list(itertools.accumulate(meta.query_lens, initial=0))
        device = meta.slot_mapping.device
        host = torch.tensor(meta.context_lens + starts, dtype=torch.int32)
        both = host.to(device, non_blocking=True)
        chunk = self.decode_chunk(nd, cache)
        longest = max(meta.context_lens[:nd], default=0)
        step = TritonStep(
            slot_mapping=meta.slot_mapping,
            block_tables=meta.block_tables,
            context_lens=both[:n],
            query_starts=both[n:] if nd < n else None,
            num_decodes=nd,
            num_entries=n,
            max_prefill_len=max(meta.query_lens[nd:], default=0),
            decode_chunk=chunk,
            decode_splits=max(1, -(-longest // chunk)),
        )
        return TritonPagedAttention(self.kernels, cache, step)

    def decode_chunk(self, num_decodes: int, cache: PagedKVCache) -> int:
        n_kv = cache.k[0].shape[2]
        block_n = self.kernels.DECODE_BLOCK_N
        return self.kernels.decode_chunk(num_decodes, n_kv, self.max_context, self.num_sms, block_n)

    def decode_step(
        self,
        cache: PagedKVCache,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> TritonPagedAttention:
        """A decode-only context over fixed buffers (CUDA graphs): the splits cover the
        model's whole context, and the combine pass reads only those holding keys."""
        n = context_lens.shape[0]
        chunk = self.decode_chunk(n, cache)
        step = TritonStep(
            slot_mapping, block_tables, context_lens, None, n, n, 0, chunk,
            max(1, -(-self.max_context // chunk)),
        )  # fmt: skip
        return TritonPagedAttention(self.kernels, cache, step)


class TritonPagedAttention:
    """``AttentionContext`` of one step for the triton backend."""

    def __init__(self, kernels, cache: PagedKVCache, step: TritonStep):
        self.kernels, self.cache, self.step = kernels, cache, step
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # split decode buffers

    def attend(self, layer, window, q, k, v):
        # q: (1, H, T, D); k, v: (1, Hkv, T, D) after RoPE. Kernels take (T, heads, D) views.
        K, step = self.kernels, self.step
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        q, k, v = (_last_contiguous(x[0].transpose(0, 1)) for x in (q, k, v))
        K.store_kv(k, v, kc, vc, step.slot_mapping)
        T, H, D = q.shape
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        nd = step.num_decodes
        if nd:
            if step.decode_splits > 1 and self._scratch is None:
                self._scratch = K.decode_scratch(nd, H, D, step.decode_splits, q)
            K.paged_decode(
                q[:nd], kc, vc, out[:nd], step.context_lens[:nd], step.block_tables[:nd],
                window, step.decode_chunk, step.decode_splits, self._scratch,
            )  # fmt: skip
        if step.num_entries > nd:
            K.paged_prefill(
                q, kc, vc, out, step.query_starts, step.context_lens, step.block_tables,
                nd, step.num_entries - nd, step.max_prefill_len, window,
            )  # fmt: skip
        return out.transpose(0, 1)[None]  # (1, H, T, D), a view the decoder reshapes for free


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


CHECK_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def self_check(backend: TritonPagedBackend, config, dtype: torch.dtype) -> None:
    """Compile and run the kernels once at the model's head shapes and windows, against the
    sdpa backend, on decodes (one pass and split) and prefill chunks (with and without a
    cached prefix). Raises on a compile error or a mismatch; what the engine's first steps
    would hit, found before the engine relies on it."""
    device = torch.device(backend.device)
    H, n_kv, D, page = config.num_attention_heads, config.num_key_value_heads, config.head_dim, 16
    entries = [(0, 1), (100, 1), (0, 5), (20, 3)]  # (cached, new): 2 decodes, 2 chunks
    g = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(8 * len(entries), page, n_kv, D, generator=g, device=device).to(dtype)
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(entries))]
    slots = [tables[i][p // page] * page + p % page for i, (a, b) in enumerate(entries)
             for p in range(a, a + b)]  # fmt: skip
    meta = StepMetadata(
        query_lens=[b for _, b in entries],
        context_lens=[a + b for a, b in entries],
        num_decodes=2,
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor(tables, device=device),
    )
    T = len(slots)
    q, k, v = (
        torch.randn(1, h, T, D, generator=g, device=device).to(dtype) for h in (H, n_kv, n_kv)
    )
    windows = {config.window_for_layer(i) for i in range(config.num_hidden_layers)}
    for window in sorted(windows, key=lambda w: w or 0):
        want = SdpaBackend().context(_one_layer(noise), meta).attend(0, window, q, k, v)
        for chunk in (None, backend.kernels.DECODE_BLOCK_N):
            ctx = backend.context(_one_layer(noise), meta)
            if chunk:  # the split path: the 101-token decode in two splits
                ctx.step.decode_chunk, ctx.step.decode_splits = chunk, 2
            err = (ctx.attend(0, window, q, k, v).float() - want.float()).abs().max().item()
            if not err <= CHECK_TOL[dtype]:
                raise RuntimeError(
                    f"triton attention differs from sdpa by {err:.3g} (window {window}, "
                    f"{'split' if chunk else 'one-pass'} decode, {dtype}, head dim {D})"
                )


def _one_layer(noise: torch.Tensor):
    """A one-layer stand-in for ``PagedKVCache`` holding a copy of ``noise``."""
    return SimpleNamespace(k=[noise.clone()], v=[noise.flip(0).clone()], block_size=noise.shape[1])
