"""The RL set: one row per (session, agent), stored as Parquet. The contract between
`trainers/prepare_data.py` (writes) and `trainers/adrpo.py` (reads).

Columns (all required; JSON columns hold UTF-8 JSON text):

| column | type | what |
|---|---|---|
| `row_id` | string | `"{conversation_id}/{session_id}/{agent}"`, unique in the set |
| `conversation_id` | string | the dialogue |
| `owner` | string | bank owner holding the pre-session memory (search runs under it) |
| `session_id` | string | the session |
| `session_index` | int32 | position of the session in its conversation |
| `session_date` | string or null | ISO date/datetime of the session |
| `agent` | string | core / episodic / semantic / procedural |
| `prompt` | string (JSON) | the rendered chat messages `[{"role", "content"}, ...]` |
| `snapshot_id` | string | content-addressed id of the expert's state before the session |
| `qa` | string (JSON) | list of `reward.types.QAPair.to_dict()` (may be empty: then masked) |
| `expert_output` | string | the expert agent's own raw answer (the SFT target) |
| `expert_tokens` | int32 | its length in policy tokens (`tokenizer` in the file metadata) |
| `split` | string | "train" / "heldout" |

File metadata (Parquet key-value): `membuilder.tokenizer` (name or path of the tokenizer used for
`expert_tokens`), `membuilder.snapshots` (the snapshot folder, relative to the file), and
`membuilder.source` (dataset / expert).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from reward.types import AGENTS, QAPair, RewardInputError

SCHEMA = pa.schema([
    ("row_id", pa.string()), ("conversation_id", pa.string()), ("owner", pa.string()),
    ("session_id", pa.string()), ("session_index", pa.int32()), ("session_date", pa.string()),
    ("agent", pa.string()), ("prompt", pa.string()), ("snapshot_id", pa.string()), ("qa", pa.string()),
    ("expert_output", pa.string()), ("expert_tokens", pa.int32()), ("split", pa.string()),
])

META_TOKENIZER = b"membuilder.tokenizer"
META_SNAPSHOTS = b"membuilder.snapshots"
META_SOURCE = b"membuilder.source"


class RLDataError(ValueError):
    """A malformed RL row or file; the message names the row and the column."""


@dataclass(frozen=True)
class RLRow:
    row_id: str
    conversation_id: str
    owner: str
    session_id: str
    session_index: int
    session_date: str | None
    agent: str
    prompt: tuple[dict[str, str], ...]
    snapshot_id: str
    qa: tuple[QAPair, ...]
    expert_output: str
    expert_tokens: int
    split: str = "train"

    def to_record(self) -> dict[str, Any]:
        return {"row_id": self.row_id, "conversation_id": self.conversation_id, "owner": self.owner,
                "session_id": self.session_id, "session_index": self.session_index,
                "session_date": self.session_date, "agent": self.agent,
                "prompt": json.dumps(list(self.prompt), ensure_ascii=False), "snapshot_id": self.snapshot_id,
                "qa": json.dumps([q.to_dict() for q in self.qa], ensure_ascii=False),
                "expert_output": self.expert_output, "expert_tokens": self.expert_tokens, "split": self.split}

    @classmethod
    def from_record(cls, rec: dict[str, Any], where: str = "row") -> "RLRow":
        for col in SCHEMA.names:
            if col not in rec:
                raise RLDataError(f"{where}: column {col!r} is missing")
        if rec["agent"] not in AGENTS:
            raise RLDataError(f"{where}: agent must be one of {AGENTS}, got {rec['agent']!r}")
        try:
            prompt = json.loads(rec["prompt"])
            qa = json.loads(rec["qa"])
        except (TypeError, json.JSONDecodeError) as exc:
            raise RLDataError(f"{where}: prompt / qa must be JSON text ({exc})") from exc
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt):
            raise RLDataError(f"{where}: prompt must be a non-empty list of {{role, content}} messages")
        if not isinstance(qa, list):
            raise RLDataError(f"{where}: qa must be a JSON list")
        try:
            pairs = tuple(QAPair.from_dict(q, f"{where}.qa[{i}]") for i, q in enumerate(qa))
        except RewardInputError as exc:
            raise RLDataError(str(exc)) from exc
        tokens = rec["expert_tokens"]
        if not isinstance(tokens, int) or tokens < 0:
            raise RLDataError(f"{where}: expert_tokens must be an integer >= 0, got {tokens!r}")
        return cls(row_id=rec["row_id"], conversation_id=rec["conversation_id"], owner=rec["owner"],
                   session_id=rec["session_id"], session_index=int(rec["session_index"]),
                   session_date=rec["session_date"], agent=rec["agent"],
                   prompt=tuple({"role": m["role"], "content": m["content"]} for m in prompt),
                   snapshot_id=rec["snapshot_id"], qa=pairs, expert_output=rec["expert_output"],
                   expert_tokens=tokens, split=rec["split"])


def write_rl_rows(path: str | Path, rows: Iterable[RLRow], *, tokenizer: str, snapshots: str,
                  source: str = "") -> Path:
    """Write rows to a Parquet file (atomically: a temporary file renamed into place)."""
    path = Path(path)
    rows = list(rows)
    ids = [r.row_id for r in rows]
    if len(set(ids)) != len(ids):
        raise RLDataError("row_id must be unique in an RL set")
    table = pa.Table.from_pylist([r.to_record() for r in rows], schema=SCHEMA)
    table = table.replace_schema_metadata({META_TOKENIZER: tokenizer.encode(), META_SNAPSHOTS: snapshots.encode(),
                                           META_SOURCE: source.encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class RLSet:
    rows: tuple[RLRow, ...]
    tokenizer: str
    snapshots_dir: Path
    source: str

    def sessions(self) -> list[tuple[str, str]]:
        """(conversation_id, session_id) in file order, each once."""
        return list(dict.fromkeys((r.conversation_id, r.session_id) for r in self.rows))


def read_rl_rows(path: str | Path) -> RLSet:
    """Read and validate an RL Parquet file; errors name the file, the row and the column."""
    path = Path(path)
    if not path.is_file():
        raise RLDataError(f"RL data file not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise RLDataError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in SCHEMA.names if c not in table.column_names]
    if missing:
        raise RLDataError(f"{path}: missing columns {missing}")
    meta = table.schema.metadata or {}
    rows = tuple(RLRow.from_record(rec, f"{path.name} row {i}") for i, rec in enumerate(table.to_pylist()))
    snap = meta.get(META_SNAPSHOTS, b"snapshots").decode()
    return RLSet(rows=rows, tokenizer=meta.get(META_TOKENIZER, b"").decode(),
                 snapshots_dir=(path.parent / snap).resolve(), source=meta.get(META_SOURCE, b"").decode())
