"""A throwaway PostgreSQL server for the tests, from the machine's own binaries.

Started once per pytest session (``initdb`` into a temporary folder, ``pg_ctl start``
listening on 127.0.0.1 only, on a free port, with its socket in that folder and
durability off for speed), stopped at the session's end. PostgreSQL refuses to run
as root, so under root (CI) its commands run as the ``postgres`` system user.

Each test gets a database of its own, copied from a template that already holds the
migrated catalogue schema, and dropped with its connections after it: create + drop
cost ~100 ms a test here. TRUNCATE of one shared database costs ~7 ms, but a test
would then inherit the last one's lingering pooled connections, advisory locks and
half-finished subprocess writers; ~60 tests make the difference ~6 s a run.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Every VisualSearch of every test opens a pool; closed ones linger until collected.
    "max_connections": "300",
    "shared_buffers": "32MB",
}
TEMPLATE = "vs_template"
SERVER_USER = "postgres"


def find_binaries() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One running server; :meth:`new_database` hands out fresh catalogue databases."""

    def __init__(self, binaries: Path):
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="vs-postgres-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._names = itertools.count(1)
        self._as_server_user: list[str] = []
        if os.geteuid() == 0:
            pwd.getpwnam(SERVER_USER)  # KeyError: no such user
            shutil.chown(self.root, SERVER_USER, SERVER_USER)
            self._as_server_user = ["runuser", "-u", SERVER_USER, "--"]

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self._as_server_user, str(self.binaries / tool), *args],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {result.stderr or result.stdout}\n{tail}")

    def _options(self) -> str:
        return " ".join([f"-p {self.port}", f"-k {self.root}",
                         *(f"-c {name}={value}" for name, value in SERVER_SETTINGS.items())])

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SERVER_USER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "-o", self._options(), "start")
        from visualsearch.catalogue import open_catalogue

        self._admin(f"CREATE DATABASE {TEMPLATE}")
        sessions = open_catalogue(self.url(TEMPLATE))  # the migrated schema every copy starts with
        sessions.kw["bind"].dispose()

    def halt(self) -> None:
        """Stop the server but keep its data (an outage); :meth:`resume` starts it again."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "-o", self._options(), "start")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SERVER_USER, dbname="postgres",
                             autocommit=True) as connection:
            for statement in statements:
                connection.execute(statement)

    def new_database(self, *, migrated: bool = True) -> str:
        """A fresh database's URL: holding an empty migrated catalogue, or nothing at all."""
        name = f"vs_test_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE if migrated else 'template0'}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop it, closing the connections that test's pools still hold."""
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
