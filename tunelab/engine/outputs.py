"""What the engine hands back: whole results (offline API) and deltas (streaming API)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.engine.sampler import Logprobs


@dataclass
class CompletionOutput:
    """One of the ``n`` samples of a request.

    ``finish_reason``: "stop" (EOS, a stop token or a stop string; none of them is included),
    "length" (max_tokens or the model's context), "abort", or "error" (see the request's
    ``error``).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[Logprobs] | None = None  # per token: chosen id + top-k -> logprob
    num_preemptions: int = 0


@dataclass
class RequestMetrics:
    """Times in seconds (``time.perf_counter``); derived latencies in seconds."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        """End-to-end latency: arrival to the last sample's end."""
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """A finished (or failed) request: prompt, samples, prompt logprobs and timings."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics
    prompt_logprobs: list[Logprobs | None] | None = None  # position 0 is None
    error: str | None = None  # why the request failed (finish_reason "error")

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class StreamDelta:
    """New text and tokens of one sample since its last delta.

    ``finished`` is True on the request's last delta (every sample has a finish reason).
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[Logprobs] | None = None
    error: str | None = None
    finished: bool = False
