"""Streaming API: concurrent streams, deltas that add up to the offline result, abort."""

from __future__ import annotations

import asyncio
import contextlib

from tests.engine.conftest import prompts_of_lengths
from tunelab.engine.async_engine import AsyncEngine
from tunelab.engine.sampler import SamplingParams


async def collect(stream):
    deltas = [d async for d in stream]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


def test_concurrent_streams_add_up_to_the_offline_result(tiny_llm):
    llm = tiny_llm("llama")
    prompts = ["The capital of France", [{"role": "user", "content": "hello world"}]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate(prompts, params)
    engine = AsyncEngine(llm.engine)

    async def main():
        async with engine:
            return await asyncio.gather(*(collect(engine.add_request(p, params)) for p in prompts))

    results = asyncio.run(main())
    for (text, tokens, deltas), ref in zip(results, expected, strict=True):
        assert text == ref.outputs[0].text and tokens == ref.outputs[0].token_ids
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert not any(d.finished for d in deltas[:-1])
    assert not llm.engine.requests  # results were handed over and forgotten


def test_abort_ends_the_stream_and_frees_blocks(tiny_llm):
    llm = tiny_llm("llama")
    engine = AsyncEngine(llm.engine)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        async with engine:
            stream = engine.add_request(prompts_of_lengths([20])[0], long, request_id="x")
            seen = []
            async for delta in stream:
                seen.append(delta)
                if len(seen) == 3:
                    engine.abort("x")
            # a consumer that leaves early aborts its request too
            other = engine.add_request([5, 6, 7], long, request_id="y")
            async with contextlib.aclosing(other) as it:
                async for _ in it:
                    break
            await asyncio.sleep(0.2)
            return seen

    seen = asyncio.run(main())
    assert seen[-1].finish_reason == "abort" and seen[-1].finished
    assert sum(len(d.token_ids) for d in seen) < 200
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.scheduler.has_unfinished()


def test_a_bad_request_yields_one_error_delta(tiny_llm):
    engine = AsyncEngine(tiny_llm("llama").engine)

    async def main():
        async with engine:
            good = collect(engine.add_request([5, 6], SamplingParams(max_tokens=3)))
            bad = collect(engine.add_request(list(range(3, 303)), SamplingParams()))
            return await asyncio.gather(good, bad)

    (_, tokens, _), (_, _, bad) = asyncio.run(main())
    assert len(tokens) <= 3
    assert len(bad) == 1 and bad[0].finish_reason == "error" and "context" in bad[0].error
