"""The short CI version of ``make loadtest``: real gunicorn, 16 readers and a writer, then
an exact check of the catalogue, the vector store and the uploads (benchmarks/loadtest.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from benchmarks.loadtest import READ_KINDS, run_load

pytestmark = pytest.mark.skipif(not Path(sys.executable).with_name("gunicorn").exists(),
                                reason="gunicorn is not installed (extra 'serve')")


def test_readers_and_writer_under_gunicorn_make_no_error_and_an_exact_catalogue(demo_settings, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(demo_settings.data_dir, data_dir)  # the load test writes; other tests share the original
    report = run_load(data_dir, duration=12, clients=16, log=tmp_path / "gunicorn.log")
    assert report.errors == [] and report.mismatches == [], (report.errors + report.mismatches)[:10]
    assert report.workers >= 2  # gunicorn.conf.py's default, not a single process
    assert report.created >= 10 and report.deleted == report.created - 2
    assert all(report.latencies_ms.get(kind) for kind in READ_KINDS)
