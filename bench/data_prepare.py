"""Tokenizing synthetic chat data: tunelab's ``prepare`` vs a plain ``datasets.map`` loop.

    python bench/data_prepare.py                 # 100k conversations, 2 workers, default model
    python bench/data_prepare.py --n 20000 --model path/to/model-dir

Both sides tokenize the same seeded conversations (1-3 user/assistant exchanges, some with a
system prompt) with ``num_proc`` workers and the model's own chat template:

- ours: ``tunelab.data.pipeline.prepare`` into a fresh cache directory, end to end: read the
  JSON Lines file, parse, render + tokenize with assistant-only loss masks (prefix renders),
  verify every example against ``apply_chat_template(tokenize=True)`` (on, as shipped),
  shuffle, count, write the memory-mapped Arrow cache;
- plain: ``Dataset.from_list`` + ``map(apply_chat_template(tokenize=True))``: ids only, no
  masks, no checks, nothing written.

Prints examples/s for each (wall clock), the CPU seconds each side used (its workers
included: steadier than wall time on a shared machine), the ratios, and whether both produced
the same number of tokens.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOPICS = ["France", "Italy", "Japan", "Kenya", "Peru", "Canada", "Norway", "Egypt", "India"]
THINGS = ["capital", "largest city", "currency", "main river", "highest mountain", "language"]
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a careful assistant that double-checks every answer.",
]
FILLER_TEXT = (
    "This is a well-known fact that appears in most atlases and encyclopedias, and it is often "
    "asked in quizzes about geography, history and culture."
)
FILLER = FILLER_TEXT.split(" ")


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` seeded chat conversations in OpenAI ``messages`` form."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            topic, thing = rng.choice(TOPICS), rng.choice(THINGS)
            extra = " ".join(rng.choices(FILLER, k=rng.randint(5, 40)))
            msgs.append({"role": "user", "content": f"What is the {thing} of {topic}?"})
            msgs.append({"role": "assistant", "content": f"The {thing} of {topic}: {extra}."})
        out.append(msgs)
    return out


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (the map workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args) -> tuple[float, float, int]:
    """(wall s, CPU s, tokens) of ``fn(*args)``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    tokens = fn(*args)
    return time.perf_counter() - wall, cpu_seconds() - cpu, tokens


def run_ours(path: Path, tokenizer: Any, num_proc: int, cache_dir: Path) -> int:
    from tunelab.data.config import DataConfig
    from tunelab.data.pipeline import prepare

    cfg = DataConfig(
        train=str(path),
        format="messages",
        max_length=1 << 20,  # nothing truncated: the token totals must match
        num_proc=num_proc,
        cache_dir=str(cache_dir),
    )
    data = prepare(cfg, tokenizer)
    assert not data.stats.cache_hit
    return data.stats.tokens


class PlainEncoder:
    """The map function of the plain loop (a class so ``datasets`` workers can pickle it)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        ids = self.tokenizer.apply_chat_template(row["messages"], tokenize=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return {"input_ids": ids}


def run_plain(convs: list, tokenizer: Any, num_proc: int) -> int:
    import datasets

    ds = datasets.Dataset.from_list([{"messages": m} for m in convs])
    out = ds.map(PlainEncoder(tokenizer), remove_columns=["messages"], num_proc=num_proc)
    return sum(len(x) for x in out["input_ids"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="conversations (default: 100000)")
    p.add_argument("--model", default="default", help="model spec or local dir (its tokenizer)")
    p.add_argument("--num-proc", type=int, default=2, help="workers on both sides (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    for module in ("datasets", "tunelab.data.pipeline", "tunelab.data.formats"):
        importlib.import_module(module)  # before timing: neither side pays for imports
    from tunelab.hub import resolve_model
    from tunelab.models.loading import load_tokenizer

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    convs = conversations(args.n, args.seed)
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-data-") as tmp:
        path = Path(tmp) / "chats.jsonl"
        with path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"messages": m}) + "\n" for m in convs)
        cache = Path(tmp) / "cache"
        ours_s, ours_cpu, ours_tokens = timed(run_ours, path, tokenizer, args.num_proc, cache)
    plain_s, plain_cpu, plain_tokens = timed(run_plain, convs, tokenizer, args.num_proc)

    ours_rate, plain_rate = args.n / ours_s, args.n / plain_s
    print(
        f"# data_prepare: {args.n} synthetic conversations, tokenizer of {Path(model_dir).name}, "
        f"num_proc={args.num_proc}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"ours   {ours_rate:8.1f} examples/s  {ours_s:7.2f} s wall  {ours_cpu:7.2f} s CPU  "
        "(read + masks + verify + cache)"
    )
    print(
        f"plain  {plain_rate:8.1f} examples/s  {plain_s:7.2f} s wall  {plain_cpu:7.2f} s CPU  "
        "(datasets.map + apply_chat_template)"
    )
    print(
        f"ratio ours/plain: {ours_rate / plain_rate:.2f} (wall examples/s), "
        f"{plain_cpu / ours_cpu:.2f} (per CPU second)"
    )
    print(
        f"tokens: ours {ours_tokens}, plain {plain_tokens}, match: "
        f"{'yes' if ours_tokens == plain_tokens else 'NO'}"
    )
    print(
        "note: ours also computes assistant-only loss masks (prefix renders of each answer), "
        "verifies every example against apply_chat_template(tokenize=True), and reads, "
        "shuffles, counts and caches (Arrow); plain returns token ids only."
    )
    return 0 if ours_tokens == plain_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
