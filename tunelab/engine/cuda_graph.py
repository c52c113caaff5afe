"""CUDA graphs for decode-only steps.

A decode step runs a few dozen small kernels per layer for a handful of tokens; at small
batch sizes launching them costs the CPU more time than they take on the GPU. So the decoder
forward (embeddings to final norm, triton attention included) is captured once per padded
batch size (1, 2, 4, 8, ... up to ``max_num_seqs``) over fixed input buffers, and a decode
step that fits is copied into those buffers and replayed. Anything else (prefill chunks,
steps with LoRA rows, the lm_head and the sampler) runs eagerly.

Padded rows carry slot -1 and context length 0: the KV store skips them and attention gives
them zeros. Decode splits are chosen from the batch-size bucket and the model's context only
(``triton_kernels.decode_chunk``), so a replay computes every row exactly as an eager step
with the same backend does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from tunelab import device as dev
from tunelab.engine.kv_cache import PagedKVCache
from tunelab.engine.paged_attention import PagedAttentionBackend, StepMetadata
from tunelab.engine.triton_attention import TritonPagedBackend
from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: powers of two below ``max_num_seqs``, then it."""
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    """The decoder forward for decode-only steps, one CUDA graph per padded batch size.

    ``capture=False`` keeps everything but the graphs (the same fixed buffers, padding and
    attention launches, run eagerly): it checks that plumbing on machines without CUDA.
    """

    def __init__(
        self,
        model: Decoder,
        cache: PagedKVCache,
        backend: PagedAttentionBackend,
        max_num_seqs: int,
        capture: bool = True,
    ):
        if not isinstance(backend, TritonPagedBackend):
            raise TunelabError(
                f"CUDA graphs need the triton attention backend, not {backend.name} (its "
                "decode depends on host-side lengths): use attention_backend='triton' or "
                "'auto', or turn CUDA graphs off (cuda_graphs=False)."
            )
        self.model, self.cache, self.backend = model, cache, backend
        self.sizes = capture_sizes(max_num_seqs)
        n, device = self.sizes[-1], model.device
        self.max_blocks = min(-(-backend.max_context // cache.block_size), cache.num_blocks)
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._runs: dict[int, Callable[[], torch.Tensor]] = {}
        if capture:
            self._capture_all()
        else:
            self._runs = {bs: self._forward(bs) for bs in self.sizes}

    def _forward(self, bs: int) -> Callable[[], torch.Tensor]:
        """The decoder over the first ``bs`` rows of the buffers: hidden states (bs, hidden)."""
        attn = self.backend.decode_step(
            self.cache, self.slots[:bs], self.block_tables[:bs], self.context_lens[:bs]
        )
        ids, positions, body = self.ids[None, :bs], self.positions[None, :bs], self.model.model

        def forward() -> torch.Tensor:
            return body(ids, positions, attn=attn)[0]

        return forward

    @torch.inference_mode()
    def _capture_all(self) -> None:
        t0, pool = time.perf_counter(), None
        for bs in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
            forward = self._forward(bs)
            forward()  # warm-up: compiles the kernels, allocates the split-decode scratch
            torch.cuda.synchronize(self.model.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward()
            pool = graph.pool()
            self.graphs[bs] = graph
            self._runs[bs] = _replayer(graph, out)
        log.info(
            "captured CUDA graphs for decode batches of %s in %.1f s",
            ", ".join(map(str, self.sizes)),
            time.perf_counter() - t0,
        )

    def can_run(self, meta: StepMetadata) -> bool:
        """A decode-only step of at most ``max_num_seqs`` sequences."""
        n = len(meta.query_lens)
        return (
            meta.num_decodes == n
            and n <= self.sizes[-1]
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """Hidden states (n, hidden) of a step that ``can_run``: fill the buffers, replay."""
        n = len(meta.query_lens)
        bs = next(s for s in self.sizes if s >= n)
        width = meta.block_tables.shape[1]
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:bs].fill_(-1)
        lens = torch.tensor(meta.context_lens, dtype=torch.int32)
        self.context_lens[:n].copy_(lens)
        self.context_lens[n:bs].zero_()
        self.block_tables[:n, :width].copy_(meta.block_tables)
        return self._runs[bs]()[:n]


def _replayer(graph: torch.cuda.CUDAGraph, out: torch.Tensor) -> Callable[[], torch.Tensor]:
    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def decode_graphs(
    enabled: bool | None,
    model: Decoder,
    cache: PagedKVCache,
    backend: PagedAttentionBackend,
    max_num_seqs: int,
) -> DecodeGraphs | None:
    """CUDA graphs per the engine option: None = on where possible (CUDA with the triton
    backend), True = required (a TunelabError says why not), False = off."""
    if enabled is False:
        return None
    device = model.device
    if enabled:
        dev.require("cuda_graphs", device)
        return DecodeGraphs(model, cache, backend, max_num_seqs)
    if device.type != "cuda" or not isinstance(backend, TritonPagedBackend):
        return None
    try:
        return DecodeGraphs(model, cache, backend, max_num_seqs)
    except Exception as e:  # on by default, untested on this GPU: decode eagerly instead
        log.warning("CUDA graphs off, capture failed: %s: %s", type(e).__name__, e)
        return None
