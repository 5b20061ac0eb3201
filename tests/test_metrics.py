"""/metrics: one process's own registry, and the sum over processes in multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from visualsearch.service import VisualSearch
from web import create_app, metrics

from .conftest import REPO


def samples(text: str) -> dict[tuple, float]:
    """A scrape as {(sample name, sorted labels): value}."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def requests_total(scraped: dict[tuple, float], endpoint: str) -> float:
    return sum(value for (name, labels), value in scraped.items()
               if name == "visualsearch_http_requests_total" and ("endpoint", endpoint) in labels)


@pytest.fixture
def client(tiny_settings, small_catalogue):
    VisualSearch(tiny_settings).index(small_catalogue)
    return create_app({"TESTING": True}, settings=tiny_settings).test_client()


def test_one_process_counts_its_requests_and_reports_cnn_threads(client, small_catalogue):
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # the suite runs in single-process mode
    before = samples(client.get("/metrics").get_data(as_text=True))
    for _ in range(3):
        assert client.get("/api/v1/health").status_code == 200
    with open(small_catalogue.parent / "img" / "p1-0.png", "rb") as photo:
        assert client.post("/api/v1/search", data={"image": (photo, "p1-0.png")}).status_code == 200
    response = client.get("/metrics")
    assert response.mimetype == "text/plain"
    after = samples(response.get_data(as_text=True))
    assert requests_total(after, "/api/v1/health") - requests_total(before, "/api/v1/health") == 3
    assert requests_total(after, "/api/v1/search") - requests_total(before, "/api/v1/search") == 1
    assert requests_total(after, "/metrics") - requests_total(before, "/metrics") == 1  # the first scrape
    assert after[("visualsearch_cnn_threads", ())] == torch.get_num_threads()
    assert after[("visualsearch_search_stage_seconds_count", (("stage", "embed"),))] >= 1


def test_multiprocess_mode_sums_every_process(tmp_path, monkeypatch):
    """Processes that share PROMETHEUS_MULTIPROC_DIR, a forked one included (gunicorn --preload),
    are summed by whichever process is scraped."""
    script = textwrap.dedent("""
        import os
        from web.metrics import REQUESTS, record_cnn_threads
        REQUESTS.labels("/api/v1/health", "GET", "200").inc(3)
        record_cnn_threads()
        if os.fork() == 0:
            REQUESTS.labels("/api/v1/health", "GET", "200").inc(4)
            os._exit(0)
        os.wait()
    """)
    environ = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=environ, check=True, timeout=60)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    scraped = samples(metrics.scrape().decode())
    assert requests_total(scraped, "/api/v1/health") == 7
    reporters = [dict(labels)["pid"] for (name, labels) in scraped if name == "visualsearch_cnn_threads"]
    assert len(reporters) == 2  # the parent and its fork, each with its own sample
