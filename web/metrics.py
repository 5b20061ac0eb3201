"""Prometheus metrics at ``/metrics``: request counts and latencies, search stage timings, CNN threads.

One process (``visualsearch serve``, tests) serves its own registry. Under gunicorn every
worker counts only what it served, so ``gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR``
before any worker imports prometheus_client: each process then writes its values to files
there and a scrape, answered by any one worker, sums them all (prometheus_client's
multiprocess mode).
"""

from __future__ import annotations

import os
import time

import torch
from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

REGISTRY = CollectorRegistry()
REQUESTS = Counter("visualsearch_http_requests_total", "HTTP requests.",
                   ["endpoint", "method", "status"], registry=REGISTRY)
LATENCY = Histogram("visualsearch_http_request_seconds", "HTTP request latency.", ["endpoint"],
                    registry=REGISTRY)
SEARCH_STAGE = Histogram("visualsearch_search_stage_seconds", "Time of each search stage.", ["stage"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                         registry=REGISTRY)
# One sample per live worker (a "pid" label in multiprocess mode): workers x threads above
# the core count is the oversubscription that made a default gunicorn ~25x slower.
CNN_THREADS = Gauge("visualsearch_cnn_threads", "CPU threads PyTorch gives this process's CNN.",
                    multiprocess_mode="liveall", registry=REGISTRY)


def observe_search(took_ms: dict[str, float]) -> None:
    for stage, milliseconds in took_ms.items():
        SEARCH_STAGE.labels(stage).observe(milliseconds / 1000)


def record_cnn_threads() -> None:
    """Report this process's current PyTorch thread count (gunicorn.conf.py calls it once a worker is set up)."""
    CNN_THREADS.set(torch.get_num_threads())


def scrape() -> bytes:
    """The text exposition: this process's metrics, or every process's in multiprocess mode."""
    if os.environ.get(MULTIPROC_DIR_ENV):
        registry = CollectorRegistry()  # a fresh one per scrape, as prometheus_client documents
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def register(app: Flask) -> None:
    record_cnn_threads()  # no sample may read 0 before the first request

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _count(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        REQUESTS.labels(endpoint, request.method, response.status_code).inc()
        if "request_started" in g:
            LATENCY.labels(endpoint).observe(time.perf_counter() - g.request_started)
        record_cnn_threads()  # loading the embedder may have just changed it
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(scrape(), mimetype=CONTENT_TYPE_LATEST)
