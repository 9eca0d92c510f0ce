"""MemBuilder's memory library: a structured long-term memory bank with four kinds of memory
(core, episodic, semantic, procedural), exact operation semantics, hybrid retrieval, and
persistent or in-memory storage. See `Memory` for the small public API."""

from .api import Memory
from .bank import ApplyResult, MemoryBank, SearchResult
from .operations import (
    Add,
    CoreAppend,
    CoreReplace,
    CoreRewrite,
    Merge,
    Skip,
    Update,
    parse_operation,
    parse_operations,
)
from .store import InMemoryStore, SQLiteStore, open_store
from .types import (
    BankState,
    InvalidInputError,
    MemBuilderError,
    MemoryEntry,
    MemoryKind,
    OperationRejected,
    Status,
    StoreError,
    UnknownEntryError,
)

__all__ = [
    "Add", "ApplyResult", "BankState", "CoreAppend", "CoreReplace", "CoreRewrite", "InMemoryStore",
    "InvalidInputError", "MemBuilderError", "Memory", "MemoryBank", "MemoryEntry", "MemoryKind",
    "Merge", "OperationRejected", "SQLiteStore", "SearchResult", "Skip", "Status", "StoreError",
    "UnknownEntryError", "Update", "open_store", "parse_operation", "parse_operations",
]
