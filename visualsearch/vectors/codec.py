"""The trained part of an ANN plan, shared by every segment encoded with it.

A codec holds an optional PCA reduction, the IVF coarse centroids, the code
parameters (SQ8 ranges, or nothing to train for RaBitQ) and, for plans with re-rank
codes (:mod:`.refine`), the ranges of those. All ANN segments of one codec
share the centroids, so a query is reduced and coarse-assigned once and then scans
each segment's inverted lists (``search_preassigned``); merging segments copies codes.

Lists are always assigned in the PCA space when there is one. SQ8 codes encode the
reduced vector; RaBitQ codes encode the full vector's offset from its list centre, the
PCA centroid mapped back to the full space (PCA's rows are orthonormal, so mapping it
back and reducing again gives the same point): assigning a 1,280-d vector to one of
4,096 full-dimension centroids would cost five times as much, in the write path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np

from ..durable import fsync_directory
from .planner import IndexPlan
from .refine import REFINE_SUFFIX, RefineScale

logger = logging.getLogger(__name__)

# The files of a codec (``codec-<id>`` + suffix) and of a segment's encoding by it
# (``seg-<uid>.<id>`` + suffix): inverted lists or IVF template, PCA, re-rank codes.
CODEC_SUFFIXES = (".ivf", ".pca", REFINE_SUFFIX)
# Bits per dimension of a RaBitQ query (FAISS's default is 4); the recalls in
# docs/performance.md were measured with 8.
RABITQ_QUERY_BITS = 8
# k-means points per centroid: the least FAISS accepts without a warning; more buys
# little for our use
# (re-ranking from exact vectors absorbs small centroid errors) and costs training time.
TRAIN_POINTS_PER_LIST = 39
MAX_TRAIN_POINTS = 39 * 4096
KMEANS_ITERATIONS = 10
# Rows assigned to lists per matrix product: 4,096 rows x 4,096 lists of float32 scores
# is 64 MB.
ASSIGN_BLOCK_ROWS = 4096


class Codec:
    """Trained PCA (optional) + IVF centroids + code parameters for one :class:`IndexPlan`."""

    def __init__(self, codec_id: str, plan: IndexPlan, template: faiss.IndexIVF,
                 pca: faiss.PCAMatrix | None, refiner: faiss.IndexScalarQuantizer | None = None):
        self.codec_id = codec_id
        self.plan = plan
        self.template = template  # trained, empty
        self.pca = pca
        # Re-rank codes (see .refine): a trained, empty SQ8 index holds their ranges.
        self.refiner = refiner
        self.refine_scale = RefineScale.from_trained(faiss.vector_to_array(refiner.sq.trained), plan.dim) \
            if refiner is not None else None
        if plan.rabitq_bits and pca is not None:
            # The template's quantizer holds the full-space centres the codes are offsets
            # from; lists are assigned with the same centres in the PCA space.
            centres = self.template.quantizer.reconstruct_n(0, plan.nlist)
            self.quantizer = faiss.IndexFlatIP(plan.reduce_dim)
            self.quantizer.add(pca.apply(np.ascontiguousarray(centres)))
        else:
            self.quantizer = self.template.quantizer
        # Encoding reduces and assigns with numpy's BLAS: FAISS's own PCA apply and its
        # nearest-centroid search took 2.9 s per 20,000 1,280-d vectors on one thread
        # here, numpy 0.6 s (the 10M benchmark's re-plan at 5.1M: 15 -> 6.5 minutes).
        self._centres = self.quantizer.reconstruct_n(0, self.quantizer.ntotal)
        if pca is not None:
            self._pca_matrix = np.ascontiguousarray(
                faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in).T)
            self._pca_bias = faiss.vector_to_array(pca.b).astype(np.float32)

    @classmethod
    def train(cls, codec_id: str, plan: IndexPlan, sample: np.ndarray, *, seed: int = 1234) -> "Codec":
        """Train on ``sample`` (unit vectors; at most MAX_TRAIN_POINTS are used).

        Raises:
            ValueError: the plan is not an IVF plan, or the sample is too small.
        """
        if plan.kind != "ivf":
            raise ValueError(f"a codec needs an IVF plan, not {plan.kind!r}")
        wanted = min(MAX_TRAIN_POINTS, plan.nlist * TRAIN_POINTS_PER_LIST)
        if len(sample) > wanted:
            rng = np.random.default_rng(seed)
            sample = sample[np.sort(rng.choice(len(sample), wanted, replace=False))]
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if len(sample) < plan.nlist:
            raise ValueError(f"{len(sample)} training vectors for {plan.nlist} lists")
        with all_cores():
            return cls._train(codec_id, plan, sample, seed)

    @classmethod
    def _train(cls, codec_id: str, plan: IndexPlan, sample: np.ndarray, seed: int) -> "Codec":
        pca = None
        reduced = sample
        if plan.reduce_dim:
            pca = faiss.PCAMatrix(plan.dim, plan.reduce_dim)
            pca.train(sample)
            reduced = pca.apply(sample)
        dim = reduced.shape[1]
        kmeans = faiss.Kmeans(dim, plan.nlist, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                              max_points_per_centroid=TRAIN_POINTS_PER_LIST * 4)
        kmeans.train(reduced)
        if plan.rabitq_bits:
            centres = kmeans.centroids
            if pca is not None:  # back to the full space: x = mean + A^T y
                rows = faiss.vector_to_array(pca.A).reshape(plan.reduce_dim, plan.dim)
                centres = (faiss.vector_to_array(pca.mean) + centres @ rows).astype(np.float32)
            quantizer = faiss.IndexFlatIP(plan.dim)
            quantizer.add(np.ascontiguousarray(centres))
            template = faiss.IndexIVFRaBitQ(quantizer, plan.dim, plan.nlist, faiss.METRIC_INNER_PRODUCT, True,
                                            plan.rabitq_bits)
            template.qb = RABITQ_QUERY_BITS
            template.train(sample)  # the quantizer is already trained: this only sets up the encoder
        else:
            quantizer = faiss.IndexFlatIP(dim)
            quantizer.add(kmeans.centroids)
            template = faiss.IndexIVFScalarQuantizer(quantizer, dim, plan.nlist, faiss.ScalarQuantizer.QT_8bit,
                                                     faiss.METRIC_INNER_PRODUCT)
            template.train(reduced)  # the quantizer is already trained: this learns the SQ ranges
        refiner = None
        if plan.refine:
            refiner = faiss.IndexScalarQuantizer(plan.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            refiner.train(sample)  # the per-dimension ranges of the re-rank codes
        return cls(codec_id, plan, template, pca, refiner)

    def reduce(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.pca is None:
            return vectors
        return np.ascontiguousarray(vectors @ self._pca_matrix + self._pca_bias, dtype=np.float32)

    def assign(self, reduced: np.ndarray) -> np.ndarray:
        """The list of each reduced vector: its nearest centroid by inner product."""
        lists = np.empty(len(reduced), dtype=np.int64)
        for start in range(0, len(reduced), ASSIGN_BLOCK_ROWS):  # bounds the score block's memory
            block = reduced[start:start + ASSIGN_BLOCK_ROWS]
            lists[start:start + len(block)] = np.argmax(block @ self._centres.T, axis=1)
        return lists

    def scanned(self, vectors: np.ndarray, reduced: np.ndarray) -> np.ndarray:
        """What the codes compare queries with: the reduced vectors (SQ8 of PCA) or the
        vectors themselves (RaBitQ codes keep every dimension)."""
        return np.ascontiguousarray(vectors, dtype=np.float32) if self.plan.rabitq_bits else reduced

    def refine_codes(self, vectors: np.ndarray) -> np.ndarray:
        """The (n, dim) uint8 re-rank codes of ``vectors`` (see .refine); the plan must have them."""
        if self.refiner is None:
            raise ValueError(f"codec {self.codec_id} has no re-rank codes")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not len(vectors):
            return np.zeros((0, self.plan.dim), dtype=np.uint8)
        return self.refiner.sq.compute_codes(vectors)

    def encode(self, vectors: np.ndarray) -> faiss.IndexIVF:
        """A new IVF index of ``vectors``, labelled with their row numbers 0..n-1."""
        index = faiss.clone_index(self.template)
        if len(vectors):
            self.add(index, vectors, 0)
        return index

    def add(self, index: faiss.IndexIVF, vectors: np.ndarray, first_row: int) -> None:
        """Encode ``vectors`` into ``index`` (built by this codec) as rows first_row, first_row + 1..."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not len(vectors):
            return
        reduced = self.reduce(vectors)
        lists = self.assign(reduced)
        scanned = np.ascontiguousarray(self.scanned(vectors, reduced))
        rows = np.arange(first_row, first_row + len(vectors), dtype=np.int64)
        # add_core takes the list numbers computed here, in the PCA space (the arrays must
        # stay referenced during the call: swig_ptr does not keep them alive).
        index.add_core(len(scanned), faiss.swig_ptr(scanned), faiss.swig_ptr(rows), faiss.swig_ptr(lists))

    def merge_lists(self, parts: Sequence[tuple[faiss.IndexIVF, np.ndarray]]) -> faiss.IndexIVF:
        """A new IVF index holding the codes of ``parts``, renumbered, without encoding again.

        Each part is (an index built by this codec, its new row number per old row, -1
        for rows to drop). Codes of one codec share its coarse centroids, so a code stays
        valid in the same list: a merge copies bytes instead of reducing and assigning
        every vector again (which cost as much as the rest of the write path at 10M)."""
        index = self.encode(np.zeros((0, self.plan.dim), np.float32))
        target, code_size, total = index.invlists, index.code_size, 0
        for source_index, new_rows in parts:
            source = source_index.invlists
            for list_no in range(source.nlist):
                size = source.list_size(list_no)
                if not size:
                    continue
                ids_ptr, codes_ptr = source.get_ids(list_no), source.get_codes(list_no)
                try:
                    renumbered = new_rows[faiss.rev_swig_ptr(ids_ptr, size)]
                    keep = renumbered >= 0
                    kept = int(np.count_nonzero(keep))
                    if not kept:
                        continue
                    codes = faiss.rev_swig_ptr(codes_ptr, size * code_size).reshape(size, code_size)
                    ids = np.ascontiguousarray(renumbered[keep], dtype=np.int64)
                    codes = np.ascontiguousarray(codes[keep])
                finally:
                    source.release_ids(list_no, ids_ptr)
                    source.release_codes(list_no, codes_ptr)
                target.add_entries(list_no, kept, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
                total += kept
        index.ntotal = total
        return index

    def coarse(self, reduced_queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, list numbers) of the ``nprobe`` lists nearest each query."""
        nprobe = max(1, min(nprobe, self.plan.nlist))
        return self.quantizer.search(reduced_queries, nprobe)

    # --- files ------------------------------------------------------------------

    def save(self, directory: Path) -> list[str]:
        """Write the codec's files into ``directory``; returns their names."""
        names = [f"codec-{self.codec_id}.ivf"]
        _write_atomic(lambda writer: faiss.write_index(self.template, writer), directory / names[0])
        if self.pca is not None:
            names.append(f"codec-{self.codec_id}.pca")
            _write_atomic(lambda writer: faiss.write_VectorTransform(self.pca, writer), directory / names[-1])
        if self.refiner is not None:
            names.append(f"codec-{self.codec_id}{REFINE_SUFFIX}")
            _write_atomic(lambda writer: faiss.write_index(self.refiner, writer), directory / names[-1])
        return names

    @classmethod
    def load(cls, directory: Path, codec_id: str, plan: IndexPlan) -> "Codec":
        """Raises RuntimeError (from FAISS) when a file is missing or damaged."""
        template = faiss.read_index(str(directory / f"codec-{codec_id}.ivf"))
        if plan.rabitq_bits:
            template.qb = RABITQ_QUERY_BITS
        pca = None
        if plan.reduce_dim:
            pca = faiss.read_VectorTransform(str(directory / f"codec-{codec_id}.pca"))
        refiner = faiss.read_index(str(directory / f"codec-{codec_id}{REFINE_SUFFIX}")) if plan.refine else None
        # FAISS's Python readers return the concrete class already; downcasting again would
        # make a second, non-owning proxy while the owning one is freed with the index.
        return cls(codec_id, plan, template, pca, refiner)


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    """FAISS's OpenMP threads on every core for batch work (training, re-encoding a
    whole catalogue); searches run on one (see ``store.configure_threads``)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _write_atomic(write, path: Path) -> None:
    """``write(faiss_writer)`` into a temporary file, fsync, rename into place.

    FAISS writes through Python's file object rather than its own FILE*: a full disk or
    a read-only mount then raises OSError with its errno (FAISS's own writer raises a
    RuntimeError, and an error at fclose would go unnoticed).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(faiss.PyCallbackIOWriter(handle.write))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_ann(index: faiss.IndexIVF, path: Path) -> None:
    """Save a segment's inverted lists (read back memory-mapped by :func:`read_ann`)."""
    _write_atomic(lambda writer: faiss.write_index(index, writer), path)


def read_ann(path: Path) -> faiss.IndexIVF:
    # IO_FLAG_MMAP_IFC maps the inverted lists: every server worker shares the pages.
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)


def search_segment(index: faiss.IndexIVF, scanned: np.ndarray, coarse: tuple[np.ndarray, np.ndarray], k: int,
                   allowed_bitmap: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` (approximate scores, row numbers) of one segment for preassigned queries
    (``scanned``: the queries as :meth:`Codec.scanned` gives them).

    ``allowed_bitmap`` (little-endian packed bits over the segment's rows) restricts
    the rows considered: dead rows and rows a filter excludes never take a slot.
    """
    distances, lists = coarse
    n = len(scanned)
    k = max(1, min(k, index.ntotal))
    scores = np.empty((n, k), dtype=np.float32)
    rows = np.empty((n, k), dtype=np.int64)
    if isinstance(index, faiss.IndexIVFRaBitQ):
        params = faiss.IVFRaBitQSearchParameters()
        params.nprobe, params.qb = lists.shape[1], RABITQ_QUERY_BITS
    else:
        params = faiss.SearchParametersIVF(nprobe=lists.shape[1])
    selector = None
    if allowed_bitmap is not None:
        selector = faiss.IDSelectorBitmap(allowed_bitmap)
        params.sel = selector
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    distances = np.ascontiguousarray(distances, dtype=np.float32)
    scanned = np.ascontiguousarray(scanned, dtype=np.float32)
    # The Python wrapper of search_preassigned refuses search parameters; the C++
    # method takes them (the selector must outlive the call: ``selector`` holds it).
    index.search_preassigned_c(n, faiss.swig_ptr(scanned), k, faiss.swig_ptr(lists), faiss.swig_ptr(distances),
                               faiss.swig_ptr(scores), faiss.swig_ptr(rows), False, params)
    del selector
    return scores, rows
