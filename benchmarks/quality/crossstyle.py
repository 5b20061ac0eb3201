"""crossstyle: the same freedesktop icon drawn by two icon themes (catalogue Papirus, queries Breeze)."""

from __future__ import annotations

import configparser
import hashlib
import io
import logging
import os
import random
import shutil
import subprocess
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .common import (
    BenchmarkSourceError,
    BuildResult,
    CatalogueRow,
    QueryRow,
    prepare_folder,
    save_image,
    write_benchmark,
)

logger = logging.getLogger(__name__)

NAME = "crossstyle"
ICONS_DIR = Path("/usr/share/icons")
CATALOGUE_THEME, QUERY_THEME = "Papirus", "breeze"
SIZE = 256
# Icon contexts that draw an object (an app's emblem, a device, a folder), mapped to the
# freedesktop context folder names; actions, emblems, status... are glyphs, not objects.
CONTEXTS = {"Applications": "apps", "Devices": "devices", "Places": "places"}
EXTENSIONS = (".svg", ".png")  # at the same size, the first wins

CREDITS = """
# crossstyle: credits

Catalogue: icons of the {catalogue} icon theme; queries: icons of the same freedesktop
names in the {query} icon theme, both from Debian's packages in `/usr/share/icons/`,
rendered to {size} px PNG on white (SVGs with librsvg's `rsvg-convert`) — modified
renderings of the originals.

- Papirus (`papirus-icon-theme`): (c) 2016-2017 Alexey Varfolomeev, Sergei Eremenko
  and the Papirus Development Team, GPL-3.0
  (https://github.com/PapirusDevelopmentTeam/papirus-icon-theme).
- Breeze (`breeze-icon-theme`): (c) 2014 Uri Herrera and the KDE Visual Design Group,
  LGPL-3.0 or later (https://invent.kde.org/frameworks/breeze-icons).
- Adwaita (`adwaita-icon-theme`), when chosen: (c) the GNOME Project, LGPL-3.0 or
  CC BY-SA 3.0 (https://gitlab.gnome.org/GNOME/adwaita-icon-theme).

Names whose drawings are identical within a theme (aliases) are one catalogue product,
its sku the first name, its title all of them; a query lists every product its drawing
stands for.
"""


@dataclass(frozen=True)
class ThemeIcon:
    """The largest drawing of one icon name in a theme."""

    name: str
    path: Path
    category: str  # the context folder: apps, devices, places
    size: int
    rank: int  # position of the extension in EXTENSIONS, lower preferred


def scan_theme(root: str | Path, contexts: dict[str, str] = CONTEXTS) -> dict[str, ThemeIcon]:
    """Icon name -> its largest unscaled, non-symbolic drawing in ``contexts``, read through ``index.theme``.

    Raises:
        BenchmarkSourceError: the theme or its ``index.theme`` is missing.
    """
    root = Path(root)
    index = root / "index.theme"
    if not index.is_file():
        raise BenchmarkSourceError(f"{index} is missing (Debian: apt-get install -y papirus-icon-theme "
                                   "breeze-icon-theme)")
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(index, encoding="utf-8")
    best: dict[str, ThemeIcon] = {}
    for directory in parser.get("Icon Theme", "Directories", fallback="").split(","):
        directory = directory.strip()
        if not parser.has_section(directory) or "symbolic" in directory:
            continue
        section = parser[directory]
        category = contexts.get(section.get("Context", ""))
        if category is None or section.getint("Scale", 1) != 1 or not (root / directory).is_dir():
            continue
        size = section.getint("Size", 0)
        for path in sorted((root / directory).iterdir()):
            if path.suffix not in EXTENSIONS or path.stem.endswith("-symbolic") or not path.is_file():
                continue
            icon = ThemeIcon(path.stem, path, category, size, EXTENSIONS.index(path.suffix))
            known = best.get(icon.name)
            if known is None or (icon.size, -icon.rank) > (known.size, -known.rank):
                best[icon.name] = icon
    return best


def render(source: Path, size: int = SIZE) -> Image.Image:
    """An icon file drawn ``size`` px square on white (SVG through ``rsvg-convert``).

    Raises:
        BenchmarkSourceError: an SVG and no ``rsvg-convert`` (Debian: librsvg2-bin).
        subprocess.CalledProcessError: librsvg could not draw it.
    """
    if source.suffix == ".svg":
        tool = shutil.which("rsvg-convert")
        if tool is None:
            raise BenchmarkSourceError("rsvg-convert is missing (Debian: apt-get install -y librsvg2-bin)")
        drawn = subprocess.run([tool, "--width", str(size), "--height", str(size), "--keep-aspect-ratio",
                                "--format", "png", str(source)], capture_output=True, check=True, timeout=60).stdout
        picture = Image.open(io.BytesIO(drawn))
    else:
        picture = Image.open(source)
    picture = picture.convert("RGBA")
    if max(picture.size) != size:
        scale = size / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2), mask=picture.getchannel("A"))
    return canvas


def _groups(icons: dict[str, ThemeIcon], names: list[str]) -> list[list[str]]:
    """``names`` grouped by identical drawings (symlinks and copies alike), in name order."""
    by_content: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_content[hashlib.sha256(icons[name].path.read_bytes()).hexdigest()].append(name)
    return sorted(sorted(group) for group in by_content.values())


def _render_all(paths: list[Path], size: int) -> dict[Path, Image.Image | None]:
    def attempt(path: Path) -> Image.Image | None:
        try:
            return render(path, size)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
            logger.warning("skipping %s: %s", path, error)
            return None

    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(unique, pool.map(attempt, unique)))


def build(out: str | Path, *, icons_dir: str | Path = ICONS_DIR, catalogue_theme: str = CATALOGUE_THEME,
          query_theme: str = QUERY_THEME, seed: int = 0, limit: int | None = None,
          size: int = SIZE) -> BuildResult:
    """Write ``out/crossstyle``: one theme's icons as the catalogue, another's as queries.

    Args:
        out: the folder that receives ``crossstyle/``.
        icons_dir: the folder holding both themes.
        catalogue_theme, query_theme: theme folder names (e.g. Papirus, breeze, Adwaita).
        seed: picks the names when ``limit`` is given.
        limit: keep this many icon names (seeded sample); None keeps every shared name.
        size: the rendered square's side in pixels.

    Returns:
        What was written. Names that librsvg cannot draw in either theme are left out.

    Raises:
        BenchmarkSourceError: a theme, or ``rsvg-convert``, is missing.
    """
    catalogue_icons = scan_theme(Path(icons_dir) / catalogue_theme)
    query_icons = scan_theme(Path(icons_dir) / query_theme)
    names = sorted(set(catalogue_icons) & set(query_icons))
    if limit is not None and limit < len(names):
        names = sorted(random.Random(seed).sample(names, limit))
    drawn = _render_all([catalogue_icons[name].path for name in names] + [query_icons[name].path for name in names],
                        size)
    names = [name for name in names if drawn[catalogue_icons[name].path] and drawn[query_icons[name].path]]
    folder = prepare_folder(out, NAME)

    catalogue, sku_of = [], {}
    for group in _groups(catalogue_icons, names):
        icon = catalogue_icons[group[0]]
        image = save_image(drawn[icon.path], folder, f"images/{icon.category}/{icon.name}.png")
        catalogue.append(CatalogueRow(sku=icon.name, image=image, title=", ".join(group), category=icon.category))
        sku_of.update((name, icon.name) for name in group)
    category_of = {row.sku: row.category for row in catalogue}

    queries = []
    for group in _groups(query_icons, names):
        icon = query_icons[group[0]]
        image = save_image(drawn[icon.path], folder, f"queries/{icon.category}/{icon.name}.png")
        expected = tuple(sorted({sku_of[name] for name in group}))
        queries.append(QueryRow(image=image, expected_skus=expected, expected_category=category_of[expected[0]]))
    credits = CREDITS.format(catalogue=catalogue_theme, query=query_theme, size=size)
    return write_benchmark(BuildResult(NAME, folder, catalogue, queries), credits)
