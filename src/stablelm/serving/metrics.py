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
        self.queue_time = Histogram("stablelm_queue_time_seconds", "Time from arrival to the start of prefill",
                                    buckets=buckets, registry=r)
        gaps = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
        self.token_gap = Histogram("stablelm_inter_token_latency_seconds", "Time between a sequence's tokens",
                                   buckets=gaps, registry=r)
        self.kv_blocks = Gauge("stablelm_kv_cache_blocks_used_ratio", "Share of the KV cache pool's blocks held by "
                               "running sequences and prompts in prefill", registry=r)
        self.preemptions = Gauge("stablelm_preemptions", "Sequences that gave their blocks back to be recomputed",
                                 registry=r)
        self.prefilling = Gauge("stablelm_prefilling_requests", "Requests whose prompt is being prefilled", registry=r)
        self.prefix_blocks = Gauge("stablelm_prefix_cache_blocks", "Full blocks cached by their token prefix",
                                   registry=r)
        self.prefix_lookups = Gauge("stablelm_prefix_cache_lookups", "Prompts looked up in the prefix cache",
                                    registry=r)
        self.prefix_hits = Gauge("stablelm_prefix_cache_hits", "Prompts that reused cached keys/values", registry=r)
        self.prefix_tokens = Gauge("stablelm_prefix_cache_reused_tokens", "Prompt tokens not prefilled thanks to "
                                   "the prefix cache", registry=r)

    def observe_engine(self, engine) -> None:
        """After each engine round (in the engine's thread): its gauges and what it timed."""
        self.batch_size.set(engine.batch_size)
        self.queue_depth.set(engine.queue_depth)
        self.prefilling.set(len(engine.prefilling))
        pool = engine.pool
        self.kv_blocks.set(pool.used / pool.num_blocks)
        self.preemptions.set(engine.preemptions)
        self.prefix_blocks.set(pool.cached_blocks)
        self.prefix_lookups.set(pool.lookups)
        self.prefix_hits.set(pool.hits)
        self.prefix_tokens.set(pool.tokens_reused)
        for kind, seconds in engine.observations:
            (self.queue_time if kind == "queue" else self.token_gap).observe(seconds)
        self.steps.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
