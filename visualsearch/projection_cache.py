"""A tuned recipe's projection file: kept in the catalogue, cached in the data directory.

``visualsearch tune`` records its recipe and the projection's bytes in the catalogue,
which every replica shares; a data directory holds only a copy. Before a process loads
such a recipe, :func:`ensure_projection` puts the catalogue's bytes in place where the
copy is missing or differs (another host tuned, or the file was damaged).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from sqlalchemy.orm import Session

from .catalogue import store as catalogue
from .durable import write_file_atomic
from .errors import ConfigurationError
from .recipes import Recipe, file_sha256, projection_path

logger = logging.getLogger(__name__)


def recorded_projection_sha256(session: Session, recipe: Recipe) -> str | None:
    """The SHA-256 the catalogue recorded for ``recipe``'s projection (None: it has none,
    or ``recipe`` is not one the catalogue defines, e.g. a registered one)."""
    if not recipe.projection:
        return None
    for record in catalogue.data_recipes(session):
        if record.recipe.name == recipe.name and record.recipe.projection == recipe.projection:
            return record.projection_sha256
    return None


def ensure_projection(session: Session, recipe: Recipe, data_dir: str | os.PathLike, *,
                      share: bool = False) -> Path | None:
    """Make the data directory's copy of ``recipe``'s projection the one the catalogue
    recorded, fetching the catalogue's bytes when the copy is missing or differs.

    Args:
        session: a catalogue session (only read unless ``share``).
        share: a right local copy that the catalogue lacks (tuned before the catalogue
            kept projections) is stored there for the other hosts; the caller commits.
        recipe: the recipe about to be loaded; one the catalogue does not define (no
            projection, a registered recipe, an absolute path) is left alone.
        data_dir: the data directory its projection's file name is relative to.

    Returns:
        The projection file's path (None: nothing to ensure).

    Raises:
        ConfigurationError: neither the data directory nor the catalogue holds the
            projection's bytes (or the catalogue's do not have the recorded hash).
        OSError: the data directory refused the file.
    """
    expected = recorded_projection_sha256(session, recipe)
    if expected is None:
        return None
    path = projection_path(recipe, data_dir)
    if path.is_file() and file_sha256(path) == expected:
        if share and catalogue.projection_bytes(session, expected) is None:
            catalogue.store_projection(session, path.read_bytes())
            logger.info("recipe %s: projection %s stored in the catalogue for other hosts", recipe.name, expected[:12])
        return path
    data = catalogue.projection_bytes(session, expected)
    if data is None:
        raise ConfigurationError(
            f"recipe {recipe.name!r} projects with {recipe.projection} (SHA-256 {expected[:12]}), which is in "
            f"neither the data directory ({data_dir}) nor the catalogue: re-run `visualsearch tune` to learn it "
            "again")
    if hashlib.sha256(data).hexdigest() != expected:
        raise ConfigurationError(
            f"the catalogue's copy of recipe {recipe.name!r}'s projection is damaged (its SHA-256 is not "
            f"{expected[:12]}): re-run `visualsearch tune` to learn it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, data)
    logger.info("recipe %s: projection %s fetched from the catalogue into %s", recipe.name, expected[:12], path)
    return path
