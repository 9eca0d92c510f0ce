"""The RL set: one Parquet row per (session, agent) (`trainers.data.rl_rows`), the train / heldout
split by conversation, and the LongMemEval leakage guard.

Split: by conversation group (a LongMemEval `x` and its `x_abs` twin share one haystack, so they
are one group). Groups are ranked by SHA-256 of `"{seed}:{group}"` and the first
ceil(fraction * groups) are held out (none when there is a single group): a conversation's side
depends only on its id and the seed, not on which other conversations a run selected.

LongMemEval guard (REFERENCE item 13): training data may come only from the question ids of a
splits file (`splits_dev.json`: {"sft": [...], "rl": [...]}, itself checked for base-id leakage
between its sides when loaded). `guard_longmemeval` keeps a conversation only if its id is on the
allowed sides AND no other question of the loaded data with the same base id is off them (an `x`
whose `x_abs` is a test question shares its haystack with the test: both are left out). A final
check raises `SplitLeakageError` if anything kept were a test id or a test id's twin.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from membuilder.agents.apply import AGENT_ORDER
from membuilder.agents.parsing import parse_agent_output
from membuilder.agents.records import SessionRecord
from membuilder.datasets import (
    Conversation,
    Session,
    SplitLeakageError,
    check_split_leakage,
    longmemeval_base_id,
)
from reward.types import QAPair

from .policy_tokenizer import count_tokens
from .rl_rows import RLRow

TRAIN, HELDOUT = "train", "heldout"


def assign_splits(conversation_ids: Iterable[str], heldout_fraction: float, *, seed: int = 0,
                  group: Callable[[str], str] = lambda cid: cid) -> dict[str, str]:
    """conversation id -> "train" / "heldout" (see the module doc)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    ids = list(dict.fromkeys(conversation_ids))
    groups = sorted({group(c) for c in ids}, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n_held = math.ceil(heldout_fraction * len(groups)) if len(groups) > 1 else 0
    held = set(groups[:n_held])
    return {c: HELDOUT if group(c) in held else TRAIN for c in ids}


@dataclass(frozen=True)
class GuardResult:
    kept: tuple[Conversation, ...]
    excluded: Mapping[str, str]  # conversation id -> why


def guard_longmemeval(conversations: Sequence[Conversation], splits: Mapping[str, Sequence[str]],
                      sides: Sequence[str]) -> GuardResult:
    """The conversations that may feed training: see the module doc."""
    missing = [s for s in sides if s not in splits]
    if missing:
        raise ValueError(f"the splits file has no side {missing} (it has {sorted(splits)})")
    allowed = {qid for side in sides for qid in splits[side]}
    off = {c.conversation_id for c in conversations if c.conversation_id not in allowed}
    off_bases = {longmemeval_base_id(qid): qid for qid in sorted(off)}
    kept, excluded = [], {}
    for conv in conversations:
        cid = conv.conversation_id
        if cid not in allowed:
            excluded[cid] = f"not a training id (sides {list(sides)} of the splits file)"
        elif longmemeval_base_id(cid) in off_bases:
            excluded[cid] = (f"shares its haystack (base id {longmemeval_base_id(cid)!r}) with "
                             f"{off_bases[longmemeval_base_id(cid)]!r}, which is not a training id")
        else:
            kept.append(conv)
    # Belt and braces: nothing kept may be, or be the twin of, a question outside the training ids.
    check_split_leakage({"train": [c.conversation_id for c in kept], "other": sorted(off)},
                        source="LongMemEval training selection")
    if any(c.conversation_id not in allowed for c in kept):
        raise SplitLeakageError("LongMemEval training selection holds an id outside the splits file")
    return GuardResult(tuple(kept), excluded)


@dataclass
class RLStats:
    rows: Counter = field(default_factory=Counter)  # split -> rows
    sessions_skipped: Counter = field(default_factory=Counter)  # reason -> sessions

    def to_dict(self) -> dict:
        return {"rows": dict(sorted(self.rows.items())), "sessions_skipped": dict(sorted(self.sessions_skipped.items()))}


def expert_output(kind, raw: str | None) -> str:
    """The expert's answer as the RL row stores it: the JSON object it wrote (what SFT teaches)."""
    parsed = parse_agent_output(kind, raw)
    return parsed.json_text if parsed.ok and parsed.json_text is not None else (raw or "")


def session_rows(conversation: Conversation, session: Session, record: SessionRecord, qa: Sequence[QAPair],
                 split: str, tokenizer, stats: RLStats, *, skip_empty_qa: bool = False) -> list[RLRow]:
    """The four rows of one session, or none (counted) when an expert agent failed (its length, the
    length penalty's reference, is unknown) or, with `skip_empty_qa`, when the session has no QA."""
    if record.errors:
        stats.sessions_skipped["an expert agent failed"] += 1
        return []
    if skip_empty_qa and not qa:
        stats.sessions_skipped["no QA (skip_empty_qa)"] += 1
        return []
    date = session.date.isoformat() if session.date is not None else None
    rows = []
    for kind in AGENT_ORDER:
        agent = record.agents[kind]
        text = expert_output(kind, agent.raw_output)
        rows.append(RLRow(
            row_id=f"{conversation.conversation_id}/{record.session_id}/{kind.value}",
            conversation_id=conversation.conversation_id, owner=record.owner, session_id=record.session_id,
            session_index=record.session_index, session_date=date, agent=kind.value,
            prompt=tuple({"role": m["role"], "content": m["content"]} for m in agent.messages),
            snapshot_id=record.snapshot_id, qa=tuple(qa), expert_output=text,
            expert_tokens=count_tokens(tokenizer, text), split=split))
    stats.rows[split] += len(rows)
    return rows
