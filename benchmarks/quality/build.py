"""Build quality benchmarks for ``visualsearch eval`` (see the package docstring).

    python -m benchmarks.quality.build NAME --out DIR [--seed S] [--limit N]

NAME is multiview, shopper, fashion, crossstyle or all.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import crossstyle, fashion, multiview, shopper
from .common import BenchmarkSourceError, BuildResult

BUILDERS = {
    "multiview": multiview.build,
    "shopper": shopper.build,
    "fashion": fashion.build,
    "crossstyle": crossstyle.build,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def build(name: str, out: Path, *, seed: int = 0, limit: int | None = None, **options) -> BuildResult:
    """Run one registered builder; ``options`` are its own keyword arguments (paths, themes...)."""
    return BUILDERS[name](out, seed=seed, limit=limit, **options)


def _options(args: argparse.Namespace, name: str) -> dict:
    """The builder-specific flags that were given, as the keyword arguments of builder ``name``."""
    wanted = {
        "shopper": {"fashion_source": args.fashion_dir, "per_image": args.per_image},
        "fashion": {"source": args.fashion_dir},
        "crossstyle": {"icons_dir": args.icons_dir, "catalogue_theme": args.catalogue_theme,
                       "query_theme": args.query_theme},
    }.get(name, {})
    return {key: value for key, value in wanted.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=[*BUILDERS, "all"], help="which benchmark to build")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--limit", type=int, default=None,
                        help="size cap: fashion's training images (queries: a sixth), shopper's distractors "
                             "(default 1000), crossstyle's icon names; multiview has none")
    parser.add_argument("--fashion-dir", type=Path, default=None,
                        help=f"Fashion-MNIST folder (default {fashion.FASHION_MNIST_DIR})")
    parser.add_argument("--per-image", type=int, default=None,
                        help=f"shopper photos per catalogue image (default {shopper.DEFAULT_PER_IMAGE})")
    parser.add_argument("--icons-dir", type=Path, default=None, help=f"icon themes (default {crossstyle.ICONS_DIR})")
    parser.add_argument("--catalogue-theme", default=None,
                        help=f"crossstyle catalogue theme (default {crossstyle.CATALOGUE_THEME})")
    parser.add_argument("--query-theme", default=None,
                        help=f"crossstyle query theme (default {crossstyle.QUERY_THEME}; e.g. Adwaita)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = list(BUILDERS) if args.name == "all" else [args.name]
    for name in names:
        started = time.perf_counter()
        try:
            result = build(name, args.out, seed=args.seed, limit=args.limit, **_options(args, name))
        except BenchmarkSourceError as error:
            print(f"{name}: {error}", file=sys.stderr)
            return 1
        print(f"{name}: {len(result.catalogue)} catalogue images of {result.products} products, "
              f"{len(result.queries)} queries in {result.folder} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
