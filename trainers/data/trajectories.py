"""Expert trajectories: the memory builder run over conversations, one folder per conversation.

Layout under `root` (one folder per conversation, `conversation_folder` names it):

    <conv>/records.jsonl   one `SessionRecord` per finished session (`membuilder.agents.records`:
                           prompt messages, the agents' raw answers, parsed / applied / rejected
                           operations, the validity verdict, errors), appended and fsync'ed as the
                           session finishes; `state_before_sha256` is the content-addressed id of
                           the state before the session in the snapshot store
    <conv>/done.json       written last, once every selected session is in records.jsonl, with the
                           id of the final state

Every state before a session and every state after one is `put` in the `SnapshotStore`, the state
after BEFORE the record's line is written.

Determinism: the bank's clock is the session's date (POSIX seconds of the naive date taken as
UTC; sessions without a date get their index in seconds), so entry times, history and therefore
every snapshot id are a function of the data and the expert only. Two runs over the same input
give identical records.

Resume (nothing lost, nothing repeated): a conversation with `done.json` is skipped; one with
records is continued after its last whole line (a line cut short by a kill is removed). The bank
is rebuilt from the last record: its state before is loaded from the store (digest-checked), its
applied operations are applied again with the session's clock, the result must list the same
created / updated / retired ids, and the rebuilt state's id must be in the store (where the first
run put the state after). The session that was running at the kill is redone from that state, so
with a deterministic expert (or an LLM expert behind the response cache) it comes out the same.

Snapshots are stored without embeddings by default (derived data: the id ignores them, and a bank
restored from such a state re-embeds on its first search); 384 floats per entry per session
would dominate the folder's size.

`build_trajectories` may run several conversations at once (`workers`). Not safe to run twice
at once on one folder (two writers would append the same sessions).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

from membuilder.agents import MemoryBuilder
from membuilder.agents.apply import AGENT_ORDER
from membuilder.agents.records import RecordFormatError, SessionRecord, read_records, write_records
from membuilder.bank import MemoryBank
from membuilder.datasets import Conversation, Session
from membuilder.snapshots import SnapshotStore, state_digest
from membuilder.store import InMemoryStore
from membuilder.types import BankState, MemBuilderError

RECORDS = "records.jsonl"
DONE = "done.json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class TrajectoryError(RuntimeError):
    """A trajectory folder does not match the data or run it is resumed with (names the folder)."""


def conversation_folder(conversation_id: str) -> str:
    """A folder name for a conversation id: the id itself when it is a safe name, else the id with
    unsafe characters replaced and a short hash appended (so two ids never share a folder)."""
    safe = _SAFE.sub("_", conversation_id)
    if safe == conversation_id and safe not in ("", ".", ".."):
        return safe
    return f"{safe[:60]}-{hashlib.sha256(conversation_id.encode()).hexdigest()[:10]}"


def session_clock(session: Session, index: int) -> float:
    """The bank time while `session` is added: its date (naive, read as UTC) or `index` seconds."""
    if session.date is None:
        return float(index)
    date = session.date if session.date.tzinfo else session.date.replace(tzinfo=timezone.utc)
    return date.timestamp()


class _Clock:
    """A settable clock for the bank (one bank per conversation, one session at a time)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_trajectory(folder: Path, *, repair: bool = False) -> list[SessionRecord]:
    """The records of `folder/records.jsonl` ([] when there is none). With `repair`, a last line
    cut short by a kill is removed from the file first (without it, such a line is an error)."""
    path = Path(folder) / RECORDS
    if not path.exists():
        return []
    if repair:
        raw = path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):
            with open(path, "r+b") as fh:
                fh.truncate(end)
    try:
        return read_records(path)
    except RecordFormatError as exc:
        raise TrajectoryError(str(exc)) from None


def _store_state(snapshots: SnapshotStore, state: BankState, keep_embeddings: bool) -> str:
    return snapshots.put(state if keep_embeddings else replace(state, embeddings=()))


@dataclass(frozen=True)
class ConversationTrajectory:
    conversation_id: str
    folder: Path
    records: tuple[SessionRecord, ...]
    final_snapshot_id: str | None  # state after the last session
    resumed_from: int = 0  # sessions already on disk when this run started


def build_conversation(conversation: Conversation, builder: MemoryBuilder, folder: Path,
                       snapshots: SnapshotStore, *, max_sessions: int | None = None, embedder=None,
                       keep_embeddings: bool = False,
                       after_session: Callable[[SessionRecord], None] | None = None) -> ConversationTrajectory:
    """Run `builder` over the conversation's first `max_sessions` sessions, continuing what
    `folder` already holds (see the module doc). `after_session` is called after each record is
    written (the progress bar; tests use it to simulate a kill)."""
    folder.mkdir(parents=True, exist_ok=True)
    sessions = conversation.sessions if max_sessions is None else conversation.sessions[:max_sessions]
    done = folder / DONE
    if done.exists():
        records = read_trajectory(folder)
        _check_records(records, sessions, folder, complete=True)
        final = json.loads(done.read_text())["final_snapshot_id"]
        return ConversationTrajectory(conversation.conversation_id, folder, tuple(records), final, len(records))
    records = read_trajectory(folder, repair=True)
    _check_records(records, sessions, folder, complete=False)
    clock = _Clock()
    bank = MemoryBank(InMemoryStore(), conversation.conversation_id, embedder=embedder, clock=clock)
    final = None
    if records:
        final = _rebuild(bank, records[-1], sessions, clock, snapshots, folder)
    resumed = len(records)
    for index in range(len(records), len(sessions)):
        clock.now = session_clock(sessions[index], index)
        (record,) = builder.build(bank, conversation, start=index, max_sessions=1)
        if record.state_before is None:
            raise TrajectoryError("the builder was made with snapshots=False; trajectories need the state before")
        before = _store_state(snapshots, record.state_before, keep_embeddings)
        final = _store_state(snapshots, bank.snapshot(), keep_embeddings)  # before the line: resume checks it
        record = replace(record, state_before=None, snapshot_id=before)
        write_records(folder / RECORDS, [record])
        records.append(record)
        if after_session is not None:
            after_session(record)
    write_json_atomic(done, {"conversation_id": conversation.conversation_id, "sessions": len(records),
                             "final_snapshot_id": final})
    return ConversationTrajectory(conversation.conversation_id, folder, tuple(records), final, resumed)


def _rebuild(bank: MemoryBank, last: SessionRecord, sessions: Sequence[Session], clock: _Clock,
             snapshots: SnapshotStore, folder: Path) -> str:
    """Make `bank` the state after `last` (see the module doc); returns that state's id."""
    try:
        state = snapshots.get(last.snapshot_id)  # digest-checked
    except MemBuilderError as exc:
        raise TrajectoryError(f"{folder}: cannot resume: {exc}") from None
    bank.restore(state if state.owner == bank.owner else replace(state, owner=bank.owner))
    clock.now = session_clock(sessions[last.session_index], last.session_index)
    ops = [op for kind in AGENT_ORDER if kind in last.agents for op in last.agents[kind].operations]
    result = bank.apply(ops, session_id=last.session_id, skip_invalid=True)
    same = (result.created, result.updated, result.retired, result.core_changed) == (
        last.result.created, last.result.updated, last.result.retired, last.result.core_changed)
    after = state_digest(bank.snapshot())
    if result.rejected or not same or after not in snapshots:
        raise TrajectoryError(f"{folder}: re-applying the operations of {last.session_id} did not give the "
                              "state the run recorded (other snapshot store, or edited records?)")
    return after


def _check_records(records: Sequence[SessionRecord], sessions: Sequence[Session], folder: Path, *,
                   complete: bool) -> None:
    if len(records) > len(sessions) or (complete and len(records) != len(sessions)):
        raise TrajectoryError(f"{folder}: holds {len(records)} sessions but this run selects {len(sessions)} "
                              "(a different --sessions? use a new --out)")
    for i, rec in enumerate(records):
        if rec.session_index != i or rec.session_id != sessions[i].session_id:
            raise TrajectoryError(f"{folder}: line {i + 1} is session {rec.session_id!r} (index "
                                  f"{rec.session_index}), expected {sessions[i].session_id!r} (index {i}): "
                                  "the folder belongs to other data")
        if rec.snapshot_id is None:
            raise TrajectoryError(f"{folder}: line {i + 1} has no state-before snapshot id")


def build_trajectories(conversations: Iterable[Conversation], builder: MemoryBuilder, root: Path,
                       snapshots: SnapshotStore, *, max_sessions: int | None = None, embedder=None,
                       keep_embeddings: bool = False, progress: bool = True, workers: int = 1,
                       after_session: Callable[[SessionRecord], None] | None = None
                       ) -> list[ConversationTrajectory]:
    """`build_conversation` for each conversation (in order, or `workers` at a time: each has its
    own bank and folder, so the results are the same), with one progress bar over sessions.
    `after_session` may then be called from several threads. The first failure is raised once
    the conversations already running have finished (what they wrote is kept)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    conversations = list(conversations)
    total = sum(len(c.sessions) if max_sessions is None else min(max_sessions, len(c.sessions))
                for c in conversations)
    lock = threading.Lock()
    with tqdm(total=total, desc="expert trajectories", unit="session", disable=not progress) as bar:
        def tick(record: SessionRecord) -> None:
            with lock:
                bar.update()
            if after_session is not None:
                after_session(record)

        def one(conv: Conversation) -> ConversationTrajectory:
            folder = Path(root) / conversation_folder(conv.conversation_id)
            result = build_conversation(conv, builder, folder, snapshots, max_sessions=max_sessions,
                                        embedder=embedder, keep_embeddings=keep_embeddings, after_session=tick)
            with lock:
                bar.update(result.resumed_from)
            return result

        if workers == 1:
            return [one(conv) for conv in conversations]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, conversations))
