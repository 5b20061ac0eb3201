"""Parse and validate API form/query parameters into small dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from visualsearch.errors import InvalidRequestError
from visualsearch.images import Crop
from visualsearch.search import validate_offset, validate_top_k
from visualsearch.vectors import SearchFilters

DEFAULT_TOP_K = 10
# Search parameters with a meaning of their own; every other field filters on the
# product attribute of that name (colour=red, in_stock=true).
SEARCH_FIELDS = frozenset({"image", "image_url", "top_k", "offset", "category", "brand", "min_price", "max_price",
                           "crop"})


@dataclass(frozen=True)
class SearchRequest:
    top_k: int
    filters: SearchFilters
    crop: Crop | None
    image_url: str | None = None  # the photo is fetched from here instead of uploaded
    offset: int = 0               # results start after this many (pagination)


def _blank_to_none(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def parse_top_k(value: str | None) -> int:
    value = _blank_to_none(value)
    if value is None:
        return DEFAULT_TOP_K
    try:
        top_k = int(value)
    except ValueError:
        raise InvalidRequestError(f"top_k must be a whole number, got {value!r}") from None
    return validate_top_k(top_k)


def _price(form: Mapping[str, str], name: str) -> float | None:
    value = _blank_to_none(form.get(name))
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise InvalidRequestError(f"{name} must be a number, got {value!r}") from None


def parse_filters(form: Mapping[str, str], *, reserved: Iterable[str] = SEARCH_FIELDS) -> SearchFilters:
    """Category, brand, price range, and any other field as an attribute filter.

    A value may list several accepted values separated by ``|`` (``category=Shoes|Bags``).
    """
    reserved = set(reserved)
    attributes = {name: _blank_to_none(value) for name, value in form.items() if name not in reserved}
    return SearchFilters.build(
        category=_blank_to_none(form.get("category")), brand=_blank_to_none(form.get("brand")),
        attributes={name: value for name, value in attributes.items() if value is not None},
        min_price=_price(form, "min_price"), max_price=_price(form, "max_price"),
    )


def parse_search_request(form: Mapping[str, str]) -> SearchRequest:
    """Raises InvalidRequestError naming the bad parameter."""
    crop_text = _blank_to_none(form.get("crop"))
    try:
        crop = Crop.parse(crop_text) if crop_text else None
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    return SearchRequest(top_k=parse_top_k(form.get("top_k")), filters=parse_filters(form), crop=crop,
                         image_url=_blank_to_none(form.get("image_url")), offset=parse_offset(form.get("offset")))


def parse_offset(value: str | None) -> int:
    """The ``offset`` field or query argument (0 when absent). Raises InvalidRequestError."""
    value = (value or "").strip()
    if not value:
        return 0
    try:
        offset = int(value)
    except ValueError:
        raise InvalidRequestError(f"offset must be a whole number, got {value!r}") from None
    return validate_offset(offset)
