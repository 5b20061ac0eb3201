"""An ``flock`` with a deadline: how the writers of one machine take turns.

Used by the FAISS store's commit lock, a Milvus store's default commit lock and an
SQLite catalogue's locks; writers on several hosts need the catalogue's advisory locks
instead (:mod:`visualsearch.catalogue.locks`).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path
from typing import Iterator

from .errors import WriterBusyError

# A waiting writer polls from this often, backing off to MAX_POLL_SECONDS: an API write
# queued behind another's short commit starts milliseconds after it, not a poll later.
FIRST_POLL_SECONDS = 0.005
MAX_POLL_SECONDS = 0.1


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, busy_message: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    Raises:
        WriterBusyError: (with ``busy_message``) another holder kept it for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    delay = FIRST_POLL_SECONDS
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WriterBusyError(busy_message) from None
                time.sleep(delay)
                delay = min(delay * 2, MAX_POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
