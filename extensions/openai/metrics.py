"""GET /metrics: the serving core's numbers in Prometheus' text format (OpenMetrics when the scraper asks for it).

Counters and histograms come from the ModelManager's ServingMetrics (modules/serving/metrics.py); gauges are read
from the pool of resident models when the page is asked for. Names follow vLLM's where one fits
(`prompt_tokens_total`, `generation_tokens_total`, `time_to_first_token_seconds`, `time_per_output_token_seconds`,
`e2e_request_latency_seconds`, `request_queue_time_seconds`, `num_requests_running`, `num_requests_waiting`), under
the prefix `workbench:` as llama.cpp's server uses `llamacpp:`; the label `model_name` is vLLM's too.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from extensions.openai.errors import documented_errors
from modules.serving.metrics import Histogram

PREFIX = "workbench:"

router = APIRouter(responses=documented_errors())


class ServingCollector(Collector):
    """The manager's metrics as Prometheus families, collected afresh at every scrape."""

    def __init__(self, manager: Any):
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        snap = self.manager.metrics.snapshot()
        model = ["model_name"]

        requests = CounterMetricFamily(PREFIX + "requests", "Requests that ended, by model and outcome (stop, "
                                       "length, cancelled, error; overloaded: refused, the queue was full).",
                                       labels=[*model, "outcome"])
        for (name, outcome), count in sorted(snap.requests.items()):
            requests.add_metric([name, outcome], count)
        yield requests
        yield _counter("prompt_tokens", "Prompt tokens of requests that were queued.", snap.prompt_tokens)
        yield _counter("generation_tokens", "Tokens generated.", snap.generation_tokens)
        yield _histogram("time_to_first_token_seconds", "From queueing a request to its first token.",
                         snap.time_to_first_token)
        yield _histogram("time_per_output_token_seconds", "Per request: the time after its first token over "
                         "the tokens after it.", snap.time_per_output_token)
        yield _histogram("e2e_request_latency_seconds", "From queueing a request to its last token.",
                         snap.request_latency)
        yield _histogram("request_queue_time_seconds", "Time a request waited for a slot.", snap.queue_time)
        yield _counter("model_loads", "Models loaded (at start, by request, just in time).", snap.loads)
        yield _counter("model_load_seconds", "Seconds spent loading models.", snap.load_seconds)
        unloads = CounterMetricFamily(PREFIX + "model_unloads", "Models unloaded, by reason: evicted (to make "
                                      "room for another), idle (--idle-unload or keep_alive), requested.",
                                      labels=[*model, "reason"])
        for (name, reason), count in sorted(snap.unloads.items()):
            unloads.add_metric([name, reason], count)
        yield unloads

        residents = self.manager.pool.all()
        yield GaugeMetricFamily(PREFIX + "models_resident", "Models in memory now.", value=len(residents))
        gauges = {
            "num_requests_running": ("Requests decoding now (slots busy).", lambda r: r.engine.busy_slots),
            "num_requests_waiting": ("Requests waiting for a slot (queue depth).", lambda r: r.engine.waiting),
            "slots": ("Requests a model decodes at once.", lambda r: r.engine.slots),
            "model_memory_bytes": ("Memory a resident model holds.", lambda r: r.model.info().memory_bytes),
        }
        for name, (doc, read) in gauges.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=model)
            for resident in residents:
                family.add_metric([resident.name], read(resident))
            yield family


def _counter(name: str, doc: str, values: dict[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
    for model, value in sorted(values.items()):
        family.add_metric([model], value)
    return family


def _histogram(name: str, doc: str, histograms: dict[str, Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(PREFIX + name, doc, labels=["model_name"])
    for model, histogram in sorted(histograms.items()):
        buckets = [("+Inf" if bound == float("inf") else repr(float(bound)), count)
                   for bound, count in histogram.cumulative()]
        family.add_metric([model], buckets, histogram.total)
    return family


def metrics_registry(manager: Any) -> CollectorRegistry:
    """A registry of the manager's metrics alone (never prometheus_client's process-wide default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServingCollector(manager))
    return registry


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format (OpenMetrics when the Accept header asks)."}})
async def metrics(request: Request) -> Response:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    registry = request.app.state.api.metrics
    return Response(await run_in_threadpool(encoder, registry), media_type=content_type)
