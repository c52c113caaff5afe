"""``/v1/completions`` and ``/v1/chat/completions``: non-streamed JSON or SSE chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from tunelab.serve.errors import APIError, sse_error
from tunelab.serve.params import (
    chat_prompt,
    check_prompts,
    completion_prompts,
    sampling_params,
)
from tunelab.serve.protocol import ChatCompletionRequest, CompletionRequest, message_dicts
from tunelab.serve.runner import Choice, Run
from tunelab.serve.sse import DisconnectAwareStream


def _token_text(tok: Any, token_id: int) -> str:
    return tok.decode([token_id]) if tok is not None else str(token_id)


def _top(tok: Any, lps: dict[int, float], k: int) -> list[tuple[str, float]]:
    best = sorted(lps.items(), key=lambda kv: -kv[1])[:k]
    return [(_token_text(tok, t), lp) for t, lp in best]


def completion_logprobs(tok: Any, entries, k: int, offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for ``entries`` (token id, logprob dict)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, lps in entries:  # lps None: nothing to condition on (the first prompt token)
        text = _token_text(tok, token_id)
        tokens.append(text)
        token_lps.append(lps.get(token_id) if lps is not None else None)
        tops.append(dict(_top(tok, lps, k)) if k and lps is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def chat_logprobs(tok: Any, entries, k: int) -> dict[str, Any]:
    """The chat ``logprobs`` object for ``entries`` (token id, logprob dict)."""
    content = []
    for token_id, lps in entries:
        text = _token_text(tok, token_id)
        content.append({
            "token": text,
            "logprob": lps.get(token_id),
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(t.encode())}
                for t, lp in _top(tok, lps, k)
            ],
        })  # fmt: skip
    return {"content": content}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _collect(run: Run, request: Request) -> None:
    """Drain ``run``; abort it if the client disconnects before it is done."""

    async def drain() -> None:
        async for _ in run.deltas():
            pass

    async def watch() -> None:
        while not await request.is_disconnected():  # cheap: one non-blocking receive
            await asyncio.sleep(0.05)

    work, watcher = asyncio.create_task(drain()), asyncio.create_task(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()  # the client went away: the run's cleanup aborts the engine requests
            await asyncio.gather(work, return_exceptions=True)
            raise APIError(499, "client disconnected")
    work.result()


async def _stream(
    state: Any, n: int, events: Callable[[float], AsyncIterator[str]], request: Request
):
    """Take the admission slots first (so a full queue is a 429, not a broken stream).

    ``events(waited)`` makes the SSE chunks; ``waited``: seconds spent waiting for the slots.
    """
    stack = AsyncExitStack()
    waited = await stack.enter_async_context(state.admission.slot(n, request.is_disconnected))
    return DisconnectAwareStream(events(waited), on_close=stack.aclose)


# ---- completions ----------------------------------------------------------------------------


async def create_completion(
    state: Any, req: CompletionRequest, request: Request, lora: str | None = None
):
    """``lora``: the adapter the request's model names (None: the base model)."""
    llm = state.engine.engine
    tok = llm.tokenizer
    prompts = completion_prompts(llm, req.prompt)
    max_tokens = check_prompts(llm, prompts, req.max_tokens, req.n, req.stop_token_ids)
    k = req.logprobs or 0
    # echo + logprobs: the prompt's tokens get logprobs too (position 0: null, as OpenAI's)
    echo_logprobs = req.echo and req.logprobs is not None
    params = sampling_params(req, max_tokens, req.logprobs, k if echo_logprobs else None)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = [tok.decode(p) if tok is not None else "" for p in prompts] if req.echo else None

    def head(choice: Choice) -> str:
        return echo[choice.index // req.n] if echo else ""

    def head_entries(run: Run, choice: Choice) -> list[tuple[int, dict[int, float] | None]]:
        if not echo_logprobs:
            return []
        i = choice.index // req.n
        lps = run.prompt_logprobs[i] or [None] * len(prompts[i])
        return list(zip(prompts[i], lps, strict=False))

    def body(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        model = req.model or state.served_model_name
        return {"id": rid, "object": "text_completion", "created": created,
                "model": model, "choices": choices, **extra}  # fmt: skip

    async with state.admission.slot(len(prompts) * req.n, request.is_disconnected) as waited:
        run = Run(state.engine, state.metrics, prompts, params, lora, waited)
        if not req.stream:
            await _collect(run, request)
            choices = []
            for c in run.choices:
                lp = None
                if req.logprobs is not None:
                    lp = completion_logprobs(tok, head_entries(run, c) + c.logprobs, k, 0)
                choices.append({"index": c.index, "text": head(c) + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason})  # fmt: skip
            return JSONResponse(body(choices, usage=run.usage()))

    async def events(waited: float) -> AsyncIterator[str]:
        run = Run(state.engine, state.metrics, prompts, params, lora, waited)
        sent = [0] * len(run.choices)  # text offsets, for logprobs
        try:
            async for choice, delta in run.deltas():
                text, entries = delta.text, []
                start = sent[choice.index]  # text offset of the first logprobs entry
                if echo and choice.index not in echoed:
                    echoed.add(choice.index)
                    text = head(choice) + text
                    entries = head_entries(run, choice)  # from offset 0 when echoed with logprobs
                    if not entries:
                        start += len(text) - len(delta.text)
                lp = None
                if req.logprobs is not None:
                    entries += list(zip(delta.token_ids, delta.logprobs or [], strict=False))
                    lp = completion_logprobs(tok, entries, k, start)
                sent[choice.index] += len(text)
                yield _sse(body([{"index": choice.index, "text": text, "logprobs": lp,
                                  "finish_reason": delta.finish_reason}]))  # fmt: skip
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(body([], usage=run.usage()))
        except APIError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"

    echoed: set[int] = set()
    return await _stream(state, len(prompts) * req.n, events, request)


# ---- chat completions -----------------------------------------------------------------------


async def create_chat_completion(
    state: Any, req: ChatCompletionRequest, request: Request, lora: str | None = None
):
    """``lora``: the adapter the request's model names (None: the base model)."""
    llm = state.engine.engine
    tok = llm.tokenizer
    prompt = chat_prompt(llm, message_dicts(req.messages), lora=lora)
    max_tokens = req.max_completion_tokens
    max_tokens = req.max_tokens if max_tokens is None else max_tokens
    max_tokens = check_prompts(llm, [prompt], max_tokens, req.n, req.stop_token_ids)
    k = req.top_logprobs or 0
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true.", "top_logprobs")
    params = sampling_params(req, max_tokens, k if req.logprobs else None)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def body(obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        model = req.model or state.served_model_name
        return {"id": rid, "object": obj, "created": created, "model": model,
                "choices": choices, **extra}  # fmt: skip

    if not req.stream:
        async with state.admission.slot(req.n, request.is_disconnected) as waited:
            run = Run(state.engine, state.metrics, [prompt], params, lora, waited)
            await _collect(run, request)
        choices = [
            {"index": c.index, "message": {"role": "assistant", "content": c.text},
             "logprobs": chat_logprobs(tok, c.logprobs, k) if req.logprobs else None,
             "finish_reason": c.finish_reason}
            for c in run.choices
        ]  # fmt: skip
        return JSONResponse(body("chat.completion", choices, usage=run.usage()))

    async def events(waited: float) -> AsyncIterator[str]:
        run = Run(state.engine, state.metrics, [prompt], params, lora, waited)
        try:
            for c in run.choices:
                first = {"index": c.index, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}  # fmt: skip
                yield _sse(body("chat.completion.chunk", [first]))
            async for choice, delta in run.deltas():
                lp = None
                if req.logprobs:
                    entries = list(zip(delta.token_ids, delta.logprobs or [], strict=False))
                    lp = chat_logprobs(tok, entries, k)
                d = {"content": delta.text} if delta.text or not delta.finish_reason else {}
                chunk = {"index": choice.index, "delta": d, "logprobs": lp,
                         "finish_reason": delta.finish_reason}  # fmt: skip
                yield _sse(body("chat.completion.chunk", [chunk]))
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(body("chat.completion.chunk", [], usage=run.usage()))
        except APIError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"

    return await _stream(state, req.n, events, request)
