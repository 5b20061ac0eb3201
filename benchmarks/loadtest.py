"""Load test: the production server under readers and a writer at once, checked for exactness.

    python -m benchmarks.loadtest [--duration 60] [--clients 16] [--update-docs]
    make loadtest                  # the same, 60 s, and the numbers go to docs/reliability.md

Indexes the demo catalogue (real photos, the default backbone) into a temporary data
directory, then starts ``gunicorn "web:create_app()"`` from the project folder with
the documented defaults of ``gunicorn.conf.py`` (only the bind address is set: a free
port on 127.0.0.1; nothing leaves this machine). For ``--duration`` seconds:

- ``--clients`` reader threads each send requests back to back, mixing in equal parts
  ``POST /api/v1/search`` (a demo photo, randomly cropped, flipped and re-encoded),
  ``GET /api/v1/products/<sku>/similar`` and ``GET /api/v1/products/<sku>``;
- one writer, once a second, creates ``LOAD-<n>`` with a new photo (``PUT``, multipart)
  and deletes ``LOAD-<n-2>`` (``DELETE``).

Any error (an unexpected status, a refused connection, a malformed body) is counted.
Afterwards the catalogue must be exactly what the writer expects: the last two
``LOAD-*`` products present with their images indexed, every other one gone (404),
the vector store agreeing with the catalogue, and ``DATA_DIR/uploads`` holding exactly
the files of the products still there. Prints p50/p99 per request kind and
requests/s; exits 1 on any error or mismatch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.query_latency import free_port

REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO / "data" / "demo" / "catalogue.csv"
DOCS = REPO / "docs" / "reliability.md"
DOCS_BEGIN, DOCS_END = "<!-- loadtest:begin -->", "<!-- loadtest:end -->"
API_KEY = "loadtest-key"
READ_KINDS = ("search", "similar", "product")
KEPT = 2  # the writer deletes the product it created this many ticks before


@dataclass
class LoadReport:
    duration_s: float
    clients: int
    workers: int
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    created: int = 0
    deleted: int = 0

    def record(self, lock: threading.Lock, kind: str, started: float, problem: str | None) -> None:
        """One finished request: its latency, and its error if it had one."""
        elapsed = 1000 * (time.perf_counter() - started)
        with lock:
            self.latencies_ms.setdefault(kind, []).append(elapsed)
            if problem:
                self.errors.append(problem)
            elif kind == "put":
                self.created += 1
            elif kind == "delete":
                self.deleted += 1

    @property
    def ok(self) -> bool:
        return not self.errors and not self.mismatches

    def reads_per_second(self) -> float:
        return sum(len(self.latencies_ms.get(kind, [])) for kind in READ_KINDS) / self.duration_s

    def summary(self) -> dict:
        def percentiles(values: list[float]) -> dict:
            if not values:
                return {"count": 0}
            ordered = sorted(values)
            return {"count": len(values), "p50_ms": round(statistics.median(ordered), 1),
                    "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)}

        return {"duration_s": round(self.duration_s, 1), "clients": self.clients, "workers": self.workers,
                "reads_per_s": round(self.reads_per_second(), 1), "created": self.created, "deleted": self.deleted,
                "errors": len(self.errors), "mismatches": len(self.mismatches),
                "requests": {kind: percentiles(values) for kind, values in self.latencies_ms.items()}}


# --- HTTP -----------------------------------------------------------------------------------


def _multipart(fields: dict[str, str], photo: bytes | None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
             for name, value in fields.items()]
    if photo is not None:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\n"
                     "Content-Type: image/jpeg\r\n\r\n".encode() + photo + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, *, body: bytes | None = None, content_type: str | None = None,
                auth: bool = False) -> tuple[int, dict]:
        headers = {"Content-Type": content_type} if content_type else {}
        if auth:
            headers["Authorization"] = f"Bearer {API_KEY}"
        request = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                return error.code, json.loads(payload)
            except ValueError:
                return error.code, {"raw": payload[:200].decode(errors="replace")}


# --- load ---------------------------------------------------------------------------------


class Photos:
    """Variations of the demo photos: each request sends different bytes."""

    def __init__(self, folder: Path):
        from PIL import Image

        self.images = [Image.open(path).convert("RGB") for path in sorted(folder.iterdir())
                       if path.suffix.lower() in (".jpg", ".jpeg", ".png")]

    def variant(self, rng: random.Random) -> bytes:
        from PIL import ImageOps

        image = rng.choice(self.images)
        width, height = image.size
        left, top = rng.randint(0, width // 8), rng.randint(0, height // 8)
        crop = image.crop((left, top, width - rng.randint(0, width // 8), height - rng.randint(0, height // 8)))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=rng.randint(70, 92))
        return buffer.getvalue()


def _reader(client: Client, skus: list[str], photos: Photos, stop: threading.Event, seed: int,
            report: LoadReport, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        kind = rng.choice(READ_KINDS)
        sku = rng.choice(skus)
        started = time.perf_counter()
        try:
            if kind == "search":
                body, content_type = _multipart({"top_k": "10"}, photos.variant(rng))
                status, payload = client.request("POST", "/api/v1/search", body=body, content_type=content_type)
                good = status == 200 and len(payload.get("results", [])) == 10
            elif kind == "similar":
                status, payload = client.request("GET", f"/api/v1/products/{sku}/similar?top_k=5")
                good = status == 200 and payload.get("results") and all(r["sku"] != sku for r in payload["results"])
            else:
                status, payload = client.request("GET", f"/api/v1/products/{sku}")
                good = status == 200 and payload.get("sku") == sku
            problem = None if good else f"{kind} {sku}: {status} {str(payload)[:200]}"
        except Exception as exc:  # a refused or reset connection is an error like any other
            problem = f"{kind} {sku}: {type(exc).__name__}: {exc}"
        report.record(lock, kind, started, problem)


def _writer(client: Client, photos: Photos, stop: threading.Event, report: LoadReport,
            lock: threading.Lock) -> list[str]:
    """Once a second: PUT LOAD-n with a new photo, DELETE LOAD-(n-KEPT). Returns the SKUs created."""
    rng = random.Random(7)
    created: list[str] = []
    tick = time.monotonic()
    while not stop.is_set():
        sku = f"LOAD-{len(created)}"
        body, content_type = _multipart({"title": f"Load test {len(created)}", "category": "Load",
                                         "price": f"{rng.randint(1, 99)}.00"}, photos.variant(rng))
        actions = [("put", "PUT", sku, body, content_type, 201)]
        if len(created) >= KEPT:
            actions.append(("delete", "DELETE", created[-KEPT], None, None, 200))
        for kind, method, target, payload_body, payload_type, expected in actions:
            started = time.perf_counter()
            try:
                status, payload = client.request(method, f"/api/v1/products/{target}", body=payload_body,
                                                 content_type=payload_type, auth=True)
                problem = None if status == expected else f"{kind} {target}: {status} {str(payload)[:200]}"
                if kind == "put" and not problem and payload["indexing"]["failures"]:
                    problem = f"put {target}: {payload['indexing']['failures']}"
            except Exception as exc:
                problem = f"{kind} {target}: {type(exc).__name__}: {exc}"
            report.record(lock, kind, started, problem)
        created.append(sku)
        tick += 1.0
        stop.wait(max(0.0, tick - time.monotonic()))
    return created


def check_final_state(client: Client, data_dir: Path, created: list[str], report: LoadReport) -> None:
    """The catalogue, the vector store and the uploads are exactly what the writer expects."""
    from visualsearch.service import VisualSearch
    from visualsearch.settings import Settings

    kept = set(created[-KEPT:])
    for sku in created:
        status, payload = client.request("GET", f"/api/v1/products/{sku}")
        if sku in kept:
            statuses = [image["status"] for image in payload.get("images", [])]
            if status != 200 or statuses != ["indexed"]:
                report.mismatches.append(f"{sku} should be there with one indexed image: {status} {statuses}")
        elif status != 404:
            report.mismatches.append(f"{sku} was deleted but answers {status}")
    vs = VisualSearch(Settings(data_dir=data_dir), read_only=True)
    stats = vs.stats()
    demo_products = sum(1 for _ in _demo_skus())
    if stats["products"] != demo_products + len(kept):
        report.mismatches.append(f"{stats['products']} products, expected {demo_products + len(kept)}")
    if not stats["index"]["up_to_date"] or stats["pending_images"] or stats["failed_images"]:
        report.mismatches.append(f"catalogue and vector store disagree: {stats}")
    uploads = {path.name for path in (data_dir / "uploads").glob("*") if not path.name.startswith(".")}
    referenced = set()
    for sku in kept:
        for image in vs.product(sku).images:
            path = vs.image_file(image.id)
            if path is not None:
                referenced.add(path.name)
    if uploads != referenced:
        report.mismatches.append(f"uploads {sorted(uploads)} != files of the kept products {sorted(referenced)}")


def _demo_skus() -> list[str]:
    import csv

    with open(DEMO_MANIFEST, newline="") as handle:
        return sorted({row["sku"] for row in csv.DictReader(handle)})


def _wait_until_up(client: Client, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError("gunicorn exited while starting")
        try:
            status, _ = client.request("GET", "/api/v1/health")
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn did not answer within {timeout:.0f} s")
        time.sleep(0.3)


def _warm_up(client: Client, photos: Photos, workers: int) -> None:
    """Each worker loads the CNN on its first search: do that before the clock starts."""
    rng = random.Random(0)
    bodies = [_multipart({}, photos.variant(rng)) for _ in range(workers * 3)]
    threads = [threading.Thread(target=client.request, args=("POST", "/api/v1/search"),
                                kwargs={"body": body, "content_type": content_type})
               for body, content_type in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_load(data_dir: Path, *, duration: float, clients: int, log: Path) -> LoadReport:
    """Serve ``data_dir`` (an indexed demo catalogue) with gunicorn, its log going to
    ``log``, and load it; see the module doc."""
    port = free_port()
    env = {**os.environ, "VISUALSEARCH_DATA_DIR": str(data_dir), "VISUALSEARCH_API_KEY": API_KEY}
    for name in ("VISUALSEARCH_THREADS", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)  # the documented defaults, not this shell's
    log_handle = open(log, "w")
    gunicorn = Path(sys.executable).with_name("gunicorn")
    server = subprocess.Popen([str(gunicorn), "-b", f"127.0.0.1:{port}", "web:create_app()"], cwd=REPO, env=env,
                              stdout=log_handle, stderr=log_handle)
    client = Client(port)
    photos = Photos(REPO / "data" / "demo" / "images")
    try:
        _wait_until_up(client, server)
        workers = len(re.findall(r"Booting worker", log.read_text()))
        _warm_up(client, photos, max(workers, 2))
        report = LoadReport(duration_s=duration, clients=clients, workers=workers)
        stop, lock = threading.Event(), threading.Lock()
        skus = _demo_skus()
        readers = [threading.Thread(target=_reader, args=(client, skus, photos, stop, seed, report, lock))
                   for seed in range(clients)]
        created: list[str] = []
        writer = threading.Thread(target=lambda: created.extend(_writer(client, photos, stop, report, lock)))
        started = time.monotonic()
        for thread in (*readers, writer):
            thread.start()
        time.sleep(duration)
        stop.set()
        for thread in (*readers, writer):
            thread.join()
        report.duration_s = time.monotonic() - started
        check_final_state(client, data_dir, created, report)
        if server.poll() is not None:
            report.errors.append(f"gunicorn exited with status {server.returncode} during the test")
        return report
    finally:
        server.terminate()
        server.wait(60)
        log_handle.close()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (f"{len(os.sched_getaffinity(0))} cores ({cpu}), {memory:.0f} GB RAM, no GPU, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def markdown(report: LoadReport) -> str:
    summary = report.summary()
    lines = [DOCS_BEGIN,
             f"Measured {time.strftime('%Y-%m-%d')} with `make loadtest` on {machine()}. "
             f"Server: `gunicorn \"web:create_app()\"` with `gunicorn.conf.py`'s defaults "
             f"({summary['workers']} sync workers, CNN threads = cores / workers); the {report.clients} "
             "client threads and the writer ran on the same machine, sharing its cores.",
             "",
             f"{summary['duration_s']:.0f} s, {report.clients} readers + 1 writer: "
             f"**{summary['reads_per_s']:.1f} reads/s**, {summary['created']} products created and "
             f"{summary['deleted']} deleted, **{summary['errors']} errors**, "
             f"**{summary['mismatches']} mismatches** in the final catalogue.",
             "",
             "| request | count | p50 ms | p99 ms |",
             "|---|---:|---:|---:|"]
    for kind in (*READ_KINDS, "put", "delete"):
        entry = summary["requests"].get(kind, {"count": 0})
        if entry["count"]:
            lines.append(f"| {kind} | {entry['count']} | {entry['p50_ms']} | {entry['p99_ms']} |")
    lines.append(DOCS_END)
    return "\n".join(lines)


def update_docs(report: LoadReport) -> None:
    text = DOCS.read_text()
    start, end = text.index(DOCS_BEGIN), text.index(DOCS_END) + len(DOCS_END)
    DOCS.write_text(text[:start] + markdown(report) + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent reader threads (default 16)")
    parser.add_argument("--update-docs", action="store_true", help=f"write the results into {DOCS.name}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="visualsearch-loadtest-") as tmp:
        data_dir = Path(tmp) / "data"
        print("indexing the demo catalogue ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "indexer.cli", "index", str(DEMO_MANIFEST), "--data-dir", str(data_dir)],
                       cwd=REPO, check=True, capture_output=True)
        print(f"serving it with gunicorn; {args.clients} readers + 1 writer for {args.duration:.0f} s ...",
              file=sys.stderr)
        report = run_load(data_dir, duration=args.duration, clients=args.clients, log=Path(tmp) / "gunicorn.log")
        if not report.ok:
            shutil.copy(Path(tmp) / "gunicorn.log", REPO / "loadtest-gunicorn.log")
    print(json.dumps(report.summary(), indent=2))
    for problem in (report.errors + report.mismatches)[:20]:
        print("  ", problem, file=sys.stderr)
    if args.update_docs:
        update_docs(report)
        print(f"wrote the results into {DOCS.relative_to(REPO)}", file=sys.stderr)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
