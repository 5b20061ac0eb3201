"""gunicorn.conf.py under a real gunicorn with two workers: each worker's CNN threads, and
``/metrics`` summed over the workers.

The servers' workers load :func:`create_tiny_app` from this module, whose import registers
the tiny test backbone (``tests.conftest``).
"""

from __future__ import annotations

import contextlib
import os
import re
import runpy
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from visualsearch.service import VisualSearch
from web import create_app

from .conftest import REPO, TINY

GUNICORN = Path(sys.executable).with_name("gunicorn")
CONFIG = REPO / "gunicorn.conf.py"
STARTUP_TIMEOUT_S = 60
THREADS_LOG = re.compile(r"worker (\d+): (\d+) CNN threads \((.*)\)")

pytestmark = pytest.mark.skipif(not GUNICORN.exists(), reason="gunicorn is not installed (extra 'serve')")


def create_tiny_app():
    """The WSGI app of the test servers (configured by VISUALSEARCH_* variables, as in production)."""
    return create_app()


@pytest.fixture
def conf(monkeypatch, tmp_path) -> dict:
    """gunicorn.conf.py's namespace; a metrics directory is given so that loading it creates none."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return runpy.run_path(str(CONFIG))


@dataclass
class Server:
    port: int
    log: Path
    metrics_dir: Path

    def worker_threads(self) -> dict[int, tuple[int, str]]:
        """Each worker's logged CNN thread count and where it came from, by pid."""
        return {int(pid): (int(threads), source)
                for pid, threads, source in THREADS_LOG.findall(self.log.read_text())}

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as response:
            assert response.status == 200
            return response.read().decode()

    def search(self, photo: Path) -> dict:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{photo.name}\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v1/search", data=body, method="POST",
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            return response.read().decode()

    def scrape(self) -> dict[str, list]:
        """``/metrics`` parsed: samples by metric name."""
        return {family.name: family.samples for family in text_string_to_metric_families(self.get("/metrics"))}


@contextlib.contextmanager
def gunicorn(tmp_path: Path, settings, *args: str, **env: str):
    """Run ``gunicorn -w 2`` on an ephemeral loopback port from the repository root (so it reads
    gunicorn.conf.py); stop it and wait for it on the way out."""
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith(("VISUALSEARCH_", "PROMETHEUS_", "GUNICORN_"))
               and name not in ("WEB_CONCURRENCY", "PORT")}
    environ.update(VISUALSEARCH_DATA_DIR=str(settings.data_dir), VISUALSEARCH_BACKBONE=TINY,
                   VISUALSEARCH_WEIGHTS=str(settings.weights), VISUALSEARCH_ALLOW_DOWNLOAD="no",
                   # The metrics directory (mkdtemp) and gunicorn's control socket land here.
                   TMPDIR=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path), **env)
    log = tmp_path / "gunicorn.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([str(GUNICORN), "-w", "2", "-b", "127.0.0.1:0", *args,
                                    "tests.test_gunicorn:create_tiny_app()"],
                                   cwd=REPO, env=environ, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield _wait_until_ready(process, log, tmp_path)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the master and its workers
            process.wait()


def _wait_until_ready(process: subprocess.Popen, log: Path, tmp_path: Path) -> Server:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log.read_text()
        port = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
        if port and len(THREADS_LOG.findall(text)) >= 2:
            metrics_dirs = list(tmp_path.glob("visualsearch-metrics-*"))
            return Server(port=int(port.group(1)), log=log, metrics_dir=metrics_dirs[0] if metrics_dirs else None)
        if process.poll() is not None:
            pytest.fail(f"gunicorn exited with {process.returncode}:\n{text}")
        time.sleep(0.2)
    pytest.fail(f"gunicorn's two workers did not start in {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


def request_counts(samples: list) -> tuple[float, float]:
    """(requests other than scrapes, scrapes) in a scrape's request counter."""
    counts = {"/metrics": 0.0, "other": 0.0}
    for sample in samples:
        if sample.name == "visualsearch_http_requests_total":
            counts["/metrics" if sample.labels["endpoint"] == "/metrics" else "other"] += sample.value
    return counts["other"], counts["/metrics"]


def cnn_threads(samples: dict[str, list]) -> dict[int, float]:
    return {int(sample.labels["pid"]): sample.value for sample in samples["visualsearch_cnn_threads"]}


@pytest.fixture
def indexed(tiny_settings, small_catalogue):
    VisualSearch(tiny_settings).index(small_catalogue)
    return tiny_settings


def test_workers_share_the_cores_and_metrics_add_up_over_workers(tmp_path, indexed, small_catalogue, conf):
    expected = max(1, conf["available_cores"]() // 2)
    photos = sorted((small_catalogue.parent / "img").glob("*.png"))
    with gunicorn(tmp_path, indexed) as server:
        assert server.metrics_dir is not None
        workers = server.worker_threads()
        assert len(workers) == 2
        assert all(threads == expected and "/ 2 workers" in source for threads, source in workers.values())

        # Concurrent clients, until both workers have served (each has its own counter file).
        sent = 0
        with ThreadPoolExecutor(4) as clients:
            while sent < 400 and not all((server.metrics_dir / f"counter_{pid}.db").exists() for pid in workers):
                list(clients.map(lambda n: server.search(photos[n % len(photos)]) if n % 2
                                 else server.get("/api/v1/health"), range(sent, sent + 12)))
                sent += 12
        assert all((server.metrics_dir / f"counter_{pid}.db").exists() for pid in workers)

        for scrapes_before in range(6):
            samples = server.scrape()
            # Any worker answers; every answer holds every worker's count: none goes backwards.
            assert request_counts(samples["visualsearch_http_requests"]) == (sent, scrapes_before)
            # The CNN ran (searches) and still has the worker's share.
            assert cnn_threads(samples) == {pid: expected for pid in workers}
    # The directory the configuration made for the metrics goes with the server.
    assert not server.metrics_dir.exists()


def test_explicit_settings_win_and_preload_keeps_metrics_per_worker(tmp_path, indexed, small_catalogue):
    photo = next((small_catalogue.parent / "img").glob("*.png"))
    metrics_dir = tmp_path / "metrics"  # not there yet: the configuration creates it
    with gunicorn(tmp_path, indexed, "--preload", VISUALSEARCH_THREADS="3",
                  PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)) as server:
        workers = server.worker_threads()
        assert set(workers.values()) == {(3, "VISUALSEARCH_THREADS set by the user")} and len(workers) == 2
        for _ in range(5):
            server.search(photo)
        for scrapes_before in range(2):
            samples = server.scrape()
            assert request_counts(samples["visualsearch_http_requests"]) == (5, scrapes_before)
            # Only the workers report (the master loaded the app but serves nothing).
            assert cnn_threads(samples) == {pid: 3 for pid in workers}
    assert list(metrics_dir.glob("counter_*.db")), "the user's directory is theirs: kept"


@pytest.mark.parametrize("cores, workers, threads", [(1, 2, 1), (2, 2, 1), (2, 1, 2), (8, 4, 2), (8, 3, 2),
                                                     (32, 8, 4), (32, 32, 1), (4, 0, 4)])
def test_cnn_threads_are_the_workers_share_of_the_cores(conf, cores, workers, threads):
    assert conf["cnn_threads"](cores, workers) == threads


@pytest.mark.parametrize("cores, workers", [(1, 2), (2, 2), (4, 4), (8, 8), (32, 8)])
def test_default_workers(conf, cores, workers):
    assert conf["default_workers"](cores) == workers


def test_configuration_defaults(conf, monkeypatch):
    assert conf["worker_class"] == "sync" and conf["threads"] == 1 and conf["bind"] == ["127.0.0.1:8000"]
    monkeypatch.setenv("WEB_CONCURRENCY", "5")
    monkeypatch.setenv("PORT", "9000")
    configured = runpy.run_path(str(CONFIG))
    assert configured["workers"] == 5 and configured["bind"] == ["0.0.0.0:9000"]
