"""Training-free recipe experiments (issue 7): a benchmark's metrics for one embedding
configuration, computed from cached CNN feature maps (``features.py``) with numpy only.

    python -m benchmarks.quality.explore --benchmark multiview --config baseline
    python -m benchmarks.quality.explore --benchmark fashion --limit 6000 --config "p=4,flip=1"
    python -m benchmarks.quality.explore --all [--benchmark NAME ...] [--limit 6000]
    python -m benchmarks.quality.explore --table          # markdown table of the saved results

A configuration is a named preset (see ``CONFIGS``) or ``key=value`` pairs over
``DEFAULTS`` (today's engine: EfficientNet-Lite0, resize 224 -> centre crop 224,
GeM p=3, L2). Ranking is the engine's: a product scores with its best image's cosine
score; a query's ``exclude_image`` leaves before the per-product bests are picked, and
anything learnt from the catalogue (PCA-whitening, DBA) is learnt without it.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import Variant, benchmark_images, feature_maps

try:  # the engine's own metric definitions
    from visualsearch.evaluation import average_precision_at_k, category_precision_at_k, hit_at_k
except ImportError:  # a bare GPU box without the engine's dependencies: the same definitions
    def hit_at_k(ranked, relevant, k):
        return any(sku in relevant for sku in ranked[:k])

    def average_precision_at_k(ranked, relevant, k=10):
        wanted, seen, total = set(relevant), set(), 0.0
        for rank, sku in enumerate(ranked[:k], start=1):
            if sku in wanted and sku not in seen:
                seen.add(sku)
                total += len(seen) / rank
        return total / min(len(wanted), k)

    def category_precision_at_k(categories, expected, k=10):
        key = expected.strip().casefold()
        return sum(1 for c in categories[:k] if c is not None and c.strip().casefold() == key) / k

logger = logging.getLogger(__name__)

OUT = Path(__file__).resolve().parent / "out"
RESULTS_DIR = Path(os.environ.get("VS_EXPLORE_RESULTS_DIR", OUT / "explore"))
BENCHMARKS = ("multiview", "shopper", "crossstyle", "fashion")
DEPTH = 10
GEM_EPS = 1e-6
# Relative CNN cost of one pass, from published multiply-adds at each network's native
# size (Lite0 0.41 G @224, MobileNetV2 0.30 G @224, Lite1 0.63 G @240, Lite2 0.90 G @260),
# scaled by pixel count; 1.0 = today's single Lite0 pass at 224.
CNN_GMACS = {"lite0": (0.41, 224), "mnv2": (0.30, 224), "lite1": (0.63, 240), "lite2": (0.90, 260)}
MULTI_SCALE = (1 / math.sqrt(2), 1.0, math.sqrt(2))

DEFAULTS = {
    "bb": "lite0",       # backbone, or an ensemble "lite0+mnv2" (L2 descriptors concatenated)
    "size": 224,         # CNN input side
    "policy": "crop",    # crop: resize short side + centre crop (engine); pad: whole image on white
    "cat": "same",       # catalogue-side policy override: same | object (crop to the non-white box)
    "q": "same",         # query-side policy override: same | object
    "pool": "gem",       # gem | rmac (regional GeM, Tolias et al. 2016)
    "p": 3.0,            # GeM exponent (p=1 average, large p ~ max)
    "mask": 0.0,         # >0: keep map positions whose summed activation >= mask x the image's mean
    "maskside": "q",     # which side the mask applies to: q | both
    "flip": 0,           # 1: average with the horizontally flipped image's descriptor
    "ms": 0,             # 1: average over input scales 1/sqrt2, 1, sqrt2; 2: over 1/sqrt2, 1
    "pca": 0,            # >0: PCA-whitening to this many dims, learnt on the catalogue's vectors
    "shrink": 1.0,       # whitening exponent: eigenvalue^(-shrink/2); 0 = PCA rotation only
    "pw": 0.0,           # >0: power-normalisation sign(x)|x|^pw after PCA (e.g. 0.5)
    "qe": 0,             # alpha query expansion with the top-k catalogue images (0 = off)
    "qa": 3.0,           # its alpha (weights = score^alpha)
    "dba": 0,            # database-side augmentation with each image's top-k neighbours
    "da": 3.0,           # its alpha
    "qsize": 0,          # >0: CNN input side of query photos (catalogue images keep `size`)
    "centre": 0.0,       # >0: query photos' GeM weights positions by a centred Gaussian of this sigma
                         # (in half-sides of the map; the engine's Recipe.query_centre_prior)
}

# Presets, in table order; "x+y" style names combine earlier ideas.
CONFIGS: dict[str, str] = {
    "baseline": "",
    "crop288": "size=288", "crop320": "size=320",
    "pad224": "policy=pad", "pad288": "policy=pad,size=288", "pad320": "policy=pad,size=320",
    "p1": "p=1", "p2": "p=2", "p4": "p=4", "p6": "p=6",
    "flip": "flip=1",
    "ms3": "ms=1",
    "rmac": "pool=rmac",
    "mask-q": "mask=1", "mask-q0.5": "mask=0.5", "mask-both": "mask=1,maskside=both",
    "objcat": "cat=object", "objboth": "cat=object,q=object",
    "pca128": "pca=128", "pca256": "pca=256", "pca512": "pca=512",
    "pca256-shrink": "pca=256,shrink=0.5", "pca512-shrink": "pca=512,shrink=0.5",
    "pca256-pw": "pca=256,pw=0.5", "pca512-shrink-pw": "pca=512,shrink=0.5,pw=0.5",
    "pca512-rot": "pca=512,shrink=0",
    "mnv2": "bb=mnv2", "lite1": "bb=lite1,size=240", "lite2": "bb=lite2,size=260",
    "lite0+mnv2": "bb=lite0+mnv2",
    "qe1": "qe=1", "qe2": "qe=2", "qe3": "qe=3", "qe5": "qe=5",
    "dba1": "dba=1", "dba2": "dba=2", "dba3": "dba=3",
    "dba2+qe2": "dba=2,qe=2",
    "ms2": "ms=2",
    "center": "pca=1280,shrink=0",
    "pca512-shrink0.25": "pca=512,shrink=0.25",
    "pca256-rot": "pca=256,shrink=0",
    "mnv2-pad224": "bb=mnv2,policy=pad",
    "lite0+mnv2-pad": "bb=lite0+mnv2,policy=pad",
    "mask-both+pca512-shrink": "mask=1,maskside=both,pca=512,shrink=0.5",
    "lite0+mnv2+mask-both": "bb=lite0+mnv2,mask=1,maskside=both",
    "lite0+mnv2+pca512-shrink": "bb=lite0+mnv2,pca=512,shrink=0.5",
    "lite0+mnv2+pca256-shrink": "bb=lite0+mnv2,pca=256,shrink=0.5",
    "lite0+mnv2+pca512-rot": "bb=lite0+mnv2,pca=512,shrink=0",
    "lite0+mnv2+dba1": "bb=lite0+mnv2,dba=1",
    "lite0+mnv2+p2": "bb=lite0+mnv2,p=2",
    "lite0+mnv2+rmac": "bb=lite0+mnv2,pool=rmac",
    "mnv2+mask-both+pca512-shrink": "bb=mnv2,mask=1,maskside=both,pca=512,shrink=0.5",
    "mnv2+pca512-shrink": "bb=mnv2,pca=512,shrink=0.5",
    "mnv2+p2": "bb=mnv2,p=2",
    "mnv2+rmac": "bb=mnv2,pool=rmac",
    "mnv2+mask-both": "bb=mnv2,mask=1,maskside=both",
    "mnv2+flip": "bb=mnv2,flip=1",
    "mnv2+ms2": "bb=mnv2,ms=2",
    "objboth+mask-both": "cat=object,q=object,mask=1,maskside=both",
    "rmac+pca512-shrink": "pool=rmac,pca=512,shrink=0.5",
    "lite0+mnv2+rmac+pca512-shrink": "bb=lite0+mnv2,pool=rmac,pca=512,shrink=0.5",
    "lite0+mnv2+mask-both+pca512-shrink": "bb=lite0+mnv2,mask=1,maskside=both,pca=512,shrink=0.5",
    "lite0+mnv2+mask-both+pca512-shrink+qe1": "bb=lite0+mnv2,mask=1,maskside=both,pca=512,shrink=0.5,qe=1",
    # Query photos apart: a larger input and a centre prior on the query side only.
    "q320": "qsize=320",
    "centre0.5": "centre=0.5", "centre0.35": "centre=0.35", "centre0.25": "centre=0.25",
    "q320+centre0.5": "qsize=320,centre=0.5", "q320+centre0.35": "qsize=320,centre=0.35",
    "q320+centre0.25": "qsize=320,centre=0.25",
    "q288+centre0.35": "qsize=288,centre=0.35", "q288+centre0.25": "qsize=288,centre=0.25",
    "mnv2+q288+centre0.35": "bb=mnv2,qsize=288,centre=0.35",
    "mnv2+centre0.35": "bb=mnv2,centre=0.35",
    "q320+centre0.35+pca512-shrink": "qsize=320,centre=0.35,pca=512,shrink=0.5",
    "q320+centre0.35+pca512-rot": "qsize=320,centre=0.35,pca=512,shrink=0",
    "mnv2+q320+centre0.35": "bb=mnv2,qsize=320,centre=0.35",
    "mnv2+q320+centre0.35+pca512-shrink": "bb=mnv2,qsize=320,centre=0.35,pca=512,shrink=0.5",
    "lite0+mnv2+q320+centre0.35": "bb=lite0+mnv2,qsize=320,centre=0.35",
    "lite0+mnv2+centre0.35+pca512-shrink": "bb=lite0+mnv2,centre=0.35,pca=512,shrink=0.5",
}


# --- the benchmark -----------------------------------------------------------------------


@dataclass
class Benchmark:
    name: str
    folder: Path
    images: dict[str, int]              # relative image path -> row of the feature cache
    cat_images: np.ndarray               # cache rows of the catalogue images
    cat_product: np.ndarray              # product index of each catalogue image
    skus: list[str]
    categories: list[str | None]         # per product
    q_images: np.ndarray                 # cache rows of the query images
    q_skus: list[tuple[str, ...]]
    q_category: list[str | None]
    q_exclude: list[tuple[int, ...]]     # catalogue positions (into cat_images) to leave out


def benchmark_folder(name: str, limit: int | None) -> Path:
    """out/NAME, or for fashion with a limit its class-balanced build out/fashion-N/fashion
    (built with the benchmark's own builder, seed 0, when missing)."""
    if name != "fashion" or limit is None:
        return OUT / name
    folder = OUT / f"fashion-{limit}" / "fashion"
    if not (folder / "queries.csv").is_file():
        from .build import build
        build("fashion", folder.parent, seed=0, limit=limit)
    return folder


def load_benchmark(name: str, limit: int | None = None) -> Benchmark:
    folder = benchmark_folder(name, limit)
    images = {path: row for row, path in enumerate(benchmark_images(folder))}
    with open(folder / "catalogue.csv", newline="", encoding="utf-8") as handle:
        catalogue = list(csv.DictReader(handle))
    with open(folder / "queries.csv", newline="", encoding="utf-8") as handle:
        queries = list(csv.DictReader(handle))
    product_of: dict[str, int] = {}
    categories: list[str | None] = []
    for row in catalogue:
        if row["sku"] not in product_of:
            product_of[row["sku"]] = len(product_of)
            categories.append(row.get("category") or None)
    position_of: dict[str, list[int]] = {}
    for position, row in enumerate(catalogue):
        position_of.setdefault(row["image"], []).append(position)
    return Benchmark(
        name=name, folder=folder, images=images,
        cat_images=np.array([images[row["image"]] for row in catalogue]),
        cat_product=np.array([product_of[row["sku"]] for row in catalogue]),
        skus=list(product_of), categories=categories,
        q_images=np.array([images[row["image"]] for row in queries]),
        q_skus=[tuple(s.strip() for s in (row.get("expected_sku") or "").split("|") if s.strip()) for row in queries],
        q_category=[row.get("expected_category") or None for row in queries],
        q_exclude=[tuple(position_of.get(row.get("exclude_image") or "", ())) for row in queries],
    )


# --- configurations ----------------------------------------------------------------------


def parse_config(text: str) -> dict:
    """A preset name or ``key=value,...`` (over the preset ``base=NAME`` if given) -> full config."""
    config = dict(DEFAULTS)
    if text in CONFIGS:
        text = CONFIGS[text]
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key == "base":
            config.update(parse_config(value))
            continue
        if key not in DEFAULTS:
            raise SystemExit(f"unknown config key {key!r}; known: {', '.join(DEFAULTS)}")
        config[key] = type(DEFAULTS[key])(value) if not isinstance(DEFAULTS[key], str) else value
    # Combinations the harness would compute otherwise than the engine: refused, not recorded.
    if config["qsize"] and config["ms"]:
        raise SystemExit("qsize with ms is not supported: the engine scales every scale to the query size")
    if config["centre"] and (config["mask"] or config["pool"] != "gem"):
        raise SystemExit("centre with mask or pool=rmac is not supported: the pooling takes one weighting")
    return config


def config_text(config: dict) -> str:
    """The non-default keys, the canonical ``--config`` string."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in config.items() if v != DEFAULTS[k]) or "baseline"


def scales(config: dict) -> list[int]:
    if not config["ms"]:
        return [config["size"]]
    factors = MULTI_SCALE if config["ms"] == 1 else MULTI_SCALE[:2]
    return [int(round(config["size"] * s / 32) * 32) for s in factors]


def query_cost(config: dict) -> float:
    """CNN multiply-adds of one query relative to today's single Lite0 pass at 224."""
    base = CNN_GMACS["lite0"][0]
    total = 0.0
    for backbone in config["bb"].split("+"):
        gmacs, native = CNN_GMACS[backbone]
        for size in ([config["qsize"]] if config["qsize"] else scales(config)):
            total += gmacs * (size / native) ** 2 * (2 if config["flip"] else 1)
    return total / base


# --- pooling (numpy) ---------------------------------------------------------------------


def gem(maps: np.ndarray, p: float, mask: np.ndarray | None = None) -> np.ndarray:
    """(N, C, H, W) -> (N, C) generalised mean over the (masked or weighted) positions."""
    x = np.maximum(maps, GEM_EPS) ** p
    if mask is None:
        pooled = x.mean(axis=(2, 3))
    else:
        weights = (mask if mask.ndim == 3 else mask[None]).astype(np.float32)[:, None, :, :]
        pooled = (x * weights).sum(axis=(2, 3)) / weights.sum(axis=(2, 3))
    return pooled ** (1.0 / p)


def centre_weights(height: int, width: int, sigma: float) -> np.ndarray:
    """(H, W) Gaussian weights centred on the map, sigma in half-sides (the engine's
    ``visualsearch.embedder.centre_prior``)."""
    y = (np.arange(height) - (height - 1) / 2) / (height / 2)
    x = (np.arange(width) - (width - 1) / 2) / (width / 2)
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2)).astype(np.float32)


def activation_mask(maps: np.ndarray, threshold: float) -> np.ndarray:
    """Positions whose channel-summed activation is >= threshold x the image's mean (the
    strongest position always stays)."""
    energy = maps.sum(axis=1)
    keep = energy >= threshold * energy.mean(axis=(1, 2), keepdims=True)
    keep |= energy == energy.max(axis=(1, 2), keepdims=True)
    return keep


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """R-MAC's square regions (Tolias et al. 2016; the cirtorch recipe): the whole map,
    then ``levels`` scales of ~40 %-overlapping squares. Returns (top, left, h, w)."""
    regions = [(0, 0, height, width)]
    ovr = 0.4
    steps = np.array([2, 3, 4, 5, 6, 7])
    short, long = min(width, height), max(width, height)
    b = (long - short) / (steps - 1)
    idx = int(np.argmin(np.abs(((short ** 2 - short * b) / short ** 2) - ovr)))
    extra_w = int(idx + 1) if height < width else 0
    extra_h = int(idx + 1) if height > width else 0
    for level in range(1, levels + 1):
        side = int(math.floor(2 * short / (level + 1)))
        if side < 1:
            continue
        n_w, n_h = level + extra_w, level + extra_h
        lefts = [0] if n_w == 1 else np.linspace(0, width - side, n_w).round().astype(int)
        tops = [0] if n_h == 1 else np.linspace(0, height - side, n_h).round().astype(int)
        regions += [(int(t), int(x), side, side) for t in tops for x in lefts]
    return regions


def rmac(maps: np.ndarray, p: float) -> np.ndarray:
    total = np.zeros(maps.shape[:2], dtype=np.float32)
    for top, left, h, w in rmac_regions(*maps.shape[2:]):
        total += l2n(gem(maps[:, :, top:top + h, left:left + w], p))
    return total


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Descriptors:
    """Pooled, L2-normalised descriptors per (variant, pooling), cached for ``--all``."""

    def __init__(self, bench: Benchmark, *, device: str, workers: int, batch_size: int):
        self.bench, self.device, self.workers, self.batch_size = bench, device, workers, batch_size
        self._cache: dict[tuple, np.ndarray] = {}

    def pooled(self, variant: Variant, pool: str, p: float, mask: float, centre: float = 0.0) -> np.ndarray:
        """(all cached images, C) L2-normalised descriptors of one variant and pooling."""
        key = (variant, pool, p, mask, centre)
        if key not in self._cache:
            maps = feature_maps(self.bench.folder, variant, device=self.device, workers=self.workers,
                                batch_size=self.batch_size)
            chunks = []
            for start in range(0, len(maps), 256):
                block = np.asarray(maps[start:start + 256], dtype=np.float32)
                if pool == "rmac":
                    chunks.append(rmac(block, p))
                elif centre > 0:
                    chunks.append(gem(block, p, centre_weights(*block.shape[2:], centre)))
                else:
                    chunks.append(gem(block, p, activation_mask(block, mask) if mask > 0 else None))
            self._cache[key] = l2n(np.concatenate(chunks))
        return self._cache[key]

    def side(self, config: dict, rows: np.ndarray, side: str) -> np.ndarray:
        """Descriptors of the images at cache ``rows`` for the catalogue or query side."""
        policy = config[side] if config[side] != "same" else config["policy"]
        mask = config["mask"] if (side == "q" or config["maskside"] == "both") else 0.0
        centre = config["centre"] if side == "q" else 0.0
        sizes = [config["qsize"]] if side == "q" and config["qsize"] else scales(config)
        parts = []
        for backbone in config["bb"].split("+"):
            views = [self.pooled(Variant(backbone, policy, size, flip), config["pool"], config["p"], mask, centre)[rows]
                     for size in sizes for flip in ((False, True) if config["flip"] else (False,))]
            parts.append(l2n(np.mean(views, axis=0)))
        return l2n(np.concatenate(parts, axis=1))


# --- catalogue-learnt post-processing ----------------------------------------------------


def pca_whitening(catalogue: np.ndarray, config: dict):
    """A function applying PCA-whitening learnt on ``catalogue`` (dims capped at its rank)."""
    mean = catalogue.mean(axis=0)
    _, singular, vt = np.linalg.svd(catalogue - mean, full_matrices=False)
    eig = singular ** 2 / max(1, len(catalogue) - 1)
    dims = min(config["pca"], int((eig > eig[0] * 1e-6).sum()))
    projection = vt[:dims].T / (eig[:dims] + eig[0] * 1e-4) ** (config["shrink"] / 2)

    def apply(x: np.ndarray) -> np.ndarray:
        y = (x - mean) @ projection
        if config["pw"] > 0:
            y = np.sign(y) * np.abs(y) ** config["pw"]
        return l2n(y.astype(np.float32))

    return apply


def dba(catalogue: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Database-side augmentation: each vector -> the score^alpha-weighted mean of itself
    and its k nearest catalogue neighbours."""
    sims = catalogue @ catalogue.T
    top = top_k(sims, k + 1)
    weights = np.maximum(np.take_along_axis(sims, top, axis=1), 0) ** alpha
    return l2n(np.einsum("nk,nkd->nd", weights, catalogue[top]))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest scores, best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def alpha_qe(queries: np.ndarray, catalogue: np.ndarray, scores: np.ndarray, k: int, alpha: float) -> np.ndarray:
    top = top_k(scores, k)
    weights = np.maximum(np.take_along_axis(scores, top, axis=1), 0) ** alpha
    return l2n(queries + np.einsum("nk,nkd->nd", weights, catalogue[top]))


# --- ranking and metrics -----------------------------------------------------------------


def rank_products(bench: Benchmark, scores: np.ndarray) -> np.ndarray:
    """(queries, images) scores (excluded images at -inf) -> top-DEPTH product indices,
    each product scored by its best remaining image."""
    order = np.argsort(bench.cat_product, kind="stable")
    products = bench.cat_product[order]
    starts = np.flatnonzero(np.r_[True, products[1:] != products[:-1]])
    best = np.maximum.reduceat(scores[:, order], starts, axis=1)
    product_ids = products[starts]
    top = np.argsort(-best, axis=1, kind="stable")[:, :DEPTH]
    return product_ids[top]


def search(bench: Benchmark, queries: np.ndarray, catalogue: np.ndarray, config: dict,
           excluded: tuple[int, ...]) -> np.ndarray:
    """Top products for query vectors that share one exclusion set."""
    keep = np.ones(len(catalogue), dtype=bool)
    keep[list(excluded)] = False
    if config["pca"]:
        whiten = pca_whitening(catalogue[keep], config)
        catalogue, queries = whiten(catalogue), whiten(queries)
    if config["dba"]:
        augmented = catalogue.copy()
        augmented[keep] = dba(catalogue[keep], config["dba"], config["da"])
        catalogue = augmented
    scores = queries @ catalogue.T
    scores[:, ~keep] = -np.inf
    if config["qe"]:
        queries = alpha_qe(queries, catalogue, scores, config["qe"], config["qa"])
        scores = queries @ catalogue.T
        scores[:, ~keep] = -np.inf
    return rank_products(bench, scores)


def evaluate(bench: Benchmark, descriptors: Descriptors, config: dict) -> dict:
    catalogue = descriptors.side(config, bench.cat_images, "cat")
    queries = descriptors.side(config, bench.q_images, "q")
    ranked = np.zeros((len(queries), DEPTH), dtype=np.int64)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, excluded in enumerate(bench.q_exclude):
        groups.setdefault(excluded, []).append(index)
    for excluded, members in groups.items():
        ranked[members] = search(bench, queries[members], catalogue, config, excluded)
    return metrics(bench, ranked)


def metrics(bench: Benchmark, ranked: np.ndarray) -> dict:
    hits: dict[int, list[float]] = {1: [], 5: [], 10: []}
    aps, cat_p = [], []
    for row, skus, category in zip(ranked, bench.q_skus, bench.q_category):
        names = [bench.skus[i] for i in row]
        if skus:
            for k in hits:
                hits[k].append(float(hit_at_k(names, skus, k)))
            aps.append(average_precision_at_k(names, skus))
        if category is not None:
            cat_p.append(category_precision_at_k([bench.categories[i] for i in row], category))
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    return {"recall_at_1": mean(hits[1]), "recall_at_5": mean(hits[5]), "recall_at_10": mean(hits[10]),
            "map_at_10": mean(aps), "category_precision_at_10": mean(cat_p), "queries": len(ranked)}


# --- command line ------------------------------------------------------------------------


def results_path(name: str, limit: int | None) -> Path:
    return RESULTS_DIR / (f"{name}-{limit}.json" if name == "fashion" and limit else f"{name}.json")


def run(names: list[str], configs: list[str], *, limit: int | None, device: str, workers: int,
        batch_size: int, save: bool) -> None:
    for name in names:
        bench = load_benchmark(name, limit if name == "fashion" else None)
        descriptors = Descriptors(bench, device=device, workers=workers, batch_size=batch_size)
        path = results_path(name, limit)
        saved = json.loads(path.read_text()) if path.is_file() else {}
        for text in configs:
            config = parse_config(text)
            started = time.perf_counter()
            try:
                result = evaluate(bench, descriptors, config)
            except Exception as exc:  # one broken experiment must not lose the others
                logger.exception("%s %s failed: %s", name, text, exc)
                continue
            result.update(config=config_text(config), preset=text if text in CONFIGS else None,
                          cost=round(query_cost(config), 2))
            print(f"{name:10s} {text:22s} R@1 {_f(result['recall_at_1'])} R@5 {_f(result['recall_at_5'])} "
                  f"mAP@10 {_f(result['map_at_10'])} catP@10 {_f(result['category_precision_at_10'])} "
                  f"cost {result['cost']:.2f}x  ({time.perf_counter() - started:.1f} s)", flush=True)
            if save:
                saved[text] = result
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(saved, indent=1))


def print_table(limit: int | None) -> None:
    """One markdown row per preset: each benchmark's metrics, the query cost, the command."""
    results = {name: json.loads(results_path(name, limit).read_text()) if results_path(name, limit).is_file() else {}
               for name in BENCHMARKS}
    print("| config | cost | multiview R@1 / R@5 / mAP@10 | shopper R@1 / R@5 / mAP@10 | "
          "crossstyle R@1 / R@5 / mAP@10 (catP@10) | fashion catP@10 | command (`--config`) |")
    print("|---|---|---|---|---|---|---|")
    presets = list(dict.fromkeys([*CONFIGS, *(key for r in results.values() for key in r)]))
    for preset in presets:
        cells = []
        for name in ("multiview", "shopper", "crossstyle"):
            r = results[name].get(preset)
            text = " / ".join(_f(r[k]) for k in ("recall_at_1", "recall_at_5", "map_at_10")) if r else ""
            if r and name == "crossstyle":
                text += f" ({_f(r['category_precision_at_10'])})"
            cells.append(text)
        fashion = results["fashion"].get(preset)
        cells.append(_f(fashion["category_precision_at_10"]) if fashion else "")
        any_result = next((r[preset] for r in results.values() if preset in r), None)
        if any_result is None:
            continue
        print(f"| {preset} | {any_result['cost']:.2f}x | " + " | ".join(cells) + f" | `{any_result['config']}` |")


def _f(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", action="append", choices=BENCHMARKS,
                        help="which benchmark (repeatable; default with --all: all four)")
    parser.add_argument("--config", action="append", help="a preset name or key=value,... (repeatable)")
    parser.add_argument("--all", action="store_true", help="every preset in CONFIGS")
    parser.add_argument("--limit", type=int, default=6000,
                        help="fashion: use the class-balanced build of N catalogue / N/6 queries (default 6000; "
                             "0 = the full out/fashion)")
    parser.add_argument("--device", default="cpu", help="where missing feature maps are computed")
    parser.add_argument("--workers", type=int, default=1, help="image-decoding processes for missing features")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-save", action="store_true", help=f"do not record results in {RESULTS_DIR}")
    parser.add_argument("--table", action="store_true", help="print the saved results as a markdown table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit = args.limit or None
    if args.table:
        print_table(limit)
        return 0
    configs = list(CONFIGS) if args.all else (args.config or ["baseline"])
    names = args.benchmark or (list(BENCHMARKS) if args.all else ["multiview"])
    run(names, configs, limit=limit, device=args.device, workers=args.workers, batch_size=args.batch_size,
        save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
