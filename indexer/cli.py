"""The ``visualsearch`` command: index, remove, search, stats, serve, backbones.

Each command turns its options into a :class:`Settings`, calls the library and
formats the result; library errors become a one-line message and exit status 1.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from visualsearch.errors import VisualSearchError
from visualsearch.settings import SETTINGS_HELP, Settings


def _help(name: str) -> str:
    return SETTINGS_HELP["VISUALSEARCH_" + name.upper()] + f" [env: VISUALSEARCH_{name.upper()}]"


def engine_options(function: Callable) -> Callable:
    """Options every command shares; they override the VISUALSEARCH_* variables."""
    options = [
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help=_help("data_dir")),
        click.option("--db", "db_url", help=_help("db_url")),
        click.option("--backbone", help=_help("backbone")),
        click.option("--weights", type=click.Path(dir_okay=False), help=_help("weights")),
        click.option("--device", help=_help("device")),
        click.option("--threads", type=click.IntRange(min=1), help=_help("threads")),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _settings(**options: Any) -> Settings:
    try:
        return Settings.from_env(**options)
    except VisualSearchError as exc:
        raise click.UsageError(str(exc)) from None


def library_errors(function: Callable) -> Callable:
    """Turn the library's typed errors into a clean message and exit status 1."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except VisualSearchError as exc:
            raise click.ClickException(f"{exc} [{exc.code}]") from None

    return wrapper


def _open(settings: Settings, *, read_only: bool = False, create: bool = True):
    from visualsearch.service import VisualSearch  # torch/faiss load only when a command needs them

    return VisualSearch(settings, read_only=read_only, create=create)


def _wait_option(function: Callable) -> Callable:
    return click.option("--wait", type=click.FloatRange(min=0), default=0, show_default=True,
                        help="Seconds to wait when another process holds the writer lock.")(function)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="visualsearch")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Visual search for ecommerce catalogues.

    Index a catalogue manifest, then search it with a photo, from here or through
    the web app and its REST API. Every option can also be set with the
    VISUALSEARCH_* environment variable named in its help.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@engine_options
@click.option("--batch-size", type=click.IntRange(min=1), help=_help("batch_size"))
@click.option("--workers", type=click.IntRange(min=0), help=_help("workers"))
@click.option("--strict", is_flag=True, help="Exit with status 1 if any image failed.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's report as JSON.")
@_wait_option
@library_errors
def index(manifest: Path, strict: bool, as_json: bool, wait: float, **options: Any) -> None:
    """Add or update the products of MANIFEST (CSV or JSON Lines).

    Images already indexed and unchanged are skipped, so an interrupted run can
    simply be started again. Images that cannot be read are listed at the end
    and in DATA_DIR/failures.jsonl; they never stop the run.
    """
    from .progress import TqdmProgress

    vs = _open(_settings(**options))
    progress = TqdmProgress()
    try:
        report = vs.index(manifest, progress=progress, wait=wait)
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(
            f"{report.products} products, {report.images} images: {report.embedded} embedded, "
            f"{report.reused} reused by content hash, {report.unchanged} unchanged, "
            f"{len(report.failures)} failed in {report.seconds:.1f}s "
            f"({report.images_per_second:.1f} images/s)"
        )
    if report.failures:
        click.echo(f"{len(report.failures)} image(s) could not be indexed "
                   f"(also in {vs.failures_path}):", err=True)
        for failure in report.failures:
            click.echo(f"  {failure.sku}: {failure.image}: {failure.message}", err=True)
        if strict:
            sys.exit(1)


@main.command()
@click.argument("skus", nargs=-1, required=True)
@engine_options
@library_errors
def remove(skus: tuple[str, ...], **options: Any) -> None:
    """Remove products (and their vectors) by SKU."""
    result = _open(_settings(**options), create=False).remove(list(skus))
    click.echo(f"removed {len(result.removed)} product(s)")
    if result.unknown:
        click.echo(f"not in the catalogue: {', '.join(result.unknown)}", err=True)


@main.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@engine_options
@click.option("-k", "--top-k", type=click.IntRange(1, 100), default=10, show_default=True,
              help="How many products to return.")
@click.option("--category", help="Only products of this category (several: 'Shoes|Bags').")
@click.option("--brand", help="Only products of this brand (several: 'A|B').")
@click.option("--filter", "attribute_filters", multiple=True, metavar="NAME=VALUE",
              help="Only products whose attribute NAME has VALUE (repeatable; 'red|blue' for either).")
@click.option("--min-price", type=float, help="Only products at or above this price.")
@click.option("--max-price", type=float, help="Only products at or below this price.")
@click.option("--crop", help="Search with this region of the photo: x,y,w,h in pixels.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@library_errors
def search(image: Path, top_k: int, category: str | None, brand: str | None, attribute_filters: tuple[str, ...],
           min_price: float | None, max_price: float | None, crop: str | None, as_json: bool,
           **options: Any) -> None:
    """Find the catalogue products most similar to the photo IMAGE."""
    from visualsearch.images import Crop
    from visualsearch.vectors import SearchFilters

    try:
        region = Crop.parse(crop) if crop else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--crop") from None
    from visualsearch.vectors import configure_threads

    configure_threads(serving=True)
    filters = SearchFilters.build(category=category, brand=brand, attributes=_attribute_filters(attribute_filters),
                                  min_price=min_price, max_price=max_price)
    result = _open(_settings(**options), read_only=True).search(image, top_k=top_k, crop=region, filters=filters)
    if as_json:
        click.echo(json.dumps({"results": [hit.to_dict() for hit in result.hits],
                               "took_ms": result.took_ms}, indent=2))
        return
    if not result.hits:
        click.echo("no matching products")
    for rank, hit in enumerate(result.hits, start=1):
        price = "" if hit.price is None else f"  {hit.price:.2f}"
        click.echo(f"{rank:>3}. {hit.score:.3f}  {hit.sku}  {hit.title or ''}{price}")
    click.echo(f"({result.took_ms['total']:.0f} ms)", err=True)


def _attribute_filters(pairs: tuple[str, ...]) -> dict[str, str]:
    filters: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--filter")
        filters[name.strip()] = value
    return filters


@main.command()
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@library_errors
def stats(as_json: bool, **options: Any) -> None:
    """Show what the catalogue and the vector index hold."""
    numbers = _open(_settings(**options), read_only=True).stats()
    if as_json:
        click.echo(json.dumps(numbers, indent=2))
        return
    for key, value in numbers.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k or '(none)'}: {v}" for k, v in value.items()) or "-"
        click.echo(f"{key:>16}: {value}")


@main.command()
@engine_options
@click.option("--force", is_flag=True, help="Rebuild the whole index even when the plan still fits.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@library_errors
def compact(force: bool, as_json: bool, **options: Any) -> None:
    """Merge vector segments, drop deleted rows, and re-plan the index when the catalogue
    outgrew it (no model work). Searches go on meanwhile."""
    outcome = _open(_settings(**options), create=False).compact(force=force)
    _print_outcome(outcome, as_json)


@main.command("rebuild-index")
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@library_errors
def rebuild_index(as_json: bool, **options: Any) -> None:
    """Re-plan the vector index for the catalogue's size and VISUALSEARCH_INDEX_MEMORY,
    rebuild it from the stored vectors and tune it to recall@10 >= 0.95 (no model work)."""
    outcome = _open(_settings(**options), create=False).rebuild_index()
    _print_outcome(outcome, as_json)


def _print_outcome(outcome: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(outcome, indent=2))
        return
    width = max(map(len, outcome), default=0)
    for key, value in outcome.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        click.echo(f"{key:>{width}}: {value}")


@main.command()
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--debug", is_flag=True, help="Flask debug mode (reloader, tracebacks). Never in production.")
@library_errors
def serve(host: str, port: int, debug: bool, **options: Any) -> None:
    """Run the web app and API with Flask's development server.

    In production use: gunicorn "web:create_app()" (configured by the same
    VISUALSEARCH_* variables).
    """
    from web import create_app

    app = create_app(settings=_settings(**options))
    app.run(host=host, port=port, debug=debug, threaded=True)


@main.command()
def backbones() -> None:
    """List the registered backbones."""
    from visualsearch.backbones import get_backbone, list_backbones

    for name in list_backbones():
        spec = get_backbone(name)
        click.echo(f"{name:<20} dim {spec.embedding_dim:<5} {spec.description}")


if __name__ == "__main__":  # pragma: no cover
    main()
