"""Concurrency sweep against a running OpenAI-compatible server (vLLM's serving metrics).

TTFT: request sent -> first token. TPOT: (e2e - TTFT) / (output tokens - 1), per request.
ITL: time between consecutive streamed chunks carrying tokens. Throughput: requests and
output tokens per second of wall time for each concurrency level.

    python bench/serve_load.py --base-url http://127.0.0.1:8000 --model default \\
        --concurrency 1,4,8 --num-prompts 16 --max-tokens 32
    python bench/serve_load.py --launch --model default ...   # start `tunelab serve` first
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three uses of Python.",
    "What is the capital of France? Answer briefly.",
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    times: list[float] = []
    usage = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    end = time.perf_counter()
    out_tokens = usage["completion_tokens"] if usage else len(times)
    return start, times, end, out_tokens


async def sweep_level(url: str, model: str, concurrency: int, num: int, max_tokens: int):
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def run(i: int):
            async with sem:
                return await one(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens)

        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(run(i) for i in range(num)), return_exceptions=True)
        wall = time.perf_counter() - t0
    results = [r for r in outcomes if not isinstance(r, BaseException)]
    failed = len(outcomes) - len(results)  # counted, not hidden: the goal is none lost
    ttft, tpot, itl, tokens = [], [], [], 0
    for start, times, end, out in results:
        tokens += out
        if times:
            ttft.append(times[0] - start)
            itl += [b - a for a, b in itertools.pairwise(times)]
            if out > 1:
                tpot.append((end - times[0]) / (out - 1))
    ms = 1000
    return {
        "concurrency": concurrency, "requests": num, "failed": failed, "wall_s": wall,
        "req_per_s": num / wall, "out_tok_per_s": tokens / wall,
        "ttft_p50_ms": pct(ttft, 50) * ms, "ttft_p99_ms": pct(ttft, 99) * ms,
        "tpot_p50_ms": pct(tpot, 50) * ms, "tpot_p99_ms": pct(tpot, 99) * ms,
        "itl_p50_ms": pct(itl, 50) * ms, "itl_p99_ms": pct(itl, 99) * ms,
        "ttft_mean_ms": statistics.fmean(ttft) * ms if ttft else float("nan"),
    }  # fmt: skip


def launch(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", "--model", model, "--port", str(port),
           "--served-model-name", model]  # fmt: skip
    log_path = Path(os.environ.get("OUT", tempfile.gettempdir())) / "serve_load_server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # died at start: say so now, not after the timeout
            raise SystemExit(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not come up in 300 s; see {log_path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="default", help="model name the server serves")
    ap.add_argument("--concurrency", default="1,4,8", help="comma-separated levels")
    ap.add_argument("--num-prompts", type=int, default=16, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--launch", action="store_true", help="start `tunelab serve` on the port")
    ap.add_argument("--json", action="store_true", help="print rows as JSON lines")
    args = ap.parse_args()
    proc = None
    if args.launch:
        port = int(args.base_url.rsplit(":", 1)[1].split("/")[0])
        proc = launch(args.model, port)
    try:
        # one untimed request first: first-use costs (kernel compiles) stay out of level 1
        asyncio.run(sweep_level(args.base_url, args.model, 1, 1, 4))
        rows = [
            asyncio.run(sweep_level(args.base_url, args.model, c, args.num_prompts,
                                    args.max_tokens))
            for c in map(int, args.concurrency.split(","))
        ]  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # a slow shutdown must not cost the table
                proc.kill()
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    cols = ["concurrency", "failed", "req_per_s", "out_tok_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")  # fmt: skip
    print(f"\n{os.cpu_count()} CPUs; {args.num_prompts} requests per level, "
          f"{args.max_tokens} output tokens each (EOS ignored), greedy, chat prompts.")  # fmt: skip


if __name__ == "__main__":
    main()
