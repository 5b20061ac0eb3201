"""The vector store: segments of vectors with their filter fields, planned ANN indexes, filters."""

from .filters import SearchFilters, row_tokens
from .planner import IndexPlan, plan_index
from .segment import VectorRows
from .store import StoreHits, StoreStats, VectorStore, configure_threads

__all__ = ["IndexPlan", "SearchFilters", "StoreHits", "StoreStats", "VectorRows", "VectorStore",
           "configure_threads", "plan_index", "row_tokens"]
