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


def test_first_delta_carries_prompt_logprobs_and_queue_time(tiny_llm):
    """What the server needs for echo + logprobs and its queue-time histogram."""
    llm = tiny_llm("llama", max_num_batched_tokens=8, block_size=4)
    prompt = prompts_of_lengths([13], seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=4, n=2, seed=0, prompt_logprobs=1,
                            ignore_eos=True)  # fmt: skip
    expected = llm.generate([prompt], params)[0]
    engine = AsyncEngine(llm.engine)

    async def main():
        async with engine:
            return await collect(engine.add_request(prompt, params))

    _, _, deltas = asyncio.run(main())
    first, rest = deltas[0], deltas[1:]
    assert first.prompt_logprobs == expected.prompt_logprobs  # chunked: complete all the same
    assert len(first.prompt_logprobs) == len(prompt) and first.prompt_logprobs[0] is None
    assert first.queue_time is not None and first.queue_time >= 0
    assert all(d.prompt_logprobs is None and d.queue_time is None for d in rest)
    assert expected.metrics.queue_time is not None and expected.metrics.queue_time >= 0


def test_engine_stats_and_error_are_public(tiny_llm):
    llm = tiny_llm("llama")
    stats = llm.engine.stats()
    assert stats.running_requests == 0 and stats.waiting_requests == 0
    assert stats.kv_cache_usage == 0.0 and stats.num_free_blocks == stats.num_blocks
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm.engine.add_request([5, 6, 7, 8] * 8, params, request_id="a")
    llm.engine.add_request([9, 10, 11], params, request_id="b")
    llm.engine.step()
    busy = llm.engine.stats()
    assert busy.running_requests == 2 and busy.waiting_requests == 0
    assert 0 < busy.kv_cache_usage < 1 and busy.num_free_blocks < busy.num_blocks
    assert AsyncEngine(llm.engine).error is None


def test_empty_or_malformed_conversations_are_clear_errors(tiny_llm):
    import pytest

    from tunelab.engine.prompts import encode_chat
    from tunelab.errors import TunelabError

    tok = tiny_llm("llama").tokenizer
    with pytest.raises(TunelabError, match="empty"):
        encode_chat(tok, [])
    with pytest.raises(TunelabError, match="role"):
        encode_chat(tok, [{"content": "hi"}])


def test_a_failing_step_fails_the_requests_in_flight_and_the_loop_goes_on(tiny_llm, monkeypatch):
    import pytest

    from tunelab.engine import async_engine
    from tunelab.errors import TunelabError

    llm = tiny_llm("llama")
    engine = AsyncEngine(llm.engine)
    run = llm.engine.runner.run
    failures = {"left": 1}

    def flaky(batch):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("simulated kernel failure")
        return run(batch)

    monkeypatch.setattr(llm.engine.runner, "run", flaky)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def main():
        async with engine:
            with pytest.raises(TunelabError, match=r"engine step failed.*simulated kernel"):
                await collect(engine.add_request([5, 6, 7], params))
            bm = llm.engine.block_manager
            assert not llm.engine.requests and bm.num_free_blocks == bm.num_blocks
            _, tokens, _ = await collect(engine.add_request([5, 6, 7], params))
            assert len(tokens) == 3 and engine.error is None  # recovered
            failures["left"] = async_engine.MAX_FAILED_STEPS  # a device that stays broken
            for _ in range(async_engine.MAX_FAILED_STEPS):
                with pytest.raises(TunelabError):
                    await collect(engine.add_request([5, 6, 7], params))
            assert engine.error is not None  # stopped for good: the server reports 503
            with pytest.raises(TunelabError, match="stopped after an error"):
                await collect(engine.add_request([5, 6, 7], params))

    asyncio.run(main())


def test_a_consumer_whose_event_loop_closed_does_not_stop_the_engine(tiny_llm):
    llm = tiny_llm("llama")
    engine = AsyncEngine(llm.engine)
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    async def leave_early():
        stream = engine.add_request([5, 6, 7], long)
        await anext(stream)  # then asyncio.run returns while the request still runs

    async def later():  # a dead engine thread would leave this waiting: bounded
        stream = engine.add_request([5, 6], long)
        _, tokens, deltas = await asyncio.wait_for(collect(stream), timeout=30)
        return len(tokens), deltas[-1].finish_reason

    engine.start()
    try:
        asyncio.run(leave_early())
        assert asyncio.run(later()) == (60, "length")
        assert engine.error is None
    finally:
        engine.shutdown()


def test_a_refused_duplicate_id_leaving_early_does_not_abort_the_original(tiny_llm):
    engine = AsyncEngine(tiny_llm("llama").engine)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def main():
        async with engine:
            original = engine.add_request([5, 6, 7], params, request_id="same")
            duplicate = engine.add_request([8, 9], params, request_id="same")
            await duplicate.aclose()  # its consumer leaves before reading the error delta
            return await collect(original)

    _, tokens, deltas = asyncio.run(main())
    assert len(tokens) == 20 and deltas[-1].finish_reason == "length"


def test_shutdown_right_after_a_refused_request_ends_its_stream(tiny_llm):
    engine = AsyncEngine(tiny_llm("llama").engine)

    async def main():
        engine.start()
        bad = engine.add_request([5, 6], SamplingParams(max_tokens=2), lora="nope")
        await asyncio.to_thread(engine.shutdown)
        return await asyncio.wait_for(collect(bad), timeout=10)

    _, _, deltas = asyncio.run(main())
    assert deltas[-1].finished and deltas[-1].finish_reason == "error"
    assert "unknown LoRA adapter" in deltas[-1].error


def test_a_request_added_while_shutdown_runs_is_not_lost(tiny_llm):
    """shutdown() queues its stop and waits for the loop; a request queued behind the stop is
    run by a new loop (it used to wait forever)."""
    import threading
    import time

    llm = tiny_llm("llama")
    engine = AsyncEngine(llm.engine)
    run, in_step = llm.engine.runner.run, threading.Event()

    def slow_run(batch):  # a step long enough to queue commands behind the stop
        in_step.set()
        time.sleep(0.3)
        return run(batch)

    llm.engine.runner.run = slow_run
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def main():
        first = engine.add_request([5, 6, 7], params)
        await anext(first)
        in_step.clear()
        await asyncio.to_thread(in_step.wait)  # the loop is inside a step
        stopper = threading.Thread(target=engine.shutdown)
        stopper.start()
        while None not in list(engine._commands.queue):  # the stop is queued
            await asyncio.sleep(0.001)
        late = engine.add_request([8, 9], params)
        await asyncio.to_thread(stopper.join)
        result = await asyncio.wait_for(collect(late), timeout=30)
        await asyncio.to_thread(engine.shutdown)
        return result

    _, tokens, deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "length" and len(tokens) == 3
