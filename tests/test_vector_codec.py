"""The codec: numpy reduction and list assignment equal to FAISS's, and the RaBitQ path.

The store suite (test_vector_store.py) runs every store behaviour on an ``ivf_rabitq``
plan; these tests pin what makes that plan's codes right: each vector lands in the list
of its nearest PCA-space centre, its code is an offset from that same centre in the
full space (so its estimated score tracks the true one), and a codec read back from
disk encodes and scores exactly as the one that was trained.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from visualsearch.vectors.codec import Codec, search_segment
from visualsearch.vectors.planner import IndexPlan, rabitq_code_bytes

DIM, REDUCED, NLIST = 256, 32, 8


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, DIM)) * 3
    vectors = unit(centres[rng.integers(0, 20, 3000)] + rng.standard_normal((3000, DIM)))
    queries = unit(centres[rng.integers(0, 20, 20)] + rng.standard_normal((20, DIM)))
    return vectors, queries


@pytest.fixture(scope="module")
def codec(data) -> Codec:
    plan = IndexPlan(kind="ivf", dim=DIM, planned_for=3000, nlist=NLIST, reduce_dim=REDUCED, encoding="RaBitQ",
                     code_bytes=rabitq_code_bytes(DIM, 1))
    return Codec.train("00000001", plan, data[0])


def lists_of(index: faiss.IndexIVF) -> dict[int, int]:
    """row -> list number."""
    out = {}
    for list_no in range(index.nlist):
        size = index.invlists.list_size(list_no)
        if size:
            for row in faiss.rev_swig_ptr(index.invlists.get_ids(list_no), size).tolist():
                out[row] = list_no
    return out


@pytest.mark.parametrize("encoding", ["RaBitQ", "SQ8"])
def test_encoding_reduces_with_the_trained_pca_and_assigns_the_nearest_centre(data, encoding):
    # Encoding reduces and assigns with numpy rather than FAISS (four times faster); both
    # must give what FAISS's own PCA transform and nearest-centroid search give.
    vectors, _ = data
    plan = IndexPlan(kind="ivf", dim=DIM, planned_for=3000, nlist=NLIST, reduce_dim=REDUCED, encoding=encoding,
                     code_bytes=rabitq_code_bytes(DIM, 1) if encoding == "RaBitQ" else REDUCED)
    trained = Codec.train("00000002", plan, vectors)
    reduced = trained.reduce(vectors)
    np.testing.assert_allclose(reduced, trained.pca.apply(vectors), atol=1e-5)
    _, nearest = trained.quantizer.search(reduced, 1)
    assert np.array_equal(trained.assign(reduced), nearest[:, 0])


def test_rows_land_in_the_list_of_their_nearest_pca_space_centre(codec, data):
    vectors, _ = data
    index = codec.encode(vectors)
    assert isinstance(index, faiss.IndexIVFRaBitQ) and index.code_size == rabitq_code_bytes(DIM, 1)
    assert index.ntotal == len(vectors)
    _, nearest = codec.quantizer.search(codec.reduce(vectors), 1)
    assert lists_of(index) == dict(enumerate(nearest[:, 0].tolist()))


def test_the_full_space_centres_reduce_to_the_pca_space_ones(codec):
    full = codec.template.quantizer.reconstruct_n(0, NLIST)
    pca_space = codec.quantizer.reconstruct_n(0, NLIST)
    assert full.shape == (NLIST, DIM) and pca_space.shape == (NLIST, REDUCED)
    np.testing.assert_allclose(codec.pca.apply(full), pca_space, atol=1e-4)


def test_estimated_scores_track_the_exact_ones(codec, data):
    """Codes are offsets from the centre of the list the row is in: with any other centre
    the estimates would be noise."""
    vectors, queries = data
    index = codec.encode(vectors)
    reduced = codec.reduce(queries)
    scores, rows = search_segment(index, codec.scanned(queries, reduced), codec.coarse(reduced, NLIST), 200, None)
    exact = np.einsum("qd,qkd->qk", queries, vectors[rows])
    assert np.corrcoef(scores.ravel(), exact.ravel())[0, 1] > 0.9
    assert np.abs(scores - exact).mean() < 0.05


def test_a_saved_codec_encodes_and_scores_as_the_trained_one(codec, data, tmp_path):
    vectors, queries = data
    codec.save(tmp_path)
    loaded = Codec.load(tmp_path, codec.codec_id, codec.plan)
    original, reloaded = codec.encode(vectors), loaded.encode(vectors)
    assert lists_of(original) == lists_of(reloaded)
    reduced = codec.reduce(queries)
    scores, rows = search_segment(original, codec.scanned(queries, reduced), codec.coarse(reduced, 4), 50, None)
    scores_after, rows_after = search_segment(reloaded, loaded.scanned(queries, reduced), loaded.coarse(reduced, 4),
                                              50, None)
    np.testing.assert_array_equal(rows_after, rows)
    np.testing.assert_allclose(scores_after, scores, rtol=1e-6)


@pytest.fixture(scope="module")
def refining_codec(data) -> Codec:
    plan = IndexPlan(kind="ivf", dim=DIM, planned_for=3000, nlist=NLIST, reduce_dim=REDUCED, encoding="RaBitQ",
                     code_bytes=rabitq_code_bytes(DIM, 1), refine="SQ8")
    return Codec.train("00000002", plan, data[0])


def test_re_rank_codes_score_as_the_vectors_faiss_decodes_them_to(refining_codec, data, tmp_path):
    """The re-rank codes' scores (computed from the codes without decoding them) are the
    inner products with FAISS's own decoding, within float rounding, and within 1e-3 of
    the exact ones on average; a codec read back from disk encodes and scores the same."""
    vectors, queries = data
    codes = refining_codec.refine_codes(vectors)
    assert codes.shape == vectors.shape and codes.dtype == np.uint8
    decoded = refining_codec.refiner.sq.decode(codes)
    exact = queries @ vectors.T
    for query, truth in zip(queries, exact):
        scores = refining_codec.refine_scale.scores(codes, query)
        np.testing.assert_allclose(scores, decoded @ query, atol=1e-5)
        assert np.abs(scores - truth).mean() < 1e-3
    refining_codec.save(tmp_path)
    loaded = Codec.load(tmp_path, refining_codec.codec_id, refining_codec.plan)
    np.testing.assert_array_equal(loaded.refine_codes(vectors), codes)
    np.testing.assert_array_equal(loaded.refine_scale.vmin, refining_codec.refine_scale.vmin)
    np.testing.assert_array_equal(loaded.refine_scale.vdiff, refining_codec.refine_scale.vdiff)


def test_a_codec_without_re_rank_codes_refuses_to_make_them(codec, data):
    assert codec.refiner is None and codec.refine_scale is None
    with pytest.raises(ValueError, match="no re-rank codes"):
        codec.refine_codes(data[0][:2])
