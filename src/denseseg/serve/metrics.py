"""``GET /metrics``: request counts, latencies, queue length and batch sizes in Prometheus' text
format (prometheus_client, one registry per application; with ``--workers N`` each worker
process reports its own)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "Metrics"]

# The *_created series (one timestamp per label set) only add noise to a scrape.
disable_created_metrics()

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's counters; ``queue_length`` is read when scraped."""

    def __init__(self, queue_length: Callable[[], int], in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "denseseg_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "denseseg_request_seconds",
            "Request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "denseseg_batch_images",
            "Images per forward pass",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=self.registry,
        )
        gauge = Gauge("denseseg_queue_length", "Jobs waiting for the model", registry=self.registry)
        gauge.set_function(queue_length)
        busy = Gauge("denseseg_in_flight", "Requests being handled", registry=self.registry)
        busy.set_function(in_flight)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
