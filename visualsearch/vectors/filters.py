"""Filter fields stored beside each vector, and the filters a search may apply.

Every row of the vector store carries its product's price and a list of 64-bit
*tokens*, one per filterable ``field=value`` pair (category, brand, and every
product attribute). Values are compared Unicode case-insensitively: the token is a
hash of the casefolded text, so ``Électronique`` matches ``ÉLECTRONIQUE`` and
``Straße`` matches ``STRASSE`` (SQLite's ``lower()`` folds ASCII only).
Filters are evaluated against these columns inside the store (as Milvus filters
on scalar fields), never by listing matching ids in Python or SQL first.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import InvalidRequestError

# Separates several accepted values in one filter parameter: category=Shoes|Bags.
VALUE_SEPARATOR = "|"
# Fields with their own columns in the product table; the rest are attributes.
BUILTIN_FIELDS = ("category", "brand")
MAX_FILTER_VALUES = 64
MAX_FILTER_TEXT = 1000


def fold(text: str) -> str:
    """The comparison key of a filter value: NFKC-normalised, casefolded, outer spaces dropped.

    Normalising first makes a decomposed "E\u0301" (macOS file names, some CSV exports)
    equal to "É"; normalising again after casefolding is Unicode's caseless matching.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", str(text)).casefold().strip())


def token(field_name: str, value: Any) -> int:
    """The signed 64-bit token of ``field_name=value`` (both compared case-insensitively)."""
    digest = hashlib.blake2b(f"{fold(field_name)}\x1f{fold(_text(value))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _text(value: Any) -> str:
    if isinstance(value, bool):  # before int: True is an int
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 42.0 and "42" are the same value in a filter
    return str(value)


def _values(value: Any) -> list[Any]:
    if value is None or value == "" or isinstance(value, dict):
        return []
    if isinstance(value, (list, tuple, set)):
        return [item for item in value if item is not None and item != "" and not isinstance(item, (dict, list))]
    return [value]


def row_tokens(*, category: str | None, brand: str | None, attributes: Mapping[str, Any] | None) -> list[int]:
    """The tokens of one product: its category, brand and every attribute value
    (a list-valued attribute gives one token per element)."""
    tokens = []
    for name, value in (("category", category), ("brand", brand), *((attributes or {}).items())):
        for item in _values(value):
            tokens.append(token(name, item))
    return sorted(set(tokens))


@dataclass(frozen=True)
class SearchFilters:
    """Restrictions on the products a search returns.

    ``fields`` maps a field name (``category``, ``brand`` or any product attribute)
    to the values accepted for it: a product passes when, for every field, one of its
    values matches (case-insensitively). Prices are an inclusive range.
    """

    fields: tuple[tuple[str, tuple[str, ...]], ...] = ()
    min_price: float | None = None
    max_price: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_price", "max_price"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise InvalidRequestError(f"min_price {self.min_price} is above max_price {self.max_price}")

    @classmethod
    def build(cls, *, category: Any = None, brand: Any = None, attributes: Mapping[str, Any] | None = None,
              min_price: float | None = None, max_price: float | None = None) -> "SearchFilters":
        """Filters from loose values: a string (``"A|B"`` means A or B), a list, or None.

        Raises:
            InvalidRequestError: an empty field name, too many values, a value too long,
                or a bad price range.
        """
        fields: dict[str, tuple[str, ...]] = {}
        for name, value in (("category", category), ("brand", brand), *((attributes or {}).items())):
            values = _split(name, value)
            if values:
                key = fold(name)
                if not key:
                    raise InvalidRequestError("a filter needs a field name")
                fields[key] = tuple(dict.fromkeys((*fields.get(key, ()), *values)))
        return cls(fields=tuple(sorted(fields.items())), min_price=min_price, max_price=max_price)

    @property
    def active(self) -> bool:
        return bool(self.fields) or self.min_price is not None or self.max_price is not None

    def token_groups(self) -> list[list[int]]:
        """One list of tokens per field: a row passes if it has a token of every list."""
        return [[token(name, value) for value in values] for name, values in self.fields]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: list(values) for name, values in self.fields}
        if self.min_price is not None:
            data["min_price"] = self.min_price
        if self.max_price is not None:
            data["max_price"] = self.max_price
        return data


def _split(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    items: Iterable[Any] = value if isinstance(value, (list, tuple)) else str(value).split(VALUE_SEPARATOR)
    values = [_text(item).strip() for item in items if item is not None]
    values = [item for item in values if item]
    if len(values) > MAX_FILTER_VALUES:
        raise InvalidRequestError(f"filter {name!r} has {len(values)} values; at most {MAX_FILTER_VALUES}")
    for item in values:
        if len(item) > MAX_FILTER_TEXT:
            raise InvalidRequestError(f"a value of filter {name!r} is longer than {MAX_FILTER_TEXT} characters")
    return values
