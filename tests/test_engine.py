"""Engine: a reader stays consistent with the catalogue while writers come, go and crash."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
from visualsearch.engine import Engine
from visualsearch.vector_index import MANIFEST_NAME

from visualsearch.indexing import index_manifest
from visualsearch.search import search_image

from .conftest import Crash, CrashAfterFirstBatch, make_image, write_catalogue


def _crash_after_first_batch(settings, manifest):
    with pytest.raises(Crash):
        index_manifest(Engine(settings), manifest, progress=CrashAfterFirstBatch(settings.batch_size))


def test_a_running_reader_notices_a_writer_that_died_before_saving(tiny_settings, small_catalogue, tmp_path):
    index_manifest(Engine(tiny_settings), small_catalogue)
    reader = Engine(tiny_settings, read_only=True)
    assert reader.index().count == 24
    folder = tmp_path / "more"
    folder.mkdir()
    rows = [{"sku": f"N{i}", "image": make_image(folder / f"{i}.png", seed=500 + i).name} for i in range(10)]
    _crash_after_first_batch(tiny_settings, write_catalogue(folder, rows))
    # The writer committed 8 images and died: no new index file, but the reader rebuilds.
    assert reader.index().count == 32
    assert search_image(reader, folder / "3.png", top_k=1).hits[0].sku == "N3"


def _remove(settings, skus):
    Engine(settings).remove(skus)


def test_a_reader_reloads_after_another_process_saves(tiny_settings, small_catalogue):
    index_manifest(Engine(tiny_settings), small_catalogue)
    reader = Engine(tiny_settings, read_only=True)
    assert reader.index().count == 24 and reader.index().read_only  # memory-mapped
    process = multiprocessing.get_context("spawn").Process(target=_remove, args=(tiny_settings, ["P0", "P1"]))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert reader.index().count == 20


def test_a_corrupt_manifest_is_rebuilt_from_the_catalogue(tiny_settings, small_catalogue):
    index_manifest(Engine(tiny_settings), small_catalogue)
    (tiny_settings.data_dir / MANIFEST_NAME).write_text("{")
    reader = Engine(tiny_settings, read_only=True)
    assert reader.index().count == 24
    writer = Engine(tiny_settings)
    assert writer.index().count == 24
    assert writer.manifest() is not None and writer.manifest().count == 24  # saved again
    scores, ids = writer.index().search(np.ones((1, 32), np.float32) / np.sqrt(32), 3)
    assert len(ids[0]) == 3
