"""The ``visualsearch`` command: index, validate, remove, search, similar, show, stats, serve, ...

Each command turns its options into a :class:`Settings`, calls the library and
formats the result; library errors become a one-line message and exit status 1.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, TextIO

import click

from visualsearch.errors import VisualSearchError
from visualsearch.feeds import FORMATS
from visualsearch.settings import SETTINGS_HELP, Settings


def _help(name: str) -> str:
    return SETTINGS_HELP["VISUALSEARCH_" + name.upper()] + f" [env: VISUALSEARCH_{name.upper()}]"


def engine_options(function: Callable) -> Callable:
    """Options every command shares; they override the VISUALSEARCH_* variables."""
    options = [
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help=_help("data_dir")),
        click.option("--db", "db_url", help=_help("db_url")),
        click.option("--backbone", help=_help("backbone")),
        click.option("--recipe", help=_help("recipe")),
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


def _prune_options(function: Callable) -> Callable:
    """The limits of --prune (see visualsearch.sync.PrunePolicy)."""
    options = [
        click.option("--max-prune", type=click.FloatRange(0, 100), default=10, show_default=True, metavar="PERCENT",
                     help="Refuse to prune more than this share of the catalogue's products or images."),
        click.option("--force", is_flag=True, help="Prune however much the manifest leaves out."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _prune_policy(max_prune: float, force: bool):
    from visualsearch.sync import PrunePolicy

    return PrunePolicy(max_fraction=max_prune / 100, force=force)


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
@click.option("--prune", is_flag=True,
              help="After indexing, remove the products and images the manifest does not name.")
@_prune_options
@click.option("--dry-run", is_flag=True, help="Only show what the run would add, update and prune.")
@click.option("--recheck-urls", is_flag=True,
              help="Ask again for every indexed image URL now, however recently it was checked "
                   "(VISUALSEARCH_REMOTE_RECHECK).")
@click.option("--format", "manifest_format", type=click.Choice(FORMATS),
              help="What MANIFEST is (default: detected from its header): a manifest (csv, tsv, jsonl) or a "
                   "shop feed (merchant-tsv, merchant-xml: Google Merchant Center; shopify-csv: product export).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where images are read and embedded: this process, or a Ray cluster (needs the ray extra; "
                   "every worker must be able to read the manifest's paths).")
@click.option("--ray-address", metavar="ADDR",
              help="The Ray cluster to run on (ray://HOST:10001, HOST:6379 or auto); default: a local Ray "
                   "sized to this machine. Only with --engine ray.")
@_wait_option
@library_errors
def index(manifest: Path, strict: bool, as_json: bool, wait: float, prune: bool, max_prune: float, force: bool,
          dry_run: bool, recheck_urls: bool, manifest_format: str | None, engine: str, ray_address: str | None,
          **options: Any) -> None:
    """Add or update the products of MANIFEST (CSV, JSON Lines or a shop feed).

    Images already indexed and unchanged are skipped, so an interrupted run can
    simply be started again. Images that cannot be read are listed at the end
    and in DATA_DIR/failures.jsonl; they never stop the run.

    With --prune the manifest is the whole truth: products it does not list, and
    images of listed products it no longer names, are removed once the run succeeded
    (refused when that is more than --max-prune of the catalogue, unless --force).
    """
    from .progress import TqdmProgress

    if ray_address is not None and engine != "ray":
        raise click.UsageError("--ray-address only makes sense with --engine ray")
    if engine == "ray" and options.get("workers") is not None:
        raise click.UsageError("--workers is for the local engine: on Ray, decoding runs in Ray tasks "
                               "spread over the cluster's CPUs")
    if dry_run:
        from visualsearch.sync import plan_for_settings

        plan = plan_for_settings(_settings(**options), manifest, prune=prune, policy=_prune_policy(max_prune, force),
                                 manifest_format=manifest_format)
        _print_plan(plan, as_json)
        if plan.prune_refused or (strict and plan.problems):
            sys.exit(1)
        return
    vs = _open(_settings(**options))
    progress = TqdmProgress()
    synced = None
    try:
        if prune:
            def announce(counts) -> None:
                progress.close()
                click.echo(f"pruning {_count(counts.products, 'product')} and {_count(counts.images, 'image')} "
                           "not in the manifest", err=True)

            synced = vs.sync(manifest, policy=_prune_policy(max_prune, force), progress=progress, wait=wait,
                             manifest_format=manifest_format, on_prune=announce, recheck_urls=recheck_urls,
                             engine=engine, ray_address=ray_address)
            report = synced.index
        else:
            report = vs.index(manifest, progress=progress, wait=wait, manifest_format=manifest_format,
                              recheck_urls=recheck_urls, engine=engine, ray_address=ray_address)
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(synced.to_dict() if synced else report.to_dict(), indent=2))
    else:
        click.echo(
            f"{report.products} products, {report.images} images: {report.embedded} embedded, "
            f"{report.reused} reused by content hash, {report.unchanged} unchanged, "
            f"{len(report.failures)} failed in {report.seconds:.1f}s "
            f"({report.images_per_second:.1f} images/s)"
        )
        if synced:
            pruned = synced.pruned
            click.echo(f"pruned {_count(pruned.products, 'product')} ({_count(pruned.product_images, 'image')}) "
                       f"and {_count(pruned.images, 'more image')} not in the manifest")
    if report.failures:
        click.echo(f"{len(report.failures)} image(s) could not be indexed "
                   f"(also in {vs.failures_path}):", err=True)
        for failure in report.failures:
            click.echo(f"  {failure.sku}: {failure.image}: {failure.message}", err=True)
        if strict:
            sys.exit(1)


@main.command()
@click.argument("skus", nargs=-1)
@engine_options
@click.option("--from-file", type=click.File("r", encoding="utf-8"), metavar="FILE",
              help="Also remove the SKUs of FILE, one per line (blank lines and # comments skipped; - reads stdin).")
@click.option("--image", "image_id", type=click.IntRange(min=1), metavar="ID",
              help="Remove only this image (an id that 'show SKU' lists) of the one SKU given.")
@click.option("--wait", type=click.FloatRange(min=0), default=30, show_default=True,
              help="Seconds to wait when another process holds the vector index's commit lock.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
@library_errors
def remove(skus: tuple[str, ...], from_file: TextIO | None, image_id: int | None, wait: float, as_json: bool,
           **options: Any) -> None:
    """Remove products (and their vectors) by SKU, or one image of a product.

    A file of SKUs is read as a stream and removed in batches, so it may hold millions.
    """
    from visualsearch.sync import read_sku_lines

    if image_id is not None and (len(skus) != 1 or from_file is not None):
        raise click.UsageError("--image removes an image of exactly one SKU: give one SKU and no --from-file")
    if not skus and from_file is None:
        raise click.UsageError("give the SKUs to remove, or --from-file FILE")
    vs = _open(_settings(**options), create=False)
    if image_id is not None:
        product = vs.remove_image(skus[0], image_id, wait=wait)
        if as_json:
            click.echo(json.dumps({"sku": product.sku, "removed_image": image_id,
                                   "images": [asdict(image) for image in product.images]}, indent=2))
        else:
            click.echo(f"removed image {image_id} of {product.sku} ({len(product.images)} left)")
        return
    stream = itertools.chain(skus, read_sku_lines(from_file) if from_file is not None else ())
    summary = vs.remove_many(stream, wait=wait)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    click.echo(f"removed {summary.removed:,} product(s)")
    if summary.unknown:
        more = summary.unknown - len(summary.unknown_skus)
        click.echo(f"not in the catalogue: {', '.join(summary.unknown_skus)}"
                   + (f" and {more:,} more" if more else ""), err=True)


def result_options(function: Callable) -> Callable:
    """How many results and which products: the options of search and similar."""
    options = [
        click.option("-k", "--top-k", type=click.IntRange(1, 100), default=10, show_default=True,
                     help="How many products to return."),
        click.option("--category", help="Only products of this category (several: 'Shoes|Bags')."),
        click.option("--brand", help="Only products of this brand (several: 'A|B')."),
        click.option("--filter", "attribute_filters", multiple=True, metavar="NAME=VALUE",
                     help="Only products whose attribute NAME has VALUE (repeatable; 'red|blue' for either)."),
        click.option("--min-price", type=float, help="Only products at or above this price."),
        click.option("--max-price", type=float, help="Only products at or below this price."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@main.command()
@click.argument("image")
@engine_options
@result_options
@click.option("--crop", help="Search with this region of the photo: x,y,w,h in pixels.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@library_errors
def search(image: str, top_k: int, category: str | None, brand: str | None, attribute_filters: tuple[str, ...],
           min_price: float | None, max_price: float | None, crop: str | None, as_json: bool,
           **options: Any) -> None:
    """Find the catalogue products most similar to the photo IMAGE (a file, or an
    http(s) URL fetched under the same rules as image URLs in manifests)."""
    from visualsearch.catalogue_manifest import is_image_url
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
    settings = _settings(**options)
    if is_image_url(image):
        from visualsearch.remote_images import FetchPolicy, fetch_image

        photo: Path | bytes = fetch_image(image, FetchPolicy.from_settings(settings)).data
    elif Path(image).is_file():
        photo = Path(image)
    else:
        raise click.BadParameter(f"{image!r} is neither a file nor an http(s) URL", param_hint="IMAGE")
    result = _open(settings, read_only=True).search(photo, top_k=top_k, crop=region, filters=filters)
    _print_hits(result, as_json)


@main.command()
@click.argument("sku")
@engine_options
@result_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@library_errors
def similar(sku: str, top_k: int, category: str | None, brand: str | None, attribute_filters: tuple[str, ...],
            min_price: float | None, max_price: float | None, as_json: bool, **options: Any) -> None:
    """Find the catalogue products most similar to product SKU (without it)."""
    from visualsearch.vectors import SearchFilters, configure_threads

    configure_threads(serving=True)
    filters = SearchFilters.build(category=category, brand=brand, attributes=_attribute_filters(attribute_filters),
                                  min_price=min_price, max_price=max_price)
    result = _open(_settings(**options), read_only=True).similar(sku, top_k=top_k, filters=filters)
    _print_hits(result, as_json)


def _print_hits(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"results": [hit.to_dict() for hit in result.hits],
                               "took_ms": result.took_ms}, indent=2))
        return
    if not result.hits:
        click.echo("no matching products")
    for rank, hit in enumerate(result.hits, start=1):
        price = "" if hit.price is None else f"  {hit.price:.2f}"
        click.echo(f"{rank:>3}. {hit.score:.3f}  {hit.sku}  {hit.title or ''}{price}")
    if "total" in result.took_ms:
        click.echo(f"({result.took_ms['total']:.0f} ms)", err=True)


@main.command()
@click.argument("sku")
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print the product as JSON.")
@library_errors
def show(sku: str, as_json: bool, **options: Any) -> None:
    """Show product SKU: its fields, and its images with their status and errors."""
    product = _open(_settings(**options), read_only=True).product(sku)
    data = {**product.to_dict(), "images": [asdict(image) for image in product.images]}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in ("sku", "title", "category", "brand", "price", "url"):
        value = data[key]
        click.echo(f"{key:>10}: {'-' if value is None else value}")
    attributes = ", ".join(f"{name}={value}" for name, value in data["attributes"].items()) or "-"
    click.echo(f"{'attributes':>10}: {attributes}")
    click.echo(f"{'images':>10}: {len(product.images)} ({len(product.indexed_images)} indexed)")
    for image in product.images:
        size = f"{image.width}x{image.height}" if image.width else "-"
        click.echo(f"  #{image.id:<8} {image.status:<8} {size:<10} {image.error or ''}".rstrip())


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@engine_options
@click.option("--prune", is_flag=True, help="Also count what 'index --prune' would remove.")
@_prune_options
@click.option("--format", "manifest_format", type=click.Choice(FORMATS),
              help="What MANIFEST is (default: detected from its header), as for 'index --format'.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@library_errors
def validate(manifest: Path, prune: bool, max_prune: float, force: bool, manifest_format: str | None,
             as_json: bool, **options: Any) -> None:
    """Check MANIFEST and show what indexing it would do, writing nothing.

    Every row is checked, local image files must exist and be readable (URLs are
    checked for syntax, not fetched), and each product and image is compared with
    the catalogue. Exit status 1 when an image cannot be read or (--prune) the
    prune would be refused.
    """
    from visualsearch.sync import plan_for_settings

    plan = plan_for_settings(_settings(**options), manifest, prune=prune, policy=_prune_policy(max_prune, force),
                             manifest_format=manifest_format)
    _print_plan(plan, as_json)
    if plan.problems or plan.prune_refused:
        sys.exit(1)


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _print_plan(plan, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
        return
    products, images = plan.products, plan.images
    click.echo(f"{plan.manifest}: {_count(plan.rows, 'row')}, {_count(products.total, 'product')}, "
               f"{_count(images.total, 'image')}")
    click.echo(f"  add:       {_count(products.add, 'product')}, {_count(images.add, 'image')}")
    click.echo(f"  update:    {_count(products.update, 'product')} (fields), "
               f"{_count(images.update, 'image')} (changed or not indexed yet)")
    click.echo(f"  unchanged: {_count(products.unchanged, 'product')}, {_count(images.unchanged, 'image')}")
    if plan.prune is not None:
        prune = plan.prune
        examples = f" (e.g. {', '.join(prune.examples)})" if prune.examples else ""
        click.echo(f"  prune:     {_count(prune.products, 'product')} ({_count(prune.product_images, 'image')}) "
                   f"and {_count(prune.images, 'more image')} not in the manifest{examples}")
        if plan.prune_refused:
            click.echo(f"prune refused: {plan.prune_refused}", err=True)
    if plan.problems:
        click.echo(f"{_count(plan.problems, 'image')} cannot be read:", err=True)
        for problem in plan.problem_examples:
            click.echo(f"  {problem.sku}: {problem.message}", err=True)
        if plan.problems > len(plan.problem_examples):
            click.echo(f"  ... and {plan.problems - len(plan.problem_examples):,} more", err=True)
    click.echo("nothing was written", err=True)


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
@_wait_option
@library_errors
def compact(force: bool, as_json: bool, wait: float, **options: Any) -> None:
    """Merge vector segments, drop deleted rows, and re-plan the index when the catalogue
    outgrew it (no model work). Searches go on meanwhile."""
    outcome = _open(_settings(**options), create=False).compact(force=force, wait=wait)
    _print_outcome(outcome, as_json)


@main.command("rebuild-index")
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@_wait_option
@library_errors
def rebuild_index(as_json: bool, wait: float, **options: Any) -> None:
    """Re-plan the vector index for the catalogue's size and VISUALSEARCH_INDEX_MEMORY,
    rebuild it from the stored vectors and tune it to recall@10 >= 0.95 (no model work)."""
    outcome = _open(_settings(**options), create=False).rebuild_index(wait=wait)
    _print_outcome(outcome, as_json)


@main.command()
@click.option("--backbone", help="Registered backbone to re-embed the catalogue with, with its own recipe (this "
                                 "or --recipe is required unless --drop-old alone) [env: VISUALSEARCH_BACKBONE]")
@click.option("--recipe", help="Registered recipe to re-embed the catalogue with (it names its backbone; "
                               "`visualsearch recipes`) [env: VISUALSEARCH_RECIPE]")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="Weights file of that backbone; recorded, so servers find it too [env: VISUALSEARCH_WEIGHTS]")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help=_help("data_dir"))
@click.option("--db", "db_url", help=_help("db_url"))
@click.option("--device", help=_help("device"))
@click.option("--threads", type=click.IntRange(min=1), help=_help("threads"))
@click.option("--batch-size", type=click.IntRange(min=1), help=_help("batch_size"))
@click.option("--workers", type=click.IntRange(min=0), help=_help("workers"))
@click.option("--drop-old", is_flag=True,
              help="Delete the vectors of the replaced backbone(s); alone, once the servers answer with the new "
                   "one (refused within 10 minutes of the switch; never in the run that switches).")
@click.option("--force", is_flag=True,
              help="Switch even if more than 1% of the images could not be embedded; --drop-old even within "
                   "10 minutes of the switch.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's report as JSON.")
@_wait_option
@library_errors
def reembed(drop_old: bool, force: bool, as_json: bool, wait: float, **options: Any) -> None:
    """Re-embed the catalogue with another backbone or recipe, with no downtime.

    The new vectors are built beside the current ones while servers keep answering
    (and API writes keep landing); then one switch makes them current, and servers
    follow within a second, loading the new vectors while still answering from the old.
    The old vectors stay on disk until a later `reembed --drop-old`, once the servers
    answer with the new backbone. A run that was interrupted, or refused because too
    many images failed, resumes where it stopped when started again.
    """
    from visualsearch.reembed import ReembedRefusedError

    from .progress import TqdmProgress

    settings = _settings(**options)
    vs = _open(settings, create=False)
    if not settings.backbone and not settings.recipe:
        if not drop_old:
            raise click.UsageError("name the backbone or recipe to switch to with --backbone or --recipe (or only "
                                   "--drop-old)")
        outcome = {"dropped": vs.drop_old_generations(wait=wait, force=force)}
        _print_outcome(outcome, as_json)
        return
    progress = TqdmProgress("re-embedding")
    try:
        report = vs.reembed(backbone=settings.backbone, recipe=settings.recipe, weights=settings.weights, wait=wait,
                            drop_old=drop_old, force=force, progress=progress)
    except ReembedRefusedError as exc:
        if as_json:
            click.echo(json.dumps(exc.report.to_dict(), indent=2))
        else:
            for failure in exc.report.failures:
                click.echo(f"  {failure.sku}: {failure.image}: {failure.message}", err=True)
        raise
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    if not report.switched:
        click.echo(f"the vectors already come from {report.backbone} (recipe {report.recipe}): nothing to re-embed")
    else:
        click.echo(f"switched from {report.previous_backbone} (recipe {report.previous_recipe}) to "
                   f"{report.backbone} (recipe {report.recipe}, dim {report.dim}): "
                   f"{report.embedded} embedded, {report.reused} reused by content hash, {report.skipped} done "
                   f"by an earlier run, {report.caught_up} caught up after writes, {report.deleted} deleted, "
                   f"{len(report.failures)} failed in {report.seconds:.1f}s")
    for failure in report.failures:
        click.echo(f"  {failure.sku}: {failure.image}: {failure.message}", err=True)
    if report.dropped:
        click.echo(f"dropped old vectors: {', '.join(report.dropped)}")
    for note in report.notes:
        click.echo(note)


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
@click.option("--dim", type=click.IntRange(min=1),
              help="Dimension of the learned projection (at most the backbone's). Default: 256, or fewer "
                   "for a catalogue too small to learn 256.")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Passes over the training images.")
@click.option("--views", type=click.IntRange(min=1), default=4, show_default=True,
              help="Shopper-style photos made of each sampled image.")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of the products held out of training to measure recall@1 on.")
@click.option("--max-images", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Catalogue images sampled (whole products, at random).")
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes the sample, the photos and training.")
@click.option("--batch-size", type=click.IntRange(min=1), help=_help("batch_size"))
@click.option("--dry-run", is_flag=True, help="Learn and report only: record nothing, switch nothing.")
@click.option("--force", is_flag=True,
              help="Switch even if the tuned projection did not beat the current vectors on the held-out products.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_wait_option
@library_errors
def tune(dim: int, epochs: int, views: int, holdout: float, max_images: int, seed: int, dry_run: bool, force: bool,
         as_json: bool, wait: float, **options: Any) -> None:
    """Learn a projection from the catalogue's own images, then switch to it.

    Shopper-style photos of each sampled image (mostly the product cropped and turned
    among other products of the catalogue, else the whole image at an angle; light,
    blur, JPEG) teach a linear map on top of the current recipe's vectors to bring a photo
    near its product's images. Recall@1 of held-out products' photos is shown before
    and after; then the recipe <current>+tuned is recorded in the data directory and
    the catalogue is re-embedded with it without downtime (as `reembed` does), unless
    it did not beat the current vectors on the held-out products (--force).
    """
    from visualsearch.tuning import TuneOptions, TuneRefusedError
    from visualsearch.tuning import tune as run_tune

    from .progress import TqdmProgress

    settings = _settings(**options)
    vs = _open(settings, create=False)
    try:
        tune_options = TuneOptions(dim=dim, epochs=epochs, views=views, holdout=holdout, max_images=max_images,
                                   seed=seed, dry_run=dry_run, force=force)
    except VisualSearchError as exc:
        raise click.UsageError(str(exc)) from None
    features, switching = TqdmProgress("tuning: photos"), TqdmProgress("re-embedding")
    try:
        report = run_tune(vs, tune_options, wait=wait, progress=features, reembed_progress=switching)
    except TuneRefusedError as exc:
        _print_tune(exc.report, as_json)
        raise
    finally:
        features.close()
        switching.close()
    _print_tune(report, as_json)


def _print_tune(report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(f"{report.images} images of {report.products} products, {report.views} photos each; "
               f"{report.held_out_products} products held out ({report.queries} query photos)")
    click.echo("recall@1 of the held-out products' photos:")
    for name, value in report.recall_at_1.items():
        label = {"identity": f"{report.base_recipe} as is", "pca": f"PCA to {report.dim}",
                 "current": "current projection", "tuned": f"tuned ({report.dim})"}[name]
        click.echo(f"  {label:<30} {'-' if value is None else f'{value:.3f}'}")
    if report.reembed is None:
        click.echo("nothing recorded")
    elif report.reembed["switched"]:
        click.echo(f"switched to recipe {report.recipe} ({report.projection}) in {report.seconds['total']:.1f}s; "
                   "old vectors kept: drop them later with `visualsearch reembed --drop-old`")
    else:
        click.echo(f"recipe {report.recipe} learned the same projection again: nothing to re-embed")


@main.command("eval")
@click.argument("queries", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@engine_options
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Index this catalogue manifest into the data directory first (what is indexed already is "
                   "skipped).")
@click.option("-k", "--top-k", type=click.IntRange(10, 100), default=10, show_default=True,
              help="Products asked of each search (the metrics look 10 deep; more adds Recall@K).")
@click.option("--limit", type=click.IntRange(min=1), help="Run only the first N queries.")
@click.option("--compare", nargs=2, type=click.Path(exists=True, file_okay=False, path_type=Path),
              metavar="DIR_A DIR_B",
              help="Run the queries against two data directories, each with the backbone it was indexed with, "
                   "and show them side by side.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@_wait_option
@library_errors
def evaluate_command(queries: Path, manifest: Path | None, top_k: int, limit: int | None,
                     compare: tuple[Path, Path] | None, as_json: bool, wait: float, **options: Any) -> None:
    """Measure retrieval quality with the labelled query photos of QUERIES.

    QUERIES is a CSV or JSON Lines file with the columns image, expected_sku ('A|B' for
    several), expected_category and exclude_image (see the README). Each query runs
    through the real search (decode, embed, search); the result is Recall@1/5/10,
    mAP@10, category precision@10 and the query latency p50/p95.
    """
    from dataclasses import replace

    from visualsearch.evaluation import compare_reports, read_queries
    from visualsearch.vectors import configure_threads

    labelled = read_queries(queries, limit=limit)  # the whole file is checked before anything runs
    if compare:
        if manifest is not None or options["data_dir"] is not None or options["backbone"] is not None or \
                options["recipe"] is not None:
            raise click.UsageError("--compare names both data directories and searches each with the backbone it "
                                   "was indexed with: leave out --manifest, --data-dir, --backbone and --recipe")
        settings = _settings(**options)
        configure_threads(serving=True)  # measure latency as a serving process searches
        # Each directory's own stored backbone (not one pinned by VISUALSEARCH_BACKBONE).
        reports = [_run_eval(_open(replace(settings, data_dir=folder, backbone=None, recipe=None), read_only=True),
                             labelled, top_k, label) for folder, label in zip(compare, ("A", "B"))]
        outcome = compare_reports(*reports)
        click.echo(json.dumps(outcome, indent=2) if as_json else _eval_table(outcome))
        return
    settings = _settings(**options)
    if manifest is not None:
        from .progress import TqdmProgress

        vs = _open(settings)
        progress = TqdmProgress()
        try:
            indexed = vs.index(manifest, progress=progress, wait=wait)
        finally:
            progress.close()
        click.echo(f"indexed {manifest}: {indexed.embedded} embedded, {indexed.unchanged} unchanged, "
                   f"{len(indexed.failures)} failed", err=True)
    else:
        vs = _open(settings, read_only=True)
    configure_threads(serving=True)  # measure latency as a serving process searches
    report = _run_eval(vs, labelled, top_k, "")
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else _eval_table({"a": report.to_dict()}))


def _run_eval(vs, queries: list, top_k: int, label: str):
    from visualsearch.evaluation import evaluate

    from .progress import TqdmProgress

    progress = TqdmProgress(f"evaluating {label}".strip())
    try:
        return evaluate(vs, queries, top_k=top_k, progress=progress)
    finally:
        progress.close()


def _eval_table(outcome: dict) -> str:
    """The metrics as a table: one column per data directory (and their difference)."""
    runs = [outcome[key] for key in ("a", "b") if key in outcome]
    difference = outcome.get("difference")
    names = [name for name in runs[0] if name.startswith(("recall_at_", "map_at_", "category_precision_", "latency_"))]
    header = ["metric", *(["A", "B", "B - A"] if difference else ["value"])]
    rows = [["data dir", *(run["data_dir"] for run in runs)], ["backbone", *(str(run["backbone"]) for run in runs)],
            ["queries", *(f"{run['queries']} ({run['sku_queries']} sku, {run['category_queries']} category)"
                          for run in runs)]]
    for name in names:
        row = [_metric_label(name), *(_metric(name, run[name]) for run in runs)]
        if difference:
            row.append(_metric(name, difference[name], signed=True))
        rows.append(row)
    widths = [max(len(str(row[i])) for row in [header, *rows] if i < len(row)) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def _metric_label(name: str) -> str:
    """recall_at_5 -> Recall@5, map_at_10 -> mAP@10, latency_p50_ms -> latency p50."""
    if name.startswith("recall_at_"):
        return "Recall@" + name.removeprefix("recall_at_")
    return {"map_at_10": "mAP@10", "category_precision_at_10": "category precision@10"}.get(
        name, name.removesuffix("_ms").replace("_", " "))


def _metric(name: str, value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed else ""
    return f"{value:{sign}.1f} ms" if name.startswith("latency_") else f"{value:{sign}.3f}"


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
@click.option("--json", "as_json", is_flag=True, help="Print the backbones as JSON.")
def backbones(as_json: bool) -> None:
    """List the registered backbones."""
    from visualsearch.backbones import get_backbone, list_backbones

    specs = [get_backbone(name) for name in list_backbones()]
    if as_json:
        click.echo(json.dumps([{"name": spec.name, "embedding_dim": spec.embedding_dim,
                                "input_size": spec.preprocessing.input_size, "description": spec.description}
                               for spec in specs], indent=2))
        return
    for spec in specs:
        click.echo(f"{spec.name:<20} dim {spec.embedding_dim:<5} {spec.description}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the recipes (all their parameters) as JSON.")
@library_errors
def recipes(as_json: bool) -> None:
    """List the registered embedding recipes (each backbone's own is named like it)."""
    from visualsearch.recipes import get_recipe, list_recipes

    chosen = [get_recipe(name) for name in list_recipes()]
    if as_json:
        # A projection's file (and so the fingerprint) belongs to a data directory: see `stats`.
        click.echo(json.dumps([{**recipe.to_dict(), "fingerprint": None if recipe.projection else recipe.fingerprint()}
                               for recipe in chosen], indent=2))
        return
    for recipe in chosen:
        size = f"{recipe.resize} {recipe.input_size}" + (f"/{recipe.resize_size}" if recipe.resize == "crop" else "")
        extras = [f"GeM p={recipe.gem_p:g}", *(["flip"] if recipe.flip else []),
                  *([f"scales {','.join(f'{scale:g}' for scale in recipe.scales)}"] if len(recipe.scales) > 1 else []),
                  *([f"projection {recipe.projection}"] if recipe.projection else []),
                  *([f"queries at {recipe.query_input_size}"] if recipe.query_input_size else []),
                  *([f"query centre prior {recipe.query_centre_prior:g}"] if recipe.query_centre_prior else [])]
        click.echo(f"{recipe.name:<20} v{recipe.version} {recipe.backbone:<20} {size:<12} {', '.join(extras)}"
                   f"  {recipe.description}".rstrip())


if __name__ == "__main__":  # pragma: no cover
    main()
