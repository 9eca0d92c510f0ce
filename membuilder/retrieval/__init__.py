"""Retrieval for the memory bank: incremental BM25 (equal to rank_bm25's BM25Okapi), a dense
cosine index, and the hybrid per-owner index that fuses both with reciprocal rank fusion."""

from .bm25 import BM25Core, BM25Index, tokenize
from .dense import DenseIndex
from .hybrid import KINDS, Hit, HybridIndex, kind_code

__all__ = [
    "BM25Core",
    "BM25Index",
    "DenseIndex",
    "Hit",
    "HybridIndex",
    "KINDS",
    "kind_code",
    "tokenize",
]
