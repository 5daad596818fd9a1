"""Prometheus metrics of the server (prometheus_client), in a registry of its own."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stablelm_requests", "HTTP requests", ["path", "status"], registry=r)
        self.cancelled = Counter("stablelm_requests_cancelled", "Generations stopped because the client went away",
                                 registry=r)
        self.prompt_tokens = Counter("stablelm_prompt_tokens", "Prompt tokens received", registry=r)
        self.completion_tokens = Counter("stablelm_completion_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("stablelm_queue_depth", "Requests waiting for a batch row", registry=r)
        self.batch_size = Gauge("stablelm_batch_size", "Sequences in the running batch", registry=r)
        self.steps = Counter("stablelm_engine_steps", "Engine loop iterations", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("stablelm_time_to_first_token_seconds", "Time to first token", buckets=buckets,
                              registry=r)
        self.latency = Histogram("stablelm_request_latency_seconds", "Request latency", buckets=buckets, registry=r)

    def observe_engine(self, batch_size: int, queue_depth: int) -> None:
        self.batch_size.set(batch_size)
        self.queue_depth.set(queue_depth)
        self.steps.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
