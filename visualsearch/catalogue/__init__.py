"""The catalogue database: products, their images, content hashes and stored vectors."""

from .database import NoCatalogueError, open_catalogue, sqlite_path
from .models import ImageStatus, Product, ProductImage

__all__ = ["ImageStatus", "NoCatalogueError", "Product", "ProductImage", "open_catalogue", "sqlite_path"]
