"""What the serving core has done, counted for monitoring: requests by model and outcome, prompt and generated
tokens, time to first token, time per output token, time in the queue, loads and unloads.

The ModelManager owns one ServingMetrics; its pool, the engines and each Generation report to it as things happen.
Gauges (queue depth, busy slots, resident models, memory) are not kept here: a reader takes them from the pool
when it looks. The numbers are plain Python (no monitoring library in the core); the API renders them in
Prometheus' format (extensions/openai/metrics.py).
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field

#: Bucket bounds in seconds (vLLM's for the same measures, trimmed to what a CPU or one GPU sees).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

#: How a request ended: the Generation's finish reasons, and "overloaded" (refused: the model's queue was full).
OUTCOMES = ("stop", "length", "cancelled", "error", "overloaded")


@dataclass
class Histogram:
    """Observations counted per bucket (`counts[i]`: values <= bounds[i] and above the bound before; the last
    entry: above every bound), with their sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, ending with (inf, count)."""
        running, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass
class MetricsSnapshot:
    """A consistent copy of the counters, for a reader (keys: model name, or (model name, label))."""

    requests: Counter[tuple[str, str]]
    prompt_tokens: Counter[str]
    generation_tokens: Counter[str]
    time_to_first_token: dict[str, Histogram]
    time_per_output_token: dict[str, Histogram]
    request_latency: dict[str, Histogram]
    queue_time: dict[str, Histogram]
    loads: Counter[str]
    load_seconds: Counter[str]
    unloads: Counter[tuple[str, str]]


class ServingMetrics:
    """Counters and histograms per model, safe to update from any thread (engines, request threads, the pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._prompt_tokens: Counter[str] = Counter()
        self._generation_tokens: Counter[str] = Counter()
        self._ttft: dict[str, Histogram] = {}
        self._tpot: dict[str, Histogram] = {}
        self._latency: dict[str, Histogram] = {}
        self._queue: dict[str, Histogram] = {}
        self._loads: Counter[str] = Counter()
        self._load_seconds: Counter[str] = Counter()
        self._unloads: Counter[tuple[str, str]] = Counter()

    @staticmethod
    def _histogram(table: dict[str, Histogram], model: str, bounds: tuple[float, ...]) -> Histogram:
        found = table.get(model)
        if found is None:
            found = table[model] = Histogram(bounds)
        return found

    def request_ended(self, model: str, outcome: str, *, prompt_tokens: int = 0, generated_tokens: int = 0,
                      time_to_first_token: float | None = None, seconds: float | None = None) -> None:
        """A request on `model` ended (`outcome`: one of OUTCOMES). Its time per output token is the time after
        the first token over the tokens after it, so a request of one token has none."""
        with self._lock:
            self._requests[(model, outcome)] += 1
            self._prompt_tokens[model] += prompt_tokens
            self._generation_tokens[model] += generated_tokens
            if time_to_first_token is not None:
                self._histogram(self._ttft, model, TTFT_BUCKETS).observe(time_to_first_token)
                if seconds is not None and generated_tokens > 1:
                    per_token = max(0.0, seconds - time_to_first_token) / (generated_tokens - 1)
                    self._histogram(self._tpot, model, TPOT_BUCKETS).observe(per_token)
            if seconds is not None:
                self._histogram(self._latency, model, LATENCY_BUCKETS).observe(seconds)

    def admitted(self, model: str, waited: float) -> None:
        """A request joined `model`'s running batch after `waited` seconds in its queue."""
        with self._lock:
            self._histogram(self._queue, model, LATENCY_BUCKETS).observe(waited)

    def loaded(self, model: str, seconds: float) -> None:
        with self._lock:
            self._loads[model] += 1
            self._load_seconds[model] += seconds

    def unloaded(self, model: str, reason: str) -> None:
        """`model` left memory: "evicted" (to make room), "idle" (--idle-unload or keep_alive passed) or
        "requested" (an unload or a reload asked for it, or shutdown)."""
        with self._lock:
            self._unloads[(model, reason)] += 1

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            def copies(table: dict[str, Histogram]) -> dict[str, Histogram]:
                return {model: histogram.copy() for model, histogram in table.items()}

            return MetricsSnapshot(
                requests=Counter(self._requests), prompt_tokens=Counter(self._prompt_tokens),
                generation_tokens=Counter(self._generation_tokens), time_to_first_token=copies(self._ttft),
                time_per_output_token=copies(self._tpot), request_latency=copies(self._latency),
                queue_time=copies(self._queue), loads=Counter(self._loads), load_seconds=Counter(self._load_seconds),
                unloads=Counter(self._unloads))
