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
    ``milvus://127.0.0.1:PORT`` address (append ``/COLLECTION``) and stops it on exit."""
    pytest.importorskip("milvus_lite")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {process.returncode}: {process.stderr.read()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"milvus-lite server did not listen on port {port} within {START_TIMEOUT:.0f}s")
            time.sleep(0.05)
        yield f"milvus://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory) -> Iterator[str]:
    """One ``milvus-lite server`` for the session: its ``milvus://127.0.0.1:PORT`` address."""
    with start_milvus_server(tmp_path_factory.mktemp("milvus-server") / "data") as address:
        yield address
