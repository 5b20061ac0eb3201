"""Pure decisions of the vector store: which index to build, which segments to merge.

Both are plain functions of numbers so that a table-driven test pins every choice
(the autofaiss way). The rules follow the FAISS wiki's "Guidelines to choose an
index" (https://github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index):

- exact search while scanning every vector stays within a few milliseconds: the
  scan reads ``count * dim * 4`` bytes, and on the reference 2-core machine numpy
  reads ~25 GB/s from RAM (20,000 x 1280 floats: 2.2 ms), so up to
  :data:`EXACT_SCAN_BYTES` we scan;
- beyond that an inverted file (IVF) with ``nlist`` about 2 * sqrt(count) lists
  (at most :data:`MAX_NLIST`: on a CPU, assigning every vector to one of more lists
  costs more build time than the shorter lists save at query time), and the
  candidates re-ranked exactly from the stored float32 vectors;
- the codes: vectors of at most :data:`CODE_DIM` dimensions get 8-bit scalar
  quantized (SQ8) codes of every dimension. Longer ones (a CNN's 1,280) get RaBitQ
  codes (Gao & Long, SIGMOD 2024; FAISS's ``IndexIVFRaBitQ``): one bit per dimension
  of the vector's offset from its list centre plus two floats, 168 bytes at 1,280
  dimensions, whose score estimate covers every dimension. Their lists are assigned
  in a PCA-:data:`CODE_DIM` space, which makes k-means and the assignment of each new
  vector five times cheaper at 1,280 dimensions (256 multiply-adds per centre, not
  1,280). The older choice, SQ8 codes of the PCA-reduced vector, remains for budgets
  too small for RaBitQ codes (PCA to fewer dimensions). RaBitQ needs far fewer
  re-ranked candidates for the same recall: PCA drops the dimensions in which near
  neighbours differ, every candidate it misranks must be made up by re-ranking more
  rows, and at 10M those rows come from disk. On 60,000 real EfficientNet-Lite0
  embeddings (Fashion-MNIST, nprobe 16) recall@10 was 0.966 with 50 candidates
  re-ranked against SQ8's 0.920; the synthetic figures are in ``docs/performance.md``
  (``python -m benchmarks.ann_codes``);
- past :data:`REFINE_ABOVE_BYTES` of float32 vectors, 8-bit re-rank codes of every
  dimension too (``refine="SQ8"``, see :mod:`.refine`): the candidates are ranked on
  them and only the best few are read from the float32 vectors, which no longer fit
  a page cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

# Plans for more float32 vector bytes than this also keep 8-bit re-rank codes of every
# dimension (see .refine): past it the exact vectors outgrow the page cache of a server
# with the 8 GB the serving process is sized for, and re-ranking hundreds of candidates
# from disk dominated a search (10M images: 34 ms p50 with the rows read from disk, 10
# cached). Below it the codes would only cost disk and build time.
REFINE_ABOVE_BYTES = 8 * 1024**3
# Exact scans up to this many bytes of float32 vectors (about 5 ms on 2 cores).
EXACT_SCAN_BYTES = 64 * 1024**2
# A newer segment smaller than this is scanned exactly even when the store has an
# ANN codec: encoding and a coarse search are not worth it for a few rows. Kept low
# because an exact scan reads every vector: a 4,096-row segment of 1,280-d vectors
# is 21 MB per query (~1.1 ms), and a catalogue built in batches carries several.
MIN_ANN_SEGMENT_ROWS = 256
# The share of the memory budget the codes may take (ids, masks and caches need the rest).
CODE_SHARE_OF_BUDGET = 0.7
# The largest code dimension of SQ8 codes; PCA output sizes tried below it, largest (best
# recall) first, until the codes fit the memory budget. Longer vectors get RaBitQ codes
# first (their lists assigned in a PCA space of this size), if those fit.
CODE_DIM = 256
# RaBitQ code precisions, bits per dimension: the planner's choice, then escalations.
RABITQ_BITS = (1, 2, 4)
PCA_DIMS = (256, 128, 64, 32)
# Code sizes to fall back on, smallest first, when a catalogue's vectors keep too little
# of their neighbourhoods under PCA for the target recall (isotropic data does that).
ESCALATION_DIMS = (32, 64, 128, 256, 512)
MIN_NLIST, MAX_NLIST = 64, 4096
# Re-plan (train a new codec) once the catalogue has grown or shrunk this much
# since the codec was planned: nlist then no longer suits the list lengths.
REPLAN_FACTOR = 4
# Measure the search parameters again once the catalogue has grown this much since
# they were tuned: more vectors near each query need more lists or a deeper re-rank
# for the same recall (parameters tuned at 5.1M images measured 0.960 there and gave
# 0.932 at 10M, where the codec, planned for growth by REPLAN_FACTOR, still suited).
RETUNE_FACTOR = 1.5
# An exact row (a scattered read of its float32 vector, then a dot product) costs about
# this many ANN code distances (measured at 1M: a price range keeping 10 % of each
# segment ran 14.8 ms p50 exact, 6 ms on the lists). Used to choose between an exact
# scan and the lists for a filter, and between search parameters when tuning.
EXACT_ROW_COST_IN_CODES = 50
# Tuning stops probing more lists at a re-rank depth once two steps each raised the
# recall by less than this.
RECALL_PLATEAU = 0.002
# Tiered merging (Lucene's LogMergePolicy): MERGE_FACTOR segments of one size level
# become one segment of the next level, so each vector is rewritten about
# log_MERGE_FACTOR(count / MERGE_FLOOR_ROWS) times in its life.
MERGE_FACTOR = 8
MERGE_FLOOR_ROWS = 1024
# No merge produces a segment above this many rows (5 GiB of float32 vectors at 1280
# dimensions, as Lucene caps merged segments at 5 GB): a merge, a compaction or a
# re-plan then needs free disk for one segment, never for a second copy of the catalogue.
MAX_SEGMENT_ROWS = 1_000_000
# A segment is rewritten without its dead rows once this share of it is dead.
MAX_DEAD_SHARE = 0.2


@dataclass(frozen=True)
class IndexPlan:
    """What to build for ``planned_for`` vectors of dimension ``dim``."""

    kind: str                 # "flat" (exact scan) or "ivf" (inverted file + exact re-rank)
    dim: int
    planned_for: int
    nlist: int = 0
    # PCA output size: the space lists are assigned in, and for SQ8 the codes' space too
    # (RaBitQ codes always keep every dimension); None: no PCA.
    reduce_dim: int | None = None
    encoding: str = ""              # "SQ8", or "RaBitQ" / "RaBitQ2" / "RaBitQ4" (bits per dimension)
    code_bytes: int = 0             # bytes of one vector's code
    refine: str = ""                # "SQ8": re-rank codes of every dimension (on disk, see .refine)

    @property
    def rabitq_bits(self) -> int:
        """Bits per dimension of RaBitQ codes; 0 for other encodings."""
        if not self.encoding.startswith("RaBitQ"):
            return 0
        return int(self.encoding[len("RaBitQ"):] or 1)

    @property
    def description(self) -> str:
        """A FAISS-factory-like name for manifests and logs."""
        if self.kind == "flat":
            return "Flat (exact)"
        rerank = f" + {self.refine} re-rank + exact re-rank" if self.refine else " + exact re-rank"
        if self.rabitq_bits:
            lists = f" (lists assigned in PCA{self.reduce_dim})" if self.reduce_dim else ""
            return f"IVF{self.nlist},{self.encoding}{lists}{rerank}"
        pca = f"PCA{self.reduce_dim}," if self.reduce_dim else ""
        return f"{pca}IVF{self.nlist},{self.encoding}{rerank}"

    def to_dict(self) -> dict:
        return asdict(self)


def plan_index(count: int, dim: int, memory_budget: int) -> IndexPlan:
    """Choose the index for ``count`` vectors of ``dim`` floats within ``memory_budget`` bytes.

    Raises:
        ValueError: a count below 0, or a budget too small for even the smallest codes.
    """
    if count < 0 or dim <= 0:
        raise ValueError(f"bad sizes: count {count}, dim {dim}")
    if count * dim * 4 <= EXACT_SCAN_BYTES:
        return IndexPlan(kind="flat", dim=dim, planned_for=count)
    nlist = _nlist_for(count)
    code_budget = memory_budget * CODE_SHARE_OF_BUDGET / count
    refine = "SQ8" if count * dim * 4 > REFINE_ABOVE_BYTES else ""
    if dim > CODE_DIM and rabitq_code_bytes(dim, RABITQ_BITS[0]) <= code_budget:
        return _rabitq_plan(dim, count, nlist, RABITQ_BITS[0], refine)
    choices = ([None] if dim <= CODE_DIM else []) + [d for d in PCA_DIMS if d < dim]
    for reduce_dim in choices:
        code_bytes = reduce_dim or dim  # SQ8: one byte per dimension
        if code_bytes <= code_budget:
            return IndexPlan(kind="ivf", dim=dim, planned_for=count, nlist=nlist,
                             reduce_dim=reduce_dim, encoding="SQ8", code_bytes=code_bytes,
                             # full-dimension SQ8 codes re-rank no better than themselves
                             refine=refine if reduce_dim else "")
    smallest = min(PCA_DIMS[-1], dim)  # the last choice tried
    raise ValueError(
        f"{count:,} vectors need at least {_human(count * smallest / CODE_SHARE_OF_BUDGET)} of index memory; "
        f"raise VISUALSEARCH_INDEX_MEMORY (now {_human(memory_budget)})"
    )


def rabitq_code_bytes(dim: int, bits: int) -> int:
    """Bytes of one RaBitQ code in FAISS: a sign bit per dimension and the other bits
    packed apart, plus two float factors (one bit) or five (more). Pinned against FAISS by a test."""
    extra = (dim * (bits - 1) + 7) // 8 + 12 if bits > 1 else 0
    return (dim + 7) // 8 + 8 + extra


def _rabitq_plan(dim: int, count: int, nlist: int, bits: int, refine: str) -> IndexPlan:
    return IndexPlan(kind="ivf", dim=dim, planned_for=count, nlist=nlist, reduce_dim=min(CODE_DIM, dim),
                     encoding="RaBitQ" if bits == 1 else f"RaBitQ{bits}", code_bytes=rabitq_code_bytes(dim, bits),
                     refine=refine)


def _human(size: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} bytes"


def _nlist_for(count: int) -> int:
    """A power of two near 2 * sqrt(count), within [MIN_NLIST, MAX_NLIST], and at
    most count / 39 so that k-means has the 39 points per centroid FAISS asks for.

    The FAISS wiki suggests 4-16 * sqrt(count) for the fastest queries; fewer, longer
    lists cost a little more per probe but train and assign much faster on a CPU, and
    the tuned ``nprobe`` compensates."""
    target = 2 * math.sqrt(count)
    nlist = 2 ** round(math.log2(max(target, 1)))
    while nlist > MIN_NLIST and nlist * 39 > count:
        nlist //= 2
    return max(MIN_NLIST, min(MAX_NLIST, nlist))


def escalate(plan: IndexPlan, memory_budget: int) -> IndexPlan | None:
    """The next plan with more precise codes (less PCA reduction, or more bits per
    dimension) that fits the budget, for when tuning cannot reach the target recall
    with this one; None if there is none."""
    budget = memory_budget * CODE_SHARE_OF_BUDGET / max(plan.planned_for, 1)
    if plan.rabitq_bits:
        for bits in RABITQ_BITS:
            if bits > plan.rabitq_bits and rabitq_code_bytes(plan.dim, bits) <= budget:
                return _rabitq_plan(plan.dim, plan.planned_for, plan.nlist, bits, plan.refine)
        return None
    if plan.kind != "ivf" or plan.reduce_dim is None:
        return None
    larger = [d for d in ESCALATION_DIMS if d > plan.reduce_dim and d < plan.dim] + [None]
    for reduce_dim in larger:
        code_bytes = reduce_dim or plan.dim
        if code_bytes <= budget:
            return IndexPlan(kind="ivf", dim=plan.dim, planned_for=plan.planned_for, nlist=plan.nlist,
                             reduce_dim=reduce_dim, encoding=plan.encoding, code_bytes=code_bytes,
                             refine=plan.refine if reduce_dim else "")
    return None


def needs_replan(plan: IndexPlan | None, count: int, dim: int, memory_budget: int) -> bool:
    """True when the current plan no longer suits ``count`` vectors (or there is none)."""
    if plan is None or plan.dim != dim:
        return True
    wanted = plan_index(count, dim, memory_budget)
    if wanted.kind != plan.kind:
        return True
    if plan.kind == "flat":
        return False
    grown = count > plan.planned_for * REPLAN_FACTOR or count * REPLAN_FACTOR < plan.planned_for
    # Past REFINE_ABOVE_BYTES searches read their candidates from disk until the plan has
    # re-rank codes: add them then, not 4x later (a plan keeps codes it has while it shrinks).
    needs_codes = bool(wanted.refine) and not plan.refine
    # Larger codes than plan_index would pick are fine (an escalation chose them for
    # recall) as long as they still fit the budget.
    return grown or needs_codes or plan.code_bytes * count > memory_budget * CODE_SHARE_OF_BUDGET


def needs_retune(tuned_for: int, count: int) -> bool:
    """True when ``count`` vectors are enough more than the ``tuned_for`` the search
    parameters were measured on that their recall may have fallen below target.
    Shrinking never triggers it: fewer neighbours only make the search easier."""
    return count > tuned_for * RETUNE_FACTOR


@dataclass(frozen=True)
class TuningTrial:
    """Search parameters tried by tuning and the recall@10 they measured."""

    nprobe: int
    rerank: int
    recall: float


def search_cost(nprobe: int, rerank: int, count: int, nlist: int) -> float:
    """What an unfiltered search costs, in ANN code distances: the codes of ``nprobe``
    lists (each about count / nlist long) plus ``rerank`` exact rows. At 1M images
    (IVF1024), nprobe 6 / re-rank 500 (cost 30,900) measured 4.5 ms p50 and nprobe 4 /
    re-rank 1,000 (53,900) 10.5 ms. The row cost is that of a cached row; rows read
    from disk cost more, so at sizes past the page cache this favours deep re-ranks."""
    return nprobe * count / max(nlist, 1) + rerank * EXACT_ROW_COST_IN_CODES


def recall_plateaued(recalls: Sequence[float]) -> bool:
    """True when the last two steps of probing more lists raised the recall by less
    than RECALL_PLATEAU each: the re-rank depth is what limits it."""
    if len(recalls) < 3:
        return False
    return recalls[-1] - recalls[-2] < RECALL_PLATEAU and recalls[-2] - recalls[-3] < RECALL_PLATEAU


def choose_tuning(trials: Sequence[TuningTrial], target: float, count: int, nlist: int) -> TuningTrial:
    """The cheapest trial (:func:`search_cost`) that reached ``target``; when none did,
    the cheapest of those within RECALL_PLATEAU of the best recall (a hair more recall
    from the costliest setting is noise, not a gain). Raises ValueError on no trials."""
    if not trials:
        raise ValueError("no tuning trials")
    reached = [trial for trial in trials if trial.recall >= target]
    if not reached:
        best = max(trial.recall for trial in trials)
        reached = [trial for trial in trials if trial.recall >= best - RECALL_PLATEAU]
    return min(reached, key=lambda t: (search_cost(t.nprobe, t.rerank, count, nlist), -t.recall))


def segment_level(rows: int) -> int:
    """The size level of a segment: 0 below MERGE_FLOOR_ROWS * MERGE_FACTOR, and so on."""
    if rows < MERGE_FLOOR_ROWS:
        return 0
    return int(math.log(rows / MERGE_FLOOR_ROWS, MERGE_FACTOR)) + 1


def plan_merge(segment_rows: Sequence[int], *, max_rows: int | None = None) -> tuple[int, int] | None:
    """Which newest segments to merge after a commit, as a ``(first, end)`` slice, or None.

    Segments are ordered oldest first. When the newest MERGE_FACTOR segments share one
    size level they become one segment (and the check repeats after that merge), so
    the number of segments stays logarithmic in the catalogue size (plus one per
    MAX_SEGMENT_ROWS rows) and a small write never rewrites a big segment. ``max_rows``
    caps the merged size (writes that must stay fast, such as an API call, leave bigger
    merges to the indexer or ``compact``).
    """
    if not segment_rows:
        return None
    # The newest segments no bigger (in level) than the newest one: a run of small
    # segments behind a big one merges among itself and never drags the big one in.
    level = segment_level(segment_rows[-1])
    run = 0
    for rows in reversed(segment_rows):
        if segment_level(rows) > level or rows > MAX_SEGMENT_ROWS // 2:
            break  # bigger, or finished: a merge never rewrites a segment that large
        run += 1
    if run < MERGE_FACTOR:
        return None
    tail = list(segment_rows[-run:])
    while len(tail) > 1 and sum(tail) > MAX_SEGMENT_ROWS:
        tail.pop(0)  # leave the oldest out: merged segments stay under MAX_SEGMENT_ROWS
    if len(tail) < 2:
        return None
    if max_rows is not None and sum(tail) > max_rows:
        return None
    return len(segment_rows) - len(tail), len(segment_rows)


def needs_compaction(alive: int, total: int) -> bool:
    """True when so many rows are dead (deleted or replaced) that rewriting pays."""
    return total > 0 and (total - alive) > MAX_DEAD_SHARE * total


def plan_force_merge(segment_rows: Sequence[int]) -> tuple[int, int] | None:
    """For ``compact``: the first run of adjacent segments that fits in one segment of at
    most MAX_SEGMENT_ROWS rows (Lucene's forceMerge), as a ``(first, end)`` slice, or None.

    Fewer segments make each search cheaper (one inverted-file scan and one exact scan
    per segment); the cap keeps every merge within one segment's worth of disk.
    """
    start = 0
    while start < len(segment_rows):
        end, total = start, 0
        while end < len(segment_rows) and total + segment_rows[end] <= MAX_SEGMENT_ROWS:
            total += segment_rows[end]
            end += 1
        if end - start >= 2:
            return start, end
        start = max(end, start + 1)
    return None
