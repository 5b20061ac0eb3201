"""Catalogue-tuned embeddings (``visualsearch tune``): a linear projection learned from one
catalogue's own images on top of the frozen backbone and recipe, then switched to.

1. **Features**: a sample of the catalogue's images (whole products, at most
   :attr:`TuneOptions.max_images` images) is embedded with the current recipe before any
   projection, each image as it is and as ``views`` shopper-style photos of it
   (:class:`ShopperViews`: the product cut out, cropped, turned and pasted among other
   catalogue products over noise or a close-up of another product; or the whole image
   warped; then colour cast, blur, JPEG), the photos as queries (the recipe's query input
   size and centre prior). The vectors stay in memory.
2. **Split**: a share of the *products* (never single images) is held out.
3. **Training**: a linear map ``W`` (D -> dim), started from the PCA of the training
   products' vectors, learns with a temperature-scaled InfoNCE loss that a photo's
   projection lies nearest to its own product's images (its catalogue image, another
   photo of it, and a multi-view product's other images are all positives) and far from
   the other products' in the batch.
4. **Report**: recall@1 of held-out products' photos against every sampled catalogue
   image, with the recipe's vectors as they are (``identity``), the PCA start, the
   current projection if any, and ``tuned``: it shows whether ``W`` generalises to
   products it never saw.
5. **Switch**: ``W`` is saved as a :class:`~.recipes.Projection` in
   ``DATA_DIR/tuned/`` (the file name carries its hash, so the file the current vectors
   were made with is never overwritten), the recipe ``<base>+tuned`` is recorded in the
   catalogue with the file's bytes (:class:`~.recipes.DataRecipe`: every process
   resolves it from there, and a replica without the file fetches it:
   :mod:`~.projection_cache`), and
   :func:`~.reembed.reembed` switches the data directory to it without downtime.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torchvision.transforms import v2 as T

from .catalogue import store as catalogue
from .embedder import Embedder, resolve_device
from .errors import ConfigurationError, ImageError, VisualSearchError
from .images import load_image
from .indexing import ImageTask, Progress
from .recipes import DataRecipe, Projection, Recipe, get_recipe

if TYPE_CHECKING:
    from .service import VisualSearch

logger = logging.getLogger(__name__)

TUNED_SUFFIX = "+tuned"
TUNED_DIR = "tuned"  # DATA_DIR/tuned/<recipe>-<sha256[:12]>.npz
# Temperature 0.05-0.1 is the usual range for instance discrimination on unit vectors
# (SimCLR, MoCo); lower sharpens the softmax over the batch's other products.
TEMPERATURE = 0.05
LEARNING_RATE = 1e-3
PAGE = 4096  # images read from the catalogue per query
MIN_TRAIN_PRODUCTS = 2
# Near-white pixels are a catalogue shot's background: they are dropped when the
# product is pasted into a scene.
WHITE_LEVEL = 236
# Share of the shopper photos that show the product among other catalogue products (the
# rest: the whole catalogue image warped, at times over noise). Such photos teach the
# projection to find a product in clutter (docs/retrieval-quality.md, "Tuning that puts
# the product among other products").
AMONG_OTHERS = 0.75
# Cut-out products kept for the clutter of later photos (the most recently read images).
CLUTTER_POOL = 64


# Output dimension of a tuned projection unless asked otherwise.
DEFAULT_DIM = 256


@dataclass(frozen=True)
class TuneOptions:
    """What ``visualsearch tune`` learns and how.

    Attributes:
        dim: output dimension of the projection (at most the backbone's); None:
            DEFAULT_DIM, or fewer when the sample has too few vectors for it.
        epochs: passes over the training images.
        views: shopper-style photos made of each sampled image.
        holdout: share of the sampled products held out of training, to measure on.
        max_images: sampled images at most (whole products, chosen at random).
        batch_size: images per training step (the other products in it are the negatives).
        seed: fixes the sample, the split, every photo and the training.
        dry_run: learn and report only; record nothing and switch nothing.
        force: switch even when the tuned projection did not beat the vectors answering
            now on the held-out products (or nothing was held out to tell).
    """

    dim: int | None = None
    epochs: int = 50
    views: int = 4
    holdout: float = 0.2
    max_images: int = 20_000
    batch_size: int = 256
    temperature: float = TEMPERATURE
    learning_rate: float = LEARNING_RATE
    seed: int = 0
    dry_run: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least 1, not {getattr(self, name)}"
                    for name in ("dim", "epochs", "views", "max_images")
                    if getattr(self, name) is not None and getattr(self, name) < 1]
        if not 0.0 <= self.holdout < 1.0:
            problems.append(f"holdout must be in [0, 1), not {self.holdout}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be at least 2, not {self.batch_size}")
        if problems:
            raise ConfigurationError("tune: " + "; ".join(problems))


class TuneRefusedError(VisualSearchError):
    """The tuned projection did not beat the vectors answering now on the held-out
    products: nothing was recorded or switched (``report`` has the numbers; force to switch anyway)."""

    code = "tune_refused"

    def __init__(self, message: str, report: "TuneReport"):
        super().__init__(message)
        self.report = report


@dataclass
class TuneReport:
    """What one ``tune`` learned, measured and switched to."""

    recipe: str
    base_recipe: str
    in_dim: int
    dim: int
    images: int
    products: int
    held_out_products: int
    queries: int
    views: int
    epochs: int
    # recall@1 of held-out products' shopper photos: "identity", "pca", "current", "tuned".
    recall_at_1: dict[str, float | None] = field(default_factory=dict)
    # Whether "tuned" beat the vectors answering now ("current", else "identity"); None: not measured.
    improved: bool | None = None
    loss: dict[str, float] = field(default_factory=dict)
    unreadable_images: int = 0
    remote_images: int = 0
    projection: str | None = None
    projection_sha256: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    reembed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- shopper-style photos ------------------------------------------------------------------


class ShopperViews:
    """Shopper-style photos of a catalogue image: usually the product (its near-white
    background dropped) cropped, turned and pasted near the middle of a scene among other
    products of the catalogue, otherwise the whole image seen at an angle, rotated and
    cropped (at times over blotchy noise); then lit differently, blurred and sent as a
    low-quality JPEG.

    Randomness comes from ``rng`` and from torch's generator (seed both for repeatable photos).

    Args:
        size: side of the photos (the recipe's query decode size is enough).
    """

    def __init__(self, size: int):
        self.size = size
        self.geometry = T.Compose([
            T.RandomPerspective(distortion_scale=0.35, p=0.5, fill=255),
            T.RandomRotation(25, fill=255),
            T.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(0.75, 1.333), antialias=True),
        ])
        self.photometric = T.Compose([
            T.ColorJitter(brightness=0.35, contrast=0.35, saturation=0.35, hue=0.04),
            T.RandomGrayscale(p=0.05),
            T.RandomApply([T.GaussianBlur(5, sigma=(0.2, 1.8))], p=0.5),
        ])

    def __call__(self, image: Image.Image, rng: np.random.Generator, others: Sequence[Image.Image] = (),
                 product: Image.Image | None = None) -> Image.Image:
        """A photo of ``image``; ``others`` are cut-out products (:func:`cutout`) it may lie
        among; ``product`` is ``image``'s own cut-out when the caller has it already."""
        if others and rng.random() < AMONG_OTHERS:
            cut = product if product is not None else cutout(image)
            photo = self._lamp_light(self._among_others(cut, others, rng), rng)
        else:
            if rng.random() < 0.5:
                image = self._in_scene(image, rng)
            photo = self.photometric(self.geometry(image))
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=int(rng.integers(15, 90)))
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            return decoded.convert("RGB")

    def _in_scene(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """The product at 50-90 % of the frame, off centre, over blotchy coloured noise."""
        width, height = image.size
        scene = _noise((width, height), rng)
        scale = rng.uniform(0.5, 0.9)
        item = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
        mask = Image.fromarray(np.where(np.asarray(item).min(axis=2) >= WHITE_LEVEL, 0, 255).astype(np.uint8))
        left = int(rng.integers(0, width - item.width + 1))
        top = int(rng.integers(0, height - item.height + 1))
        scene.paste(item, (left, top), mask=mask)
        return scene

    def _among_others(self, product: Image.Image, others: Sequence[Image.Image],
                      rng: np.random.Generator) -> Image.Image:
        """Part of the product (65-100 % of each side), turned up to 25 degrees, at 30-75 %
        of the frame near its middle, over noise or a blurred close-up of another product,
        with up to five smaller products scattered around it."""
        side = self.size
        if rng.random() < 0.5:
            scene = _noise((side, side), rng)
        else:  # a close-up of another product's texture
            other = others[int(rng.integers(len(others)))].convert("RGB")
            share = rng.uniform(0.2, 0.5)
            width, height = max(4, int(other.width * share)), max(4, int(other.height * share))
            left, top = int(rng.integers(0, other.width - width + 1)), int(rng.integers(0, other.height - height + 1))
            scene = other.crop((left, top, left + width, top + height)).resize((side, side), Image.BILINEAR)
            scene = scene.filter(ImageFilter.GaussianBlur(rng.uniform(0, 3)))
        for _ in range(int(rng.integers(0, 6))):
            item = _fit(others[int(rng.integers(len(others)))], side * rng.uniform(0.1, 0.25))
            item = item.rotate(rng.uniform(-40, 40), expand=True, resample=Image.BILINEAR)
            scene.paste(item, (int(rng.integers(-item.width // 2, side - item.width // 2)),
                               int(rng.integers(-item.height // 2, side - item.height // 2))), item.getchannel("A"))
        keep_width, keep_height = (max(1, int(length * rng.uniform(0.65, 1.0))) for length in product.size)
        left = int(rng.integers(0, product.width - keep_width + 1))
        top = int(rng.integers(0, product.height - keep_height + 1))
        item = product.crop((left, top, left + keep_width, top + keep_height))
        item = item.rotate(rng.uniform(-25, 25), expand=True, resample=Image.BICUBIC)
        item = _fit(item, side * rng.uniform(0.3, 0.75))
        centre_x, centre_y = side * rng.uniform(0.35, 0.65), side * rng.uniform(0.35, 0.65)
        scene.paste(item, (int(centre_x - item.width / 2), int(centre_y - item.height / 2)), item.getchannel("A"))
        return scene

    @staticmethod
    def _lamp_light(scene: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Lamp light or shade: per-channel gains, brightness, contrast and saturation off by
        up to 35 %, then a little blur."""
        gains = rng.uniform(0.8, 1.2, 3)
        scene = Image.fromarray(np.clip(np.asarray(scene, np.float32) * gains, 0, 255).astype(np.uint8))
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            scene = enhancer(scene).enhance(rng.uniform(0.65, 1.35))
        return scene.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def cutout(image: Image.Image) -> Image.Image:
    """A catalogue shot's product as RGBA, its near-white background transparent, cropped to it."""
    rgb = image.convert("RGB")
    alpha = np.where(np.asarray(rgb).min(axis=2) >= WHITE_LEVEL, 0, 255).astype(np.uint8)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(alpha))
    box = rgba.getchannel("A").getbbox()
    return rgba.crop(box) if box else rgba


def _noise(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Blotchy coloured noise of ``size`` (width, height)."""
    width, height = size
    coarse = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    scene = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    return Image.fromarray(np.clip(scene + rng.normal(0, rng.uniform(5, 25), scene.shape), 0, 255).astype(np.uint8))


def _fit(image: Image.Image, longest: float) -> Image.Image:
    scale = max(1.0, longest) / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


# --- the steps -----------------------------------------------------------------------------


@dataclass
class Features:
    """Pre-projection vectors of sampled images: ``originals`` (N, D), ``views`` (N, V, D)."""

    originals: np.ndarray
    views: np.ndarray
    products: np.ndarray  # (N,) product id of each image
    unreadable: int = 0


def sample_images(vs: "VisualSearch", max_images: int, seed: int) -> tuple[list[ImageTask], int]:
    """Up to ``max_images`` indexed local images of whole products chosen at random (a
    product's rank is a hash of its id and ``seed``: memory stays bounded however large
    the catalogue). Returns them (by product) and how many images at URLs were passed over."""
    kept: list[tuple[bytes, int, ImageTask]] = []
    remote, last = 0, 0
    while True:
        with vs.sessions() as session:
            page = catalogue.indexed_images_after(session, last, PAGE)
        if not page:
            break
        last = page[-1].id
        for image in page:
            task = ImageTask(image_id=image.id, product_id=image.product_id, sku=image.sku, path=image.path)
            if task.remote:
                remote += 1
                continue
            rank = hashlib.blake2b(f"{seed}:{image.product_id}".encode(), digest_size=8).digest()
            kept.append((rank, image.id, task))
        if len(kept) > 2 * max_images:
            kept = sorted(kept, key=lambda item: item[:2])[:max_images]
    return [task for *_, task in sorted(kept, key=lambda item: item[:2])[:max_images]], remote


def embed_features(embedder: Embedder, tasks: Sequence[ImageTask], *, views: int, seed: int, max_pixels: int,
                   batch_images: int = 16, progress: Progress | None = None) -> Features:
    """Each image's vector and those of ``views`` shopper photos of it (``embedder``
    should have no projection; the photos are embedded as queries). Images that cannot be
    read are left out."""
    augment = ShopperViews(max(embedder.query_decode_size, 32))
    rng = np.random.default_rng(seed)
    originals, photos, products, unreadable = [], [], [], 0
    pool: collections.deque[tuple[int, Image.Image]] = collections.deque(maxlen=CLUTTER_POOL)
    if progress is not None:
        progress.set_total(len(tasks))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(tasks), batch_images):
            batch = tasks[start:start + batch_images]
            images, kept, shots = [], [], []
            for task in batch:
                try:
                    image = load_image(task.path, max_pixels=max_pixels,
                                       target_size=2 * max(embedder.decode_size, embedder.query_decode_size))
                except (ImageError, OSError) as exc:
                    logger.warning("tune: skipping %s: %s", task.path, exc)
                    unreadable += 1
                    continue
                # Photos among the products read before this one (never batch-mates only):
                # a seed gives the same photos whatever the batch size.
                own = cutout(image)
                others = [item for product, item in pool if product != task.product_id]
                shots += [augment(image, rng, others, own) for _ in range(views)]
                # Clutter is pasted at a quarter of the photo at most: a small copy will do.
                pool.append((task.product_id, own if max(own.size) <= augment.size else _fit(own, augment.size)))
                images.append(image)
                kept.append(task)
            if kept:
                originals.append(embedder.embed_images(images))
                photos.append(embedder.embed_queries(shots).reshape(len(kept), views, -1))
                products += [task.product_id for task in kept]
            if progress is not None:
                progress.advance(len(batch))
    if not products:
        raise ConfigurationError("tune: none of the sampled catalogue images could be read")
    return Features(np.concatenate(originals), np.concatenate(photos), np.asarray(products, np.int64), unreadable)


def split_products(products: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """A mask of the images whose product is held out (``holdout`` of the products, at
    least one when above 0, leaving at least :data:`MIN_TRAIN_PRODUCTS` to train on).

    Raises:
        ConfigurationError: too few products.
    """
    unique = np.unique(products)
    held = max(round(holdout * len(unique)), 1) if holdout > 0 else 0
    if len(unique) - held < MIN_TRAIN_PRODUCTS:
        raise ConfigurationError(f"tune needs at least {MIN_TRAIN_PRODUCTS + (holdout > 0)} products with readable "
                                 f"images, not {len(unique)}")
    chosen = np.random.default_rng(seed).permutation(unique)[:held]
    return np.isin(products, chosen)


def pca_projection(vectors: np.ndarray, dim: int) -> Projection:
    """The ``dim`` principal directions of ``vectors`` (not whitened: the start of training).

    Raises:
        ConfigurationError: ``dim`` above min(N - 1, D).
    """
    data = np.asarray(vectors, np.float64)
    count, width = data.shape
    if not 1 <= dim <= min(count - 1, width):
        raise ConfigurationError(f"tune: --dim must be 1..{min(count - 1, width)} for {count} training vectors of "
                                 f"{width} dimensions, not {dim}")
    mean = data.mean(axis=0)
    _, _, components = np.linalg.svd(data - mean, full_matrices=False)
    return Projection(mean=mean.astype(np.float32), matrix=components[:dim].T.astype(np.float32))


def train_projection(features: Features, start: Projection, options: TuneOptions,
                     device: torch.device) -> tuple[Projection, list[float]]:
    """``start`` trained with InfoNCE on ``features`` (see the module's docstring).

    Each step takes a batch of images; the query is one shopper photo of each, the key its
    catalogue image or, half of the time, another photo of it. Every key of the same
    product is a positive (multi-positive InfoNCE), the rest of the batch are negatives;
    the loss is symmetric (queries to keys and back).

    Returns:
        The trained projection (``start``'s mean, a new matrix) and each epoch's mean loss.
    """
    generator = torch.Generator().manual_seed(options.seed)
    originals = torch.from_numpy(features.originals).to(device)
    photos = torch.from_numpy(features.views).to(device)
    products = torch.from_numpy(features.products).to(device)
    mean = torch.from_numpy(start.mean).to(device)
    weight = torch.nn.Parameter(torch.from_numpy(start.matrix.copy()).to(device))
    optimiser = torch.optim.Adam([weight], lr=options.learning_rate)
    count, views = photos.shape[:2]
    losses = []
    for _epoch in range(options.epochs):
        order, total, steps = torch.randperm(count, generator=generator), 0.0, 0
        for begin in range(0, count, options.batch_size):
            batch = order[begin:begin + options.batch_size]
            if len(batch) < 2:
                continue
            first = torch.randint(views, (len(batch),), generator=generator)
            # Another photo of the same image (never the same one), or its catalogue image.
            second = (first + torch.randint(1, max(views, 2), (len(batch),), generator=generator)) % views
            use_photo = (torch.rand(len(batch), generator=generator) < 0.5) & (views > 1)
            batch, first, second, use_photo = (tensor.to(device) for tensor in (batch, first, second, use_photo))
            queries = photos[batch, first]
            keys = torch.where(use_photo[:, None], photos[batch, second], originals[batch])
            loss = _info_nce(_project(queries, mean, weight), _project(keys, mean, weight), products[batch],
                             options.temperature)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, steps = total + float(loss.detach()), steps + 1
        losses.append(total / max(steps, 1))
    matrix = weight.detach().cpu().numpy().astype(np.float32)
    return Projection(mean=start.mean, matrix=matrix), losses


def _project(vectors: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize((vectors - mean) @ weight, dim=1)


def _info_nce(queries: torch.Tensor, keys: torch.Tensor, products: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = queries @ keys.T / temperature
    positive = products[:, None] == products[None, :]

    def one_way(scores: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(scores, dim=1)
                - torch.logsumexp(scores.masked_fill(~positive, float("-inf")), dim=1)).mean()

    return (one_way(logits) + one_way(logits.T)) / 2


def recall_at_1(queries: np.ndarray, query_products: np.ndarray, gallery: np.ndarray,
                gallery_products: np.ndarray, *, chunk: int = 1024) -> float | None:
    """Share of ``queries`` whose nearest ``gallery`` vector (inner product) is of their
    product (None without queries)."""
    if not len(queries):
        return None
    hits = 0
    for begin in range(0, len(queries), chunk):
        nearest = np.argmax(queries[begin:begin + chunk] @ gallery.T, axis=1)
        hits += int(np.sum(gallery_products[nearest] == query_products[begin:begin + chunk]))
    return hits / len(queries)


def held_out_recall(features: Features, held: np.ndarray, projection: Projection | None) -> float | None:
    """recall@1 of the held-out images' photos against every sampled catalogue image."""
    def project(vectors: np.ndarray) -> np.ndarray:
        return vectors if projection is None else projection.apply(vectors)

    photos = features.views[held]
    query_products = np.repeat(features.products[held], photos.shape[1])
    return recall_at_1(project(photos.reshape(-1, photos.shape[-1])), query_products,
                       project(features.originals), features.products)


# --- the whole run -------------------------------------------------------------------------


def tune(vs: "VisualSearch", options: TuneOptions | None = None, *, wait: float = 0.0,
         progress: Progress | None = None, reembed_progress: Progress | None = None) -> TuneReport:
    """Learn a projection from the catalogue's images and switch the data directory to
    the recipe ``<base>+tuned`` that applies it (see the module's docstring).

    Args:
        vs: an indexed data directory (its searches go on meanwhile).
        options: see :class:`TuneOptions`.
        wait: seconds the re-embedding waits for another batch run.
        progress, reembed_progress: receive the feature extraction's and the re-embedding's progress.

    Returns:
        The report; ``reembed`` is the re-embedding's report (None on a dry run).

    Raises:
        ConfigurationError: nothing indexed, too few readable images or products, or
            ``dim`` too large for the backbone or the sample.
        TuneRefusedError: (unless ``force`` or ``dry_run``) the tuned projection did not
            beat the vectors answering now on the held-out products, or none were held out.
        Everything :func:`~visualsearch.reembed.reembed` raises.
    """
    options = options or TuneOptions()
    started = time.perf_counter()
    if vs.read_only and not options.dry_run:
        raise ConfigurationError("this VisualSearch was opened read-only: tune needs to write (or use a dry run)")
    current = vs.generation()
    if current.ref.identity is None:
        raise ConfigurationError("nothing is indexed here yet: index the catalogue before tuning")
    embedder = current.embedder()
    base = _base_recipe(vs, embedder.recipe)
    tasks, remote = sample_images(vs, options.max_images, options.seed)
    unprojected = replace(base, projection=None)
    plain = embedder if embedder.recipe == unprojected else Embedder(
        base.backbone, recipe=unprojected, weights_path=embedder.weights_path, device=vs.settings.device,
        threads=vs.settings.threads, allow_download=False)
    if options.dim is not None and options.dim > plain.dim:
        raise ConfigurationError(f"tune: --dim must be at most {plain.dim} ({base.backbone}'s dimension), "
                                 f"not {options.dim}")
    features = embed_features(plain, tasks, views=options.views, seed=options.seed,
                              max_pixels=vs.settings.max_image_pixels, batch_images=vs.settings.batch_size,
                              progress=progress)
    featured = time.perf_counter()
    held = split_products(features.products, options.holdout, options.seed)
    train = Features(features.originals[~held], features.views[~held], features.products[~held])
    sample = np.concatenate([train.originals, train.views.reshape(-1, train.views.shape[-1])])
    # A small catalogue has fewer training vectors than dimensions: PCA gives at most N - 1.
    dim = options.dim or max(1, min(DEFAULT_DIM, plain.dim, len(sample) - 1))
    start = pca_projection(sample, dim)
    tuned, losses = train_projection(train, start, options, resolve_device(vs.settings.device))
    trained = time.perf_counter()
    report = TuneReport(recipe=base.name + TUNED_SUFFIX, base_recipe=base.name, in_dim=start.in_dim,
                        dim=dim, images=len(features.products), products=len(np.unique(features.products)),
                        held_out_products=len(np.unique(features.products[held])),
                        queries=int(held.sum()) * options.views, views=options.views, epochs=options.epochs,
                        loss={"first_epoch": losses[0], "last_epoch": losses[-1]},
                        unreadable_images=features.unreadable, remote_images=remote)
    report.recall_at_1 = {"identity": held_out_recall(features, held, None),
                          "pca": held_out_recall(features, held, start)}
    if embedder.projection is not None and embedder.projection.in_dim == start.in_dim:
        report.recall_at_1["current"] = held_out_recall(features, held, embedder.projection)
    report.recall_at_1["tuned"] = held_out_recall(features, held, tuned)
    report.seconds = {"features": featured - started, "train": trained - featured}
    logger.info("tune: recall@1 of held-out products %s", report.recall_at_1)
    baseline = report.recall_at_1.get("current", report.recall_at_1["identity"])
    if baseline is not None:
        report.improved = report.recall_at_1["tuned"] > baseline
    if not options.dry_run and not options.force and not report.improved:
        report.seconds["total"] = time.perf_counter() - started
        raise TuneRefusedError(_refusal(report, baseline), report)
    if not options.dry_run:
        _record(vs, base, tuned, report)
        switched = vs.reembed(recipe=report.recipe, weights=vs.settings.weights or current.ref.weights_path,
                              wait=wait, progress=reembed_progress)
        report.reembed = switched.to_dict()
        report.seconds["reembed"] = switched.seconds
    report.seconds["total"] = time.perf_counter() - started
    return report


def _refusal(report: TuneReport, baseline: float | None) -> str:
    if baseline is None:
        return ("nothing was held out (--holdout 0), so nothing shows the tuned projection is better: nothing "
                "was switched; hold out products to measure, or pass --force to switch anyway")
    return (f"the tuned projection found {report.recall_at_1['tuned']:.3f} of the held-out products' photos at "
            f"rank 1, the vectors answering now {baseline:.3f}: nothing was switched. More products (or "
            "--epochs, --views, --dim) may help; --force switches anyway")


def _base_recipe(vs: "VisualSearch", recipe: Recipe) -> Recipe:
    """The recipe whose features a tuned recipe projects: ``recipe`` itself, or the base
    of the data directory's (tuned) recipe ``recipe``."""
    with vs.sessions() as session:
        records = catalogue.data_recipes(session)
    for record in records:
        if record.recipe.name == recipe.name:
            return get_recipe(record.base)
    return recipe


def _record(vs: "VisualSearch", base: Recipe, projection: Projection, report: TuneReport) -> None:
    """Save the projection under a name carrying its hash and record the recipe that applies it,
    with the projection's bytes in the catalogue (the file here is only this host's cache)."""
    folder = vs.data_dir / TUNED_DIR
    safe = "".join(char if char.isalnum() or char in "_.-" else "_" for char in report.recipe)
    temporary = folder / f".{safe}.{os.getpid()}.pending.npz"  # its name needs its hash
    pending = projection.save(temporary)
    name = f"{safe}-{pending.sha256[:12]}.npz"
    os.replace(temporary, folder / name)
    data = (folder / name).read_bytes()
    recipe = replace(base, name=report.recipe, projection=f"{TUNED_DIR}/{name}", hidden=True,
                     description=f"{base.name} projected to {projection.out_dim} dimensions, learned from this "
                                 "catalogue (visualsearch tune)")
    report.projection, report.projection_sha256 = str(Path(TUNED_DIR) / name), pending.sha256
    with vs.session() as session:
        stored = catalogue.stored_identity(session)
        catalogue.store_projection(session, data)
        catalogue.record_data_recipe(session, DataRecipe(recipe, base=base.name, projection_sha256=pending.sha256),
                                     keep_fingerprint=stored.recipe_hash if stored else None)
    logger.info("tune: recorded recipe %s (projection %s)", recipe.name, name)
