"""Run one API request on the engine: its prompts x n samples as one merged delta stream.

Feeds the metrics, turns engine refusals into 400s and engine failures into 500s, and aborts
whatever is unfinished when the consumer goes away (client disconnect, error, shutdown).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tunelab.engine.outputs import StreamDelta
from tunelab.engine.sampler import SamplingParams
from tunelab.errors import TunelabError
from tunelab.serve.errors import APIError
from tunelab.serve.metrics import ServerMetrics


@dataclass
class Choice:
    """What one choice (prompt i, sample j) has produced so far."""

    index: int
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, dict[int, float]]] = field(default_factory=list)
    last_time: float | None = None


class Run:
    """One API request: ``len(prompts) * n`` choices; choice index = prompt * n + sample.

    ``lora``: the LoRA adapter every prompt runs with (None: the base model)."""

    def __init__(
        self,
        engine: Any,
        metrics: ServerMetrics,
        prompts: list[list[int]],
        params: SamplingParams,
        lora: str | None = None,
        admission_wait: float = 0.0,
    ):
        """``admission_wait``: seconds the request waited for a server slot (queue time)."""
        self.engine, self.metrics = engine, metrics
        self.admission_wait = admission_wait
        self.prompts, self.params, self.lora = prompts, params, lora
        self.n = params.n
        self.choices = [Choice(i) for i in range(len(prompts) * params.n)]
        self.request_ids = [f"{uuid.uuid4().hex}-{i}" for i in range(len(prompts))]
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.finished: set[int] = set()  # prompt indexes whose engine request ended
        # per prompt: logprobs of its tokens (position 0 None), when params.prompt_logprobs
        self.prompt_logprobs: list[list[dict[int, float] | None] | None] = [None] * len(prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def deltas(self) -> AsyncIterator[tuple[Choice, StreamDelta]]:
        """Every delta of every prompt as it comes, with its choice (state already updated)."""
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                stream = self.engine.add_request(
                    self.prompts[i], self.params, self.request_ids[i], lora=self.lora
                )
                async for delta in stream:
                    await queue.put((i, delta))
            except BaseException as e:
                await queue.put((i, e))
                raise
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.prompts))]
        done = 0
        try:
            while done < len(tasks):
                i, item = await queue.get()
                if item is None:
                    done += 1
                    continue
                if isinstance(item, BaseException):
                    raise self._failure(item)
                choice = self._update(i, item)
                yield choice, item
                if item.finished:
                    self.finished.add(i)
            self._record_end()
        finally:
            for task in tasks:
                task.cancel()
            for i, rid in enumerate(self.request_ids):
                if i not in self.finished:
                    self.engine.abort(rid)  # the consumer went away: free the KV blocks
                    self.metrics.request_success.inc(self.n, finished_reason="abort")

    def _failure(self, e: BaseException) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, asyncio.CancelledError):
            return APIError(500, "the request was cancelled")
        if self.engine.error is not None:  # the engine loop stopped: unavailable, not our bug
            return APIError(503, f"the engine stopped after an error: {self.engine.error}")
        kind = "the engine failed" if isinstance(e, TunelabError) else "internal error"
        return APIError(500, f"{kind}: {e}")

    def _update(self, i: int, delta: StreamDelta) -> Choice:
        choice = self.choices[i * self.n + delta.index]
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[i] = delta.prompt_logprobs
        if delta.queue_time is not None:  # the engine request's first delta
            self.metrics.queue_time.observe(self.admission_wait + delta.queue_time)
        if delta.finish_reason == "error":
            status = 400 if choice.num_tokens == 0 else 500
            raise APIError(status, delta.error or "the engine refused the request")
        now = time.perf_counter()
        if delta.token_ids:
            if self.first_token_time is None:
                self.first_token_time = now
                self.metrics.ttft.observe(now - self.arrival)
            if choice.last_time is not None:
                self.metrics.itl.observe((now - choice.last_time) / len(delta.token_ids))
            choice.last_time = now
            choice.num_tokens += len(delta.token_ids)
            self.metrics.generation_tokens.inc(len(delta.token_ids))
        choice.text += delta.text
        if delta.logprobs:
            choice.logprobs += list(zip(delta.token_ids, delta.logprobs, strict=False))
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
        return choice

    def _record_end(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        for c in self.choices:
            self.metrics.request_success.inc(finished_reason=c.finish_reason or "unknown")
