"""Parse and validate API form/query parameters into small dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from visualsearch.errors import InvalidRequestError
from visualsearch.images import Crop
from visualsearch.search import SearchFilters, validate_top_k

DEFAULT_TOP_K = 10


@dataclass(frozen=True)
class SearchRequest:
    top_k: int
    filters: SearchFilters
    crop: Crop | None


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


def parse_filters(form: Mapping[str, str]) -> SearchFilters:
    return SearchFilters(
        category=_blank_to_none(form.get("category")),
        brand=_blank_to_none(form.get("brand")),
        min_price=_blank_to_none(form.get("min_price")),  # SearchFilters validates prices
        max_price=_blank_to_none(form.get("max_price")),
    )


def parse_search_request(form: Mapping[str, str]) -> SearchRequest:
    """Raises InvalidRequestError naming the bad parameter."""
    crop_text = _blank_to_none(form.get("crop"))
    try:
        crop = Crop.parse(crop_text) if crop_text else None
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    return SearchRequest(top_k=parse_top_k(form.get("top_k")), filters=parse_filters(form), crop=crop)
