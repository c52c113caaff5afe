"""One sequence being generated: its tokens, its place in the paged cache, its progress.

A request with ``n`` samples becomes ``n`` sequences that share the prompt (and, through the
prefix cache, the prompt's full blocks once one of them has computed it).
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import TYPE_CHECKING

import torch

from tunelab.engine.detokenizer import TextStream
from tunelab.engine.sampler import Logprobs, SamplingParams

if TYPE_CHECKING:
    from tunelab.engine.lora import LoadedAdapter

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its blocks were freed)
    RUNNING = "running"  # holds blocks; gets tokens scheduled every step
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt + generated), block table and counters for one sample of a request.

    ``num_computed_tokens`` counts tokens whose keys/values are in the cache (prefix-cache hits
    included); the tokens after it are what the scheduler still has to run. A sequence needs a
    new sample exactly when every token is computed.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        generator: torch.Generator | None = None,
        arrival_time: float | None = None,
        adapter: LoadedAdapter | None = None,
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.generator = generator
        # LoRA adapter: its slot in the LoRA layers (-1: none) and its prefix-cache id
        self.lora_slot = adapter.slot if adapter is not None else -1
        self.lora_id = adapter.uid if adapter is not None else None
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # memo: chained hashes of full blocks of token_ids
        self.num_cached_blocks = 0  # leading blocks already registered in the prefix cache
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens from the prefix cache at first admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None  # "stop", "length", "abort", "error"
        self.error: str | None = None
        self.logprobs: list[Logprobs] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[Logprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )  # position 0 has nothing before it
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None  # left the waiting queue (first time)
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, {self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int, logprobs: Logprobs | None = None) -> None:
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()


class Request:
    """A prompt, its sampling parameters and its ``n`` sequences, plus streaming state."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.request_id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self.seqs: list[Sequence] = []
        self.streams: list[TextStream | None] = []  # incremental detokenizers, when needed
        self.unsent_text: list[str] = []  # per sample: text not yet in a delta
        self.sent_tokens: list[int] = []  # per sample: output tokens already in a delta
        self.sent_first_delta = False  # prompt logprobs and queue time ride on the first one
        self.error: str | None = None
        self.stream = False  # detokenize every step (deltas carry text)
        self.arrival_time = time.perf_counter()

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def first_scheduled_time(self) -> float | None:
        """When the first of its sequences left the waiting queue (None: not yet)."""
        times = [s.first_scheduled_time for s in self.seqs if s.first_scheduled_time is not None]
        return min(times) if times else None
