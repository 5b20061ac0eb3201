"""A real Milvus gRPC server for tests: ``milvus-lite server`` in its own process.

Milvus Lite opens a ``.db`` in one process only (it locks the folder), so replicas in
several processes need a server; this one speaks the Milvus protocol on 127.0.0.1.
Use the ``milvus_server`` fixture (import it into a test module), or
:func:`start_milvus_server` directly.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def start_milvus_server(data_dir: Path) -> Iterator[str]:
    """Run ``milvus-lite server`` on a free port of 127.0.0.1 with ``data_dir``; yields its
    ``milvus://127.0.0.1:PORT`` address (append ``/COLLECTION``) and stops it on exit.

    Its output goes to ``server.log`` beside ``data_dir`` (a pipe nobody reads would fill
    up and block the server mid-session)."""
    pytest.importorskip("milvus_lite")
    port = free_port()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {process.returncode}: {_tail(log_path)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"milvus-lite server did not listen on port {port} within {START_TIMEOUT:.0f}s: "
                                   f"{_tail(log_path)}")
            time.sleep(0.05)
        yield f"milvus://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log_path: Path, size: int = 4096) -> str:
    """The end of the server's log (for an error message)."""
    with open(log_path, "rb") as log:
        log.seek(max(0, log_path.stat().st_size - size))
        return log.read().decode(errors="replace")


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory) -> Iterator[str]:
    """One ``milvus-lite server`` for the session: its ``milvus://127.0.0.1:PORT`` address."""
    with start_milvus_server(tmp_path_factory.mktemp("milvus-server") / "data") as address:
        yield address
