"""Prometheus metrics at ``/metrics``: request counts and latencies, search stage timings."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry()
REQUESTS = Counter("visualsearch_http_requests_total", "HTTP requests.",
                   ["endpoint", "method", "status"], registry=REGISTRY)
LATENCY = Histogram("visualsearch_http_request_seconds", "HTTP request latency.", ["endpoint"],
                    registry=REGISTRY)
SEARCH_STAGE = Histogram("visualsearch_search_stage_seconds", "Time of each search stage.", ["stage"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                         registry=REGISTRY)


def observe_search(took_ms: dict[str, float]) -> None:
    for stage, milliseconds in took_ms.items():
        SEARCH_STAGE.labels(stage).observe(milliseconds / 1000)


def register(app: Flask) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _count(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        REQUESTS.labels(endpoint, request.method, response.status_code).inc()
        if "request_started" in g:
            LATENCY.labels(endpoint).observe(time.perf_counter() - g.request_started)
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), mimetype=CONTENT_TYPE_LATEST)
