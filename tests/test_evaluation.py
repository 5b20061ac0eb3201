"""visualsearch.evaluation and `visualsearch eval`: metrics on hand-made rankings, the queries
file's checks, search with an excluded image, and whole runs on tiny indexed catalogues."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from visualsearch.backbones import Preprocessing, get_backbone, register_backbone
from visualsearch.errors import InvalidRequestError
from visualsearch.evaluation import (
    QueriesFileError,
    Query,
    QueryOutcome,
    average_precision_at_k,
    category_precision_at_k,
    compare_reports,
    evaluate,
    hit_at_k,
    read_queries,
    summarise,
)
from visualsearch.service import VisualSearch

from .conftest import TINY, make_image, write_catalogue

# The tiny test CNN at another input size: another backbone that loads the same weights file.
TINY_48 = register_backbone(replace(get_backbone(TINY), name="test_tiny_48",
                                    preprocessing=Preprocessing(input_size=48, resize_size=48,
                                                                interpolation="bilinear"))).name


# --- metrics on hand-made rankings ------------------------------------------------------


def test_hit_at_k_looks_only_k_deep_and_takes_any_relevant_sku():
    ranked = ["x", "y", "b", "z"]
    assert not hit_at_k(ranked, {"b"}, 1) and not hit_at_k(ranked, {"b"}, 2)
    assert hit_at_k(ranked, {"b"}, 3) and hit_at_k(ranked, {"b"}, 10)  # fewer results than k
    assert hit_at_k(ranked, {"a", "y"}, 2)  # one of several relevant SKUs is enough
    assert not hit_at_k([], {"a"}, 10)


@pytest.mark.parametrize("ranked, relevant, expected", [
    (["a"], {"a"}, 1.0),
    (["x", "a"], {"a"}, 1 / 2),
    (["x", "a", "y", "b"], {"a", "b"}, (1 / 2 + 2 / 4) / 2),
    (["a", "b", "x"], {"a", "b"}, 1.0),
    (["a"], {"a", "b"}, 1 / 2),  # fewer results than relevant SKUs: the missing one costs
    (["x", "y"], {"a"}, 0.0),
    (["a", "a", "b"], {"a", "b"}, (1 / 1 + 2 / 3) / 2),  # a repeated SKU is relevant once
    (["a", "a", "a"], {"a"}, 1.0),
    ([f"x{i}" for i in range(10)] + ["a"], {"a"}, 0.0),  # rank 11 is past AP@10
    ([f"s{i}" for i in range(10)], {f"s{i}" for i in range(12)}, 1.0),  # divided by min(|S|, 10)
    ([f"s{i}" for i in range(5)], {f"s{i}" for i in range(12)}, 5 / 10),
])
def test_average_precision_at_10(ranked, relevant, expected):
    assert average_precision_at_k(ranked, relevant) == pytest.approx(expected)


def test_average_precision_needs_a_relevant_sku():
    with pytest.raises(ValueError):
        average_precision_at_k(["a"], set())


def test_category_precision_divides_by_10_and_compares_caselessly():
    assert category_precision_at_k(["Shoes", " SHOES ", "bags", None], "shoes") == pytest.approx(2 / 10)
    assert category_precision_at_k(["Straße", "ÉLECTRONIQUE"], "STRASSE") == pytest.approx(1 / 10)
    assert category_precision_at_k(["E\u0301lectronique"], "électronique") == pytest.approx(1 / 10)
    assert category_precision_at_k(["hats"] * 12, "Hats") == pytest.approx(1.0)  # only 10 deep
    assert category_precision_at_k([], "hats") == 0.0


def _outcome(skus, expected=(), category=None, categories=(), latency=1.0) -> QueryOutcome:
    query = Query(line=2, image=Path("q.png"), expected_skus=tuple(expected), expected_category=category)
    return QueryOutcome(query=query, skus=tuple(skus), categories=tuple(categories), latency_ms=latency)


def test_summarise_averages_over_the_queries_each_metric_applies_to():
    outcomes = [
        _outcome(["a", "x"], expected=["a"], latency=1.0),
        _outcome(["x", "y", "b"], expected=["b", "c"], latency=2.0),
        # Tied scores keep the order search returned; the metrics only see that order.
        _outcome(["x", "x2"], expected=["z"], category="Shoes", categories=["shoes", "bags"], latency=3.0),
        _outcome(["y"], category="bags", categories=["BAGS"], latency=4.0),  # category only
    ]
    report = summarise(outcomes, top_k=10)
    assert (report.queries, report.sku_queries, report.category_queries) == (4, 3, 2)
    assert report.recall == pytest.approx({1: 1 / 3, 5: 2 / 3, 10: 2 / 3})
    assert report.map_at_10 == pytest.approx((1.0 + (1 / 3) / 2 + 0.0) / 3)
    assert report.category_precision_at_10 == pytest.approx((1 / 10 + 1 / 10) / 2)
    assert report.latency_p50_ms == pytest.approx(2.5) and report.latency_p95_ms == pytest.approx(3.85)


def test_summarise_without_sku_queries_has_no_recall_and_a_deeper_top_k_adds_a_recall():
    report = summarise([_outcome(["a"], category="c", categories=["c"])], top_k=20)
    assert report.recall == {1: None, 5: None, 10: None, 20: None}
    assert report.map_at_10 is None and report.category_precision_at_10 == pytest.approx(0.1)
    assert set(report.to_dict()) >= {"recall_at_20", "map_at_10", "latency_p95_ms"}


def test_compare_reports_gives_b_minus_a():
    a = summarise([_outcome(["x", "a"], expected=["a"], latency=2.0)], top_k=10)
    b = summarise([_outcome(["a"], expected=["a"], latency=5.0)], top_k=10)
    outcome = compare_reports(a, b)
    assert outcome["difference"]["recall_at_1"] == pytest.approx(1.0)
    assert outcome["difference"]["map_at_10"] == pytest.approx(0.5)
    assert outcome["difference"]["latency_p50_ms"] == pytest.approx(3.0)
    assert outcome["difference"]["category_precision_at_10"] is None
    assert outcome["a"]["recall_at_1"] == 0.0 and outcome["b"]["recall_at_1"] == 1.0


# --- the queries file -------------------------------------------------------------------


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_read_queries_resolves_paths_and_splits_skus(tmp_path):
    (tmp_path / "q").mkdir()
    make_image(tmp_path / "q" / "a.png", seed=1)
    elsewhere = make_image(tmp_path / "b.png", seed=2)
    path = _write_csv(tmp_path / "q" / "queries.csv", [
        {"image": "a.png", "expected_sku": "A | B|A", "expected_category": "", "exclude_image": "../cat/x.png"},
        {"image": str(elsewhere), "expected_sku": "", "expected_category": " Shoes ", "exclude_image": ""},
    ])
    first, second = read_queries(path)
    assert first == Query(line=2, image=(tmp_path / "q" / "a.png").resolve(), expected_skus=("A", "B"),
                          exclude_image=(tmp_path / "cat" / "x.png").resolve())
    assert second == Query(line=3, image=elsewhere, expected_category="Shoes")
    assert read_queries(path, limit=1) == [first]


def test_read_queries_from_json_lines(tmp_path):
    make_image(tmp_path / "a.png", seed=1)
    path = tmp_path / "queries.jsonl"
    path.write_text(json.dumps({"image": "a.png", "expected_sku": ["A", "B"]}) + "\n\n"
                    + json.dumps({"image": "a.png", "expected_category": "hats", "note": "ignored"}) + "\n")
    first, second = read_queries(path)
    assert first.expected_skus == ("A", "B") and (second.line, second.expected_category) == (3, "hats")


@pytest.mark.parametrize("columns, message", [
    (["photo", "expected_sku"], "missing column(s) image"),
    (["image", "title"], "missing column(s) expected_sku or expected_category"),
])
def test_a_missing_column_is_refused(tmp_path, columns, message):
    path = _write_csv(tmp_path / "queries.csv", [], columns=columns)
    with pytest.raises(QueriesFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_queries(path)


def test_bad_rows_are_named_by_line_and_nothing_is_read(tmp_path):
    make_image(tmp_path / "a.png", seed=1)
    path = _write_csv(tmp_path / "queries.csv", [
        {"image": "a.png", "expected_sku": "A", "expected_category": ""},
        {"image": "a.png", "expected_sku": " | ", "expected_category": ""},
        {"image": "missing.png", "expected_sku": "B", "expected_category": ""},
        {"image": "", "expected_sku": "C", "expected_category": ""},
    ])
    with pytest.raises(QueriesFileError) as caught:
        read_queries(path)
    message = str(caught.value)
    assert "3 bad row(s), nothing was run" in message
    assert "line 3: neither expected_sku nor expected_category" in message
    assert f"line 4: image file {tmp_path / 'missing.png'} does not exist" in message
    assert "line 5: no image" in message and "line 2" not in message


def test_broken_json_lines_and_empty_files_are_refused(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text('{"image": "a.png", "expected_sku": "A"}\n{not json\n')
    with pytest.raises(QueriesFileError, match="line 2 is not valid JSON"):
        read_queries(path)
    path.write_text('{"image": "a.png", "expected_sku": 7}\n')
    with pytest.raises(QueriesFileError, match="line 1: expected_sku must be text"):
        read_queries(path)
    empty = _write_csv(tmp_path / "empty.csv", [], columns=["image", "expected_sku"])
    with pytest.raises(QueriesFileError, match="has no rows"):
        read_queries(empty)


# --- searching with an excluded image, and whole runs -----------------------------------


@pytest.fixture
def twins_catalogue(small_catalogue) -> Path:
    """small_catalogue plus TWIN, whose two views are one picture at two sizes, and SOLO,
    which has one image."""
    folder = small_catalogue.parent
    make_image(folder / "img" / "twin-0.png", seed=500, size=48)
    make_image(folder / "img" / "twin-1.png", seed=500, size=64)
    make_image(folder / "img" / "solo.png", seed=600)
    with open(small_catalogue, newline="") as handle:
        rows = list(csv.DictReader(handle))
    extra = [{"sku": "TWIN", "image": "img/twin-0.png", "category": "hats"},
             {"sku": "TWIN", "image": "img/twin-1.png", "category": "hats"},
             {"sku": "SOLO", "image": "img/solo.png", "category": "bags"}]
    return write_catalogue(folder, rows + extra, name="twins.csv")


@pytest.fixture
def twins(tiny_settings, twins_catalogue) -> VisualSearch:
    vs = VisualSearch(tiny_settings)
    assert vs.index(twins_catalogue).failures == []
    return vs


def _image_id(vs: VisualSearch, path: Path) -> int:
    (image_id,) = vs.image_ids_by_path([str(path)])[str(path)]
    return image_id


def test_search_ranks_a_product_by_its_best_image_other_than_the_excluded_one(twins, twins_catalogue):
    img = twins_catalogue.parent / "img"
    first, second = _image_id(twins, img / "twin-0.png"), _image_id(twins, img / "twin-1.png")
    plain = twins.search(img / "twin-0.png", top_k=5).hits[0]
    assert (plain.sku, plain.image_id) == ("TWIN", first) and plain.score == pytest.approx(1.0, abs=1e-5)

    top = twins.search(img / "twin-0.png", top_k=5, exclude_image_ids={first}).hits[0]
    assert (top.sku, top.image_id) == ("TWIN", second) and top.score < plain.score

    assert "TWIN" not in [hit.sku for hit in twins.search(img / "twin-0.png", top_k=100,
                                                          exclude_image_ids={first, second}).hits]
    solo = _image_id(twins, img / "solo.png")
    assert "SOLO" not in [hit.sku for hit in twins.search(img / "solo.png", top_k=100,
                                                          exclude_image_ids={solo}).hits]


def test_evaluate_on_a_catalogue_s_own_images(twins, twins_catalogue, tmp_path):
    img = twins_catalogue.parent / "img"
    rows = [{"image": str(path), "expected_sku": path.stem.split("-")[0].upper(), "expected_category": "",
             "exclude_image": ""} for path in sorted(img.glob("p*.png"))]
    rows.append({"image": "../catalogue/img/twin-0.png", "expected_sku": "TWIN", "expected_category": "hats",
                 "exclude_image": "../catalogue/img/twin-0.png"})
    queries = read_queries(_write_csv(tmp_path / "bench" / "queries.csv", rows))

    report = evaluate(twins, queries, top_k=10)
    assert (report.queries, report.sku_queries, report.category_queries) == (25, 25, 1)
    assert report.recall == {1: 1.0, 5: 1.0, 10: 1.0} and report.map_at_10 == pytest.approx(1.0)
    twin = report.outcomes[-1]
    assert twin.skus[0] == "TWIN" and 0.1 <= report.category_precision_at_10 <= 1.0
    assert 0 < report.latency_p50_ms <= report.latency_p95_ms
    assert report.backbone == TINY and report.data_dir == str(twins.data_dir.resolve())

    with pytest.raises(InvalidRequestError, match="top_k"):
        evaluate(twins, queries, top_k=5)


def test_an_exclude_image_the_catalogue_does_not_hold_is_named(twins, twins_catalogue, tmp_path):
    photo = twins_catalogue.parent / "img" / "p0-0.png"
    queries = read_queries(_write_csv(tmp_path / "queries.csv", [
        {"image": str(photo), "expected_sku": "P0", "exclude_image": str(photo)},
        {"image": str(photo), "expected_sku": "P0", "exclude_image": "nowhere.png"},
    ]))
    with pytest.raises(QueriesFileError, match="line 3: exclude_image .*nowhere.png is not an image of the"):
        evaluate(twins, queries)


# --- the command ------------------------------------------------------------------------


@pytest.fixture
def benchmark(small_catalogue) -> Path:
    """Each view of small_catalogue queries for its siblings, itself left out."""
    rows = [{"image": f"img/p{n}-{view}.png", "expected_sku": f"P{n}",
             "expected_category": ["shoes", "bags", "hats"][n % 3], "exclude_image": f"img/p{n}-{view}.png"}
            for n in range(12) for view in range(2)]
    rows += [{"image": f"img/p{n}-0.png", "expected_sku": f"P{n}", "expected_category": "", "exclude_image": ""}
             for n in range(12)]
    return _write_csv(small_catalogue.parent / "queries.csv", rows)


def test_eval_indexes_the_manifest_then_reports_json(run, small_catalogue, benchmark, tmp_path, tiny_settings):
    result = run("eval", benchmark, "--manifest", small_catalogue, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"data_dir", "backbone", "top_k", "queries", "sku_queries", "category_queries",
                           "recall_at_1", "recall_at_5", "recall_at_10", "map_at_10", "category_precision_at_10",
                           "latency_p50_ms", "latency_p95_ms"}
    assert (report["queries"], report["sku_queries"], report["category_queries"]) == (36, 36, 24)
    assert report["backbone"] == TINY and report["top_k"] == 10
    # The numbers of the library's run on the same data directory (the latencies aside).
    direct = evaluate(VisualSearch(tiny_settings.with_overrides(data_dir=tmp_path / "data"), read_only=True),
                      read_queries(benchmark)).to_dict()
    assert {name: value for name, value in report.items() if "latency" not in name} == \
        {name: value for name, value in direct.items() if "latency" not in name}
    assert 12 / 36 <= report["recall_at_1"] < 1.0  # the queries without exclusion find their own image

    again = run("eval", benchmark, "--manifest", small_catalogue, "--limit", "12", "--top-k", "12")
    assert again.exit_code == 0, again.output
    assert "0 embedded, 24 unchanged" in again.stderr  # indexing is idempotent
    assert "Recall@12" in again.stdout and "mAP@10" in again.stdout and "latency p95" in again.stdout


def test_eval_checks_the_queries_before_anything_runs(run, small_catalogue, tmp_path):
    bad = _write_csv(small_catalogue.parent / "bad.csv", [{"image": "img/none.png", "expected_sku": "P1"}])
    result = run("eval", bad, "--manifest", small_catalogue)
    assert result.exit_code == 1 and "line 2: image file" in result.output and "[bad_queries]" in result.output
    assert not (tmp_path / "data").exists()


def test_eval_compares_two_data_dirs_each_with_its_own_backbone(run, small_catalogue, benchmark, tmp_path):
    first, second = tmp_path / "recipe-a", tmp_path / "recipe-b"
    assert run("index", small_catalogue, "--data-dir", first).exit_code == 0
    assert run("index", small_catalogue, "--data-dir", second, "--backbone", TINY_48).exit_code == 0

    result = run("eval", benchmark, "--compare", first, second, "--json")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert (outcome["a"]["backbone"], outcome["b"]["backbone"]) == (TINY, TINY_48)
    assert outcome["a"]["data_dir"] == str(first.resolve())
    for name, difference in outcome["difference"].items():
        assert difference == pytest.approx(outcome["b"][name] - outcome["a"][name])

    table = run("eval", benchmark, "--compare", first, second)
    assert table.exit_code == 0, table.output
    assert "B - A" in table.stdout and TINY_48 in table.stdout and "Recall@1 " in table.stdout

    refused = run("eval", benchmark, "--compare", first, second, "--manifest", small_catalogue)
    assert refused.exit_code == 2 and "--compare" in refused.output
