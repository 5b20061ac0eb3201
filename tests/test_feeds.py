"""Shop feeds as manifests: Google Merchant Center (TSV, RSS and Atom XML) and Shopify's
product CSV export, mapped onto records; detection, explicit formats, unsafe XML, and
`visualsearch index` on feeds whose images are local files."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import pytest

from visualsearch import feeds
from visualsearch.catalogue_manifest import ProductRecord, read_manifest, validate_manifest
from visualsearch.errors import ManifestError

from .conftest import make_image

# --- Shopify: the export's columns, in its order (a subset of the full export) ---------

SHOPIFY_COLUMNS = [
    "Handle", "Title", "Body (HTML)", "Vendor", "Product Category", "Type", "Tags", "Published",
    "Option1 Name", "Option1 Value", "Option2 Name", "Option2 Value", "Option3 Name", "Option3 Value",
    "Variant SKU", "Variant Grams", "Variant Inventory Tracker", "Variant Inventory Qty",
    "Variant Inventory Policy", "Variant Fulfillment Service", "Variant Price", "Variant Compare At Price",
    "Variant Requires Shipping", "Variant Taxable", "Variant Barcode", "Image Src", "Image Position",
    "Image Alt Text", "Gift Card", "SEO Title", "SEO Description", "Google Shopping / Gender",
    "Variant Image", "Variant Weight Unit", "Cost per item", "Status",
]

TEE_ROWS = [
    {"Handle": "classic-tee", "Title": "Classic Tee", "Body (HTML)": "<p>Soft cotton</p>", "Vendor": "Acme",
     "Product Category": "Apparel & Accessories > Clothing > Shirts & Tops", "Type": "T-Shirts",
     "Tags": "summer, cotton", "Published": "true", "Option1 Name": "Color", "Option1 Value": "Red",
     "Option2 Name": "Size", "Option2 Value": "M", "Variant SKU": "TEE-R-M", "Variant Grams": "200",
     "Variant Inventory Qty": "7", "Variant Price": "19.00", "Variant Compare At Price": "25.00",
     "Variant Barcode": "0001", "Image Src": "img/tee-back.png", "Image Position": "2",
     "Image Alt Text": "Back", "Google Shopping / Gender": "unisex", "Variant Image": "img/tee-red.png",
     "Cost per item": "4.10", "Status": "active"},
    {"Handle": "classic-tee", "Option1 Value": "Red", "Option2 Value": "L", "Variant SKU": "TEE-R-L",
     "Variant Price": "21.00", "Variant Barcode": "0002", "Image Src": "img/tee-front.png",
     "Image Position": "1", "Variant Image": "img/tee-red.png", "Cost per item": "4.30"},
    {"Handle": "classic-tee", "Option1 Value": "Blue", "Option2 Value": "M", "Variant SKU": "TEE-B-M",
     "Variant Price": "19.00", "Variant Image": "img/tee-blue.png"},
    {"Handle": "classic-tee", "Image Src": "img/tee-detail.png", "Image Position": "3"},  # an image-only row
]
MUG_ROWS = [
    {"Handle": "mug", "Title": "Mug", "Vendor": "Globex",
     "Product Category": "Home & Garden > Kitchen & Dining > Tableware > Drinkware > Mugs", "Published": "true",
     "Option1 Name": "Title", "Option1 Value": "Default Title", "Variant SKU": "MUG-1", "Variant Price": "8.50",
     "Image Src": "https://cdn.shopify.com/s/files/1/mug.png?v=1", "Image Position": "1", "Status": "active"},
]


def write_shopify(path: Path, rows: list[dict[str, str]], columns: list[str] = SHOPIFY_COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def expected_tee(base: Path, line: int = 2) -> ProductRecord:
    return ProductRecord(
        sku="classic-tee", title="Classic Tee", category="T-Shirts", brand="Acme", price=19.0, url=None,
        attributes={
            "product_category": "Apparel & Accessories > Clothing > Shirts & Tops", "published": "true",
            "status": "active", "gender": "unisex", "tags": ["summer", "cotton"],
            "color": ["Red", "Blue"], "size": ["M", "L"], "variant_sku": ["TEE-R-M", "TEE-R-L", "TEE-B-M"],
            "barcode": ["0001", "0002"], "compare_at_price": "25.00",
        },
        # Image Src by Image Position, then the variants' own images.
        images=[base / "img" / name for name in
                ("tee-front.png", "tee-back.png", "tee-detail.png", "tee-red.png", "tee-blue.png")],
        line=line,
    )


def expected_mug(line: int = 6) -> ProductRecord:
    return ProductRecord(
        sku="mug", title="Mug", category="Mugs", brand="Globex", price=8.5, url=None,
        attributes={"product_category": "Home & Garden > Kitchen & Dining > Tableware > Drinkware > Mugs",
                    "published": "true", "status": "active", "variant_sku": "MUG-1"},
        images=["https://cdn.shopify.com/s/files/1/mug.png?v=1"], line=line,
    )


def test_shopify_export_gives_one_record_per_handle(tmp_path):
    path = write_shopify(tmp_path / "products_export_1.csv", TEE_ROWS + MUG_ROWS)
    assert validate_manifest(path).rows == 2  # one per product, not per line
    # Exactly these fields: the body, inventory, weights and what the shop paid for the
    # goods (Cost per item) are not kept, since product attributes are public.
    assert read_manifest(path) == [expected_tee(tmp_path.resolve()), expected_mug()]
    assert read_manifest(path, format="shopify-csv") == read_manifest(path)


def test_shopify_products_not_on_the_shop_are_left_out(tmp_path):
    """Drafts, archived and unpublished products are not on the shop: a search must not
    show them, and a sync with --prune removes them once they are unpublished."""
    hidden = [
        {**MUG_ROWS[0], "Handle": "draft-mug", "Status": "draft"},
        {**MUG_ROWS[0], "Handle": "archived-mug", "Status": "archived"},
        {**MUG_ROWS[0], "Handle": "unpublished-mug", "Published": "false"},
        {**MUG_ROWS[0], "Handle": "old-export-mug", "Status": "", "Published": "FALSE"},
    ]
    path = write_shopify(tmp_path / "p.csv", TEE_ROWS + hidden + MUG_ROWS)
    assert validate_manifest(path).rows == 2
    assert [record.sku for record in read_manifest(path)] == ["classic-tee", "mug"]


def test_a_shopify_handle_that_reappears_later_is_merged(tmp_path):
    later = {"Handle": "classic-tee", "Title": "Classic Tee 2024", "Option1 Value": "Green",
             "Variant SKU": "TEE-G-M", "Image Src": "img/tee-green.png", "Image Position": "1"}
    path = write_shopify(tmp_path / "p.csv", TEE_ROWS + MUG_ROWS + [later])
    tee, mug = read_manifest(path)
    base = tmp_path.resolve()
    assert tee.images == expected_tee(base).images + [base / "img" / "tee-green.png"]
    assert tee.title == "Classic Tee 2024" and tee.price == 19.0 and tee.line == 2
    assert mug == expected_mug()


def test_bad_shopify_rows_are_named_by_line(tmp_path):
    rows = [
        {"Handle": "ok", "Title": "OK", "Image Src": "a.png"},                   # line 2
        {"Handle": "", "Title": "No handle", "Image Src": "b.png"},              # line 3
        {"Handle": "no-image", "Title": "No image", "Variant Price": "5"},       # line 4
        {"Handle": "cheap", "Variant Price": "five", "Image Src": "c.png"},      # line 5
        {"Handle": "ftp", "Image Src": "ftp://cdn.example/d.png"},               # line 6
    ]
    with pytest.raises(ManifestError) as caught:
        validate_manifest(write_shopify(tmp_path / "p.csv", rows))
    message = str(caught.value)
    assert "4 bad row(s)" in message
    assert "line 3: empty sku" in message
    assert "line 4: product 'no-image' has an empty image" in message
    assert "line 5: price 'five' is not a number (product 'cheap')" in message
    assert "line 6: image 'ftp://cdn.example/d.png' is a URL" in message


def test_shopify_structural_errors(tmp_path):
    no_handle = write_shopify(tmp_path / "p.csv", [{"Title": "T"}], columns=["Title", "Vendor"])
    with pytest.raises(ManifestError, match=r"missing required column\(s\) Handle of a Shopify"):
        read_manifest(no_handle, format="shopify-csv")
    path = tmp_path / "long.csv"
    path.write_text("Handle,Title,Image Src\nA,T,a.png\nB,T,b.png,surprise\n")
    with pytest.raises(ManifestError, match="line 3 has more fields"):
        validate_manifest(path)


# --- Google Merchant Center --------------------------------------------------------------

MERCHANT_COLUMNS = ["id", "title", "description", "link", "image_link", "additional_image_link", "price",
                    "sale_price", "brand", "product_type", "google_product_category", "availability", "color",
                    "size", "item_group_id", "gtin", "condition"]
MERCHANT_ITEMS = [
    ["TEE-R-M", "Classic Tee Red M", "Soft cotton", "https://shop.example/tee?v=1", "img/tee-red.png",
     "img/tee-back.png,img/tee-detail.png", "19.00 USD", "15.00 USD", "Acme", "Apparel > Tops > T-Shirts",
     "1604", "in stock", "Red", "M", "TEE", "0001", "new"],
    ["TEE-R-L", "Classic Tee Red L", "Soft cotton", "https://shop.example/tee?v=2", "img/tee-red.png", "",
     "21.00 USD", "", "Acme", "Apparel > Tops > T-Shirts", "1604", "out of stock", "Red", "L", "TEE", "0002",
     "new"],
    ["TEE-B-M", "Classic Tee Blue M", "", "https://shop.example/tee?v=3", "img/tee-blue.png", "", "19.00 USD",
     "", "Acme", "Apparel > Tops > T-Shirts", "1604", "in stock", "Blue", "M", "TEE", "0003", "new"],
    ["MUG-1", "Mug", "", "https://shop.example/mug", "https://cdn.example/mug.png", "", "8.50 EUR", "",
     "Globex", "", "Home & Garden > Kitchen & Dining > Tableware > Drinkware > Mugs", "in stock", "", "", "",
     "", "new"],
]


def write_merchant_tsv(path: Path, items: list[list[str]] = MERCHANT_ITEMS,
                       columns: list[str] = MERCHANT_COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(fields) for fields in [columns, *items]) + "\n", encoding="utf-8")
    return path


def expected_merchant(base: Path, lines: tuple[int, int] = (2, 5)) -> list[ProductRecord]:
    tee = ProductRecord(
        # The variants of item_group_id TEE are one product: one search result, not three.
        sku="TEE", title="Classic Tee Red M", category="T-Shirts", brand="Acme", price=19.0,
        url="https://shop.example/tee?v=1",
        attributes={"sale_price": "15.00 USD", "product_type": "Apparel > Tops > T-Shirts",
                    "google_product_category": "1604", "availability": ["in stock", "out of stock"],
                    "color": ["Red", "Blue"], "size": ["M", "L"], "gtin": ["0001", "0002", "0003"],
                    "condition": "new", "currency": "USD", "variant_id": ["TEE-R-M", "TEE-R-L", "TEE-B-M"]},
        images=[base / "img" / name for name in ("tee-red.png", "tee-back.png", "tee-detail.png", "tee-blue.png")],
        line=lines[0],
    )
    mug = ProductRecord(
        sku="MUG-1", title="Mug", category="Mugs", brand="Globex", price=8.5, url="https://shop.example/mug",
        attributes={"google_product_category": "Home & Garden > Kitchen & Dining > Tableware > Drinkware > Mugs",
                    "availability": "in stock", "condition": "new", "currency": "EUR"},
        images=["https://cdn.example/mug.png"], line=lines[1],
    )
    return [tee, mug]


def test_merchant_tsv_maps_items_and_groups_variants(tmp_path):
    path = write_merchant_tsv(tmp_path / "products.txt")
    summary = validate_manifest(path)
    assert (summary.rows, summary.images) == (2, 5)  # tee-red.png named twice, counted once
    assert read_manifest(path) == expected_merchant(tmp_path.resolve())


def test_merchant_fields_a_shop_does_not_publish_are_not_kept(tmp_path):
    """Attributes are public (search hits, the product API): costs and margin labels stay out."""
    columns = [*MERCHANT_COLUMNS, "cost_of_goods_sold", "custom_label_0", "custom_label_4",
               "sell_on_google_quantity", "excluded_destination", "material"]
    items = [[*item, "4.10 USD", "high-margin", "q4", "7", "Shopping_ads", "cotton"] for item in MERCHANT_ITEMS]
    tee, mug = read_manifest(write_merchant_tsv(tmp_path / "feed.tsv", items, columns))
    assert tee.attributes == {**expected_merchant(tmp_path.resolve())[0].attributes, "material": "cotton"}
    assert mug.attributes == {**expected_merchant(tmp_path.resolve())[1].attributes, "material": "cotton"}


def test_merchant_tsv_header_spellings(tmp_path):
    columns = ["g:id", "Image Link", "g:price", "title"]
    path = write_merchant_tsv(tmp_path / "feed.tsv", [["A", "a.png", "USD 3", "Thing"]], columns=columns)
    assert feeds.resolve_format(path) == "merchant-tsv"
    [record] = read_manifest(path)
    assert (record.sku, record.title, record.price, record.attributes) == ("A", "Thing", 3.0, {"currency": "USD"})


def test_bad_merchant_tsv_items_are_named_by_line(tmp_path):
    items = [
        ["A", "a.png", "1.00 USD"],       # line 2
        ["", "b.png", "1.00 USD"],        # line 3
        ["C", "", "1.00 USD"],            # line 4
        ["D", "d.png", "1,00 EUR"],       # line 5
        ["E", "e.png", "1.00 USD EUR"],   # line 6
    ]
    path = write_merchant_tsv(tmp_path / "f.txt", items, columns=["id", "image_link", "price"])
    with pytest.raises(ManifestError) as caught:
        validate_manifest(path)
    message = str(caught.value)
    assert "4 bad row(s)" in message and "line 2" not in message
    assert "line 3: empty sku" in message
    assert "line 4: product 'C' has an empty image" in message
    assert "line 5: price '1,00 EUR' is not a number (product 'D')" in message
    assert "line 6: price '1.00 USD EUR' is not a number" in message


RSS_FEED = """<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:g="http://base.google.com/ns/1.0">
  <channel>
    <title>Example shop</title>
    <link>https://shop.example</link>
    <description>All products</description>
    <item>
      <g:id>TEE-R-M</g:id>
      <title>Classic Tee Red M</title>
      <description>Soft cotton</description>
      <link>https://shop.example/tee?v=1</link>
      <g:image_link>img/tee-red.png</g:image_link>
      <g:additional_image_link>img/tee-back.png</g:additional_image_link>
      <g:additional_image_link>img/tee-detail.png</g:additional_image_link>
      <g:price>19.00 USD</g:price>
      <g:sale_price>15.00 USD</g:sale_price>
      <g:brand>Acme</g:brand>
      <g:product_type>Apparel &gt; Tops &gt; T-Shirts</g:product_type>
      <g:google_product_category>1604</g:google_product_category>
      <g:availability>in stock</g:availability>
      <g:color>Red</g:color>
      <g:size>M</g:size>
      <g:item_group_id>TEE</g:item_group_id>
      <g:gtin>0001</g:gtin>
      <g:condition>new</g:condition>
    </item>
    <item>
      <g:id>TEE-R-L</g:id>
      <title>ignored: the g: element wins</title>
      <g:title>Classic Tee Red L</g:title>
      <link>https://shop.example/tee?v=2</link>
      <g:image_link>img/tee-red.png</g:image_link>
      <g:price>21.00 USD</g:price>
      <g:brand>Acme</g:brand>
      <g:product_type>Apparel &gt; Tops &gt; T-Shirts</g:product_type>
      <g:google_product_category>1604</g:google_product_category>
      <g:availability>out of stock</g:availability>
      <g:color>Red</g:color>
      <g:size>L</g:size>
      <g:item_group_id>TEE</g:item_group_id>
      <g:gtin>0002</g:gtin>
      <g:condition>new</g:condition>
    </item>
    <item>
      <g:id>TEE-B-M</g:id>
      <g:title>Classic Tee Blue M</g:title>
      <g:link>https://shop.example/tee?v=3</g:link>
      <g:image_link>img/tee-blue.png</g:image_link>
      <g:price>19.00 USD</g:price>
      <g:brand>Acme</g:brand>
      <g:product_type>Apparel &gt; Tops &gt; T-Shirts</g:product_type>
      <g:google_product_category>1604</g:google_product_category>
      <g:availability>in stock</g:availability>
      <g:color>Blue</g:color>
      <g:size>M</g:size>
      <g:item_group_id>TEE</g:item_group_id>
      <g:gtin>0003</g:gtin>
      <g:condition>new</g:condition>
    </item>
    <item>
      <g:id>MUG-1</g:id>
      <title>Mug</title>
      <link>https://shop.example/mug</link>
      <g:image_link><![CDATA[https://cdn.example/mug.png]]></g:image_link>
      <g:price>8.50 EUR</g:price>
      <g:brand>Globex</g:brand>
      <g:google_product_category>Home &amp; Garden &gt; Kitchen &amp; Dining &gt; Tableware &gt; Drinkware
        &gt; Mugs</g:google_product_category>
      <g:availability>in stock</g:availability>
      <g:condition>new</g:condition>
    </item>
  </channel>
</rss>
"""


def test_merchant_rss_gives_the_same_records_as_the_tsv(tmp_path):
    path = tmp_path / "feed.xml"
    path.write_text(RSS_FEED, encoding="utf-8")
    assert validate_manifest(path).rows == 2
    # Each product is named by the line of its first <item>.
    assert read_manifest(path) == expected_merchant(tmp_path.resolve(), lines=(7, 60))
    assert read_manifest(path, format="merchant-xml") == read_manifest(path)


ATOM_FEED = """<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:g="http://base.google.com/ns/1.0">
  <title>Example shop</title>
  <link rel="self" href="https://shop.example"/>
  <updated>2024-07-11T12:00:00Z</updated>
  <entry>
    <id>tag:shop.example,2024:tv</id>
    <title>LG 22LB4510 - 22" LED TV</title>
    <link href="https://shop.example/tv"/>
    <updated>2024-07-11T12:00:00Z</updated>
    <g:id>TV_123456</g:id>
    <g:image_link>https://images.example.com/TV_123456.png</g:image_link>
    <g:condition>new</g:condition>
    <g:price>159.00 USD</g:price>
    <g:shipping>
      <g:country>US</g:country>
      <g:service>Standard</g:service>
      <g:price>14.95 USD</g:price>
    </g:shipping>
    <g:gtin>71919219405200</g:gtin>
    <g:brand>LG</g:brand>
    <g:product_type>Consumer Electronics &gt; TVs &gt; Flat Panel TVs</g:product_type>
  </entry>
</feed>
"""


def test_merchant_atom_feed(tmp_path):
    path = tmp_path / "feed.atom"
    path.write_text(ATOM_FEED, encoding="utf-8")
    assert read_manifest(path) == [ProductRecord(
        sku="TV_123456", title='LG 22LB4510 - 22" LED TV', category="Flat Panel TVs", brand="LG", price=159.0,
        url="https://shop.example/tv",
        attributes={"condition": "new", "gtin": "71919219405200", "currency": "USD",
                    "product_type": "Consumer Electronics > TVs > Flat Panel TVs",
                    # A group of sub-attributes is kept whole; its price is not the product's.
                    "shipping": {"country": "US", "service": "Standard", "price": "14.95 USD"}},
        images=["https://images.example.com/TV_123456.png"], line=6,
    )]


def rss(*items: str) -> str:
    return ('<?xml version="1.0"?>\n<rss xmlns:g="http://base.google.com/ns/1.0"><channel>\n'
            + "".join(items) + "</channel></rss>\n")


def test_bad_merchant_xml_items_are_named_by_line(tmp_path):
    path = tmp_path / "feed.xml"
    path.write_text(rss(
        "<item><g:id>A</g:id><g:image_link>a.png</g:image_link></item>\n",             # line 3
        "<item><title>no id</title><g:image_link>b.png</g:image_link></item>\n",       # line 4
        "<item>\n<g:id>C</g:id>\n<g:price>free</g:price>\n<g:image_link>c.png</g:image_link>\n</item>\n",
        "<item><g:id>D</g:id></item>\n",                                                # line 10
    ))
    with pytest.raises(ManifestError) as caught:
        validate_manifest(path)
    message = str(caught.value)
    assert "3 bad row(s)" in message
    assert "line 4: empty sku" in message
    assert "line 5: price 'free' is not a number (product 'C')" in message
    assert "line 10: product 'D' has an empty image" in message


@pytest.mark.parametrize("text, message", [
    (rss("<item><g:id>A</g:id>\n<g:image_link>a.png</g:image_link></itm>"), r"line 4: not well-formed XML"),
    (rss("<item><g:id>&nbsp;</g:id></item>"), r"line 3: not well-formed XML \(undefined entity\)"),
    ('<?xml version="1.0"?><urlset><url/></urlset>', r"root element <urlset> is not a Merchant Center feed"),
    ("", r"line 1: not well-formed XML \(no element found\)"),
    (rss(), "has no rows"),
])
def test_broken_xml_is_a_manifest_error(tmp_path, text, message):
    path = tmp_path / "feed.xml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        validate_manifest(path)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE rss [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<rss xmlns:g="http://base.google.com/ns/1.0"><channel>
<item><g:id>A</g:id><g:title>&lol9;</g:title><g:image_link>a.png</g:image_link></item>
</channel></rss>
"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE rss [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<rss xmlns:g="http://base.google.com/ns/1.0"><channel>
<item><g:id>A</g:id><g:title>&secret;</g:title><g:image_link>a.png</g:image_link></item>
</channel></rss>
"""
BARE_DOCTYPE = '<?xml version="1.0"?>\n<!DOCTYPE rss>\n<rss><channel></channel></rss>\n'


@pytest.mark.parametrize("text", [BILLION_LAUGHS, EXTERNAL_ENTITY, BARE_DOCTYPE])
def test_a_doctype_is_refused_before_any_entity_is_expanded(tmp_path, text):
    path = tmp_path / "feed.xml"
    path.write_text(text, encoding="utf-8")
    for read in (validate_manifest, read_manifest):
        with pytest.raises(ManifestError, match="line 2: a DOCTYPE or entity declaration is not allowed"):
            read(path)


# --- detection and explicit formats -------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, text, expected", [
    ("products.txt", "id\ttitle\timage_link\nA\tT\ta.png\n", "merchant-tsv"),
    ("products.tsv", "g:id\tg:image link\nA\ta.png\n", "merchant-tsv"),
    ("products.csv", "\ufeffid\timage_link\r\nA\ta.png\r\n", "merchant-tsv"),
    ("feed.xml", RSS_FEED, "merchant-xml"),
    ("feed.txt", "\n  " + RSS_FEED, "merchant-xml"),
    ("feed.atom", ATOM_FEED, "merchant-xml"),
    ("products_export.csv", "\ufeffHandle,Title,Image Src\nx,X,x.png\n", "shopify-csv"),
    ("catalogue.csv", "sku,image\nA,a.png\n", "csv"),
    ("catalogue.txt", "sku\timage\nA\ta.png\n", "tsv"),
    ("catalogue.tsv", "sku\timage\nA\ta.png\n", "tsv"),
    ("catalogue.jsonl", '{"sku": "A", "image": "a.png"}\n', "jsonl"),
    ("odd.csv", "name,picture\nA,a.png\n", "csv"),  # unrecognised: read as the suffix says
    ("odd.tsv", "name\tpicture\nA\ta.png\n", "tsv"),
])
def test_the_format_is_detected_from_the_header(tmp_path, name, text, expected):
    assert feeds.resolve_format(write(tmp_path / name, text)) == expected


@pytest.mark.parametrize("asked, text, start, detected", [
    ("shopify-csv", "id\ttitle\timage_link\nA\tT\ta.png\n", "'id title image_link'", "merchant-tsv"),
    ("merchant-tsv", "Handle,Title,Image Src\nx,X,x.png\n", "'Handle,Title,Image Src'", "shopify-csv"),
    ("csv", "sku\timage\nA\ta.png\n", "'sku image'", "tsv"),
    ("jsonl", RSS_FEED, "'<?xml version=", "merchant-xml"),
    ("merchant-xml", "sku,image\nA,a.png\n", "'sku,image'", "csv"),
])
def test_a_wrong_explicit_format_shows_the_header_and_the_format_to_use(tmp_path, asked, text, start, detected):
    path = write(tmp_path / "feed.txt", text)
    with pytest.raises(ManifestError) as caught:
        validate_manifest(path, format=asked)
    message = str(caught.value)
    assert f"asked to read it as {asked!r}" in message
    assert f"starts with {start}" in message
    assert f"use the format {detected!r}" in message


def test_explicit_formats_read_files_with_any_name(tmp_path):
    path = write_shopify(tmp_path / "export.dat", MUG_ROWS)
    with pytest.raises(ManifestError, match="unknown manifest format '.dat'"):
        validate_manifest(path)
    assert read_manifest(path, format="shopify-csv") == [expected_mug(line=2)]
    with pytest.raises(ManifestError, match="unknown manifest format 'xlsx'; use one of csv, tsv, jsonl"):
        validate_manifest(path, format="xlsx")
    odd = write(tmp_path / "odd.txt", "name\tpicture\nA\ta.png\n")  # recognised by nothing
    with pytest.raises(ManifestError, match=r"missing required column\(s\) id, image_link of a Google .* "
                                            r"found name, picture"):
        validate_manifest(odd, format="merchant-tsv")


# --- memory stays flat in the feed's length ------------------------------------------------

# Enough that holding the records would pass the bound (read_manifest peaks at ~4 MB
# here), few enough that tracing every allocation takes seconds.
FEED_PRODUCTS = 6_000


def traced_peak(run) -> tuple[object, int]:
    tracemalloc.start()
    try:
        return run(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_validating_big_feeds_keeps_memory_flat(tmp_path):
    xml = tmp_path / "big.xml"
    xml.write_text(rss(*(f"<item><g:id>S{n}</g:id><g:title>Product {n}</g:title><g:price>{n}.00 USD</g:price>"
                         f"<g:image_link>https://cdn.example/{n}.jpg</g:image_link></item>\n"
                         for n in range(FEED_PRODUCTS))))
    shop = write_shopify(tmp_path / "big.csv", [
        row for n in range(FEED_PRODUCTS // 2) for row in (
            {"Handle": f"p{n}", "Title": f"P{n}", "Option1 Name": "Size", "Option1 Value": "S",
             "Variant Price": "1", "Image Src": f"{n}.png"},
            {"Handle": f"p{n}", "Option1 Value": "M", "Image Src": f"{n}b.png", "Image Position": "2"},
        )])
    for path, rows in ((xml, FEED_PRODUCTS), (shop, FEED_PRODUCTS // 2)):
        summary, peak = traced_peak(lambda: validate_manifest(path))
        assert summary.rows == rows
        assert peak < 2 * 2**20, f"validating {path.name} peaked at {peak} bytes"


# --- `visualsearch index` on feeds with local images --------------------------------------


@pytest.fixture
def shop_folder(tmp_path) -> Path:
    """The images that TEE_ROWS and the Merchant TEE items name, as local files."""
    folder = tmp_path / "shop"
    (folder / "img").mkdir(parents=True)
    for seed, name in enumerate(["tee-front", "tee-back", "tee-detail", "tee-red", "tee-blue", "mug"]):
        make_image(folder / "img" / f"{name}.png", seed=100 + seed)
    return folder


def show(run, sku: str) -> dict:
    result = run("show", sku, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_index_a_shopify_export(run, shop_folder):
    local_mug = [{**MUG_ROWS[0], "Image Src": "img/mug.png"}]
    export = write_shopify(shop_folder / "products_export_1.csv", TEE_ROWS + local_mug)
    result = run("index", str(export))
    assert result.exit_code == 0, result.output
    assert "2 products, 6 images: 6 embedded" in result.output

    tee = show(run, "classic-tee")
    assert (tee["title"], tee["category"], tee["brand"], tee["price"]) == ("Classic Tee", "T-Shirts", "Acme", 19.0)
    assert tee["attributes"]["color"] == ["Red", "Blue"] and "Cost per item" not in json.dumps(tee)
    assert len(tee["images"]) == 5
    found = json.loads(run("search", str(shop_folder / "img" / "tee-blue.png"), "--json").stdout)["results"]
    assert found[0]["sku"] == "classic-tee" and [hit["sku"] for hit in found].count("classic-tee") == 1
    filtered = run("search", str(shop_folder / "img" / "tee-blue.png"), "--json", "--category", "Mugs")
    assert [hit["sku"] for hit in json.loads(filtered.stdout)["results"]] == ["mug"]


def test_index_a_merchant_tsv_feed_with_an_explicit_format(run, shop_folder):
    items = [[*item[:4], *(["img/mug.png"] if item[0] == "MUG-1" else [item[4]]), *item[5:]]
             for item in MERCHANT_ITEMS]
    feed = write_merchant_tsv(shop_folder / "products.txt", items)
    wrong = run("index", str(feed), "--format", "shopify-csv")
    assert wrong.exit_code == 1
    assert "looks like a Google Merchant Center TSV feed" in wrong.output and "'merchant-tsv'" in wrong.output

    result = run("index", str(feed), "--format", "merchant-tsv", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["products"], report["embedded"], report["failures"]) == (2, 5, [])
    tee = show(run, "TEE")
    assert tee["url"] == "https://shop.example/tee?v=1" and tee["attributes"]["size"] == ["M", "L"]
    assert tee["attributes"]["currency"] == "USD" and tee["price"] == 19.0
    query = str(shop_folder / "img" / "mug.png")
    assert json.loads(run("search", query, "--json").stdout)["results"][0]["sku"] == "MUG-1"
    assert json.loads(run("index", str(feed), "--json").stdout)["unchanged"] == 5  # detected the same way

