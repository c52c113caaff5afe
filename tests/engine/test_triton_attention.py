"""Triton paged-attention kernels and backend against a dense reference and the sdpa backend.

On a CUDA machine the kernels run compiled on the GPU. Without CUDA they run on CPU tensors
under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before triton
is imported: ``test_kernels_under_interpreter`` runs this module again in a subprocess with
it set, and the kernel tests skip in the parent process.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)

from tests.engine.conftest import prompts_of_lengths
from tunelab.engine.kv_cache import PagedKVCache
from tunelab.engine.paged_attention import SdpaBackend, StepMetadata
from tunelab.engine.sampler import SamplingParams

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
kernel_test = pytest.mark.skipif(
    not (ON_CUDA or INTERPRET),
    reason="no CUDA: runs under the Triton interpreter in test_kernels_under_interpreter",
)
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DTYPES = list(TOL)


@pytest.fixture(autouse=True, scope="module")
def _interpreter_fixes():
    """Two bugs of the interpreter (not of compiled kernels), patched while interpreting:
    loop bounds are one-element arrays that numpy >= 2.3 will not turn into ints (triton 3.7
    squeezes them), and ``tl.dot`` on bf16 multiplies the raw uint16 bits."""
    if not INTERPRET:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def patch_tensor(tensor, scope, _original=interpreter._patch_lang_tensor):
        _original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle(
            (h.data.astype(np.uint32) << 16).view(np.float32), tl.float32
        )

    def create_dot(self, a, b, *args, _original=interpreter.InterpreterBuilder.create_dot):
        return _original(self, widen(a), widen(b), *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter, "_patch_lang_tensor", patch_tensor)
        mp.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
        yield


@pytest.fixture(scope="module")
def K():
    from tunelab.engine import triton_kernels

    return triton_kernels


# ---- random paged layouts and a dense reference --------------------------------------------


def paged_layout(lens, page, num_blocks, n_kv, D, dtype, seed=0):
    """Caches filled with noise and a block table of distinct, shuffled blocks per entry."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(num_blocks, page, n_kv, D, generator=g).to(dtype)
    vc = torch.randn(num_blocks, page, n_kv, D, generator=g).to(dtype)
    need = [-(-n // page) for n in lens]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need)
    tables, used = [], 0
    for n in need:
        tables.append(perm[used : used + n] + [0] * (width - n))
        used += n
    return kc.to(DEVICE), vc.to(DEVICE), torch.tensor(tables, device=DEVICE)


def entry_kv(kc, vc, table, n):
    """Keys and values of an entry's first ``n`` positions: (n, n_kv, D) each."""
    page = kc.shape[1]
    pos = torch.arange(n, device=kc.device)
    blocks, offs = table[pos // page], pos % page
    return kc[blocks, offs], vc[blocks, offs]


def dense(q, keys, values, positions, window):
    """fp32 attention of queries (n, H, D) at ``positions`` over keys at 0..len-1 (GQA)."""
    H, n_kv = q.shape[1], keys.shape[1]
    k = keys.float().repeat_interleave(H // n_kv, 1)
    v = values.float().repeat_interleave(H // n_kv, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) / math.sqrt(q.shape[-1])
    j = torch.arange(keys.shape[0], device=q.device)[None, :]
    p = positions.to(q.device)[:, None]
    allowed = (j <= p) & ((j > p - window) if window else True)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


# ---- kernels --------------------------------------------------------------------------------


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_slots_and_skips_padding(K, dtype):
    T, n_kv, D, page = 6, 2, 16, 4
    kc = torch.zeros(5, page, n_kv, D, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    # (T, n_kv, D) views with the strides the decoder gives: token-major storage, heads within
    k = torch.randn(n_kv, T, D, device=DEVICE).to(dtype).transpose(0, 1)
    v = torch.randn(T, n_kv, D, device=DEVICE).to(dtype)
    slots = torch.tensor([13, 0, -1, 7, 19, 4], device=DEVICE)
    K.store_kv(k, v, kc, vc, slots)
    keep = slots >= 0
    want_k, want_v = torch.zeros_like(kc), torch.zeros_like(vc)
    want_k.view(-1, n_kv, D)[slots[keep]] = k[keep]
    want_v.view(-1, n_kv, D)[slots[keep]] = v[keep]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
def test_decode_matches_dense(K, dtype, window):
    lens, page, H, n_kv, D = [1, 4, 5, 17, 70, 131], 4, 8, 2, 32
    kc, vc, tables = paged_layout(lens, page, 64, n_kv, D, dtype)
    q = torch.randn(len(lens), H, D, device=DEVICE).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want = torch.stack(
        [
            dense(q[i : i + 1], *entry_kv(kc, vc, tables[i], n), torch.tensor([n - 1]), window)[0]
            for i, n in enumerate(lens)
        ]
    )
    for chunk, splits in ((192, 1), (64, 3), (64, 5)):  # one pass; split; extra empty splits
        out = torch.full_like(q, float("nan"))
        K.paged_decode(q, kc, vc, out, ctx, tables, window, chunk, splits)
        torch.testing.assert_close(out.float(), want, **TOL[dtype], msg=f"splits {splits}")


@kernel_test
def test_decode_splits_beyond_the_keys_change_nothing(K):
    """A CUDA graph launches splits for the whole context; the result must be bit-equal."""
    lens, dtype = [3, 64, 65, 150], torch.bfloat16
    kc, vc, tables = paged_layout(lens, 16, 32, 2, 16, dtype)
    q = torch.randn(len(lens), 4, 16, device=DEVICE).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    outs = []
    for splits in (3, 8):
        out = torch.empty_like(q)
        K.paged_decode(q, kc, vc, out, ctx, tables, None, 64, splits)
        outs.append(out)
    one_pass = torch.empty_like(q)  # 1 split of 256: short sequences take no combine pass
    K.paged_decode(q[:1], kc, vc, one_pass[:1], ctx[:1], tables[:1], None, 64, 1)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(one_pass[:1], outs[0][:1])


def test_decode_chunk_depends_on_batch_bucket_only():
    pytest.importorskip("triton")
    from tunelab.engine.triton_kernels import MIN_SPLIT_KEYS, decode_chunk

    assert decode_chunk(1, 8, 4096, 132, 64) >= MIN_SPLIT_KEYS
    assert decode_chunk(3, 8, 4096, 132, 64) == decode_chunk(4, 8, 4096, 132, 64)
    assert decode_chunk(256, 8, 4096, 132, 64) == 4096  # a full batch: no split
    assert decode_chunk(1, 1, 100, 132, 64) == 128  # a short context: one split


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 6])
def test_prefill_matches_dense(K, dtype, window):
    # (cached prefix, chunk): fresh prompts, chunks after a prefix, chunks over tile edges
    entries = [(0, 7), (9, 1), (5, 20), (0, 33), (30, 3)]
    page, H, n_kv, D = 4, 4, 2, 16
    lens = [a + b for a, b in entries]
    kc, vc, tables = paged_layout(lens, page, 64, n_kv, D, dtype, seed=1)
    T = sum(b for _, b in entries)
    q = torch.randn(T, H, D, device=DEVICE).to(dtype)
    starts = [0]
    for _, b in entries:
        starts.append(starts[-1] + b)
    qs = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    # entry 0 is left to a (pretend) decode launch: first_entry=1 must skip it
    K.paged_prefill(q, kc, vc, out, qs, ctx, tables, 1, 4, 33, window, tiles=(16, 16))
    for i in range(1, len(entries)):
        a, b = entries[i]
        rows = slice(starts[i], starts[i + 1])
        want = dense(q[rows], *entry_kv(kc, vc, tables[i], a + b), torch.arange(a, a + b), window)
        torch.testing.assert_close(out[rows].float(), want, **TOL[dtype], msg=f"entry {i}")
    assert out[: starts[1]].isnan().all()


# ---- the backend against the sdpa backend ---------------------------------------------------


class _Config:  # what PagedKVCache reads from a model config
    num_hidden_layers, num_key_value_heads, head_dim = 1, 2, 16


def _llm(path, **kw):
    """An engine on DEVICE in fp32 (sdpa, eager); tests swap in the triton backend."""
    from tunelab.engine.llm import LLM
    from tunelab.models.loading import load_model, load_tokenizer

    model = load_model(path, DEVICE, torch.float32)
    kw = dict(block_size=4, max_cache_tokens=512, attention_backend="sdpa", cuda_graphs=False) | kw
    return LLM(model, tokenizer=load_tokenizer(path), **kw)


def _triton_backend(max_context=256):
    from tunelab.engine.triton_attention import TritonPagedBackend

    return TritonPagedBackend(DEVICE, max_context, num_sms=4)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 7])
def test_backend_matches_sdpa_on_a_mixed_step(dtype, window):
    """Decodes and prefill chunks in one step: outputs and the caches they leave agree."""
    page, H = 4, 8
    # (tokens already cached, tokens this step): 4 decodes, then 3 prefill chunks
    entries = [(0, 1), (3, 1), (8, 1), (40, 1), (0, 9), (12, 5), (0, 2)]
    caches = [PagedKVCache(_Config, 40, page, DEVICE, dtype) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(caches[0].k[0].shape, generator=g).to(dtype).to(DEVICE)
    for c in caches:
        c.k[0].copy_(noise)
        c.v[0].copy_(noise.flip(0))
    perm = torch.randperm(40, generator=g).tolist()
    tables, slots = [], []
    for a, b in entries:
        table, perm = perm[: -(-(a + b) // page)], perm[-(-(a + b) // page) :]
        tables.append(table)
        slots += [table[p // page] * page + p % page for p in range(a, a + b)]
    width = max(map(len, tables))
    meta = StepMetadata(
        query_lens=[b for _, b in entries],
        context_lens=[a + b for a, b in entries],
        num_decodes=4,
        slot_mapping=torch.tensor(slots, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE),
    )
    T = len(slots)
    q = torch.randn(1, T, H, 16, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(1, T, 2, 16, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    v = torch.randn(1, T, 2, 16, generator=g).to(dtype).to(DEVICE).transpose(1, 2)
    want = SdpaBackend().context(caches[0], meta).attend(0, window, q, k, v)
    got = _triton_backend(64).context(caches[1], meta).attend(0, window, q, k, v)
    assert got.shape == want.shape == (1, H, T, 16)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.equal(caches[1].k[0], caches[0].k[0])
    assert torch.equal(caches[1].v[0], caches[0].v[0])


@kernel_test
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_engine_greedy_matches_hf(make_tiny_model, hf_greedy, model_type):
    """Whole engine runs (chunked prefill, prefix cache hits, GQA, mistral's window of 8)."""
    prompts = prompts_of_lengths([5, 19, 11, 19])
    prompts[3][:16] = prompts[1][:16]  # shares a cached block with prompt 1
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = _llm(make_tiny_model(model_type), max_num_batched_tokens=16)
    llm.engine.runner.backend = _triton_backend()  # small num_sms: decode splits too
    outs = llm.generate(prompts, params)
    path = make_tiny_model(model_type)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 8)
    assert outs[3].metrics.num_cached_tokens >= 16


@kernel_test
def test_self_check_passes_and_catches_a_broken_kernel(make_tiny_model, K, monkeypatch):
    from tunelab.engine.triton_attention import self_check
    from tunelab.models.config import ModelConfig

    config = ModelConfig.from_file(make_tiny_model("mistral") / "config.json")
    self_check(_triton_backend(), config, torch.float32)  # window 8, one-pass and split
    # A kernel that writes wrong numbers (a no-op could leave torch.empty's memory holding the
    # right values by chance: the sdpa reference ran just before in the same allocator).
    monkeypatch.setattr(K, "paged_prefill", lambda q, kc, vc, out, *a, **kw: out.fill_(0.5))
    with pytest.raises(RuntimeError, match="differs from sdpa"):
        self_check(_triton_backend(), config, torch.float32)


def test_selection_off_cuda_is_sdpa_and_refuses_triton_and_graphs(tiny_llm):
    from tunelab.engine.paged_attention import select_backend
    from tunelab.errors import TunelabError

    llm = tiny_llm("llama")
    assert llm.engine.runner.backend.name == "sdpa" and llm.engine.runner.graphs is None
    cpu, config = torch.device("cpu"), llm.engine.model.config
    assert select_backend("auto", cpu, config, torch.float32).name == "sdpa"
    with pytest.raises(TunelabError, match="triton_kernels is not available on cpu"):
        select_backend("triton", cpu, config, torch.float32)
    with pytest.raises(TunelabError, match="cuda_graphs is not available on cpu"):
        tiny_llm("llama", cuda_graphs=True)


# ---- without CUDA: this module again, under the interpreter ----------------------------------


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA or INTERPRET, reason="the kernel tests run directly here")
def test_kernels_under_interpreter():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in report and " failed" not in report, report


@kernel_test
def test_decode_graphs_match_hf(make_tiny_model, hf_greedy, K, monkeypatch):
    """Decode steps through the graphs' fixed buffers (captured on CUDA, run eagerly under
    the interpreter): padded rows (slot -1, no keys), splits over the whole context and their
    combine pass. Sequences finish at different steps: the batch shrinks and gets padded."""
    from tunelab.engine.cuda_graph import DecodeGraphs

    monkeypatch.setattr(K, "MIN_SPLIT_KEYS", 64)  # 4 splits of 64 keys over the context of 256

    prompts = prompts_of_lengths([5, 19, 11, 7, 14], seed=3)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 4, 7, 9, 2)]
    llm = _llm(make_tiny_model("mistral"), max_num_seqs=8)
    runner = llm.engine.runner
    runner.backend = _triton_backend()
    runner.graphs = DecodeGraphs(runner.model, runner.cache, runner.backend, 8, capture=ON_CUDA)
    sizes = []
    run = runner.graphs.run
    runner.graphs.run = lambda ids, pos, meta: (
        sizes.append(len(meta.query_lens)) or run(ids, pos, meta)
    )
    outs = llm.generate(prompts, params)
    path = make_tiny_model("mistral")
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, p.max_tokens)
    assert 5 in sizes and 3 in sizes and 2 in sizes
