"""Catalogue manifests (CSV / TSV / JSON Lines): parsing, merging by SKU, validation errors,
and the two streaming passes (validation, then records in chunks) with flat memory."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

from visualsearch import catalogue_manifest
from visualsearch.catalogue_manifest import (
    ManifestSummary,
    ProductRecord,
    iter_manifest_records,
    read_manifest,
    validate_manifest,
)
from visualsearch.errors import ManifestError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def full_csv(folder: Path, absolute: Path) -> Path:
    return write(folder / "catalogue.csv", (
        "sku,image,title,category,brand,price,url,colour\n"
        "A1,img/a.jpg|img/b.jpg,Red shoe,shoes,Acme,19.5,https://shop.example/a1,red\n"
        f"B2,{absolute},Blue bag,bags,Globex,120,,blue\n"
        "A1,img/c.jpg|img/a.jpg,,,Acme Corp,,,\n"
    ))


def full_jsonl(folder: Path, absolute: Path) -> Path:
    rows = [
        {"sku": "A1", "image": ["img/a.jpg", "img/b.jpg"], "title": "Red shoe", "category": "shoes",
         "brand": "Acme", "price": "19.5", "url": "https://shop.example/a1", "colour": "red"},
        {"sku": "B2", "image": str(absolute), "title": "Blue bag", "category": "bags",
         "brand": "Globex", "price": "120", "url": "", "colour": "blue"},
        {"sku": "A1", "image": "img/c.jpg|img/a.jpg", "title": "", "category": "", "brand": "Acme Corp",
         "price": "", "url": "", "colour": ""},
    ]
    return write(folder / "catalogue.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def problems(error: pytest.ExceptionInfo) -> str:
    return str(error.value)


# --- a good manifest ---------------------------------------------------------------------


def test_csv_with_all_columns_and_merged_rows(tmp_path):
    folder = tmp_path / "shop"
    absolute = tmp_path / "elsewhere" / "bag.png"
    products = read_manifest(full_csv(folder, absolute))
    base = folder.resolve()

    assert [p.sku for p in products] == ["A1", "B2"]  # order of first appearance
    a1, b2 = products
    assert isinstance(a1, ProductRecord)
    # Two rows of A1 merged: images in order, the repeated a.jpg listed once.
    assert a1.images == [base / "img" / "a.jpg", base / "img" / "b.jpg", base / "img" / "c.jpg"]
    assert all(image.is_absolute() for image in a1.images)
    # The later non-empty brand overrides; its empty cells erase nothing.
    assert a1.brand == "Acme Corp"
    assert (a1.title, a1.category, a1.price, a1.url) == (
        "Red shoe", "shoes", 19.5, "https://shop.example/a1")
    assert a1.attributes == {"colour": "red"}
    assert a1.line == 2

    assert b2.images == [absolute]  # absolute paths are kept as they are
    assert (b2.title, b2.category, b2.brand, b2.price, b2.url) == ("Blue bag", "bags", "Globex", 120.0, None)
    assert b2.attributes == {"colour": "blue"}
    assert b2.line == 3


def test_relative_paths_resolve_against_the_manifest_folder_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "deep" / "shop"
    path = write(folder / "c.csv", "sku,image\nX,pics/x.jpg\n")
    monkeypatch.chdir(tmp_path)
    [product] = read_manifest(Path("deep/shop/c.csv"))
    assert product.images == [folder.resolve() / "pics" / "x.jpg"]
    assert read_manifest(str(path))[0].images == product.images  # str paths work too


def test_later_rows_override_fields_they_fill_in(tmp_path):
    path = write(tmp_path / "c.csv", (
        "sku,image,title,price,colour\n"
        "A,a.jpg,Old title,10,red\n"
        "A,a.jpg,New title,12.25,\n"
        "A,b.jpg,,,green\n"
    ))
    [product] = read_manifest(path)
    assert product.title == "New title"
    assert product.price == 12.25
    assert product.attributes == {"colour": "green"}
    assert product.images == [tmp_path.resolve() / "a.jpg", tmp_path.resolve() / "b.jpg"]
    assert product.line == 2


def test_image_list_with_spaces_and_empty_parts(tmp_path):
    path = write(tmp_path / "c.csv", 'sku,image\nA," a.jpg | | b.jpg |"\n')
    [product] = read_manifest(path)
    assert product.images == [tmp_path.resolve() / "a.jpg", tmp_path.resolve() / "b.jpg"]


def test_jsonl_with_the_same_content_gives_equal_records(tmp_path):
    absolute = tmp_path / "elsewhere" / "bag.png"
    from_csv = read_manifest(full_csv(tmp_path / "shop", absolute))
    from_jsonl = read_manifest(full_jsonl(tmp_path / "shop", absolute))
    # Everything but `line` (the CSV's header line shifts its numbers by one).
    assert [replace(r, line=0) for r in from_jsonl] == [replace(r, line=0) for r in from_csv]
    assert [r.line for r in from_jsonl] == [1, 2]


def test_jsonl_accepts_numbers_lists_and_blank_lines(tmp_path):
    path = write(tmp_path / "c.ndjson", (
        '{"sku": "A", "image": ["x.jpg", "y.jpg", "x.jpg"], "price": 7, "size": 42}\n'
        "\n"
        '{"sku": "B", "image": "z.jpg"}\n'
    ))
    a, b = read_manifest(path)
    base = tmp_path.resolve()
    assert a.images == [base / "x.jpg", base / "y.jpg"]
    assert a.price == 7.0 and a.attributes == {"size": 42}
    assert b.images == [base / "z.jpg"] and b.line == 3


def test_utf8_bom_in_the_csv_header_is_handled(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffsku,image,title\nA,a.jpg,Café\n".encode("utf-8"))
    [product] = read_manifest(path)
    assert product.sku == "A" and product.title == "Café"
    assert product.attributes == {}  # the BOM did not turn 'sku' into an extra column


def test_utf8_bom_in_a_jsonl_file_is_handled(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"sku": "A", "image": "a.jpg"}\n'.encode("utf-8"))
    assert [p.sku for p in read_manifest(path)] == ["A"]


def test_tsv_works(tmp_path):
    path = write(tmp_path / "c.tsv", "sku\timage\ttitle\tmaterial\nA\ta.jpg|b.jpg\tA, with comma\tleather\n")
    [product] = read_manifest(path)
    assert product.title == "A, with comma"
    assert product.attributes == {"material": "leather"}
    assert product.images == [tmp_path.resolve() / "a.jpg", tmp_path.resolve() / "b.jpg"]


def test_header_names_with_spaces_are_stripped(tmp_path):
    path = write(tmp_path / "c.csv", " sku , image ,title\nA,a.jpg,T\n")
    [product] = read_manifest(path)
    assert product.sku == "A" and product.title == "T" and product.attributes == {}


# --- bad manifests -----------------------------------------------------------------------


@pytest.mark.parametrize("header, missing", [("sku,title", "image"), ("image,title", "sku")])
def test_a_missing_required_column_is_named(tmp_path, header, missing):
    path = write(tmp_path / "c.csv", f"{header}\nA,B\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert re.search(rf"missing required column\(s\) {missing}\b", problems(caught))


def test_a_missing_required_key_in_jsonl_is_named(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"sku": "A", "title": "no image"}\n')
    with pytest.raises(ManifestError, match="missing required column.*image"):
        read_manifest(path)


def test_bad_rows_are_all_reported_with_their_line_numbers(tmp_path):
    path = write(tmp_path / "c.csv", (
        "sku,image,price\n"
        "A,a.jpg,1\n"          # line 2: fine
        ",b.jpg,2\n"           # line 3: empty sku
        "C,,3\n"               # line 4: empty image
        "D,d.jpg,cheap\n"      # line 5: non-numeric price
        "E,e.jpg,\n"           # line 6: fine (no price)
    ))
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    message = problems(caught)
    assert "3 bad row(s)" in message
    assert re.search(r"line 3: empty sku", message)
    assert re.search(r"line 4: .*'C'.*empty image", message)
    assert re.search(r"line 5: price 'cheap' is not a number \(product 'D'\)", message)
    assert "line 2" not in message and "line 6" not in message


def test_bad_jsonl_rows_report_line_numbers(tmp_path):
    path = write(tmp_path / "c.jsonl", (
        '{"sku": "A", "image": "a.jpg"}\n'
        '{"sku": "B", "image": []}\n'
        '{"sku": "", "image": "c.jpg"}\n'
    ))
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert "line 2:" in problems(caught) and "line 3: empty sku" in problems(caught)


def test_many_bad_rows_are_summarised(tmp_path):
    path = write(tmp_path / "c.csv", "sku,image\n" + ",x.jpg\n" * 15)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    message = problems(caught)
    assert "15 bad row(s)" in message
    assert "line 11:" in message and "line 12:" not in message  # the first 10 are listed
    assert "and 5 more" in message


def test_http_image_urls_are_kept_as_written_strings(tmp_path):
    path = write(tmp_path / "c.csv", (
        "sku,image\n"
        "A,a.jpg|https://cdn.example/img//a.jpg?v=2|HTTP://cdn.example/a.jpg\n"
        "A,https://cdn.example/img//a.jpg?v=2\n"   # the same URL again: listed once
    ))
    [product] = read_manifest(path)
    # Never a Path (which would collapse "//") and never resolved against the folder.
    assert product.images == [tmp_path.resolve() / "a.jpg", "https://cdn.example/img//a.jpg?v=2",
                              "HTTP://cdn.example/a.jpg"]
    assert [type(image) for image in product.images] == [type(tmp_path), str, str]
    assert validate_manifest(path).images == 4


@pytest.mark.parametrize("url", ["ftp://cdn.example/a.jpg", "file:///etc/passwd", "javascript:alert(1)",
                                 "data:image/png;base64,AAAA", "https:///no-host.jpg", "http:/a.jpg"])
def test_an_image_url_that_is_not_http_with_a_host_is_rejected(tmp_path, url):
    path = write(tmp_path / "c.csv", f'sku,image\nA,a.jpg\nB,"{url}"\n')
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert "line 3:" in problems(caught) and "URL" in problems(caught)


@pytest.mark.parametrize("value, expected", [
    ("https://cdn.example/a.jpg", True), ("http://10.0.0.1:8080/a", True), ("HTTPS://Cdn.Example/a", True),
    ("img/a.jpg", False), ("/abs/a.jpg", False), ("C:\\img\\a.jpg", False), ("https://", False),
    ("https:///a.jpg", False), ("ftp://cdn.example/a.jpg", False), ("data:image/png;base64,AA", False),
    ("http://[::1/a.jpg", False),
])
def test_is_image_url(value, expected):
    assert catalogue_manifest.is_image_url(value) is expected


def test_unknown_extension_is_rejected(tmp_path):
    path = write(tmp_path / "c.xlsx", "sku,image\nA,a.jpg\n")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        read_manifest(path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "dir.csv")


def test_invalid_json_line_is_rejected_with_its_number(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"sku": "A", "image": "a.jpg"}\n{"sku": "B", "image": \n')
    with pytest.raises(ManifestError, match="line 2 is not valid JSON"):
        read_manifest(path)


def test_a_json_line_that_is_not_an_object_is_rejected(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"sku": "A", "image": "a.jpg"}\n["B", "b.jpg"]\n')
    with pytest.raises(ManifestError, match="line 2 is not a JSON object"):
        read_manifest(path)


@pytest.mark.parametrize("name, text", [
    ("empty.csv", ""),
    ("empty.jsonl", ""),
    ("blank.jsonl", "\n\n  \n"),
    ("header_only.csv", "sku,image\n"),
])
def test_a_manifest_without_rows_is_rejected(tmp_path, name, text):
    with pytest.raises(ManifestError):
        read_manifest(write(tmp_path / name, text))


def test_a_row_with_more_fields_than_the_header_is_rejected(tmp_path):
    path = write(tmp_path / "c.csv", "sku,image\nA,a.jpg\nB,b.jpg,surprise\n")
    with pytest.raises(ManifestError, match="line 3 has more fields"):
        read_manifest(path)


def test_a_file_that_is_not_utf8_is_rejected(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes("sku,image,title\nA,a.jpg,Caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(path)


def test_regressions_from_review(tmp_path):
    huge = tmp_path / "huge.csv"
    huge.write_text("sku,image\nA," + "x" * 200_000 + "\n")
    with pytest.raises(ManifestError, match="CSV"):
        read_manifest(huge)
    blank = tmp_path / "blank.csv"
    blank.write_text("sku,image,colour\nA,a.jpg,red\nA,b.jpg,  \n")
    assert read_manifest(blank)[0].attributes == {"colour": "red"}
    same = tmp_path / "same.csv"
    same.write_text("sku,image\nA,a.jpg|sub/../a.jpg\n")
    assert read_manifest(same)[0].images == [tmp_path / "a.jpg"]
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"sku": "A", "image": {"x": 1}}) + "\n")
    with pytest.raises(ManifestError, match="line 1"):
        read_manifest(odd)


def test_non_finite_prices_are_rejected(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("sku,image,price\nA,a.jpg,inf\nB,b.jpg,nan\nC,c.jpg,-5\n")
    with pytest.raises(ManifestError, match="line 2.*\\n.*line 3.*\\n.*line 4"):
        read_manifest(path)


# --- streaming: validate_manifest ------------------------------------------------------


def test_validate_manifest_counts_rows_and_images(tmp_path):
    path = write(tmp_path / "c.csv", (
        "sku,image\n"
        "A,a.jpg|b.jpg\n"
        "\n"                  # blank lines are not rows
        "A,a.jpg\n"           # a repeated image still counts: it is named again
        "B,c.jpg|c.jpg\n"
    ))
    summary = validate_manifest(path)
    assert summary == ManifestSummary(path=path, rows=3, images=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.rows = 0  # type: ignore[misc]


def test_validate_manifest_counts_jsonl_image_lists(tmp_path):
    path = write(tmp_path / "c.jsonl", (
        '{"sku": "A", "image": ["x.jpg", "y.jpg", "x.jpg"]}\n'
        "\n"
        '{"sku": "B", "image": "z.jpg"}\n'
    ))
    assert validate_manifest(str(path)) == ManifestSummary(path=path, rows=2, images=4)


@pytest.mark.parametrize("text", [
    "sku,image,price\nA,a.jpg,1\n,b.jpg,2\nC,,3\nD,d.jpg,cheap\nE,ftp://x/e.jpg,\n",
    "sku,image\n" + ",x.jpg\n" * 15,
])
def test_validate_manifest_reports_exactly_what_read_manifest_reports(tmp_path, text):
    path = write(tmp_path / "c.csv", text)
    with pytest.raises(ManifestError) as by_validate:
        validate_manifest(path)
    with pytest.raises(ManifestError) as by_read:
        read_manifest(path)
    assert problems(by_validate) == problems(by_read)
    assert "nothing was indexed" in problems(by_validate)


def test_validate_manifest_rejects_what_read_manifest_rejects(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        validate_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="has no rows"):
        validate_manifest(write(tmp_path / "h.csv", "sku,image\n"))
    with pytest.raises(ManifestError, match="missing required column"):
        validate_manifest(write(tmp_path / "m.csv", "sku,title\nA,B\n"))
    with pytest.raises(ManifestError, match="line 3 has more fields"):
        validate_manifest(write(tmp_path / "x.csv", "sku,image\nA,a.jpg\nB,b.jpg,surprise\n"))


# --- streaming: iter_manifest_records ---------------------------------------------------


def chunk_skus(chunks: list[list[ProductRecord]]) -> list[list[str]]:
    return [[record.sku for record in chunk] for chunk in chunks]


def test_chunks_never_split_a_run_of_one_sku_and_far_rows_arrive_again(tmp_path):
    path = write(tmp_path / "c.csv", (
        "sku,image,title\n"
        "A,a1.jpg,Old A\n"    # line 2
        "A,a2.jpg,\n"
        "A,a3.jpg,\n"         # the chunk is full after a2, but A's run goes on
        "B,b.jpg,\n"          # line 5: a new chunk starts at the next SKU
        "C,c1.jpg,\n"
        "C,c2.jpg,\n"
        "D,d.jpg,\n"          # line 8
        "A,a1.jpg|a4.jpg,New A\n"  # line 9: A again, far from its run
    ))
    chunks = list(iter_manifest_records(path, chunk_rows=2))
    assert chunk_skus(chunks) == [["A"], ["B", "C"], ["D", "A"]]
    base = tmp_path.resolve()
    first_a, far_a = chunks[0][0], chunks[2][1]
    assert first_a.images == [base / "a1.jpg", base / "a2.jpg", base / "a3.jpg"]
    assert (first_a.title, first_a.line) == ("Old A", 2)
    assert far_a.images == [base / "a1.jpg", base / "a4.jpg"]
    assert (far_a.title, far_a.line) == ("New A", 9)
    assert chunks[1][1].images == [base / "c1.jpg", base / "c2.jpg"]

    # read_manifest applies the far record on top of the first, as the indexer does.
    [a, b, c, d] = read_manifest(path)
    assert a.images == [base / f"a{n}.jpg" for n in (1, 2, 3, 4)]
    assert (a.title, a.line) == ("New A", 2)
    assert [p.sku for p in (b, c, d)] == ["B", "C", "D"]


def test_chunk_sizes(tmp_path):
    path = write(tmp_path / "c.csv", "sku,image\n" + "".join(f"S{n},{n}.jpg\n" for n in range(7)))
    assert [len(chunk) for chunk in iter_manifest_records(path, chunk_rows=1)] == [1] * 7
    assert [len(chunk) for chunk in iter_manifest_records(path, chunk_rows=3)] == [3, 3, 1]
    [whole] = iter_manifest_records(path, chunk_rows=100)
    assert whole == read_manifest(path)
    with pytest.raises(ValueError, match="chunk_rows"):
        next(iter_manifest_records(path, chunk_rows=0))


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5, 8, 50])
def test_random_layouts_keep_runs_whole_and_merge_like_read_manifest(tmp_path, chunk_rows):
    chooser = random.Random(chunk_rows)
    skus = [chooser.choice("ABCDEF") for _ in range(60)]  # runs of many lengths, and repeats
    lines = [f"{sku},{n}.jpg,t{n}" for n, sku in enumerate(skus)]
    path = write(tmp_path / "c.csv", "sku,image,title\n" + "\n".join(lines) + "\n")
    chunks = list(iter_manifest_records(path, chunk_rows=chunk_rows))

    chunk_of_row = {}  # row number (= image name) -> the chunk that holds it
    for index, chunk in enumerate(chunks):
        assert chunk and len({record.sku for record in chunk}) == len(chunk)  # merged in a chunk
        for record in chunk:
            for image in record.images:
                chunk_of_row[int(image.stem)] = index
    assert sorted(chunk_of_row) == list(range(len(skus)))  # every row arrives exactly once
    for n in range(1, len(skus)):
        if skus[n] == skus[n - 1]:
            assert chunk_of_row[n] == chunk_of_row[n - 1], f"rows {n - 1} and {n} of {skus[n]} split"
    # A chunk may only end once it holds at least chunk_rows rows.
    rows_per_chunk = [list(chunk_of_row.values()).count(index) for index in range(len(chunks))]
    assert all(rows >= chunk_rows for rows in rows_per_chunk[:-1])

    # Applying the chunks in order gives what read_manifest gives.
    merged: dict[str, ProductRecord] = {}
    for chunk in chunks:
        for record in chunk:
            if record.sku not in merged:
                merged[record.sku] = replace(record, images=list(record.images))
            else:
                merged[record.sku].images += [i for i in record.images if i not in merged[record.sku].images]
                merged[record.sku].title = record.title
    assert list(merged.values()) == read_manifest(path)


def test_read_manifest_is_the_same_with_tiny_chunks(tmp_path, monkeypatch):
    absolute = tmp_path / "elsewhere" / "bag.png"
    for path in (full_csv(tmp_path / "shop", absolute), full_jsonl(tmp_path / "shop", absolute)):
        expected = read_manifest(path)
        monkeypatch.setattr(catalogue_manifest, "DEFAULT_CHUNK_ROWS", 1)
        assert read_manifest(path) == expected  # A1's rows 1 and 3 merged across chunks
        monkeypatch.undo()


def test_validation_fails_before_any_record_is_yielded(tmp_path):
    # The bad row is the very last one, after many good chunks' worth of rows.
    good = "".join(f"S{n},{n}.jpg\n" for n in range(500))
    path = write(tmp_path / "c.csv", "sku,image\n" + good + "LAST,ftp://cdn.example/x.jpg\n")
    written: list[ProductRecord] = []

    def index(manifest: Path) -> None:  # what the indexer does: validate, then stream
        validate_manifest(manifest)
        for chunk in iter_manifest_records(manifest, chunk_rows=10):
            written.extend(chunk)

    with pytest.raises(ManifestError, match="line 502: .*URL"):
        index(path)
    assert written == []

    # Without the first pass, the stream still stops with a ManifestError (not a
    # crash), but only after the good chunks were yielded: hence the two passes.
    streamed = []
    with pytest.raises(ManifestError, match="line 502: .*URL.*validate the manifest first"):
        for chunk in iter_manifest_records(path, chunk_rows=10):
            streamed.extend(chunk)
    assert len(streamed) == 490  # 49 whole chunks; the one in progress is dropped


@pytest.mark.parametrize("name, text, message", [
    ("c.csv", "sku,image\nA,a.jpg\n,b.jpg\n", "line 3: empty sku"),
    ("c.jsonl", '{"sku": "A", "image": "a.jpg"}\n{"sku": "B", "image": \n', "line 2 is not valid JSON"),
    ("c.csv", "sku,image\n", "has no rows"),
    ("c.xlsx", "sku,image\nA,a.jpg\n", "unknown manifest format"),
    ("missing.csv", None, "does not exist"),
])
def test_iter_manifest_records_on_an_unvalidated_bad_file_raises_manifest_error(
        tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        write(path, text)
    with pytest.raises(ManifestError, match=message):
        list(iter_manifest_records(path))


# --- streaming: memory is flat in the number of rows ------------------------------------

BIG_ROWS = 200_000
# Tracing every allocation makes the record-building pass ~6x slower (pathlib on
# Python 3.11 allocates a lot), so the traced iteration reads the first quarter of the
# file; holding those 50,000 records would take ~30 MB, over the bound.
TRACED_ITERATION_ROWS = 50_000


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory) -> Path:
    """A 200,000-row CSV, one product (SKU) per row."""
    path = tmp_path_factory.mktemp("big") / "big.csv"
    path.write_text("sku,image\n" + "".join(f"S{n},{n}.jpg\n" for n in range(BIG_ROWS)))
    return path


def traced_peak(run):
    """``run()``'s result and the peak memory traced while it ran, in bytes."""
    tracemalloc.start()
    try:
        return run(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_validate_manifest_memory_is_flat(big_manifest):
    summary, peak = traced_peak(lambda: validate_manifest(big_manifest))
    assert (summary.rows, summary.images) == (BIG_ROWS, BIG_ROWS)
    # Counters and a capped problem list only: no rows, no SKU set (the 200,000 SKUs
    # alone would take over 10 MB).
    assert peak < 2 * 2**20, f"validate_manifest peaked at {peak} bytes"


def test_iterating_the_chunks_keeps_memory_bounded(big_manifest):
    def consume() -> int:
        products = 0
        chunks = iter_manifest_records(big_manifest)
        try:
            for chunk in chunks:
                products += len(chunk)  # each chunk is dropped once the next one is built
                if products >= TRACED_ITERATION_ROWS:
                    break
        finally:
            chunks.close()
        return products

    products, peak = traced_peak(consume)
    assert products == TRACED_ITERATION_ROWS  # 25 whole chunks of the default 2,000 rows
    # About two chunks of records at a time, plus pathlib's interned names.
    assert peak < 20 * 2**20, f"iterating the chunks peaked at {peak} bytes"

