"""Command-line flags for the engine's knobs, shared by ``tunelab infer`` and ``tunelab serve``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunelab.engine.llm_engine import EngineConfig

# Kept import-free (the CLI builds its parser before torch loads); a test checks these match
# tunelab.engine.paged_attention.BACKENDS.
BACKENDS = ("auto", "sdpa", "triton")
_GRAPHS = {"auto": None, "on": True, "off": False}


def add_device_flag(p: argparse.ArgumentParser) -> None:
    """``--device``, as every verb that runs a model takes it."""
    p.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:N, npu, npu:N, mps or cpu (default: best available; env TUNELAB_DEVICE)",
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Add the engine flags to ``p`` (every default leaves the choice to the device)."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="sequences running at once (default: 256 on GPUs/NPUs, 64 on CPU)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per engine step, decodes and prefill chunks together "
        "(default: 8192 on GPUs/NPUs, 512 on CPU)",
    )
    g.add_argument(
        "--max-cache-tokens",
        type=int,
        default=None,
        help="KV-cache size cap in tokens (default: from free memory on GPUs/NPUs, 16384 on CPU)",
    )
    g.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="share of the accelerator's memory the process may use in all (default: 0.9)",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=BACKENDS,
        help="paged attention: triton kernels on CUDA, sdpa elsewhere (default: auto)",
    )
    g.add_argument(
        "--cuda-graphs",
        default="auto",
        choices=sorted(_GRAPHS),
        help="replay decode steps as CUDA graphs (default: auto = on with CUDA + triton)",
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the KV blocks of prompts' common prefixes",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The ``EngineConfig`` the engine flags in ``args`` describe."""
    from tunelab.engine.llm_engine import EngineConfig

    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_cache_tokens=args.max_cache_tokens,
        memory_fraction=args.memory_fraction,
        attention_backend=args.attention_backend,
        cuda_graphs=_GRAPHS[args.cuda_graphs],
        enable_prefix_caching=not args.no_prefix_caching,
    )
