"""Content-addressed snapshots of bank states: saved once, referred to by id everywhere.

A snapshot id is the SHA-256 of the state's canonical JSON without embeddings (embeddings are
derived data: the same entries embedded by another model are the same memory). The file
`ROOT/ab/abcdef....json.gz` holds the full state, embeddings included when the state had them.
Trajectories, RL rows and reward requests carry only the id; `SnapshotStore.get` loads a state
once and shares it (an LRU cache of parsed states).

Thread- and process-safe: files are written to a temporary name and renamed into place, so a
reader sees a whole file or none; two writers of one id write the same bytes. Ids are checked
against `^[0-9a-f]{64}$` before any path is built, so an id can never name a path outside ROOT.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from membuilder.types import BankState, InvalidInputError

_ID = re.compile(r"^[0-9a-f]{64}$")


class UnknownSnapshotError(InvalidInputError, KeyError):
    """No snapshot with that id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def check_snapshot_id(snapshot_id: object) -> str:
    """Return the id if it is 64 lowercase hex characters, else raise `InvalidInputError` naming it."""
    if not isinstance(snapshot_id, str) or not _ID.match(snapshot_id):
        shown = snapshot_id if isinstance(snapshot_id, str) and len(snapshot_id) <= 80 else type(snapshot_id).__name__
        raise InvalidInputError(f"a snapshot id is 64 lowercase hex characters (SHA-256), got {shown!r}")
    return snapshot_id


def canonical_json(state: BankState) -> str:
    return json.dumps(state.to_dict(with_embeddings=False), sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))


def state_digest(state: BankState) -> str:
    """The snapshot id of a state: SHA-256 of its canonical JSON without embeddings."""
    return hashlib.sha256(canonical_json(state).encode("utf-8")).hexdigest()


class SnapshotStore:
    """A folder of content-addressed bank states with a shared in-memory LRU cache."""

    def __init__(self, root: str | os.PathLike, *, cache_size: int = 64):
        if cache_size < 0:
            raise InvalidInputError(f"cache_size must be >= 0, got {cache_size}")
        self.root = Path(root)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, BankState] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, snapshot_id: str) -> Path:
        snapshot_id = check_snapshot_id(snapshot_id)
        return self.root / snapshot_id[:2] / f"{snapshot_id}.json.gz"

    def put(self, state: BankState) -> str:
        """Save `state` (if not saved yet) and return its id."""
        if not isinstance(state, BankState):
            raise InvalidInputError(f"put() takes a BankState, got {type(state).__name__}")
        snapshot_id = state_digest(state)
        path = self.path(snapshot_id)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            data = json.dumps(state.to_dict(with_embeddings=True), sort_keys=True, ensure_ascii=False)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(gzip.compress(data.encode("utf-8"), compresslevel=6, mtime=0))
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        self._remember(snapshot_id, state)
        return snapshot_id

    def __contains__(self, snapshot_id: object) -> bool:
        try:
            return self.path(snapshot_id).is_file()  # type: ignore[arg-type]
        except InvalidInputError:
            return False

    def get(self, snapshot_id: str) -> BankState:
        """The state saved under `snapshot_id` (cached); `UnknownSnapshotError` if there is none."""
        path = self.path(snapshot_id)
        with self._lock:
            state = self._cache.get(snapshot_id)
            if state is not None:
                self._cache.move_to_end(snapshot_id)
                return state
        if not path.is_file():
            raise UnknownSnapshotError(f"no snapshot {snapshot_id} in {self.root}")
        try:
            data = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
        except (OSError, EOFError, ValueError) as exc:
            raise InvalidInputError(f"snapshot file {path} is corrupt: {exc}") from exc
        state = BankState.from_dict(data)
        if state_digest(state) != snapshot_id:
            raise InvalidInputError(f"snapshot file {path} does not hash to its id (corrupt or edited)")
        self._remember(snapshot_id, state)
        return state

    def ids(self) -> list[str]:
        """Every id in the store, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name[:64] for p in self.root.glob("??/*.json.gz") if _ID.match(p.name[:64]))

    def _remember(self, snapshot_id: str, state: BankState) -> None:
        if self.cache_size == 0:
            return
        with self._lock:
            self._cache[snapshot_id] = state
            self._cache.move_to_end(snapshot_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
