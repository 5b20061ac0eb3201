"""End-to-end query latency at demo size against the model's own forward time.

    python -m benchmarks.query_latency [--requests 60]

Indexes the demo catalogue into a temporary data directory, measures the default
backbone's bare single-image forward pass in this process, then starts the
production server (``gunicorn "web:create_app()"``, one sync worker) and times
``POST /api/v1/search`` over HTTP (one request at a time, client-side wall time)
with the same photo. The two are measured one after
the other so they never share the cores. Prints both p50s and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO / "data" / "demo" / "catalogue.csv"


def bare_forward_ms(photo: Path, runs: int) -> float:
    from visualsearch.embedder import Embedder
    from visualsearch.images import load_image

    embedder = Embedder("efficientnet_lite0")
    image = load_image(photo, target_size=embedder.query_decode_size)
    for _ in range(5):
        embedder.embed_queries([image])
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        embedder.embed_queries([image])
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def post_search(port: int, photo: bytes) -> dict:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/search", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    photo_path = REPO / "data" / "demo" / "images" / sorted(p.name for p in (REPO / "data/demo/images").iterdir())[0]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "indexer.cli", "index", str(DEMO_MANIFEST), "--data-dir", str(data_dir)],
                       cwd=REPO, check=True, capture_output=True)
        forward = bare_forward_ms(photo_path, args.requests)
        port = free_port()
        env = {**os.environ, "VISUALSEARCH_DATA_DIR": str(data_dir)}
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}",
                                   "web:create_app()"], cwd=REPO, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            photo = photo_path.read_bytes()
            deadline = time.monotonic() + 60
            while True:
                try:
                    post_search(port, photo)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            for _ in range(5):
                post_search(port, photo)
            walls, embeds = [], []
            for _ in range(args.requests):
                started = time.perf_counter()
                body = post_search(port, photo)
                walls.append(time.perf_counter() - started)
                embeds.append(body["took_ms"]["embed"])
        finally:
            server.terminate()
            server.wait(30)
    end_to_end = 1000 * statistics.median(walls)
    print(f"bare forward (1 image)            p50 {forward:7.1f} ms")
    print(f"POST /api/v1/search, end to end   p50 {end_to_end:7.1f} ms   "
          f"(p95 {1000 * statistics.quantiles(walls, n=20)[-1]:.1f} ms; server embed step p50 "
          f"{statistics.median(embeds):.1f} ms)")
    print(f"ratio                                 {end_to_end / forward:7.2f} x")


if __name__ == "__main__":
    main()
