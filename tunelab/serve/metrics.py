"""Prometheus text-format metrics (names like vLLM's, under ``tunelab:``), no dependency.

Gauges read the engine's state when scraped (plain ``len`` reads of the engine thread's
containers, atomic in CPython); counters and histograms are fed by the request handlers.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Counter:
    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self.values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = self.values or {(): 0.0}
        for key, v in sorted(values.items()):
            lines.append(f"{self.name}_total{_labels(dict(key))} {_fmt(v)}")
        return lines


class Gauge:
    def __init__(self, name: str, help_: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help_, read

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {_fmt(self.read())}",
        ]


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help = name, help_
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            self.counts[i] += 1
            self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            total += count
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {total}')
        lines += [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {total}"]
        return lines


class ServerMetrics:
    """Everything ``/metrics`` shows for one engine."""

    def __init__(self, engine) -> None:
        stats = engine.engine.stats  # the LLMEngine inside the AsyncEngine
        self.admission = None  # the server's bounded queue (``Admission``), set by the app

        def running() -> float:
            return stats().running_requests

        def waiting() -> float:
            queued = self.admission.num_waiting if self.admission is not None else 0
            return stats().waiting_requests + queued

        def kv_usage() -> float:
            return stats().kv_cache_usage

        def hit_rate() -> float:
            return stats().prefix_cache_hit_rate

        p = "tunelab:"
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens.")
        self.request_success = Counter(p + "request_success", "Finished requests by reason.")
        self.request_rejected = Counter(p + "request_rejected", "Requests refused (queue full).")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token.")
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "End-to-end request latency.")
        self.queue_time = Histogram(
            p + "request_queue_time_seconds",
            "Arrival to the first engine step: server admission plus the engine's waiting queue.",
        )
        self._all = [
            Gauge(p + "num_requests_running", "Requests running in the engine.", running),
            Gauge(p + "num_requests_waiting", "Requests waiting to run.", waiting),
            Gauge(p + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", kv_usage),
            Gauge(p + "prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens.", hit_rate),
            self.prompt_tokens,
            self.generation_tokens,
            self.request_success,
            self.request_rejected,
            self.ttft,
            self.itl,
            self.e2e,
            self.queue_time,
        ]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._all:
            lines += metric.render()
        return "\n".join(lines) + "\n"
