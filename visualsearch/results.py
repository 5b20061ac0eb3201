"""What the library's front door returns: plain dataclasses, never ORM rows.

The CLI prints them and the web views render or serialise them; neither touches the
database.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SearchHit:
    """One product of a result list, scored by its best-matching image."""

    sku: str
    title: str | None
    category: str | None
    brand: str | None
    price: float | None
    url: str | None
    image_id: int
    score: float
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, image_url: str | None = None) -> dict[str, Any]:
        """The documented key order: sku, title, category, brand, price, url, image_id (or
        ``image_url`` when one is given: the API's link to the image), score, attributes."""
        image = {"image_url": image_url} if image_url is not None else {"image_id": self.image_id}
        return {
            "sku": self.sku, "title": self.title, "category": self.category, "brand": self.brand,
            "price": self.price, "url": self.url, **image, "score": round(self.score, 6),
            "attributes": dict(self.attributes),
        }


@dataclass
class SearchResult:
    hits: list[SearchHit]
    took_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageView:
    id: int
    status: str
    width: int | None
    height: int | None
    error: str | None = None


@dataclass(frozen=True)
class ProductView:
    sku: str
    title: str | None
    category: str | None
    brand: str | None
    price: float | None
    url: str | None
    attributes: dict[str, Any]
    images: tuple[ImageView, ...] = ()

    @property
    def indexed_images(self) -> list[ImageView]:
        return [image for image in self.images if image.status == "indexed"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("images")
        return data


@dataclass(frozen=True)
class RemoveResult:
    removed: list[str]
    unknown: list[str]


@dataclass(frozen=True)
class Facets:
    """Values offered by the search form's filters."""

    categories: list[str]
    brands: list[str]
