#!/usr/bin/env python3
"""Regenerate the bundled demo catalogue from the Saleor demo shop.

Source: the ``saleor==2.10.1`` wheel on PyPI, which ships the demo-shop
product shots (``saleor/static/placeholders/saleordemoproduct_*.png``, 1024 px
transparent PNGs) and the demo database fixture
(``saleor/static/populatedb_data.json``: products, categories, images).

Outputs (in ``--out``, default: this script's folder):

* ``images/<sku>-<n>.jpg`` - each product view composited on white, shrunk so
  the longer side is at most 512 px, JPEG quality 85, no EXIF;
* ``catalogue.csv`` - ``sku,image,title,category,brand,price,url``, one row per
  product image (multi-view products have several rows with the same sku);
* ``CREDITS.md`` - attribution (artwork is CC BY 4.0, Mirumee Software).

Usage::

    python data/demo/build_demo.py                      # downloads the wheel with pip
    python data/demo/build_demo.py --wheel saleor-2.10.1-py3-none-any.whl

Needs only the standard library and Pillow.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

from PIL import Image

SALEOR_VERSION = "2.10.1"
WHEEL_NAME = f"saleor-{SALEOR_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "ebf33a74d000dcee5298b728b1bb10321521feea74c94a28bf85da556bfd337c"
FIXTURE = "saleor/static/populatedb_data.json"
PLACEHOLDERS = "saleor/static/placeholders/"

MAX_SIDE = 512
JPEG_QUALITY = 85
BRAND = "Saleor"
CSV_HEADER = ["sku", "image", "title", "category", "brand", "price", "url"]

# In the fixture a few products reuse another product's picture (e.g. "Apple
# Juice" and "Orange Juice" both point at fd_juice_06, whose bottle label reads
# "Orange").  A visual-search demo must not show the same photo under two
# skus, so each picture belongs to one product only.  Where the label on the
# picture names a product, that product gets it (listed here by product slug);
# otherwise the product with the lowest id wins.  A product left without any
# picture is skipped with a warning.
IMAGE_OWNER = {
    "saleordemoproduct_fd_juice_06.png": "orange-juice",  # label: "Orange"
    "saleordemoproduct_fd_juice_03.png": "power-juice",   # label: "Power"
    "saleordemoproduct_fd_juice_02.png": "bean-juice",    # label: "Bean"
}

# "products/saleordemoproduct_paints_01_stdygda.png" -> "saleordemoproduct_paints_01.png"
_SUFFIX_RE = re.compile(r"_[A-Za-z0-9]{7}$")


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def placeholder_name(fixture_path: str) -> str:
    """Map a fixture image path to the file name shipped in placeholders/."""
    base = fixture_path.rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return _SUFFIX_RE.sub("", stem) + dot + ext


def fetch_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--only-binary=:all:", "--python-version", "3.8",
        "-d", str(dest), f"saleor=={SALEOR_VERSION}",
    ]
    print("running:", " ".join(cmd))
    subprocess.run(cmd, check=True)
    wheel = dest / WHEEL_NAME
    if not wheel.is_file():
        sys.exit(f"error: pip did not produce {wheel}")
    return wheel


def to_jpeg(png_bytes: bytes) -> bytes:
    """Composite on white, shrink to MAX_SIDE, encode as JPEG (no metadata)."""
    with Image.open(io.BytesIO(png_bytes)) as src:
        rgba = src.convert("RGBA")
    img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img.alpha_composite(rgba)
    img = img.convert("RGB")
    w, h = img.size
    scale = MAX_SIDE / max(w, h)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    # A fresh image carries no EXIF/ICC/comment; save nothing but pixels.
    img.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def load_catalogue(zf: zipfile.ZipFile):
    """Return [(product_pk, fields, category_name, [png_name, ...]), ...]."""
    objects = json.loads(zf.read(FIXTURE))
    by_model: dict[str, dict[int, dict]] = defaultdict(dict)
    for obj in objects:
        by_model[obj["model"]][obj["pk"]] = obj["fields"]
    products = by_model["product.product"]
    categories = by_model["product.category"]

    views = defaultdict(list)  # product pk -> [(sort_order, image pk, png name)]
    for pk, f in by_model["product.productimage"].items():
        if f["product"] not in products:
            warn(f"image {f['image']!r} points at unknown product {f['product']}")
            continue
        order = f.get("sort_order")
        views[f["product"]].append(
            (order if order is not None else 0, pk, placeholder_name(f["image"]))
        )

    # Decide which product owns each picture (see IMAGE_OWNER).
    slug_to_pk = {f["slug"]: pk for pk, f in products.items()}
    claims = defaultdict(list)
    for pk in sorted(views):
        for _, _, name in views[pk]:
            if pk not in claims[name]:
                claims[name].append(pk)
    owner = {}
    for name, pks in claims.items():
        forced = slug_to_pk.get(IMAGE_OWNER.get(name, ""))
        owner[name] = forced if forced in pks else pks[0]
        for loser in pks:
            if loser != owner[name]:
                warn(f"{name} is used by {products[loser]['name']!r} "
                     f"({products[loser]['slug']}) and "
                     f"{products[owner[name]]['name']!r} "
                     f"({products[owner[name]]['slug']}); keeping it only for the latter")

    result = []
    for pk in sorted(products):
        f = products[pk]
        names = []
        for _, _, name in sorted(views.get(pk, [])):
            if owner.get(name) == pk and name not in names:
                names.append(name)
        cat = categories.get(f.get("category"))
        result.append((pk, f, cat["name"] if cat else "", names))
    return result


def price_of(fields: dict) -> str:
    for key in ("price_amount", "base_price_amount", "price", "base_price"):
        value = fields.get(key)
        if value not in (None, ""):
            if isinstance(value, dict):  # {"amount": ..., "currency": ...}
                value = value.get("amount")
            return str(Decimal(str(value)).quantize(Decimal("0.01")))
    return ""


CREDITS = """\
# Demo catalogue credits

The product images and product data in this folder come from the **Saleor demo
shop**, as shipped in the `saleor` {version} package on PyPI
(<https://pypi.org/project/saleor/{version}/>, source:
<https://github.com/mirumee/saleor>).

## Product images (`images/`)

Product artwork (c) Mirumee Software, licensed under the
[Creative Commons Attribution 4.0 International License (CC BY 4.0)](https://creativecommons.org/licenses/by/4.0/).

Source files: `saleor/static/placeholders/saleordemoproduct_*.png` in the wheel.

**Modified:** composited on a white background, resized so the longer side is
at most {max_side} px, converted to JPEG (quality {quality}). Where the demo data
assigns the same picture to two products, the picture is kept for one product
only.

## Product data (`catalogue.csv`)

Product names, categories and prices are taken from
`saleor/static/populatedb_data.json` in the same package, which is distributed
under the BSD 3-Clause License:

> Copyright (c) 2010-2019, Mirumee Software. All rights reserved.
>
> Redistribution and use in source and binary forms, with or without
> modification, are permitted provided that the following conditions are met:
> (1) Redistributions of source code must retain the above copyright notice,
> this list of conditions and the following disclaimer. (2) Redistributions in
> binary form must reproduce the above copyright notice, this list of
> conditions and the following disclaimer in the documentation and/or other
> materials provided with the distribution. (3) Neither the name of the
> copyright holder nor the names of its contributors may be used to endorse or
> promote products derived from this software without specific prior written
> permission.
>
> THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
> AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
> IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE
> ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE
> LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
> CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
> SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
> INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN
> CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE)
> ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
> POSSIBILITY OF SUCH DAMAGE.

Prices are the products' base prices in USD. "Saleor" in the `brand` column
names the source shop, not a real brand.

## Regenerating

```
python data/demo/build_demo.py                 # downloads saleor=={version} with pip
python data/demo/build_demo.py --wheel PATH    # or use a wheel you already have
```

The script needs only Python 3 and Pillow.
"""


def build(wheel: Path, out: Path) -> None:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        warn(f"{wheel.name} sha256 is {digest}, expected {WHEEL_SHA256}")

    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.glob("*.jpg"):
        old.unlink()

    with zipfile.ZipFile(wheel) as zf:
        shipped = {
            n[len(PLACEHOLDERS):]: n
            for n in zf.namelist()
            if n.startswith(PLACEHOLDERS + "saleordemoproduct_") and n.endswith(".png")
        }
        catalogue = load_catalogue(zf)

        rows, used = [], set()
        skus, categories, multi = set(), set(), {}
        for pk, f, category, names in catalogue:
            sku = "saleor-" + (slugify(f.get("slug") or "") or slugify(f["name"]) or str(pk))
            if sku in skus:
                sku = f"{sku}-{pk}"
            found = [n for n in names if n in shipped]
            for n in names:
                if n not in shipped:
                    warn(f"{sku}: image {n} not found in the wheel")
            if not found:
                warn(f"skipping {f['name']!r} ({f.get('slug')}): no usable image")
                continue
            skus.add(sku)
            categories.add(category)
            if len(found) > 1:
                multi[sku] = len(found)
            for i, name in enumerate(found, 1):
                rel = f"images/{sku}-{i}.jpg"
                (out / rel).write_bytes(to_jpeg(zf.read(shipped[name])))
                used.add(name)
                rows.append([sku, rel, f["name"], category, BRAND, price_of(f), ""])

    for name in sorted(set(shipped) - used):
        warn(f"{name} is shipped but not used by any product")

    with open(out / "catalogue.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)

    (out / "CREDITS.md").write_text(
        CREDITS.format(version=SALEOR_VERSION, max_side=MAX_SIDE, quality=JPEG_QUALITY),
        encoding="utf-8",
    )

    print(f"products: {len(skus)}")
    print(f"images: {len(rows)} (of {len(shipped)} shipped PNGs)")
    print(f"categories: {len(categories)} ({', '.join(sorted(categories))})")
    print(f"multi-view products: {len(multi)} "
          f"({', '.join(f'{s}: {n}' for s, n in multi.items())})")
    print(f"written to {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path,
                        help=f"path to {WHEEL_NAME} (default: download it with pip)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: this script's folder)")
    args = parser.parse_args(argv)

    if args.wheel:
        build(args.wheel, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build(fetch_wheel(Path(tmp)), args.out)


if __name__ == "__main__":
    main()
