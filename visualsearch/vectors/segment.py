"""Immutable segments: rows of vectors with their filter fields, plus deletes of older rows.

A segment is written once (``seg-<uid>.vseg``, and ``seg-<uid>.<codec>.ivf`` when its
rows are ANN-encoded, plus ``seg-<uid>.<codec>.sq8`` when the codec has re-rank codes)
and never modified. A row is an image: its id, its product's id,
its float32 unit vector (the durable copy the index is rebuilt from), its
product's price and its filter tokens. ``deletes`` lists ids whose rows in *older*
segments are dead from this segment on; a newer row with the same id replaces an
older one. Which rows are alive is the business of :mod:`.state`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from .arrayfile import ArrayFileBuilder, ArrayFileError, read_array_file, write_array_file
from .codec import Codec, read_ann, write_ann
from .filters import SearchFilters
from .refine import REFINE_SUFFIX, RefineCodes, RefineScale, refine_file_builder
from .row_reads import RowReader

SEGMENT_SUFFIX = ".vseg"
ANN_SUFFIX = ".ivf"
# Filter masks kept per segment (one byte per row each); segments never change, so
# a cached mask is valid for the segment's whole life.
TOKEN_MASK_CACHE = 32
# Rows copied at a time when merging segments (bounds the memory of a merge).
MERGE_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class VectorRows:
    """Rows to store: parallel arrays, tokens in CSR form (``token_offsets`` has n + 1 entries)."""

    ids: np.ndarray
    product_ids: np.ndarray
    vectors: np.ndarray
    prices: np.ndarray
    token_offsets: np.ndarray
    tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, *, ids: Sequence[int], product_ids: Sequence[int], vectors: np.ndarray,
              prices: Sequence[float | None], tokens: Sequence[Sequence[int]], dim: int) -> "VectorRows":
        """Raises ValueError when the arrays disagree in length or dimension."""
        ids_array = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim) if len(ids_array) else \
            np.zeros((0, dim), dtype=np.float32)
        if not (len(ids_array) == len(product_ids) == len(vectors) == len(prices) == len(tokens)):
            raise ValueError("ids, product ids, vectors, prices and tokens must have one entry per row")
        if len(np.unique(ids_array)) != len(ids_array):
            raise ValueError("the same id appears twice in one write")
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((tok for row in tokens for tok in row), dtype=np.int64, count=int(offsets[-1]))
        # float64: a float32 price loses cents above 2**17 and whole units above 2**24.
        price_array = np.array([np.nan if p is None else p for p in prices], dtype=np.float64)
        return cls(ids_array, np.asarray(product_ids, dtype=np.int64).reshape(-1), vectors, price_array,
                   offsets, flat)

    @classmethod
    def empty(cls, dim: int) -> "VectorRows":
        return cls.build(ids=[], product_ids=[], vectors=np.zeros((0, dim), np.float32), prices=[], tokens=[],
                         dim=dim)

    def take(self, rows: np.ndarray) -> "VectorRows":
        """The rows at positions ``rows`` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.token_offsets[rows], self.token_offsets[rows + 1]
        lengths = ends - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Position j of the result reads tokens[start of its row + j - offset of its row].
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]), dtype=np.int64)
        flat = np.asarray(self.tokens)[gather]
        return VectorRows(np.asarray(self.ids[rows]), np.asarray(self.product_ids[rows]),
                          np.asarray(self.vectors[rows]), np.asarray(self.prices[rows]), offsets,
                          flat.astype(np.int64, copy=False))

    @staticmethod
    def concat(parts: Sequence["VectorRows"], dim: int) -> "VectorRows":
        parts = [part for part in parts if len(part)]
        if not parts:
            return VectorRows.empty(dim)
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for part in parts:
            offsets.append(part.token_offsets[1:] + base)
            base += int(part.token_offsets[-1])
        return VectorRows(
            np.concatenate([p.ids for p in parts]), np.concatenate([p.product_ids for p in parts]),
            np.concatenate([p.vectors for p in parts]), np.concatenate([p.prices for p in parts]),
            np.concatenate(offsets), np.concatenate([p.tokens for p in parts]),
        )


class Segment:
    """A loaded (memory-mapped) segment. Thread-safe for searches.

    Its rows never change; its ANN encoding (``ann``, in ``seg-<uid>.<codec>.ivf``) is
    derived data that a re-plan replaces, so the manifest, not the segment file,
    says which encoding is current.
    """

    def __init__(self, uid: int, rows: VectorRows, deletes: np.ndarray, meta: dict, *,
                 ann: faiss.IndexIVF | None = None, codec_id: str | None = None,
                 refine: RefineCodes | None = None):
        self.uid = uid
        self.rows = rows
        self.deletes = deletes
        self.meta = meta
        self.ann = ann
        self.codec_id = codec_id if ann is not None else None
        self.refine = refine if ann is not None else None  # re-rank codes, when the codec has them
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._masks_lock = threading.Lock()
        self._vectors = RowReader(rows.vectors)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def name(self) -> str:
        return segment_name(self.uid)

    @property
    def ann_file(self) -> str | None:
        return ann_file_name(self.uid, self.codec_id) if self.codec_id else None

    @property
    def refine_file(self) -> str | None:
        return refine_file_name(self.uid, self.codec_id) if self.refine is not None else None

    def file_names(self) -> list[str]:
        return [self.name + SEGMENT_SUFFIX] + [name for name in (self.ann_file, self.refine_file) if name]

    # --- writing and reading ---------------------------------------------------------

    @classmethod
    def write(cls, directory: Path, uid: int, rows: VectorRows, *, deletes: Sequence[int] = (),
              codec: Codec | None = None) -> "Segment":
        """Write a new segment (ANN-encoded with ``codec`` when given) and return it loaded."""
        deletes_array = np.unique(np.asarray(deletes, dtype=np.int64))
        meta = {"uid": uid, "rows": len(rows), "deletes": len(deletes_array), "merged_from": []}
        arrays = {"ids": rows.ids, "product_ids": rows.product_ids, "vectors": rows.vectors,
                  "prices": rows.prices, "token_offsets": rows.token_offsets, "tokens": rows.tokens,
                  "deletes": deletes_array}
        path = directory / (segment_name(uid) + SEGMENT_SUFFIX)
        write_array_file(path, arrays, meta)
        segment = cls.load(directory, uid)
        if codec is None or not len(rows):
            return segment
        try:
            return segment.encoded(directory, codec)
        except BaseException:
            # Not committed: nothing may keep them.
            for name in (path.name, ann_file_name(uid, codec.codec_id), refine_file_name(uid, codec.codec_id)):
                (directory / name).unlink(missing_ok=True)
            raise

    @classmethod
    def write_merged(cls, directory: Path, uid: int, inputs: Sequence[tuple["Segment", np.ndarray]], *,
                     deletes: np.ndarray, codec: Codec | None, dim: int) -> "Segment":
        """Write the alive rows of ``inputs`` (segment, alive mask) as one new segment.

        Streams in chunks, so merging millions of rows needs memory for one chunk, not
        for the catalogue (plus the inverted lists being built when ``codec`` is given).
        """
        alive_rows = [np.flatnonzero(mask) for _, mask in inputs]
        count = sum(len(rows) for rows in alive_rows)
        token_count = sum(int(np.sum(seg.rows.token_offsets[rows + 1] - seg.rows.token_offsets[rows]))
                          for (seg, _), rows in zip(inputs, alive_rows))
        deletes = np.unique(np.asarray(deletes, dtype=np.int64))
        meta = {"uid": uid, "rows": count, "deletes": len(deletes), "merged_from": [seg.uid for seg, _ in inputs]}
        specs = {"ids": (np.int64, (count,)), "product_ids": (np.int64, (count,)),
                 "vectors": (np.float32, (count, dim)), "prices": (np.float64, (count,)),
                 "token_offsets": (np.int64, (count + 1,)), "tokens": (np.int64, (token_count,)),
                 "deletes": (np.int64, (len(deletes),))}
        builder = ArrayFileBuilder(directory / (segment_name(uid) + SEGMENT_SUFFIX), specs, meta)
        ann = codec.encode(np.zeros((0, dim), np.float32)) if codec is not None and count else None
        ann_path = directory / ann_file_name(uid, codec.codec_id) if ann is not None else None
        refine = None
        if ann is not None and codec.refiner is not None:
            refine = refine_file_builder(directory / refine_file_name(uid, codec.codec_id), count, dim,
                                         {"uid": uid, "codec": codec.codec_id})
        try:
            out = builder.arrays
            if len(deletes):
                out["deletes"][:] = deletes
            out["token_offsets"][0] = 0
            row, tok = 0, 0
            for (seg, _), rows in zip(inputs, alive_rows):
                for start in range(0, len(rows), MERGE_CHUNK_ROWS):
                    part = seg.rows.take(rows[start:start + MERGE_CHUNK_ROWS])
                    end = row + len(part)
                    out["ids"][row:end] = part.ids
                    out["product_ids"][row:end] = part.product_ids
                    out["vectors"][row:end] = part.vectors
                    out["prices"][row:end] = part.prices
                    out["token_offsets"][row + 1:end + 1] = part.token_offsets[1:] + tok
                    out["tokens"][tok:tok + len(part.tokens)] = part.tokens
                    if ann is not None and not _has_codes(seg, codec):
                        codec.add(ann, part.vectors, row)
                    if refine is not None:
                        # The codec's ranges make a code valid in any segment: copy it.
                        refine.arrays["codes"][row:end] = seg.refine.codes[rows[start:start + MERGE_CHUNK_ROWS]] \
                            if _has_codes(seg, codec) and seg.refine is not None else codec.refine_codes(part.vectors)
                    row, tok = end, tok + len(part.tokens)
            if ann is not None:
                ann = _with_copied_codes(ann, codec, inputs, alive_rows)
                write_ann(ann, ann_path)
            if refine is not None:
                refine.commit()
            builder.commit()
        except BaseException:
            builder.abort()
            if refine is not None:
                refine.abort()
                refine.path.unlink(missing_ok=True)
            if ann_path is not None:
                ann_path.unlink(missing_ok=True)
            raise
        return cls.load(directory, uid, codec_id=codec.codec_id if ann is not None else None,
                        refine_scale=codec.refine_scale if ann is not None else None)

    def encoded(self, directory: Path, codec: Codec) -> "Segment":
        """This segment with its rows (all of them: dead ones are masked at search time)
        ANN-encoded by ``codec``, written to its own file; the rows are shared."""
        ann = codec.encode(np.zeros((0, codec.plan.dim), np.float32))
        refine = None
        if codec.refiner is not None:
            refine = refine_file_builder(directory / refine_file_name(self.uid, codec.codec_id), len(self),
                                         codec.plan.dim, {"uid": self.uid, "codec": codec.codec_id})
        try:
            for start in range(0, len(self), MERGE_CHUNK_ROWS):
                part = np.asarray(self.rows.vectors[start:start + MERGE_CHUNK_ROWS])
                codec.add(ann, part, start)
                if refine is not None:
                    refine.arrays["codes"][start:start + len(part)] = codec.refine_codes(part)
            if refine is not None:
                refine.commit()
            write_ann(ann, directory / ann_file_name(self.uid, codec.codec_id))
        except BaseException:
            if refine is not None:
                refine.abort()
                refine.path.unlink(missing_ok=True)
            raise
        return self.with_encoding(directory, codec.codec_id, codec.refine_scale)

    @classmethod
    def load(cls, directory: Path, uid: int, *, codec_id: str | None = None,
             refine_scale: RefineScale | None = None) -> "Segment":
        """Load a segment, with its encoding by codec ``codec_id`` (re-rank codes too when
        ``refine_scale``, the codec's, is given).

        Raises ArrayFileError, OSError or RuntimeError (FAISS) for a missing or damaged file."""
        arrays, meta = read_array_file(directory / (segment_name(uid) + SEGMENT_SUFFIX))
        rows = VectorRows(arrays["ids"], arrays["product_ids"], arrays["vectors"], arrays["prices"],
                          arrays["token_offsets"], arrays["tokens"])
        segment = cls(uid, rows, arrays["deletes"], meta)
        if codec_id and len(rows):
            segment = segment.with_encoding(directory, codec_id, refine_scale)
        return segment

    def with_encoding(self, directory: Path, codec_id: str | None,
                      refine_scale: RefineScale | None = None) -> "Segment":
        """This segment's rows with the encoding of codec ``codec_id`` (None: none), read
        from its files.

        Raises ArrayFileError, OSError or RuntimeError (FAISS) for a missing or damaged file."""
        if not codec_id:
            return Segment(self.uid, self.rows, self.deletes, self.meta)
        ann = read_ann(directory / ann_file_name(self.uid, codec_id))
        refine = None
        if refine_scale is not None:
            refine = RefineCodes.load(directory / refine_file_name(self.uid, codec_id), refine_scale)
            wanted = (len(self), len(refine_scale.vmin))
            if refine.codes.dtype != np.uint8 or refine.codes.shape != wanted:
                raise ArrayFileError(f"re-rank codes of segment {self.uid} are {refine.codes.dtype} "
                                     f"{refine.codes.shape}, not uint8 {wanted}")
        return Segment(self.uid, self.rows, self.deletes, self.meta, ann=ann, codec_id=codec_id, refine=refine)

    def prefetch(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """Start reading the stored vectors of ``rows`` (sorted) without waiting; returns
        the runs for :meth:`read_vectors` (see :class:`.row_reads.RowReader`)."""
        return self._vectors.prefetch(rows)

    def read_vectors(self, rows: np.ndarray, *, runs: list[tuple[int, int]] | None = None) -> np.ndarray:
        """The stored float32 vectors of ``rows`` (sorted); ``runs``: what :meth:`prefetch`
        returned when the caller issued the reads already."""
        return self._vectors.read(rows, runs=runs if runs is not None else self.prefetch(rows))

    # --- filters --------------------------------------------------------------------

    def token_mask(self, tok: int) -> np.ndarray:
        """Boolean mask of the rows carrying ``tok`` (cached: the segment never changes)."""
        with self._masks_lock:
            mask = self._masks.get(tok)
            if mask is not None:
                self._masks.move_to_end(tok)
                return mask
        positions = np.flatnonzero(np.asarray(self.rows.tokens) == tok)
        mask = np.zeros(len(self.rows), dtype=bool)
        if len(positions):
            mask[np.searchsorted(self.rows.token_offsets, positions, side="right") - 1] = True
        with self._masks_lock:
            self._masks[tok] = mask
            while len(self._masks) > TOKEN_MASK_CACHE:
                self._masks.popitem(last=False)
        return mask

    def filter_mask(self, filters: SearchFilters) -> np.ndarray | None:
        """Rows passing ``filters`` (None: every row, no filter)."""
        if not filters.active:
            return None
        mask = np.ones(len(self.rows), dtype=bool)
        for group in filters.token_groups():
            any_of = self.token_mask(group[0])
            for tok in group[1:]:
                any_of = any_of | self.token_mask(tok)
            mask &= any_of
        if filters.min_price is not None or filters.max_price is not None:
            prices = np.asarray(self.rows.prices)
            if filters.min_price is not None:
                mask &= prices >= filters.min_price
            if filters.max_price is not None:
                mask &= prices <= filters.max_price
        return mask


def segment_name(uid: int) -> str:
    return f"seg-{uid:08d}"


def ann_file_name(uid: int, codec_id: str) -> str:
    return f"{segment_name(uid)}.{codec_id}{ANN_SUFFIX}"


def refine_file_name(uid: int, codec_id: str) -> str:
    return f"{segment_name(uid)}.{codec_id}{REFINE_SUFFIX}"


def _has_codes(segment: "Segment", codec: Codec) -> bool:
    return segment.ann is not None and segment.codec_id == codec.codec_id


def _with_copied_codes(ann: faiss.IndexIVF, codec: Codec, inputs: Sequence[tuple["Segment", np.ndarray]],
                       alive_rows: Sequence[np.ndarray]) -> faiss.IndexIVF:
    """``ann`` (the rows of inputs without codes, encoded) plus the codes of the inputs
    that have them, copied under their new row numbers."""
    parts, row = [], 0
    for (segment, _), rows in zip(inputs, alive_rows):
        if _has_codes(segment, codec):
            new_rows = np.full(len(segment), -1, dtype=np.int64)
            new_rows[rows] = np.arange(row, row + len(rows), dtype=np.int64)
            parts.append((segment.ann, new_rows))
        row += len(rows)
    if not parts:
        return ann
    if ann.ntotal:  # its ids are new row numbers already: keep them as they are
        parts.append((ann, np.arange(row, dtype=np.int64)))
    return codec.merge_lists(parts)
