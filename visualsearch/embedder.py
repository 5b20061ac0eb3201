"""Turn images into L2-normalised float32 vectors: backbone feature map -> GeM pooling -> L2,
as a :class:`~visualsearch.recipes.Recipe` says (input size, resize policy, GeM p, flip and
scale averaging, post-projection)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from .backbones import BackboneSpec, get_backbone, resolve_weights, weights_sha256
from .errors import ConfigurationError
from .recipes import Projection, Recipe, choose_recipe, default_recipe, load_projection, resolve_recipe

logger = logging.getLogger(__name__)

# p=3 is the value Radenovic et al. (2018) found best for retrieval without training;
# p=1 is average pooling, p->inf max pooling.
GEM_P = 3.0
GEM_EPS = 1e-6


def gem_pool(feature_map: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Generalised-mean pooling of (N, C, H, W) over H and W -> (N, C), each position
    weighed by ``weights`` (H, W) when given."""
    powered = feature_map.clamp(min=eps).pow(p)
    if weights is None:
        return powered.mean(dim=(2, 3)).pow(1.0 / p)
    return (powered * weights).sum(dim=(2, 3)).div(weights.sum()).pow(1.0 / p)


def centre_prior(height: int, width: int, sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) weights of a Gaussian centred on the map, ``sigma`` in half-sides of the map
    (1 at the centre, exp(-0.5) at ``sigma`` half-sides from it)."""
    rows = (torch.arange(height, dtype=torch.float32, device=device) - (height - 1) / 2) / (height / 2)
    columns = (torch.arange(width, dtype=torch.float32, device=device) - (width - 1) / 2) / (width / 2)
    return torch.exp(-(rows[:, None] ** 2 + columns[None, :] ** 2) / (2 * sigma**2))


class PadToSquare(torch.nn.Module):
    """Pad a (C, H, W) uint8 image to a centred square with ``fill`` (white)."""

    def __init__(self, fill: int = 255):
        super().__init__()
        self.fill = fill

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        side = max(height, width)
        left, top = (side - width) // 2, (side - height) // 2
        return torch.nn.functional.pad(image, (left, side - width - left, top, side - height - top),
                                       value=self.fill)


def build_transform(spec: BackboneSpec, recipe: Recipe | None = None) -> T.Compose:
    """The exact preprocessing of ``spec`` under ``recipe`` (default: the backbone's own):
    PIL RGB image -> normalised float tensor at the recipe's largest scale."""
    pre = spec.preprocessing
    recipe = resolve_recipe(recipe, spec) if recipe is not None else default_recipe(spec.name, spec)
    interpolation = _INTERPOLATION[pre.interpolation]
    side = recipe.tensor_size
    if recipe.resize == "pad":
        geometry = [PadToSquare(), T.Resize((side, side), interpolation=interpolation, antialias=True)]
    else:
        geometry = [T.Resize(recipe.scaled(recipe.resize_size, max(recipe.scales)), interpolation=interpolation,
                             antialias=True),
                    T.CenterCrop(side)]
    return T.Compose([
        T.PILToTensor(),
        *geometry,
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(pre.mean), std=list(pre.std)),
    ])


_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def resolve_device(requested: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present) -> a torch device.

    Raises:
        ConfigurationError: CUDA was asked for but is not available.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigurationError(f"unknown device {requested!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "device 'cuda' was requested but PyTorch sees no CUDA GPU here; use --device cpu"
        )
    return device


@dataclass(frozen=True)
class EmbedderIdentity:
    """What makes two embeddings comparable: same backbone, same weights, same size, same
    recipe (name, version and :meth:`~visualsearch.recipes.Recipe.fingerprint`)."""

    backbone: str
    weights_sha256: str
    dim: int
    recipe: str | None = None
    recipe_version: int | None = None
    recipe_hash: str | None = None


class Embedder:
    """A loaded backbone that embeds batches of PIL images.

    Args:
        backbone: registered backbone name.
        recipe: a recipe (or its registered name) for that backbone; default: its own.
        projection_dir: where the recipe's projection file lives (the data directory).
        projection: the recipe's projection, already loaded (then ``projection_dir`` is
            not read; a Ray actor gets it from the driver).
        weights_path: explicit weights file; otherwise the spec's sources are tried.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        threads: intra-op CPU threads for torch (``None`` keeps torch's default).
        allow_download: let torch.hub download missing torchvision weights.

    Raises:
        ConfigurationError: unknown backbone or recipe, a recipe for another backbone, a
            missing projection file, or an unusable device.
        WeightsUnavailableError: the weights cannot be found or do not fit the network.
    """

    def __init__(self, backbone: str, *, recipe: Recipe | str | None = None,
                 projection_dir: str | os.PathLike | None = None, projection: Projection | None = None,
                 weights_path: str | os.PathLike | None = None, device: str = "cpu", threads: int | None = None,
                 allow_download: bool = True):
        self.spec = get_backbone(backbone)
        if isinstance(recipe, str):
            recipe = choose_recipe(recipe=recipe, backbone=backbone, default_backbone=backbone)
        self.recipe: Recipe = resolve_recipe(recipe, self.spec) if recipe else default_recipe(backbone, self.spec)
        if projection is not None and not self.recipe.projection:
            raise ConfigurationError(f"recipe {self.recipe.name!r} has no projection, yet one was given")
        self.projection: Projection | None = (projection if projection is not None
                                              else load_projection(self.recipe, projection_dir))
        if self.projection is not None and self.projection.in_dim != self.spec.embedding_dim:
            raise ConfigurationError(
                f"the projection of recipe {self.recipe.name!r} takes {self.projection.in_dim}-dimensional "
                f"vectors, but {backbone} makes {self.spec.embedding_dim}")
        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.weights_path: Path = resolve_weights(
            self.spec, weights_path=weights_path, allow_download=allow_download
        )
        self.identity = EmbedderIdentity(
            backbone=self.spec.name,
            weights_sha256=weights_sha256(self.weights_path),
            dim=self.dim,
            recipe=self.recipe.name,
            recipe_version=self.recipe.version,
            recipe_hash=self.recipe.fingerprint(self.projection.sha256 if self.projection else None),
        )
        network = self.spec.build(self.weights_path).eval()
        # channels_last is ~1.4x faster for these CNNs on CPU (oneDNN) and on tensor cores.
        self.network = network.to(self.device, memory_format=torch.channels_last)
        self.transform = build_transform(self.spec, self.recipe)
        # Uploaded photos may be seen at another size than catalogue images (Recipe.for_queries).
        self.query_recipe = self.recipe.for_queries()
        self.query_transform = (self.transform if self.query_recipe is self.recipe
                                else build_transform(self.spec, self.query_recipe))
        self._lock = threading.Lock()
        logger.info("loaded backbone %s (%s, recipe %s) on %s", backbone, self.weights_path, self.recipe.name,
                    self.device)

    @property
    def dim(self) -> int:
        return self.projection.out_dim if self.projection is not None else self.spec.embedding_dim

    @property
    def input_size(self) -> int:
        return self.recipe.input_size

    @property
    def decode_size(self) -> int:
        """The short side an image needs before preprocessing, at the recipe's largest
        scale (JPEGs decode at about that)."""
        return self.recipe.decode_size

    @property
    def query_decode_size(self) -> int:
        """The short side a query photo needs before preprocessing."""
        return self.query_recipe.decode_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> its (3, S, S) input tensor (safe to call in worker processes)."""
        return self.transform(image)

    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """A (N, 3, S, S) batch of preprocessed images -> (N, dim) float32, rows of norm 1.

        Calls are serialised by the embedder's lock: concurrent requests queue instead of
        multiplying activation memory and oversubscribing the cores. (Measured on the
        2-core reference machine: a forward pass takes ~16 ms in a process's main thread
        and ~35 ms in any other thread, a dedicated one included, because PyTorch's
        OpenMP pool is fastest in the thread that created it; gunicorn's sync workers
        serve requests in the main thread.)
        """
        with self._lock:
            return self._embed_batch(batch)

    def _embed_batch(self, batch: torch.Tensor, *, query: bool = False) -> np.ndarray:
        recipe = self.query_recipe if query else self.recipe
        sigma = self.recipe.query_centre_prior if query else None
        with torch.inference_mode():
            batch = batch.to(self.device, non_blocking=True)
            pooled = []
            for view in self._views(batch, recipe):
                feature_map = self._feature_map(view).float()
                weights = None if sigma is None else centre_prior(*feature_map.shape[2:], sigma, feature_map.device)
                pooled.append(torch.nn.functional.normalize(gem_pool(feature_map, p=recipe.gem_p, weights=weights),
                                                            dim=1))
            vectors = pooled[0]
            if len(pooled) > 1:  # one view stays bit-for-bit what it was before recipes
                vectors = torch.nn.functional.normalize(torch.stack(pooled).sum(dim=0), dim=1)
        vectors = vectors.cpu().numpy().astype(np.float32, copy=False)
        return self.projection.apply(vectors) if self.projection is not None else vectors

    def _views(self, batch: torch.Tensor, recipe: Recipe):
        """The recipe's inputs of one preprocessed batch: each scale (resized from the
        largest), and its mirror image when the recipe flips."""
        mode = self.spec.preprocessing.interpolation
        for scale in recipe.scales:
            side = recipe.scaled(recipe.input_size, scale)
            view = batch if side == batch.shape[-1] else torch.nn.functional.interpolate(
                batch, size=(side, side), mode=mode, antialias=True, align_corners=False)
            yield view
            if recipe.flip:
                yield view.flip(-1)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Catalogue images (RGB PIL) -> (N, dim) float32 unit vectors."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_batch(torch.stack([self.preprocess(img) for img in images]))

    def embed_queries(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Uploaded query photos (RGB PIL) -> (N, dim) float32 unit vectors, seen as the
        recipe sees queries (its query input size and centre prior); the same as
        :meth:`embed_images` for a recipe without them."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = torch.stack([self.query_transform(img) for img in images])
        with self._lock:
            return self._embed_batch(batch, query=True)

    def classify(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """ImageNet logits (N, 1000) of the pretrained head: proves the weights are real."""
        batch = torch.stack([self.preprocess(img) for img in images])
        with self._lock:
            return self._classify(batch)

    def _classify(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.network.classify(self._feature_map(batch)).float().cpu()

    def _feature_map(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self.network(batch)

