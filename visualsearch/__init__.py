"""Visual search for ecommerce catalogues: embed product images, index them, find similar products."""

__version__ = "0.1.0"
