"""Prometheus metrics of the server (text format at GET /metrics), through prometheus_client."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """One registry per server, so several servers (tests) can live in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ossgpt_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("ossgpt_prompt_tokens", "Prompt tokens prefilled (not counting those from the prefix cache)", registry=r)
        self.prefix_hit_tokens = Counter("ossgpt_prefix_cache_hit_tokens",
                                         "Prompt tokens whose keys and values came from the prefix cache", registry=r)
        self.prefix_evictions = Counter("ossgpt_prefix_cache_evictions", "Prompts dropped from the prefix cache",
                                        registry=r)
        self.prefix_bytes = Gauge("ossgpt_prefix_cache_bytes", "Bytes the prefix cache holds", registry=r)
        self.generated_tokens = Counter("ossgpt_generation_tokens", "Tokens generated", registry=r)
        self.queue_size = Gauge("ossgpt_queue_size", "Requests waiting to join the batch", registry=r)
        self.active = Gauge("ossgpt_active_sequences", "Requests in the decoding batch", registry=r)
        self.batch_size = Histogram("ossgpt_batch_size", "Sequences per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.ttft = Histogram("ossgpt_time_to_first_token_seconds", "Submit to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("ossgpt_request_latency_seconds", "Submit to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)

    def finished(self, seq, now: float) -> None:
        self.latency.observe(now - seq.submitted)

    def text(self) -> bytes:
        return generate_latest(self.registry)
