"""Triton kernels over the paged KV cache: store this step's keys/values, paged decode
(optionally split over the keys, flash-decoding style) and paged varlen prefill.

Layouts: a layer's cache is (num_blocks, block_size, n_kv, head_dim); token ``t`` of the
flattened step has queries ``q[t, h]`` (any strides, last dim contiguous); entry ``e`` has
``context_lens[e]`` tokens in the cache after this step, its pages in ``block_tables[e]``.
Decodes are the first entries, one query each (query row = entry index). A query at position
``p`` sees keys ``j <= p`` and, with a sliding window ``w``, ``j > p - w``.

Scores are kept in base 2 (``log2(e)`` folded into the scale) and accumulated in fp32.
Imported only when the triton backend is used; tests reload it under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
DECODE_BLOCK_N = 64  # keys per tile in decode
MIN_SPLIT_KEYS = 256  # a decode split covers at least this many keys


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    # fp32 stays fp32 (the sdpa oracle does); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- KV store -----------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    NUM_KV: tl.constexpr, D: tl.constexpr, KV_PAD: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, KV_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < NUM_KV) & (d < D) & (slot >= 0)  # slot -1: a padded row (CUDA graphs)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(kc_ptr + slot * stride_cs + h * stride_ch + d, k, mask=mask)
    tl.store(vc_ptr + slot * stride_cs + h * stride_ch + d, v, mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write ``k``/``v`` (T, n_kv, D) into the cache slots ``slots`` (T,); slot -1 is skipped."""
    T, n_kv, D = k.shape
    if T == 0:
        return
    _store_kv_kernel[(T,)](
        k, v, kc, vc, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc.stride(1), kc.stride(2),
        NUM_KV=n_kv, D=D, KV_PAD=triton.next_power_of_2(n_kv), D_PAD=_pow2(D, 1),
    )  # fmt: skip


# ---- decode -------------------------------------------------------------------------------


# Integer arguments that change from step to step are not specialised (Triton would compile
# a variant whenever one is 1 or a multiple of 16, stalling a step mid-serve).
@triton.jit(do_not_specialize=["stride_bt", "window", "chunk"])
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, part_ptr, lse_ptr, ctx_ptr, bt_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    stride_pn, stride_ph, stride_ps, stride_ln, stride_lh,
    scale, window, chunk,
    PAGE: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One (sequence, kv head, split): the G query heads of that kv head over keys
    ``[split * chunk, (split + 1) * chunk)`` of the sequence (within its window)."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    if HAS_WINDOW:
        lo = tl.maximum(lo, ctx - window)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * G + g
    qmask = (g[:, None] < G) & (d[None, :] < D)
    qp = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(qp, mask=qmask, other=0.0)  # zeros: padded lanes must not be NaN

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    table = bt_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo - lo % BLOCK_N, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = (pos >= lo) & (pos < hi)
        page = tl.load(table + pos // PAGE, mask=valid, other=0).to(tl.int64)
        row = page * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch
        kvmask = valid[:, None] & (d[None, :] < D)
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=kvmask, other=0.0)  # (N, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (G, N), base 2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:
        pp = part_ptr + seq * stride_pn + heads[:, None] * stride_ph + split * stride_ps
        tl.store(pp + d[None, :], out, mask=qmask)
        has_keys = l_i > 0
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq * stride_ln + heads * stride_lh + split, lse, mask=g < G)
    else:
        op = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(op, out.to(out_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _combine_kernel(
    out_ptr, part_ptr, lse_ptr, ctx_ptr,
    stride_ot, stride_oh, stride_pn, stride_ph, stride_ps, stride_ln, stride_lh,
    chunk, D: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one (sequence, head) in split order: only the splits that hold
    keys are read, so the result does not depend on how many splits the grid had."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    n = (ctx + chunk - 1) // chunk
    lse = lse_ptr + seq * stride_ln + h * stride_lh
    m = float("-inf")
    for s in range(0, n):
        m = tl.maximum(m, tl.load(lse + s))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    d = tl.arange(0, D_PAD)
    acc = tl.zeros([D_PAD], tl.float32)
    den = 0.0
    for s in range(0, n):
        w = tl.exp2(tl.load(lse + s) - m_safe)
        part = tl.load(part_ptr + seq * stride_pn + h * stride_ph + s * stride_ps + d, d < D)
        acc += w * part
        den += w
    out = acc / tl.where(den > 0, den, 1.0)
    op = out_ptr + seq * stride_ot + h * stride_oh + d
    tl.store(op, out.to(out_ptr.dtype.element_ty), mask=d < D)


def decode_chunk(
    num_decodes: int, num_kv_heads: int, max_context: int, num_sms: int, block_n: int
) -> int:
    """Keys per decode split, from the batch size bucket (next power of two) and the model's
    context only, so a CUDA-graph replay and an eager step split every sequence alike.

    Enough splits to give about two programs per SM, each at least ``MIN_SPLIT_KEYS`` keys;
    a batch that already fills the GPU gets one split (no combine pass).
    """
    programs = triton.next_power_of_2(max(num_decodes, 1)) * num_kv_heads
    wanted = -(-2 * num_sms // programs)
    splits = max(1, min(wanted, -(-max_context // MIN_SPLIT_KEYS)))
    per_split = -(-max_context // splits)
    return -(-per_split // block_n) * block_n


def paged_decode(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    out: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    window: int | None,
    chunk: int,
    num_splits: int,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Attention of one query per sequence: q, out (N, H, D); context_lens (N,) int32.

    Split ``s`` of a sequence covers its keys ``[s * chunk, (s + 1) * chunk)``, so
    ``num_splits * chunk`` must reach the longest context; more splits than that change
    nothing (the extra ones hold no keys). Several splits write fp32 partials to ``scratch``
    (see ``decode_scratch``; allocated here when None) and a combine pass merges them.
    """
    N, H, D = q.shape
    n_kv = kc.shape[2]
    G = H // n_kv
    if N == 0:
        return
    split = num_splits > 1
    if split:
        part, lse = scratch if scratch is not None else decode_scratch(N, H, D, num_splits, q)
    else:
        part = lse = out  # unused
    _decode_kernel[(N, n_kv, num_splits)](
        q, kc, vc, out, part, lse, context_lens, block_tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2) if split else 0,
        lse.stride(0), lse.stride(1),
        LOG2E / math.sqrt(D), window or 0, chunk,
        PAGE=kc.shape[1], G=G, G_PAD=_pow2(G), D=D, D_PAD=_pow2(D), BLOCK_N=DECODE_BLOCK_N,
        HAS_WINDOW=window is not None, SPLIT=split, PRECISION=_precision(q.dtype),
    )  # fmt: skip
    if split:
        _combine_kernel[(N, H)](
            out, part, lse, context_lens,
            out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1), chunk, D=D, D_PAD=_pow2(D, 1),
        )  # fmt: skip


def decode_scratch(
    N: int, H: int, D: int, num_splits: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs and their log-sum-exps for a split decode."""
    part = torch.empty(N, H, num_splits, D, dtype=torch.float32, device=like.device)
    lse = torch.empty(N, H, num_splits, dtype=torch.float32, device=like.device)
    return part, lse


# ---- prefill ------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_bt", "first_entry", "window"])
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, qstart_ptr, ctx_ptr, bt_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    first_entry, scale, window,
    PAGE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One (query tile, head, prefill entry): the tile's queries against the cached prefix
    and the chunk itself (causal), keys read from the pages (this step's already stored)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    e = first_entry + tl.program_id(2)
    q0 = tl.load(qstart_ptr + e)
    n_q = tl.load(qstart_ptr + e + 1) - q0
    ctx = tl.load(ctx_ptr + e)
    first = ctx - n_q  # position of the chunk's first query
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rvalid = rows < n_q
    qpos = first + rows
    d = tl.arange(0, D_PAD)
    qmask = rvalid[:, None] & (d[None, :] < D)
    tok = (q0 + rows).to(tl.int64)
    qp = q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :]
    q = tl.load(qp, mask=qmask, other=0.0)

    kvh = h // G
    hi = first + tl.minimum((tile + 1) * BLOCK_M, n_q)  # past the tile's last query
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first + tile * BLOCK_M - window + 1, 0)
    hi = tl.where(tile * BLOCK_M < n_q, hi, 0)  # a tile past the chunk: no keys

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = bt_ptr + e.to(tl.int64) * stride_bt
    for start in range(lo - lo % BLOCK_N, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        kvalid = pos < hi
        page = tl.load(table + pos // PAGE, mask=kvalid, other=0).to(tl.int64)
        row = page * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch
        kvmask = kvalid[:, None] & (d[None, :] < D)
        k = tl.load(kc_ptr + row[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (M, N), base 2
        allowed = (pos[None, :] <= qpos[:, None]) & kvalid[None, :]
        if HAS_WINDOW:
            allowed = allowed & (pos[None, :] > qpos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    op = out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(op, out.to(out_ptr.dtype.element_ty), mask=qmask)


def prefill_tiles(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for the prefill kernel: smaller tiles for wide heads, and for fp32,
    whose 64x64 tiles spill registers from head dim 64 up (ptxas, sm_90, Triton 3.6)."""
    if dtype == torch.float32:
        return (32, 32) if _pow2(head_dim) <= 128 else (16, 32)
    return (64, 64) if _pow2(head_dim) <= 128 else (32, 32)


def paged_prefill(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    out: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    first_entry: int,
    num_entries: int,
    max_query_len: int,
    window: int | None,
    tiles: tuple[int, int] | None = None,
) -> None:
    """Chunked-prefill attention of entries ``first_entry ..`` (``num_entries`` of them).

    q, out: (T, H, D) over the whole step; query_starts (entries + 1,) int32 offsets into T;
    context_lens (entries,) int32; keys come from the cache, so store them first.
    """
    if num_entries == 0:
        return
    _, H, D = q.shape
    n_kv = kc.shape[2]
    block_m, block_n = tiles or prefill_tiles(D, q.dtype)
    grid = (triton.cdiv(max_query_len, block_m), H, num_entries)
    _prefill_kernel[grid](
        q, kc, vc, out, query_starts, context_lens, block_tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
        first_entry, LOG2E / math.sqrt(D), window or 0,
        PAGE=kc.shape[1], G=H // n_kv, D=D, D_PAD=_pow2(D),
        BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=window is not None, PRECISION=_precision(q.dtype),
    )  # fmt: skip
