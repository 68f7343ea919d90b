"""GET /metrics: Prometheus metrics of the server, with prometheus_client (turned on by `phi3 serve --metrics`).

Counters and histograms are fed from the request log (route, status) and from each finished reply's ReplyStats
(tokens, time to first token, time per output token); the queue's depth, the running sequences, the KV-cache use
and the loaded models are read from the served models when scraped. Labels are routes, statuses and model ids:
never a prompt or a reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import Response

from phi3cli.generation import ReplyStats

ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses"}
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class ServerMetrics:
    """The registry of one app, and what its request log and queues feed into it."""

    def __init__(self, models: Callable[[], Iterable]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "phi3_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("phi3_prompt_tokens", "Prompt tokens read.", ["model"], registry=self.registry)
        self.generated_tokens = Counter("phi3_generated_tokens", "Tokens generated.", ["model"], registry=self.registry)
        self.ttft = Histogram(
            "phi3_time_to_first_token_seconds",
            "From the start of generation (tokenizing and prefill) to the first token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "phi3_time_per_output_token_seconds",
            "Mean time per token after the first, one observation per reply.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Live(models))

    def request(self, path: str, status: int) -> None:
        route = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        self.requests.labels(route, str(status)).inc()

    def reply(self, model: str, stats: ReplyStats) -> None:
        self.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        self.generated_tokens.labels(model).inc(stats.generated_tokens)
        if stats.generated_tokens:
            self.ttft.labels(model).observe(stats.ttft_s)
        if stats.generated_tokens > 1:
            self.tpot.labels(model).observe(stats.tpot_ms / 1000)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _Live:
    """Gauges read from the served models at each scrape."""

    def __init__(self, models: Callable[[], Iterable]):
        self.models = models

    def collect(self):
        waiting = GaugeMetricFamily("phi3_queue_depth", "Requests waiting for a worker.", labels=["model"])
        running = GaugeMetricFamily("phi3_running_sequences", "Requests generating now.", labels=["model"])
        kv = GaugeMetricFamily(
            "phi3_kv_cache_usage_percent", "Share of the batch engine's KV-cache pool in use.", labels=["model"]
        )
        loaded = GaugeMetricFamily(
            "phi3_model_loaded", "1 for each model loaded.", labels=["model", "backend", "format", "device"]
        )
        for served in self.models():
            name, model = served.name, served.model
            waiting.add_metric([name], served.jobs.waiting)
            running.add_metric([name], served.jobs.running)
            info = served.jobs.engine.describe() if served.jobs.engine else {}
            if "kv_cache_usage" in info:
                kv.add_metric([name], float(info["kv_cache_usage"]))
            loaded.add_metric([name, model.backend, model.format, model.executed_device], 1)
        return [waiting, running, kv, loaded]
