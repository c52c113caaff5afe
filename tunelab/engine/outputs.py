"""What the engine hands back: whole results (offline API) and deltas (streaming API)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunelab.engine.sampler import Logprobs
from tunelab.engine.sequence import Request, Sequence


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
    first_scheduled_time: float | None = None  # left the waiting queue

    @property
    def queue_time(self) -> float | None:
        """Time spent in the engine's waiting queue before the first step that ran it."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

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

    ``finished`` is True on the request's last delta (every sample has a finish reason). The
    request's first delta also carries its ``prompt_logprobs`` (when asked for; position 0 is
    None) and ``queue_time`` (seconds in the engine's waiting queue).
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[Logprobs] | None = None
    error: str | None = None
    finished: bool = False
    prompt_logprobs: list[Logprobs | None] | None = None
    queue_time: float | None = None


# ---- built from the engine's requests -----------------------------------------------------


def request_deltas(req: Request, seqs: list[Sequence]) -> list[StreamDelta]:
    """What changed in ``seqs`` since their last delta; only the last delta may say finished."""
    deltas = [_delta(req, seq) for seq in seqs]
    for d in deltas[:-1]:
        d.finished = False
    return deltas


def _delta(req: Request, seq: Sequence) -> StreamDelta:
    i = seq.index
    out = seq.output_ids
    new_tokens = out[req.sent_tokens[i] :]
    logprobs = seq.logprobs[req.sent_tokens[i] :] if seq.logprobs is not None else None
    req.sent_tokens[i] = len(out)
    text, req.unsent_text[i] = req.unsent_text[i], ""
    delta = StreamDelta(
        req.request_id, i, text, new_tokens, seq.finish_reason, logprobs, seq.error, req.finished
    )
    if not req.sent_first_delta:
        req.sent_first_delta = True
        first = req.seqs[0]
        if first.prompt_logprobs is not None:
            delta.prompt_logprobs = list(first.prompt_logprobs)
        if req.first_scheduled_time is not None:
            delta.queue_time = req.first_scheduled_time - req.arrival_time
    return delta


def request_output(req: Request, tokenizer: Any | None) -> RequestOutput:
    """The whole result of ``req`` so far (text decoded at once unless it was streamed)."""
    outputs = []
    for seq, stream in zip(req.seqs, req.streams, strict=True):
        if stream is not None:
            text = stream.text
        elif tokenizer is not None and seq.output_ids:
            text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        else:
            text = ""
        outputs.append(
            CompletionOutput(
                seq.index,
                text,
                seq.output_ids,
                seq.finish_reason,
                seq.logprobs,
                seq.num_preemptions,
            )
        )
    firsts = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
    ends = [s.finished_time for s in req.seqs if s.finished_time is not None]
    metrics = RequestMetrics(
        req.arrival_time,
        min(firsts) if firsts else None,
        max(ends) if req.finished and ends else None,
        req.seqs[0].num_cached_tokens,
        req.first_scheduled_time,
    )
    return RequestOutput(
        req.request_id, req.prompt_ids, outputs, metrics, req.seqs[0].prompt_logprobs, req.error
    )
