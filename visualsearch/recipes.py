"""Embedding recipes: how an image becomes a vector on top of a backbone, by registered name.

A :class:`Recipe` fixes what lies between a decoded image and its stored vector that the
backbone's weights do not: the input size and resize policy, the GeM exponent,
horizontal-flip and multi-scale averaging, and an optional post-projection (PCA
whitening, a :class:`Projection` stored as an ``.npz`` file in the data directory).
Each backbone's own preprocessing is its default recipe, named like the backbone, so
``--backbone NAME`` alone embeds exactly as it did before recipes existed.

The catalogue records the recipe's name, version and :meth:`Recipe.fingerprint` beside
the backbone; opening it with another recipe is a :class:`RecipeMismatchError`, and
``visualsearch reembed --recipe NAME`` switches a catalogue to another one.

Importing this module loads no network (nor torch): the catalogue checks identities
with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .durable import write_file_atomic
from .errors import BackboneMismatchError, ConfigurationError

if TYPE_CHECKING:
    from .backbones import BackboneSpec

logger = logging.getLogger(__name__)

RESIZE_POLICIES = ("crop", "pad")
# Recipe fields that concern uploaded photos only. Unset, they stay out of a recipe's
# parameters and records, so that recipes without them keep the fingerprints their
# indexes recorded, and builds from before them can still read the records.
QUERY_SETTINGS = ("query_input_size", "query_centre_prior")
# p=3 is the value Radenovic et al. (2018) found best for retrieval without training
# (the embedder's GEM_P; a test keeps the two equal).
DEFAULT_GEM_P = 3.0
# Whitening divides by sqrt(eigenvalue): directions of almost no variance (noise) would
# be blown up, so each eigenvalue gets this share of the largest one added first.
WHITENING_SHRINKAGE = 1e-6


class RecipeMismatchError(BackboneMismatchError):
    """The catalogue's vectors were made with another recipe (or another version of it)."""

    code = "recipe_mismatch"


@dataclass(frozen=True)
class Recipe:
    """How an image becomes a vector with one backbone.

    Attributes:
        name: registered name (a backbone's default recipe is named like the backbone).
        backbone: the registered backbone whose network and normalisation it uses.
        version: bump it when a recipe's parameters change: indexes made with the old
            version then refuse to be searched with the new one.
        input_size: side of the square the network sees at scale 1 (None: the backbone's).
        resize_size: ``crop`` only: the short side is resized to this before the centre
            ``input_size`` crop (None: the backbone's ratio of the two).
        resize: ``crop`` (short side resized, centre square cropped) or ``pad`` (the whole
            image padded to a square on white, then resized: nothing is cut off).
        gem_p: generalised-mean pooling exponent (1: average pooling, large: max pooling).
        flip: average with the horizontally mirrored image's vector.
        scales: input sizes relative to ``input_size`` whose vectors are averaged.
        projection: an ``.npz`` :class:`Projection` applied after pooling (a file name
            in the data directory, or an absolute path); its SHA-256 is part of the
            recipe's fingerprint.
        query_input_size: side of the square that uploaded query photos are seen at
            (None: ``input_size``). A shopper's product fills less of the frame than a
            catalogue shot: a larger input gives it more feature-map positions. Catalogue
            images keep ``input_size``.
        query_centre_prior: when set, a query photo's GeM weighs each feature-map position
            by a Gaussian centred on the map with this sigma (in half-sides of the map), so
            that what the shopper aimed at outweighs the clutter at the edges. Catalogue
            images are pooled evenly.
        description: one line for ``visualsearch recipes``.
        hidden: registered but not listed (test recipes).
    """

    name: str
    backbone: str
    version: int = 1
    input_size: int | None = None
    resize_size: int | None = None
    resize: str = "crop"
    gem_p: float = DEFAULT_GEM_P
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    projection: str | None = None
    description: str = ""
    hidden: bool = False
    query_input_size: int | None = None
    query_centre_prior: float | None = None

    def __post_init__(self) -> None:
        # Canonical numbers (1 and 1.0 must hash alike).
        object.__setattr__(self, "scales", tuple(float(scale) for scale in self.scales))
        object.__setattr__(self, "gem_p", float(self.gem_p))
        if self.query_centre_prior is not None:
            object.__setattr__(self, "query_centre_prior", float(self.query_centre_prior))
        problems = []
        if not self.name or not self.backbone:
            problems.append("a recipe needs a name and a backbone")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"resize must be one of {', '.join(RESIZE_POLICIES)}, not {self.resize!r}")
        if not (1.0 <= self.gem_p <= 100.0):
            problems.append(f"gem_p must be between 1 and 100, not {self.gem_p}")
        if not self.scales or any(not (0.0 < scale <= 4.0) for scale in self.scales):
            problems.append(f"scales must be one or more numbers in (0, 4], not {self.scales}")
        if len(set(self.scales)) != len(self.scales):
            problems.append(f"scales repeat: {self.scales}")
        if self.query_centre_prior is not None and not (0.05 <= self.query_centre_prior <= 10.0):
            problems.append(f"query_centre_prior must be between 0.05 and 10, not {self.query_centre_prior}")
        for size_name in ("input_size", "resize_size", "query_input_size"):
            size = getattr(self, size_name)
            if size is not None and size < 8:
                problems.append(f"{size_name} must be at least 8, not {size}")
        if self.version < 1:
            problems.append(f"version must be at least 1, not {self.version}")
        if problems:
            raise ConfigurationError(f"recipe {self.name!r}: " + "; ".join(problems))

    @property
    def resolved(self) -> bool:
        return self.input_size is not None and self.resize_size is not None

    def scaled(self, size: int, scale: float) -> int:
        """``size`` at relative ``scale``, in whole pixels."""
        return max(1, round(size * scale))

    @property
    def tensor_size(self) -> int:
        """Side of the preprocessed tensor: the input size at the largest scale (smaller
        scales are resized from it on the device)."""
        return self.scaled(self._input_size(), max(self.scales))

    @property
    def decode_size(self) -> int:
        """The short side an image needs before preprocessing, at the largest scale."""
        largest = max(self.scales)
        if self.resize == "pad":
            return self.scaled(self._input_size(), largest)
        return self.scaled(max(self.resize_size or 0, self._input_size()), largest)

    def for_queries(self) -> "Recipe":
        """The recipe query photos are preprocessed with: ``query_input_size`` as the input
        size (the crop keeps the backbone's ratio), or this recipe itself."""
        if self.query_input_size is None or self.query_input_size == self._input_size():
            return self
        if self.resize == "pad":
            resize_size = self.query_input_size
        else:
            resize_size = round(self.query_input_size * (self.resize_size or self._input_size()) / self._input_size())
        return replace(self, input_size=self.query_input_size, resize_size=resize_size)

    @property
    def views(self) -> int:
        """Forward passes per image."""
        return len(self.scales) * (2 if self.flip else 1)

    def parameters(self, projection_sha256: str | None = None) -> dict:
        """What determines the vectors (not the name, version or description)."""
        if not self.resolved:
            raise ConfigurationError(f"recipe {self.name!r} is not resolved against its backbone yet")
        parameters = {"backbone": self.backbone, "input_size": self.input_size, "resize_size": self.resize_size,
                      "resize": self.resize, "gem_p": self.gem_p, "flip": self.flip, "scales": list(self.scales),
                      "projection_sha256": projection_sha256 if self.projection else None}
        for name in QUERY_SETTINGS:  # only when set (see QUERY_SETTINGS)
            if getattr(self, name) is not None:
                parameters[name] = getattr(self, name)
        return parameters

    def fingerprint(self, projection_sha256: str | None = None) -> str:
        """SHA-256 of the canonical JSON of :meth:`parameters` (recorded in the catalogue)."""
        canonical = json.dumps(self.parameters(projection_sha256), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["scales"] = list(self.scales)
        for name in QUERY_SETTINGS:  # only when set: an older recipe_from_dict refuses unknown fields
            if data[name] is None:
                del data[name]
        return data

    def _input_size(self) -> int:
        if self.input_size is None:
            raise ConfigurationError(f"recipe {self.name!r} is not resolved against its backbone yet")
        return self.input_size


# --- the registry ------------------------------------------------------------------------

_REGISTRY: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to the registry (replacing one of the same name) and return it.

    Its backbone is looked up only when the recipe is used, so recipes may be
    registered before their backbone is.
    """
    _REGISTRY[recipe.name] = recipe
    return recipe


def resolve_recipe(recipe: Recipe, spec: "BackboneSpec | None" = None) -> Recipe:
    """``recipe`` with its sizes filled in from its backbone's preprocessing.

    Raises:
        ConfigurationError: unknown backbone, or ``spec`` is another backbone's.
    """
    if spec is None:
        from .backbones import get_backbone

        spec = get_backbone(recipe.backbone)
    if spec.name != recipe.backbone:
        raise ConfigurationError(f"recipe {recipe.name!r} is for backbone {recipe.backbone!r}, not {spec.name!r}")
    pre = spec.preprocessing
    input_size = recipe.input_size or pre.input_size
    if recipe.resize == "pad":
        resize_size = input_size  # the padded square is resized to the input: no crop
    else:
        # Keeps the backbone's crop ratio (e.g. 224 of 256) at another input size.
        resize_size = recipe.resize_size or round(input_size * pre.resize_size / pre.input_size)
    return replace(recipe, input_size=input_size, resize_size=resize_size)


def default_recipe(backbone: str, spec: "BackboneSpec | None" = None) -> Recipe:
    """The recipe named like ``backbone``: its own preprocessing, GeM p=3, no flip, one
    scale, no projection (what every index was before recipes), unless one of that
    name was registered.

    Raises:
        ConfigurationError: unknown backbone.
    """
    registered = _REGISTRY.get(backbone)
    if registered is not None and registered.backbone == backbone:
        return resolve_recipe(registered, spec)
    return resolve_recipe(Recipe(name=backbone, backbone=backbone, description="the backbone's own preprocessing"),
                          spec)


def get_recipe(name: str, local: Mapping[str, Recipe] | None = None) -> Recipe:
    """The recipe registered as ``name`` (or defined by the data directory, or a
    backbone's default recipe), resolved.

    Args:
        local: the recipes a data directory defines for itself, by name (see
            :class:`DataRecipe`); registered names come first.

    Raises:
        ConfigurationError: no recipe or backbone of that name; the message lists them.
    """
    if name in _REGISTRY:
        return resolve_recipe(_REGISTRY[name])
    if local and name in local:
        return resolve_recipe(local[name])
    from .backbones import get_backbone

    try:
        spec = get_backbone(name)
    except ConfigurationError:
        pass
    else:
        return default_recipe(name, spec)
    raise ConfigurationError(f"unknown recipe {name!r}; choose one of: {', '.join(list_recipes())} "
                             "(`visualsearch recipes` describes them)")


def list_recipes() -> list[str]:
    """Names of the user-facing recipes (registered ones and each backbone's default), sorted."""
    from .backbones import list_backbones

    names = {name for name, recipe in _REGISTRY.items() if not recipe.hidden}
    return sorted(names | set(list_backbones()))


def choose_recipe(*, recipe: str | None = None, backbone: str | None = None, stored_backbone: str | None = None,
                  stored_recipe: str | None = None, default_backbone: str,
                  local: Mapping[str, Recipe] | None = None) -> Recipe:
    """The recipe a process embeds with.

    Args:
        recipe: pinned with --recipe / VISUALSEARCH_RECIPE.
        backbone: pinned with --backbone / VISUALSEARCH_BACKBONE.
        stored_backbone, stored_recipe: the catalogue's (``stored_recipe`` None: its
            backbone's default recipe, as recorded before recipes existed).
        default_backbone: for a data directory that holds nothing yet.
        local: the recipes the data directory defines (:func:`pick_data_recipes`).

    Returns:
        A pinned recipe; else the catalogue's recipe when it is for the backbone in use
        (so queries always use the index's recipe); else that backbone's default recipe.

    Raises:
        ConfigurationError: the pinned recipe is for another backbone than the pinned
            one, or a name is unknown.
    """
    if recipe:
        chosen = get_recipe(recipe, local)
        if backbone and chosen.backbone != backbone:
            raise ConfigurationError(f"recipe {chosen.name!r} is for backbone {chosen.backbone!r}, not {backbone!r}: "
                                     "leave out --backbone (a recipe names its backbone), or choose a recipe for "
                                     f"{backbone} (`visualsearch recipes`)")
        return chosen
    name = backbone or stored_backbone or default_backbone
    if stored_backbone == name and stored_recipe:
        return get_recipe(stored_recipe, local)
    return default_recipe(name)


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """The recipe :meth:`Recipe.to_dict` wrote.

    Raises:
        ConfigurationError: unknown fields or invalid parameters.
    """
    unknown = set(data) - {item.name for item in fields(Recipe)}
    if unknown:
        raise ConfigurationError(f"recipe record has unknown fields: {', '.join(sorted(unknown))}")
    try:
        return Recipe(**{**data, "scales": tuple(data.get("scales", (1.0,)))})
    except TypeError as exc:
        raise ConfigurationError(f"malformed recipe record: {exc}") from None


# --- recipes a data directory defines ----------------------------------------------------
# `visualsearch tune` learns a projection from one catalogue's images: its recipe belongs to
# that data directory, so it is recorded in the catalogue (every process resolves it from
# there) rather than registered in code.


@dataclass(frozen=True)
class DataRecipe:
    """A recipe recorded in a data directory's catalogue.

    Attributes:
        recipe: the resolved recipe (its projection a file in the data directory).
        base: the recipe it was derived from (what its features were embedded with).
        projection_sha256: of its projection file when it was recorded, so that its
            fingerprint is known without reading the file.
    """

    recipe: Recipe
    base: str
    projection_sha256: str | None = None

    def fingerprint(self) -> str:
        return self.recipe.fingerprint(self.projection_sha256)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "base": self.base, "projection_sha256": self.projection_sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataRecipe":
        """Raises: ConfigurationError: a malformed record."""
        try:
            return cls(recipe_from_dict(data["recipe"]), base=str(data["base"]),
                       projection_sha256=data.get("projection_sha256"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"malformed data-directory recipe record: {exc!r}") from None


def pick_data_recipes(records: Sequence[DataRecipe], current_fingerprint: str | None = None) -> dict[str, Recipe]:
    """The data directory's recipes by name. A name may have two definitions while a
    re-embedding switches from one to the other: the one whose fingerprint is
    ``current_fingerprint`` (that of the vectors answering now) wins, else the newest
    (the last recorded)."""
    chosen: dict[str, DataRecipe] = {}
    for record in records:
        held = chosen.get(record.recipe.name)
        if held is None or current_fingerprint is None or held.fingerprint() != current_fingerprint:
            chosen[record.recipe.name] = record
    return {name: record.recipe for name, record in chosen.items()}


# --- the catalogue's record --------------------------------------------------------------


def recipe_matches(stored_name: str, stored_version: int | None, stored_hash: str | None, *,
                   name: str, version: int | None = None, fingerprint: str | None = None) -> bool:
    """Whether vectors recorded with the first recipe compare with the second one's (a
    version or fingerprint not recorded, as before recipes, is not compared)."""
    if stored_name != name:
        return False
    if stored_version is not None and version is not None and stored_version != version:
        return False
    return stored_hash is None or fingerprint is None or stored_hash == fingerprint


def check_recipe(stored_name: str, stored_version: int | None, stored_hash: str | None, *,
                 name: str, version: int | None = None, fingerprint: str | None = None) -> None:
    """Raises RecipeMismatchError unless the recorded recipe is ``name`` (and, where both
    are known, the same version and parameters)."""
    if recipe_matches(stored_name, stored_version, stored_hash, name=name, version=version, fingerprint=fingerprint):
        return
    if stored_name != name:
        raise RecipeMismatchError(
            f"this catalogue was indexed with recipe {stored_name!r}, not {name!r}: leave out --recipe / "
            f"VISUALSEARCH_RECIPE (searches use the catalogue's recipe) or pass --recipe {stored_name}, or switch "
            f"the catalogue to {name!r} with `visualsearch reembed --recipe {name}`")
    raise RecipeMismatchError(
        f"recipe {name!r} changed since this catalogue was indexed (version {stored_version}, parameters "
        f"{(stored_hash or '?')[:12]}; now version {version}, parameters {(fingerprint or '?')[:12]}; a "
        f"projection file counts): re-embed with `visualsearch reembed --recipe {name}`, or restore the recipe "
        "(and its projection file)")


# --- post-projection ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Projection:
    """A linear map applied to pooled vectors: ``(v - mean) @ matrix``, then L2-normalised.

    Attributes:
        mean: (D,) float32, subtracted first.
        matrix: (D, d) float32.
        sha256: of the ``.npz`` file it was loaded from or saved to ("" for one in memory).
    """

    mean: np.ndarray
    matrix: np.ndarray
    sha256: str = ""
    eigenvalues: np.ndarray | None = field(default=None, repr=False)

    @property
    def in_dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.matrix.shape[1])

    def apply(self, vectors: np.ndarray, *, normalise: bool = True) -> np.ndarray:
        """(N, D) vectors -> (N, d) float32 (rows of norm 1 when ``normalise``).

        Raises:
            ConfigurationError: the vectors are not D-dimensional.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.in_dim:
            raise ConfigurationError(f"the projection takes {self.in_dim}-dimensional vectors, not {vectors.shape}")
        projected = (vectors - self.mean) @ self.matrix
        if normalise:
            norms = np.linalg.norm(projected, axis=1, keepdims=True)
            projected = projected / np.maximum(norms, 1e-12)
        return projected.astype(np.float32, copy=False)

    def save(self, path: str | os.PathLike) -> "Projection":
        """Write it to ``path`` (``.npz``, atomically). Returns it with the file's SHA-256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean.astype(np.float32), "matrix": self.matrix.astype(np.float32)}
        if self.eigenvalues is not None:
            arrays["eigenvalues"] = self.eigenvalues.astype(np.float64)
        data = io.BytesIO()
        np.savez(data, **arrays)
        write_file_atomic(path, data.getvalue())
        return replace(self, sha256=hashlib.sha256(data.getvalue()).hexdigest())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Projection":
        """Read a projection saved by :meth:`save`.

        Raises:
            ConfigurationError: missing, unreadable or malformed file.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"projection file {path} does not exist (recipes name it relative to the "
                                     "data directory)")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read projection file {path}: {exc}") from None
        return cls.from_bytes(data, source=f"projection file {path}")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "projection") -> "Projection":
        """A projection from the bytes of a file :meth:`save` wrote (its ``sha256`` theirs).

        Args:
            source: what the bytes are, for error messages.

        Raises:
            ConfigurationError: malformed bytes.
        """
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                mean = np.asarray(arrays["mean"], np.float32)
                matrix = np.asarray(arrays["matrix"], np.float32)
                eigenvalues = np.asarray(arrays["eigenvalues"]) if "eigenvalues" in arrays.files else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigurationError(f"cannot read {source}: {exc}") from None
        if matrix.ndim != 2 or mean.shape != (matrix.shape[0],) or not matrix.shape[1]:
            raise ConfigurationError(f"{source}: mean {mean.shape} does not fit matrix {matrix.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(matrix).all()):
            raise ConfigurationError(f"{source} holds non-finite numbers")
        return cls(mean=mean, matrix=matrix, sha256=hashlib.sha256(data).hexdigest(), eigenvalues=eigenvalues)


def learn_pca_whitening(vectors: np.ndarray, dim: int, *, shrinkage: float = WHITENING_SHRINKAGE) -> Projection:
    """PCA whitening learned from ``vectors`` (Jégou & Chum 2012): the ``dim`` principal
    directions, each scaled to unit variance, so the projected vectors are decorrelated.

    Args:
        vectors: (N, D) sample, e.g. the catalogue's stored vectors.
        dim: output dimension, at most min(N - 1, D).
        shrinkage: share of the largest eigenvalue added to each before dividing.

    Raises:
        ConfigurationError: too few vectors, or ``dim`` out of range.
    """
    data = np.asarray(vectors, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 2:
        raise ConfigurationError(f"PCA whitening needs at least 2 vectors of one dimension, not {data.shape}")
    count, width = data.shape
    if not 1 <= dim <= min(count - 1, width):
        raise ConfigurationError(f"whitening dimension must be 1..{min(count - 1, width)} for {count} vectors of "
                                 f"{width}, not {dim}")
    mean = data.mean(axis=0)
    _, singular, components = np.linalg.svd(data - mean, full_matrices=False)
    eigenvalues = singular**2 / (count - 1)
    scale = 1.0 / np.sqrt(eigenvalues[:dim] + shrinkage * eigenvalues[0])
    matrix = components[:dim].T * scale
    return Projection(mean=mean.astype(np.float32), matrix=matrix.astype(np.float32), eigenvalues=eigenvalues[:dim])


def projection_path(recipe: Recipe, data_dir: str | os.PathLike | None) -> Path | None:
    """Where ``recipe``'s projection file is (None: it has none).

    Raises:
        ConfigurationError: a relative file name with no data directory to look in.
    """
    if not recipe.projection:
        return None
    path = Path(recipe.projection).expanduser()
    if path.is_absolute():
        return path
    if data_dir is None:
        raise ConfigurationError(f"recipe {recipe.name!r} projects with {recipe.projection}, which lives in a data "
                                 "directory: none was given")
    return Path(data_dir) / path


def load_projection(recipe: Recipe, data_dir: str | os.PathLike | None) -> Projection | None:
    """``recipe``'s projection, loaded (None: it has none).

    Raises:
        ConfigurationError: its file is missing or malformed.
    """
    path = projection_path(recipe, data_dir)
    return None if path is None else Projection.load(path)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the shipped alternatives ------------------------------------------------------------
# Named variants of the default backbone's embedding, to compare with `visualsearch eval`
# (each switch is a `visualsearch reembed --recipe NAME`).

register_recipe(Recipe(name="lite0-flip", backbone="efficientnet_lite0",
                       flip=True, description="EfficientNet-Lite0 at 224, averaged with the mirrored image"))
register_recipe(Recipe(name="lite0-pad-288", backbone="efficientnet_lite0", input_size=288, resize="pad",
                       description="EfficientNet-Lite0, the whole image padded to a white square at 288"))
register_recipe(Recipe(name="lite0-multiscale", backbone="efficientnet_lite0", scales=(1.0, 1.0 / math.sqrt(2)),
                       description="EfficientNet-Lite0 at 224 and 158 pixels, averaged"))
register_recipe(Recipe(name="lite0-gem4", backbone="efficientnet_lite0", gem_p=4.0,
                       description="EfficientNet-Lite0 at 224 with GeM p=4 (closer to max pooling)"))

# Uploaded photos are not catalogue shots: the product is smaller and off the white, with
# other things around it. These recipes see query photos at a larger input and pool them
# towards the middle (catalogue images embed as with the backbone's own recipe). Measured
# in docs/retrieval-quality.md ("Query photos apart"); follow them with `visualsearch tune`.
register_recipe(Recipe(name="lite0-shopper", backbone="efficientnet_lite0", query_input_size=288,
                       query_centre_prior=0.35,
                       description="EfficientNet-Lite0; query photos at 288, pooled towards their centre"))
register_recipe(Recipe(name="mnv2-shopper", backbone="mobilenet_v2", query_input_size=320, query_centre_prior=0.35,
                       description="MobileNetV2; query photos at 320, pooled towards their centre"))
