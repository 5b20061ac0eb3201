"""Production defaults for ``gunicorn "web:create_app()"``, read from the working directory.

Command-line flags (``-w 8``, ``-b 0.0.0.0:8000``) and ``GUNICORN_CMD_ARGS`` override them.
What they fix:

- CPU: a worker lets PyTorch use every core, so N workers ran N threads per core (two
  workers on two cores: 0.6 requests/s instead of 17.6). Each worker gets its share,
  ``VISUALSEARCH_THREADS = cores // workers`` (at least 1), unless that variable is set.
- Metrics: each worker counts only its own requests, so ``/metrics`` alternated between
  workers. prometheus_client's multiprocess mode sums them through files in
  ``PROMETHEUS_MULTIPROC_DIR``: a fresh temporary one unless that variable is set.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import tempfile

THREADS_ENV = "VISUALSEARCH_THREADS"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Names the directory this file created, so that only that one is ever deleted.
_OWN_METRICS_DIR_ENV = "_VISUALSEARCH_METRICS_TMPDIR"
# One worker per core up to this many: each worker takes ~550 MB with the default backbone
# (~240 MB with --preload), so bigger machines give the rest of their cores to threads.
MAX_DEFAULT_WORKERS = 8


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return min(cores, max(1, math.floor(quota))) if quota else cores


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (``docker --cpus``, a Kubernetes limit), None when unlimited."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            with open(f"/sys/fs/cgroup/{quota_file}") as handle:
                quota, *period = handle.read().split()  # v2: "max 100000" or "200000 100000"
            if period_file:
                with open(f"/sys/fs/cgroup/{period_file}") as handle:
                    period = handle.read().split()
        except OSError:
            continue
        try:
            return int(quota) / int(period[0]) if int(quota) > 0 else None
        except (ValueError, IndexError):  # "max": no limit
            return None
    return None


def default_workers(cores: int) -> int:
    """One sync worker per core (at least 2, so one slow request never stalls the site), at most 8."""
    return max(2, min(cores, MAX_DEFAULT_WORKERS))


def cnn_threads(cores: int, workers: int) -> int:
    """Each worker's share of the cores, so that workers x threads <= cores (at least 1)."""
    return max(1, cores // max(1, workers))


# --- server -----------------------------------------------------------------------------

# gunicorn's own default: loopback, or all interfaces on $PORT (platforms that set it).
bind = [f"0.0.0.0:{os.environ['PORT']}"] if os.environ.get("PORT") else ["127.0.0.1:8000"]
workers = int(os.environ.get("WEB_CONCURRENCY") or default_workers(available_cores()))
# Sync workers serve in the process's main thread, where PyTorch's thread pool is ~2x
# faster than in any other thread (docs/performance.md); more threads (gthread) lose that.
worker_class = "sync"
threads = 1
# A search takes tens of milliseconds and the first one loads the CNN in about a second;
# a worker silent for 30 s is stuck and gets replaced.
timeout = 30
graceful_timeout = 30
# The heartbeat file on a disk-backed /tmp (some containers) can block a worker.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# preload_app stays gunicorn's default (off), so that HUP reloads the code; --preload
# shares the imported libraries between workers instead (~550 -> ~240 MB each).

# Must be set before any process imports prometheus_client, which picks its mode then:
# here, at configuration time, before the master (with --preload) or a worker loads the app.
if not os.environ.get(METRICS_DIR_ENV):
    os.environ[METRICS_DIR_ENV] = os.environ[_OWN_METRICS_DIR_ENV] = tempfile.mkdtemp(
        prefix="visualsearch-metrics-")
os.makedirs(os.environ[METRICS_DIR_ENV], exist_ok=True)  # a user's: prometheus_client needs it to exist


# --- hooks --------------------------------------------------------------------------------

def on_starting(server):
    directory = os.environ[METRICS_DIR_ENV]
    os.makedirs(directory, exist_ok=True)  # `-e PROMETHEUS_MULTIPROC_DIR=...` is only set by now
    if os.environ.get(_OWN_METRICS_DIR_ENV) != directory and glob.glob(os.path.join(directory, "*.db")):
        server.log.warning("%s=%s holds metrics of an earlier run, which will be counted: "
                           "empty it before starting the server", METRICS_DIR_ENV, directory)
    server.log.info("metrics of all workers are summed through %s", directory)


def when_ready(server):
    if server.cfg.preload_app:
        # The master loaded the app, so it has a "worker" gauge file; it serves nothing.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


def post_fork(server, worker):
    # Runs in the new worker before it loads the app, whose settings then read the share.
    if not os.environ.get(THREADS_ENV):
        cores = available_cores()
        os.environ[THREADS_ENV] = str(cnn_threads(cores, server.num_workers))
        worker.cnn_threads_source = f"{cores} cores / {server.num_workers} workers"
    else:
        worker.cnn_threads_source = f"{THREADS_ENV} set by the user"


def post_worker_init(worker):
    # The app is loaded: apply the setting now rather than when the CNN loads on the first
    # search, so the count is right from the start (and with --preload, whose settings were
    # read in the master).
    import torch

    from visualsearch.settings import Settings
    from web.metrics import record_cnn_threads

    torch.set_num_threads(Settings.from_env().threads)
    record_cnn_threads()
    worker.log.info("worker %s: %d CNN threads (%s)", worker.pid, torch.get_num_threads(),
                    getattr(worker, "cnn_threads_source", "?"))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    directory = os.environ.get(METRICS_DIR_ENV)
    # After a USR2 upgrade (reexec_pid set) the new master goes on using the directory.
    if directory and os.environ.get(_OWN_METRICS_DIR_ENV) == directory and not server.reexec_pid:
        shutil.rmtree(directory, ignore_errors=True)
