"""visualsearch.sync: plans against the catalogue, pruning with its safety limits, bulk removal."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest

from visualsearch import sync
from visualsearch.catalogue import store as catalogue
from visualsearch.catalogue_manifest import ProductRecord
from visualsearch.errors import ManifestError, ProductNotFoundError
from visualsearch.service import VisualSearch
from visualsearch.sync import (
    ManifestKeys,
    PruneCounts,
    PrunePolicy,
    PruneRefusedError,
    RemoveSummary,
    batched,
    plan_manifest,
    read_sku_lines,
)

from .conftest import make_image, write_catalogue

# The catalogue's queries and triggers run on SQLite and on PostgreSQL (tests/postgres.py).
pytestmark = pytest.mark.catalogue_databases("sqlite", "postgresql")


def _rows(manifest) -> list[dict]:
    with open(manifest, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def indexed(tiny_settings, small_catalogue) -> VisualSearch:
    vs = VisualSearch(tiny_settings)
    vs.index(small_catalogue)
    return vs


@pytest.fixture
def next_export(small_catalogue):
    """Tomorrow's export: P1 gone, P2's second image gone, P0 retitled, P3's file
    changed, and a new product NEW whose image exists and MISSING whose image does not."""
    folder = small_catalogue.parent
    rows = [row for row in _rows(small_catalogue) if row["sku"] != "P1" and row["image"] != "img/p2-1.png"]
    for row in rows:
        if row["sku"] == "P0":
            row["title"] = "Retitled"
    make_image(folder / "img" / "new.png", seed=999)
    rows += [{"sku": "NEW", "image": "img/new.png"}, {"sku": "MISSING", "image": "img/missing.png"}]
    stat = os.stat(folder / "img" / "p3-0.png")
    os.utime(folder / "img" / "p3-0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    return write_catalogue(folder, rows, name="next.csv")


def test_plan_of_a_manifest_against_no_catalogue(small_catalogue):
    plan = plan_manifest(small_catalogue, prune=True)
    assert plan.rows == 24
    assert (plan.products.total, plan.products.add, plan.products.update, plan.products.unchanged) == (12, 12, 0, 0)
    assert (plan.images.total, plan.images.add) == (24, 24)
    assert plan.problems == 0 and plan.prune == PruneCounts() and plan.prune_refused is None
    assert plan.examples["add"][:2] == ["P0", "P1"]


def test_plan_says_what_a_run_would_add_update_skip_and_prune(indexed, next_export):
    plan = indexed.plan(next_export, prune=True, policy=PrunePolicy(max_fraction=0.5))
    assert plan.products.total == 13 and plan.products.add == 2 and plan.products.update == 1
    assert plan.products.unchanged == 10 and set(plan.examples["add"]) == {"NEW", "MISSING"}
    assert plan.examples["update"] == ["P0"]
    assert (plan.images.total, plan.images.add, plan.images.update, plan.images.unchanged) == (23, 2, 1, 20)
    assert plan.problems == 1 and plan.problem_examples[0].sku == "MISSING"
    assert plan.problem_examples[0].code == "file_not_found"
    assert plan.prune == PruneCounts(products=1, product_images=2, images=1, catalogue_products=12,
                                     catalogue_images=24, examples=("P1",))
    assert plan.prune_refused is None
    assert "3 of the catalogue's 24 images" in indexed.plan(next_export, prune=True).prune_refused
    assert plan.to_dict()["prune"]["examples"] == ["P1"]


def test_plans_are_the_same_in_tiny_chunks_and_pages(indexed, next_export, monkeypatch):
    expected = indexed.plan(next_export, prune=True)
    # A SKU's rows far apart in the manifest, several pages of catalogue rows, batches of one.
    rows = _rows(next_export)
    shuffled = write_catalogue(next_export.parent, rows[1::2] + rows[::2], name="shuffled.csv")
    monkeypatch.setattr(sync, "MANIFEST_CHUNK_ROWS", 1)
    monkeypatch.setattr(sync, "CATALOGUE_PAGE", 2)
    assert indexed.plan(shuffled, prune=True).to_dict() == {**expected.to_dict(), "manifest": str(shuffled)}
    with ManifestKeys() as keys:
        keys.load(shuffled)
        keys.find_prunable(indexed.sessions)
        assert list(keys.prunable_skus(batch=1)) == [["P1"]]
        assert len(list(keys.prunable_images(batch=1))) == 1


def test_sync_prunes_products_and_images_gone_from_the_manifest(indexed, next_export, small_catalogue):
    kept_image, gone_image = (image.id for image in indexed.product("P2").images)  # p2-0.png, p2-1.png
    announced = []
    result = indexed.sync(next_export, policy=PrunePolicy(max_fraction=0.2), on_prune=announced.append)
    assert announced[0].products == 1 and announced[0].images == 1
    assert (result.pruned.products, result.pruned.product_images, result.pruned.images) == (1, 2, 1)
    assert result.index.embedded + result.index.reused == 2 and len(result.index.failures) == 1
    with pytest.raises(ProductNotFoundError):
        indexed.product("P1")
    assert [image.id for image in indexed.product("P2").images] == [kept_image]
    # The vectors are gone too: searches never find P1 or P2's dropped image again.
    stats = indexed.stats()
    assert stats["products"] == 13 and stats["index"]["vectors"] == 24 - 3 + 1
    assert gone_image not in set(indexed.store().alive_ids().tolist())
    photos = small_catalogue.parent / "img"
    assert "P1" not in {hit.sku for hit in indexed.search(photos / "p1-0.png", top_k=100).hits}
    assert gone_image not in {hit.image_id for hit in indexed.search(photos / "p2-1.png", top_k=100).hits}
    # Running it again prunes nothing more.
    again = indexed.sync(next_export, policy=PrunePolicy(max_fraction=0.2))
    assert again.pruned == sync.PruneResult() and again.index.unchanged == 22


def test_the_prune_limit_refuses_a_truncated_export_before_writing_anything(indexed, small_catalogue):
    folder = small_catalogue.parent
    make_image(folder / "img" / "late.png", seed=4242)
    truncated = write_catalogue(folder, _rows(small_catalogue)[:12] + [{"sku": "LATE", "image": "img/late.png"}],
                                name="truncated.csv")
    with pytest.raises(PruneRefusedError, match=r"6 of the catalogue's 12 products \(50%"):
        indexed.sync(truncated)
    assert indexed.stats()["products"] == 12  # not even LATE was indexed
    with pytest.raises(ProductNotFoundError):
        indexed.product("LATE")
    with pytest.raises(PruneRefusedError):
        indexed.sync(truncated, policy=PrunePolicy(max_fraction=0.49))
    result = indexed.sync(truncated, policy=PrunePolicy(force=True))
    assert result.pruned.products == 6 and indexed.stats()["products"] == 7
    assert indexed.stats()["index"]["vectors"] == 13


def test_an_empty_or_bad_manifest_never_prunes(indexed, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("sku,image\n")
    with pytest.raises(ManifestError, match="no rows"):
        indexed.sync(empty, policy=PrunePolicy(force=True))
    bad = tmp_path / "bad.csv"
    bad.write_text("sku,image\nA,a.png\n,b.png\n")
    with pytest.raises(ManifestError, match="bad row"):
        indexed.sync(bad, policy=PrunePolicy(force=True))
    assert indexed.stats()["products"] == 12


def test_a_manifest_that_changes_during_the_run_is_not_used_to_prune(small_catalogue):
    with ManifestKeys() as keys:
        keys.load(small_catalogue)
        keys.check_manifest_unchanged()
        with open(small_catalogue, "a") as handle:
            handle.write("P0,img/p0-0.png,,,,,\n")
        with pytest.raises(PruneRefusedError, match="changed during the run"):
            keys.check_manifest_unchanged()


def test_prune_policy_table():
    counts = PruneCounts(products=1, product_images=2, images=1, catalogue_products=10, catalogue_images=40)
    cases = [
        (PrunePolicy(), None),                              # 10% of products, 7.5% of images: at the limit
        (PrunePolicy(max_fraction=0.09), "products"),
        (PrunePolicy(max_fraction=0.09, force=True), None),
        (PrunePolicy(max_fraction=0.0), "products"),
    ]
    for policy, refused in cases:
        reason = policy.refusal(counts)
        assert (reason is None) == (refused is None), policy
        if refused:
            assert refused in reason
    images_heavy = PruneCounts(images=5, catalogue_products=10, catalogue_images=40)
    assert "5 of the catalogue's 40 images" in PrunePolicy().refusal(images_heavy)
    assert PrunePolicy(max_fraction=0).refusal(PruneCounts()) is None  # an empty catalogue


def test_read_sku_lines_batched_and_summary():
    text = io.StringIO("A\n\n  # a comment\nB  \n#C\n  D\n")
    assert list(read_sku_lines(text)) == ["A", "B", "D"]
    assert list(batched(iter("abcde"), 2)) == [["a", "b"], ["c", "d"], ["e"]]
    assert list(batched([], 3)) == []
    summary = RemoveSummary()
    summary.add(["A", "B", "C"], ["A"])
    summary.add(["D"], ["D"])
    assert summary.to_dict() == {"removed": 2, "unknown": 2, "unknown_skus": ["B", "C"]}


def test_remove_many_streams_in_batches(indexed):
    asked = (sku for sku in ["P1", "NOPE", "P2", "P3", "P1"])
    summary = indexed.remove_many(asked, batch_size=2)
    assert summary.removed == 3 and summary.unknown_skus == ["NOPE", "P1"]
    assert indexed.stats()["products"] == 9 and indexed.stats()["index"]["vectors"] == 18
    alive = set(indexed.store().alive_ids().tolist())
    assert len(alive) == 18 and np.all(np.array(sorted(alive)) > 0)


def test_urls_are_checked_for_syntax_only_and_feeds_are_manifests_too(small_catalogue):
    folder = small_catalogue.parent
    manifest = folder / "remote.csv"
    manifest.write_text("sku,image\nA,https://images.example.invalid/a.jpg\nB,img/p0-0.png\n")
    plan = plan_manifest(manifest)  # example.invalid never resolves: nothing is fetched
    assert plan.problems == 0 and plan.images.add == 2
    feed = folder / "feed.txt"
    feed.write_text("id\ttitle\timage_link\nA\tT\timg/p0-0.png\nB\tU\timg/nope.png\n")
    plan = plan_manifest(feed, manifest_format="merchant-tsv")
    assert plan.products.add == 2 and plan.problems == 1 and plan.problem_examples[0].sku == "B"


@pytest.mark.catalogue_databases("sqlite")  # (PostgreSQL's sequences never hand an id out twice)
def test_prune_deletes_only_images_unchanged_since_it_found_them(indexed, small_catalogue):
    """An image found prunable, then deleted by the API, and a new image of another product
    given the same id (SQLite reuses the highest id) before the delete: the new one stays."""
    photos = small_catalogue.parent / "img"
    extra = make_image(photos / "extra.png", seed=4321)
    indexed.put_product(ProductRecord(sku="P5", title="Product 5", category="hats",
                                      images=[str(photos / "p5-0.png"), str(photos / "p5-1.png"), str(extra)]))
    extra_id = max(image.id for image in indexed.product("P5").images)
    newcomer = make_image(photos / "newcomer.png", seed=8765)
    swapped = []

    def meanwhile(counts):  # after the prune found what to delete, before it deletes
        assert counts.images == 1
        indexed.remove_image("P5", extra_id)
        view, _report, _created = indexed.put_product(ProductRecord(sku="NEWCOMER", images=[str(newcomer)]))
        swapped.append(view.images[0].id)

    with ManifestKeys() as keys:
        keys.load(small_catalogue)
        assert keys.find_prunable(indexed.sessions).images == 1
        assert list(keys.prunable_images()) == [[_key(indexed, extra_id)]]
        result = indexed.prune(keys, on_prune=meanwhile)
    assert swapped == [extra_id]  # the id was reused
    assert result.images == 0
    assert [image.id for image in indexed.product("NEWCOMER").images] == [extra_id]
    assert extra_id in set(indexed.store().alive_ids().tolist())
    assert indexed.search(newcomer, top_k=1).hits[0].sku == "NEWCOMER"


def _key(vs: VisualSearch, image_id: int) -> tuple[int, int, str]:
    with vs.sessions() as session:
        image, product, _sku, path = sync._image_keys(session, after=image_id - 1, limit=1)[0]
    assert image == image_id
    return image, product, path


def test_delete_images_by_id_product_and_path(indexed):
    image_id = indexed.product("P3").images[0].id
    image, product, path = _key(indexed, image_id)
    with indexed.session() as session:
        assert catalogue.delete_images(session, [(image, product + 1, path), (image, product, path + "x")]) == []
    assert image_id in {other.id for other in indexed.product("P3").images}
    with indexed.session() as session:
        assert catalogue.delete_images(session, [(image, product, path)]) == [(image, path)]
    assert image_id not in {other.id for other in indexed.product("P3").images}
