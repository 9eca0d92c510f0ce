"""The SFT set: (prompt messages, expert answer) pairs from expert trajectories, in the JSONL format
`trainers/sft_data.py` reads (`{"messages": [...], "target": "..."}`).

The target is the agent's OWN answer: the JSON object it wrote (`parse_agent_output`'s
`json_text`, so think-blocks, code fences and prose around it are not taught). For core that is
the operation the agent emitted, never the whole-block REWRITE of a compression step (REFERENCE
item 5): a core answer that needed compression went over the limit, the validity gate rejects it,
and it is skipped. Every target passes the RL validity gate (`membuilder.agents.apply`), checked
here again against the state before the session (`gate`), whatever the record says; a target that
fails is skipped and counted by reason (REFERENCE item 21: what SFT teaches, RL must not score 0).

Pairs longer than `max_length` policy tokens (prompt in the chat template + target + end token):
- "shorten" (default): the session transcript is cut in the MIDDLE, whole turns, with a marker
  naming the left-out turns; the system message (instructions, schema), the memory shown and the
  target stay whole. A pair that does not fit even with every turn left out is skipped;
- "skip": the pair is skipped.
Both are counted in `SFTStats` and the manifest.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Literal, Sequence

from membuilder.agents.apply import apply_agent_outputs
from membuilder.agents.parsing import parse_agent_output
from membuilder.agents.records import AgentRecord
from membuilder.bank import MemoryBank
from membuilder.datasets import Session
from membuilder.store import InMemoryStore
from membuilder.types import CORE_LIMIT, BankState, MemoryKind
from trainers.sft_data import SFTPair, render_pair

Overlong = Literal["shorten", "skip"]
_TITLE = re.compile(r"New session \(\d+ turns\):\n")
_TAIL = "\n\nAnswer with one JSON object."


@dataclass
class SFTStats:
    written: int = 0
    shortened: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def to_dict(self) -> dict:
        return {"written": self.written, "shortened": self.shortened, "skipped": dict(sorted(self.skipped.items()))}


def gate(kind: MemoryKind | str, text: str | None, state: BankState, *, core_limit: int = CORE_LIMIT) -> str | None:
    """The RL validity gate on one agent answer against the state before: None if valid, else why.

    Exactly the reward's check: `apply_agent_outputs` with this agent alone on a scratch copy of
    the state, `drop_invalid_agents=True`.
    """
    kind = MemoryKind.parse(kind)
    bank = MemoryBank(InMemoryStore(), state.owner, clock=lambda: 0.0, core_limit=core_limit)
    bank.restore(replace(state, embeddings=()))
    verdict = apply_agent_outputs(bank, {kind: text}, session_id="gate", drop_invalid_agents=True).agents[kind]
    return None if verdict.valid else (verdict.invalid_reason or verdict.error or "invalid")


def expert_target(record: AgentRecord, state: BankState) -> tuple[str | None, str | None]:
    """(target, None) for an agent record whose answer may be taught, else (None, reason)."""
    if record.error is not None:
        return None, "expert failed" if record.compression is None else "core over the limit (compressed)"
    if record.compression is not None:
        return None, "core over the limit (compressed)"
    parsed = parse_agent_output(record.kind, record.raw_output)
    if not parsed.ok or parsed.json_text is None:
        return None, "unparsable expert answer"
    if gate(record.kind, parsed.json_text, state) is not None:
        return None, "fails the validity gate"
    return parsed.json_text, None


def pair_tokens(tokenizer, pair: SFTPair, chat_template_kwargs: dict | None = None) -> int:
    """Tokens of the pair as SFT renders it (with the same chat-template options)."""
    prompt_ids, target_ids = render_pair(tokenizer, pair, chat_template_kwargs)
    return len(prompt_ids) + len(target_ids)


def _turn_blocks(transcript: str, turn_ids: Sequence[str]) -> list[str] | None:
    """The transcript split into one block per shown turn (a turn's text may span lines; a marker
    line of the renderer stays with the turn before it). None if the turns cannot be found."""
    starts = []
    pos = 0
    for tid in turn_ids:
        at = transcript.find(f"[{tid}] ", pos)
        if at < 0 or (at > 0 and transcript[at - 1] != "\n"):
            break  # the renderer left the later turns out
        starts.append(at)
        pos = at + 1
    if not starts or starts[0] != 0:
        return None
    bounds = starts + [len(transcript) + 1]
    return [transcript[bounds[i]:bounds[i + 1] - 1] for i in range(len(starts))]


def _middle_cut(blocks: list[str], keep: int, turn_ids: Sequence[str]) -> str:
    head = (keep + 1) // 2
    tail = keep - head
    cut = len(blocks) - keep
    first, last = turn_ids[head], turn_ids[head + cut - 1]
    marker = (f"[... {cut} turns ({first} to {last}) are left out here: the session is longer than this "
              "model's context allows ...]")
    return "\n".join(blocks[:head] + [marker] + (blocks[len(blocks) - tail:] if tail else []))


def shorten_pair(tokenizer, pair: SFTPair, session: Session, max_length: int,
                 chat_template_kwargs: dict | None = None) -> SFTPair | None:
    """`pair` with its session transcript cut in the middle so that it fits in `max_length` tokens,
    keeping as many turns as fit (half from the start, half from the end); None if impossible."""
    messages = [dict(m) for m in pair.messages]
    user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
    if user is None:
        return None
    content = messages[user]["content"]
    title = None
    for title in _TITLE.finditer(content):
        pass
    end = content.rfind(_TAIL)
    if title is None or end < title.end():
        return None
    transcript = content[title.end():end]
    turn_ids = [m.turn_id for m in session.messages]
    blocks = _turn_blocks(transcript, turn_ids)
    if blocks is None:
        return None

    def with_keep(keep: int) -> SFTPair:
        text = _middle_cut(blocks, keep, turn_ids)
        msgs = list(messages)
        msgs[user] = {**messages[user], "content": content[:title.end()] + text + content[end:]}
        return SFTPair(tuple(msgs), pair.target)

    lo, hi = 0, len(blocks) - 1  # fewer than all blocks: something must go
    if pair_tokens(tokenizer, with_keep(0), chat_template_kwargs) > max_length:
        return None
    while lo < hi:  # the most turns that fit; token counts grow with `keep`
        mid = (lo + hi + 1) // 2
        if pair_tokens(tokenizer, with_keep(mid), chat_template_kwargs) <= max_length:
            lo = mid
        else:
            hi = mid - 1
    return with_keep(lo)


def fit_pair(tokenizer, pair: SFTPair, session: Session, max_length: int | None, overlong: Overlong,
             stats: SFTStats, chat_template_kwargs: dict | None = None) -> SFTPair | None:
    """`pair` as it goes into the set (shortened if needed), or None (skipped, counted in `stats`).
    Lengths are counted as SFT will render the pair: pass the run's `data.chat_template_kwargs`."""
    if max_length is None or pair_tokens(tokenizer, pair, chat_template_kwargs) <= max_length:
        return pair
    if overlong == "skip":
        stats.skipped[f"longer than {max_length} tokens"] += 1
        return None
    short = shorten_pair(tokenizer, pair, session, max_length, chat_template_kwargs)
    if short is None:
        stats.skipped[f"longer than {max_length} tokens even with the whole session left out"] += 1
        return None
    stats.shortened += 1
    return short


def write_sft(path: Path, pairs: Iterable[SFTPair]) -> int:
    """Write pairs as JSONL (`{"messages", "target"}`), atomically; returns how many."""
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps({"messages": list(pair.messages), "target": pair.target}, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
