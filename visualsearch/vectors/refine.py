"""Re-rank codes: every dimension of a vector in 8 bits, ranked between the ANN codes and
the exact vectors.

An ANN search over 1-bit RaBitQ codes needs a few hundred candidates re-ranked exactly
for recall@10 >= 0.95 at 10M images, and the exact float32 vectors (51 GB at 10M x
1,280 dimensions) no longer fit in the page cache: most of those rows are disk reads,
and the disk serves a few thousand a second. Plans for catalogues that big
(:data:`.planner.REFINE_ABOVE_BYTES`) also keep each vector as 8-bit scalar-quantized
codes of every dimension (FAISS's ``QT_8bit``, ranges trained per dimension with the
codec), a quarter of the bytes (12.8 GB at 10M), which the page cache holds. The
candidates are ranked again on these codes (an error of about 1e-3 in the score of a
unit vector) and only the best few are read exactly: tens of disk reads per query
instead of hundreds.

A segment's codes are derived data like its inverted lists: ``seg-<uid>.<codec>.sq8``,
written when the segment is encoded, copied row by row when segments merge (the
ranges belong to the codec, so a code stays valid), replaced by a re-plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arrayfile import ArrayFileBuilder, ArrayFileError, read_array_file
from .row_reads import RowReader

REFINE_SUFFIX = ".sq8"
# Exact rows read per query after ranking on the re-rank codes: at least this many, and
# at least REFINED_ROWS_PER_HIT per result asked for. A score error of ~1e-3 reorders
# near ties only: at 10M images recall@10 stayed 0.963-1.000 with this cut
# (`python -m benchmarks.scale --size 10M`, docs/performance.md).
MIN_REFINED_ROWS = 40
REFINED_ROWS_PER_HIT = 2


def refined_depth(k: int) -> int:
    """How many candidates ranked on the re-rank codes are read exactly, for ``k`` results."""
    return max(MIN_REFINED_ROWS, REFINED_ROWS_PER_HIT * k)


@dataclass(frozen=True)
class RefineScale:
    """The per-dimension ranges of FAISS's 8-bit scalar quantizer (non-uniform ``QT_8bit``):
    a code ``c`` of dimension ``i`` stands for ``vmin[i] + (c + 0.5) / 255 * vdiff[i]``."""

    vmin: np.ndarray
    vdiff: np.ndarray

    @classmethod
    def from_trained(cls, trained: np.ndarray, dim: int) -> "RefineScale":
        """From ``ScalarQuantizer.trained`` (vmin of every dimension, then vdiff)."""
        trained = np.asarray(trained, dtype=np.float32)
        return cls(trained[:dim].copy(), trained[dim:2 * dim].copy())

    def scores(self, codes: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Inner products of ``query`` with the vectors the (n, dim) uint8 ``codes`` stand for,
        without decoding them: q . x = sum q_i vdiff_i / 255 * c_i + q . (vmin + vdiff / 510)."""
        weights = (query * (self.vdiff / 255.0)).astype(np.float32)
        offset = float(query @ (self.vmin + self.vdiff * (0.5 / 255.0)))
        return codes.astype(np.float32) @ weights + np.float32(offset)


class RefineCodes:
    """One segment's re-rank codes (memory-mapped, read by row with pread)."""

    def __init__(self, codes: np.ndarray, scale: RefineScale):
        self.codes = codes
        self.scale = scale
        self.reader = RowReader(codes)

    def __len__(self) -> int:
        return len(self.codes)

    @classmethod
    def load(cls, path: Path, scale: RefineScale) -> "RefineCodes":
        """Raises ArrayFileError or OSError for a missing or damaged file."""
        arrays, _ = read_array_file(path)
        if "codes" not in arrays:
            raise ArrayFileError(f"{path} holds no re-rank codes")
        return cls(arrays["codes"], scale)


def refine_file_builder(path: Path, rows: int, dim: int, meta: dict) -> ArrayFileBuilder:
    """A builder for a segment's codes (filled by the caller, then committed or aborted)."""
    return ArrayFileBuilder(path, {"codes": (np.uint8, (rows, dim))}, meta)
