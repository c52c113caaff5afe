"""The engine core: requests in, one scheduled step at a time, deltas and results out.

``LLM`` (offline) and ``AsyncEngine`` (streaming) are thin layers over ``LLMEngine``. A request
that cannot run (prompt longer than the context, more cache than exists, a bad token id, an
unknown LoRA adapter) fails alone with finish_reason "error" and a message; the others go on.
Requests may name a loaded LoRA adapter; requests for different adapters and for the base
model share the steps (see ``engine/lora.py``).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.engine.block_manager import BlockManager, blocks_for, kv_tokens_needed
from tunelab.engine.cpu_linear import pack_linears
from tunelab.engine.cuda_graph import decode_graphs
from tunelab.engine.detokenizer import TextStream
from tunelab.engine.kv_cache import PagedKVCache, activation_bytes, plan_num_blocks
from tunelab.engine.lora import DEFAULT_MAX_LORA_RANK, LoadedAdapter, LoraRegistry
from tunelab.engine.model_runner import ModelRunner
from tunelab.engine.outputs import RequestOutput, StreamDelta, request_deltas, request_output
from tunelab.engine.paged_attention import select_backend
from tunelab.engine.prompts import Prompt, encode_prompt
from tunelab.engine.sampler import Logprobs, SamplingParams
from tunelab.engine.scheduler import Scheduler
from tunelab.engine.sequence import Request, Sequence, SequenceStatus
from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine knobs; None picks a default for the device (accelerator / CPU)."""

    max_num_seqs: int | None = None  # running sequences at once (256 / 64)
    max_num_batched_tokens: int | None = None  # tokens per step (8192 / 512)
    max_cache_tokens: int | None = None  # cache size cap (accelerators: from free memory)
    block_size: int = 16
    enable_prefix_caching: bool = True
    memory_fraction: float = 0.9  # of the accelerator's memory the process may use in all
    attention_backend: str = "auto"  # "auto", "sdpa" or "triton"
    cuda_graphs: bool | None = None  # decode steps as CUDA graphs; None: on with CUDA + triton
    stream_text: bool = False  # detokenize every step (streaming) rather than at the end
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK  # largest LoRA adapter rank accepted
    cpu_packed_linears: bool = True  # CPU bf16: pre-pack weights for decode (cpu_linear.py)

    def resolved(self, device: torch.device) -> EngineConfig:
        accel = device.type not in ("cpu", "mps")
        seqs = self.max_num_seqs if self.max_num_seqs is not None else (256 if accel else 64)
        tokens = self.max_num_batched_tokens
        tokens = tokens if tokens is not None else (8192 if accel else 512)
        for name, value in (("max_num_seqs", seqs), ("max_num_batched_tokens", tokens)):
            if value < 1:
                raise TunelabError(f"{name} must be >= 1, got {value}.")
        if self.block_size < 1:
            raise TunelabError(f"block_size must be >= 1, got {self.block_size}.")
        return EngineConfig(
            **{**vars(self), "max_num_seqs": seqs, "max_num_batched_tokens": tokens}
        )


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load (what a server's /metrics shows)."""

    running_requests: int  # requests with a sequence holding KV blocks
    waiting_requests: int  # requests queued for admission (new or preempted)
    kv_cache_usage: float  # share of KV blocks in use, 0..1
    prefix_cache_hit_rate: float  # prompt tokens served from the prefix cache / queried
    num_blocks: int
    num_free_blocks: int


class LLMEngine:
    """Paged KV cache + scheduler + model runner + output processing for one model."""

    def __init__(
        self,
        model: Decoder,
        tokenizer: Any | None = None,
        config: EngineConfig | None = None,
        eos_token_ids: set[int] | None = None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = model.device
        self.config = cfg = (config or EngineConfig()).resolved(self.device)
        self.context = model.config.max_position_embeddings
        self.eos_token_ids = set(eos_token_ids or ())
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        backend = select_backend(cfg.attention_backend, self.device, model.config, model.dtype)
        reserve = activation_bytes(
            model.config, cfg.max_num_batched_tokens, cfg.max_num_seqs, model.dtype
        )
        num_blocks = plan_num_blocks(
            model.config,
            cfg.block_size,
            self.device,
            model.dtype,
            cfg.max_cache_tokens,
            cfg.memory_fraction,
            reserve,
        )
        cache = PagedKVCache(model.config, num_blocks, cfg.block_size, self.device, model.dtype)
        if cfg.cpu_packed_linears:  # before LoRA wraps any layer: the wrappers reuse the packing
            pack_linears(model)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(model, cache, backend, self.eos_token_ids)
        self.runner.graphs = decode_graphs(cfg.cuda_graphs, model, cache, backend, cfg.max_num_seqs)
        self.lora = LoraRegistry(model, cfg.max_lora_rank)
        self.runner.lora = self.lora
        self.requests: dict[str, Request] = {}
        self._failed: list[StreamDelta] = []  # deltas of requests refused at add time
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(
        cls,
        spec: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        config: EngineConfig | None = None,
    ) -> LLMEngine:
        """Resolve a model spec (see ``tunelab.hub``), load model and tokenizer, size the cache."""
        from tunelab.engine.simple import eos_ids_from
        from tunelab.hub import resolve_model
        from tunelab.models.loading import load_model, load_tokenizer, read_generation_config

        model_dir = resolve_model(spec)
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, device=device, dtype=dtype)
        eos = eos_ids_from(read_generation_config(Path(model_dir)))
        return cls(model, tokenizer, config, eos)

    # ---- LoRA adapters ---------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path) -> LoadedAdapter:
        """Load the PEFT LoRA adapter at ``path``; requests then select it with ``lora=name``.

        Call it between steps (``AsyncEngine.load_adapter`` does). A bad adapter raises a
        TunelabError naming it and changes nothing.
        """
        base_template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(base_template, dict):
            base_template = base_template.get("default")
        loaded = self.lora.load(name, path, base_template)
        from tunelab.export.qlora import detect_qlora

        if detect_qlora(Path(path)).qlora:  # the base is shared: it cannot be NF4 for one
            log.warning(
                "adapter %r was trained with QLoRA on an NF4-rounded base; the engine applies "
                "it to the full-precision base, so outputs differ slightly from the trained "
                "model's. For the exact model, `tunelab merge` it (merges into the NF4 base).",
                name,
            )
        return loaded

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``; refused while an unfinished request uses it."""
        adapter = self.lora.get(name)
        users = [
            r.request_id
            for r in self.requests.values()
            if not r.finished and any(s.lora_id == adapter.uid for s in r.seqs)
        ]
        if users:
            raise TunelabError(
                f"adapter {name!r} is in use by {len(users)} unfinished request(s) "
                f"({', '.join(users[:3])}); abort them or wait for them to finish."
            )
        self.lora.unload(name)

    @property
    def adapters(self) -> dict[str, LoadedAdapter]:
        """The loaded LoRA adapters by name."""
        return dict(self.lora.adapters)

    # ---- requests --------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = False,
        lora: str | None = None,
    ) -> str:
        """Queue a prompt (text, chat messages or token ids); return its request id.

        ``stream`` detokenizes as tokens come so deltas carry text (always on with
        ``config.stream_text``); otherwise the text is decoded once at the end. ``lora``
        names a loaded adapter to run the request with (None: the base model).
        """
        params = params or SamplingParams()
        if request_id is None:
            request_id = next(r for r in map(str, self._ids) if r not in self.requests)
        request_id = str(request_id)
        if request_id in self.requests:
            raise TunelabError(f"request id {request_id!r} is already in use; pick another.")
        try:
            adapter = self.lora.get(lora) if lora is not None else None
            template = adapter.chat_template if adapter is not None else None
            prompt_ids = encode_prompt(self.tokenizer, prompt, template)
            self._check(prompt_ids, params)
        except TunelabError as e:
            prompt_ids = prompt if _is_token_ids(prompt) else []
            return self._fail(request_id, list(prompt_ids), params, str(e))
        req = Request(request_id, prompt_ids, params)
        req.stream = stream or self.config.stream_text
        # Every sample is built before any is queued: a failure leaves nothing half-added.
        for i in range(params.n):
            gen = params.make_generator(self.device, offset=i)
            seq = Sequence(request_id, prompt_ids, params, i, gen, req.arrival_time, adapter)
            self._add_seq(req, seq)
        self.requests[request_id] = req
        for seq in req.seqs:
            self.scheduler.add(seq)
        return request_id

    def _add_seq(self, req: Request, seq: Sequence) -> None:
        wants_text = self.tokenizer is not None and (req.stream or req.params.stop)
        req.seqs.append(seq)
        req.streams.append(TextStream(self.tokenizer, req.params.stop) if wants_text else None)
        req.unsent_text.append("")
        req.sent_tokens.append(0)

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise TunelabError("the prompt is empty: give at least one token.")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            bad = next(t for t in prompt_ids if not 0 <= t < vocab)
            raise TunelabError(f"token id {bad} is outside the vocabulary (0..{vocab - 1}).")
        if len(prompt_ids) >= self.context:
            raise TunelabError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                f"{self.context}: shorten the prompt."
            )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise TunelabError(f"{name}={k} is more than the vocabulary ({vocab} tokens).")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise TunelabError(
                f"stop token id {bad} is outside the vocabulary (0..{vocab - 1}): drop it."
            )
        bm = self.block_manager
        per_seq = kv_tokens_needed(len(prompt_ids), params.max_tokens, self.context)
        if params.n * blocks_for(per_seq, bm.block_size) > bm.num_blocks:
            raise TunelabError(
                f"the request needs {params.n * per_seq} tokens of KV cache (n={params.n} x "
                f"(prompt {len(prompt_ids)} + max_tokens {params.max_tokens} - 1)) but the "
                f"cache holds {bm.num_blocks * bm.block_size}: lower n or max_tokens, or raise "
                "max_cache_tokens."
            )

    def _fail(self, request_id: str, prompt_ids, params: SamplingParams, message: str) -> str:
        req = Request(request_id, prompt_ids, params)
        req.error = message
        seq = Sequence(request_id, prompt_ids, params, 0, None, req.arrival_time)
        seq.status, seq.finish_reason, seq.error = SequenceStatus.FINISHED, "error", message
        seq.finished_time = req.arrival_time
        self._add_seq(req, seq)
        self.requests[request_id] = req
        self._failed.append(
            StreamDelta(request_id, 0, "", [], "error", None, error=message, finished=True)
        )
        log.warning("request %s failed: %s", request_id, message)
        return request_id

    def abort(self, request_id: str) -> list[StreamDelta]:
        """Stop a request now (waiting, running or preempted) and free its blocks.

        Returns the final deltas of its unfinished samples (finish_reason "abort").
        """
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return []
        seqs = self.scheduler.abort(request_id)
        for seq in seqs:
            self._finished(req, seq)
        return request_deltas(req, seqs)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._failed)

    def stats(self) -> EngineStats:
        """The engine's load now; safe to call from another thread (reads copies)."""
        bm = self.block_manager
        running = {s.request_id for s in list(self.scheduler.running)}
        waiting = {s.request_id for s in list(self.scheduler.waiting)} - running
        free = bm.num_free_blocks
        return EngineStats(
            running_requests=len(running),
            waiting_requests=len(waiting),
            kv_cache_usage=1.0 - free / bm.num_blocks,
            prefix_cache_hit_rate=bm.hits / bm.queries if bm.queries else 0.0,
            num_blocks=bm.num_blocks,
            num_free_blocks=free,
        )

    def pop_output(self, request_id: str) -> RequestOutput:
        """The result of a request; forgets the request once it is finished."""
        req = self.requests[request_id]
        if req.finished:
            del self.requests[request_id]
        return request_output(req, self.tokenizer)

    # ---- stepping --------------------------------------------------------------------------

    def take_failed(self) -> list[StreamDelta]:
        """The final deltas of requests refused at add time, not handed out yet."""
        deltas, self._failed = self._failed, []
        return deltas

    def step(self) -> list[StreamDelta]:
        """Run one scheduled step; return a delta for every sample that changed."""
        deltas = self.take_failed()
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            log.debug("preempted %r", seq)
        if not batch:
            return deltas
        result = self.runner.run(batch)
        self.scheduler.update(batch)
        for seq, lps in result.prompt_logprobs.items():
            seq.prompt_logprobs.extend(lps)
        changed: dict[str, list[Sequence]] = {}
        for seq, (token, lp) in result.samples.items():
            self._on_token(self.requests[seq.request_id], seq, token, lp)
            changed.setdefault(seq.request_id, []).append(seq)
        for request_id, seqs in changed.items():
            deltas.extend(request_deltas(self.requests[request_id], seqs))
        return deltas

    def _on_token(self, req: Request, seq: Sequence, token: int, lp: Logprobs | None) -> None:
        p = seq.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        if token in stop_ids and seq.num_output_tokens >= p.min_tokens:
            self.scheduler.finish(seq, "stop")  # the stop token is not part of the output
            return self._finished(req, seq)
        seq.append_token(token, lp)
        stream = req.streams[seq.index]
        if stream is not None:
            req.unsent_text[seq.index] += stream.add(token)
            if stream.stopped:
                self.scheduler.finish(seq, "stop")
                return self._finished(req, seq)
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.context:
            self.scheduler.finish(seq, "length")
            self._finished(req, seq)

    def _finished(self, req: Request, seq: Sequence) -> None:
        seq.finished_time = time.perf_counter()
        if seq.first_token_time is None:
            seq.first_token_time = seq.finished_time
        stream = req.streams[seq.index]
        if stream is not None:
            req.unsent_text[seq.index] += stream.finish()
            if stream.stopped and seq.finish_reason == "length":  # the last token ended a stop
                seq.finish_reason = "stop"


def _is_token_ids(prompt: Prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
