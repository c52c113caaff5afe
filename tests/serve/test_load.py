"""Concurrency, backpressure, disconnects and metrics on a real server process."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \S+$')


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def test_metrics_parse(server):
    m = metrics(server.url)
    names = [
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_hit_rate",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_queue_time_seconds_count",
    ]
    for name in names:
        assert f"tunelab:{name}" in m


def test_concurrent_streams_all_finish_with_usage(server):
    """64 concurrent streaming clients (the issue's bar) all finish with correct usage."""
    clients = 64
    before = metrics(server.url)
    # httpx's default pool holds 100 connections: enough for 64 streams at once
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

    async def one(i: int) -> tuple[int, object]:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        tokens, usage = 0, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content is not None:
                tokens += 1
            usage = chunk.usage or usage
        return tokens, usage

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(clients)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == clients
    for _, usage in results:
        assert usage.completion_tokens == 4
        assert usage.total_tokens == usage.prompt_tokens + 4
    after = metrics(server.url)
    done = "tunelab:request_queue_time_seconds_count"
    assert after[done] - before[done] == clients  # one queue time per engine request
    assert after["tunelab:generation_tokens_total"] - before["tunelab:generation_tokens_total"] >= (
        4 * clients
    )


def test_queue_full_gives_429(launch):
    server = launch("--max-num-seqs", "1", "--max-queue", "1")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 40, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(
                *(c.post(server.url + "/v1/completions", json=body) for _ in range(6))
            )

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "rate_limit_exceeded"
    assert httpx.get(server.url + "/health").status_code == 200
    ok = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
    assert metrics(server.url)["tunelab:request_rejected_total"] >= 1


def _wait_idle(url: str, timeout: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["tunelab:num_requests_running"] == 0 and m["tunelab:kv_cache_usage_perc"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_disconnect_mid_stream_frees_blocks(server):
    _wait_idle(server.url)
    body = {"model": "tiny", "prompt": "x" * 40, "max_tokens": 200, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        busy = metrics(server.url)
        assert busy["tunelab:num_requests_running"] == 1
        assert busy["tunelab:kv_cache_usage_perc"] > 0
    m = _wait_idle(server.url)
    assert m["tunelab:num_requests_running"] == 0
    assert m["tunelab:kv_cache_usage_perc"] == 0
    assert m['tunelab:request_success_total{finished_reason="abort"}'] >= 1


def test_disconnect_non_streaming_aborts(server):
    _wait_idle(server.url)
    key = 'tunelab:request_success_total{finished_reason="abort"}'
    before = metrics(server.url).get(key, 0)
    # n=8 x 220 tokens takes ~0.35 s on a fast core; the server polls for disconnects every
    # 50 ms, so it notices the client leaving at 0.1 s well before the run could finish.
    body = {"model": "tiny", "prompt": "y" * 30, "max_tokens": 220, "ignore_eos": True, "n": 8}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.1)
    m = _wait_idle(server.url)
    assert m["tunelab:num_requests_running"] == 0 and m["tunelab:kv_cache_usage_perc"] == 0
    assert m[key] == before + 8  # every one of the n sequences
