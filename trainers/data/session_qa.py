"""Session-level QA for dense rewards: up to 5 questions per session (DESIGN section 4).

Sources:
- dataset evidence (`evidence_qa`): a question belongs to the LAST session holding its evidence
  (LoCoMo evidence turn ids, LongMemEval answer sessions): only there has the memory seen all of
  it. Its type: abstention for LoCoMo category 5 and LongMemEval `_abs`; temporal for LoCoMo's
  temporal category and LongMemEval temporal-reasoning; knowledge-update for LongMemEval's;
  cross-session when the evidence spans several sessions (LongMemEval multi-session);
  single-session otherwise. The question date is LongMemEval's own; LoCoMo has none, so it is the
  session's date (the question is asked right after the session);
- an LLM generator (`LLMQAGenerator`): given the state before the session and the session, asks
  for exactly 5 pairs in DESIGN's mix (about half single-session, a third cross-session, a fifth
  temporal; no cross-session when nothing came before), parses strictly and asks again a bounded
  number of times;
- the world generator: exact QA from the dialogue world (`membuilder.world`), when present.

When a session has more candidates than `per_session`, `pick_mix` takes them in the mix's order.
A session for which no QA could be made gets an empty list and a reason: the reward masks it; it
is never filled with made-up pairs.

Files: `<conv>/qa.jsonl`, one line per session `{"session_index", "session_id", "qa": [...],
"reason"}`, appended as each session's QA is made (an LLM generator can be killed and resumed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from membuilder.agents.parsing import find_json_object
from membuilder.agents.prompts import fit_transcript
from membuilder.datasets import ADVERSARIAL, Conversation, Question, Session
from membuilder.llm import LLMError
from membuilder.types import BankState, Status
from reward.types import QAPair, RewardInputError

QA_FILE = "qa.jsonl"
PER_SESSION = 5
# The order in which `pick_mix` takes types: for 5 questions, 2 single-session, 2 cross-session
# and 1 temporal, the nearest whole numbers to a half, a third and a fifth.
MIX_ORDER = ("single-session", "cross-session", "temporal", "single-session", "cross-session")
_LME_TYPES = {"single-session-user": "single-session", "single-session-assistant": "single-session",
              "single-session-preference": "single-session", "multi-session": "cross-session",
              "temporal-reasoning": "temporal", "knowledge-update": "knowledge-update"}


@dataclass(frozen=True)
class SessionQA:
    session_index: int
    session_id: str
    qa: tuple[QAPair, ...]
    reason: str | None = None  # why `qa` is empty (None when it is not)

    def to_dict(self) -> dict:
        return {"session_index": self.session_index, "session_id": self.session_id,
                "qa": [q.to_dict() for q in self.qa], "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "SessionQA":
        try:
            return cls(session_index=int(d["session_index"]), session_id=str(d["session_id"]),
                       qa=tuple(QAPair.from_dict(q, f"{where}.qa[{i}]") for i, q in enumerate(d["qa"])),
                       reason=d.get("reason"))
        except (KeyError, TypeError, ValueError, RewardInputError) as exc:
            raise ValueError(f"{where}: malformed session QA line ({exc})") from None


def _iso(session: Session) -> str | None:
    return session.date.isoformat() if session.date is not None else None


def pick_mix(candidates: Sequence[QAPair], n: int = PER_SESSION) -> tuple[QAPair, ...]:
    """Up to `n` of `candidates`: first one of each type in `MIX_ORDER` (in candidate order), then
    the rest in candidate order."""
    left = list(candidates)
    chosen: list[QAPair] = []
    for qtype in MIX_ORDER:
        if len(chosen) == n:
            break
        hit = next((q for q in left if q.qtype == qtype), None)
        if hit is not None:
            chosen.append(hit)
            left.remove(hit)
    chosen += left[: n - len(chosen)]
    order = {id(q): i for i, q in enumerate(candidates)}
    return tuple(sorted(chosen, key=lambda q: order[id(q)]))


def _evidence_type(q: Question, spans: int, dataset: str) -> str:
    if q.is_abstention or q.category == ADVERSARIAL:
        return "abstention"
    if dataset == "longmemeval":
        return _LME_TYPES.get(q.category, "other")
    if q.category == "temporal":
        return "temporal"
    return "cross-session" if spans > 1 else "single-session"


def evidence_qa(conversation: Conversation, sessions: Sequence[Session], *,
                per_session: int = PER_SESSION) -> list[SessionQA]:
    """QA per session of `sessions` (a prefix of the conversation's) from the dataset's evidence."""
    index = {s.session_id: i for i, s in enumerate(sessions)}
    source = f"{conversation.dataset or 'dataset'}-evidence"
    by_session: dict[int, list[QAPair]] = {}
    for q in conversation.questions:
        spans = [s for s in q.evidence_sessions]
        if not spans or any(s not in index for s in spans):
            continue  # no evidence, or evidence past the selected sessions: not answerable here
        last = max(index[s] for s in spans)
        qdate = q.question_date.isoformat() if q.question_date is not None else _iso(sessions[last])
        by_session.setdefault(last, []).append(QAPair(
            question=q.question, answer=q.answer, qtype=_evidence_type(q, len(set(spans)), conversation.dataset),
            source=source, question_date=qdate, question_id=q.question_id))
    out = []
    for i, s in enumerate(sessions):
        qa = pick_mix(by_session.get(i, []), per_session)
        out.append(SessionQA(i, s.session_id, qa, None if qa else "no dataset question has its (last) evidence here"))
    return out


# --- LLM generator ----------------------------------------------------------------------------------

_QA_SYSTEM = """You write test questions for a long-term memory built from conversations.
You are shown what the memory held before a new session, and the new session. Write exactly {n} question-answer pairs that someone who remembers the conversation well can answer, and that check whether the memory kept what matters from this session:
- "single-session": answered by this session alone ({single} of them);
- "cross-session": needs this session AND something the memory held before it ({cross} of them);
- "temporal": about when something in this session happened or will happen, answered with an absolute date worked out from the session date ({temporal} of them).
Questions name the people (never "I" or "you"). Answers are short (a few words or a date), and true according to the texts shown. Do not ask about anything the texts do not say.

Answer with one JSON object only, no Markdown: {{"qa": [{{"question": "...", "answer": "...", "type": "single-session" | "cross-session" | "temporal"}}, ...]}}"""

MAX_MEMORY_CHARS = 6000
MAX_TRANSCRIPT_CHARS = 16000


def mix_counts(n: int, cross_allowed: bool) -> dict[str, int]:
    """How many of each type to ask for: a fifth temporal, a third cross-session (if allowed), the
    rest single-session; for n = 5: 1 temporal, 2 cross-session, 2 single-session (rounded)."""
    temporal = max(1, round(n / 5)) if n >= 3 else 0
    cross = round(n / 3) if cross_allowed else 0
    return {"single-session": n - temporal - cross, "cross-session": cross, "temporal": temporal}


def _memory_text(state: BankState | None, limit: int) -> str:
    if state is None:
        return "(empty)"
    lines = [f"Core: {state.meta.core}"] if state.meta.core else []
    live = [e for e in state.entries if e.status is Status.ACTIVE]
    live.sort(key=lambda e: (-e.updated_at, e.id))  # the newest first: what the session most likely continues
    for e in live:
        when = f" ({e.event_time})" if e.event_time else ""
        line = f"[{e.kind.value}]{when} {' '.join(e.text.split())}"
        if sum(len(x) + 1 for x in lines) + len(line) > limit:
            lines.append(f"[... {len(live)} entries in all; the older ones are left out]")
            break
        lines.append(line)
    return "\n".join(lines) if lines else "(empty)"


def qa_messages(session: Session, state: BankState | None, counts: Mapping[str, int]) -> list[dict]:
    """The generator's prompt for one session."""
    n = sum(counts.values())
    system = _QA_SYSTEM.format(n=n, single=counts["single-session"], cross=counts["cross-session"],
                               temporal=counts["temporal"])
    transcript, _, _ = fit_transcript(session.messages, MAX_TRANSCRIPT_CHARS)
    date = session.date.strftime("%Y-%m-%d (%A)") if session.date is not None else "unknown"
    user = (f"Memory before the session:\n{_memory_text(state, MAX_MEMORY_CHARS)}\n\n"
            f"New session, dated {date}:\n{transcript}\n\nAnswer with one JSON object.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_generated(text: str, counts: Mapping[str, int]) -> tuple[list[dict] | None, str | None]:
    """The generated pairs if `text` holds exactly the asked-for number of well-formed pairs of the
    asked-for types (per-type counts may differ by one); else (None, why)."""
    data, _, error = find_json_object(text or "")
    if error is not None:
        return None, error
    items = data.get("qa") if isinstance(data, dict) else None
    n = sum(counts.values())
    if not isinstance(items, list) or len(items) != n:
        return None, f"expected {{\"qa\": [...]}} with {n} items"
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"question", "answer", "type"}:
            return None, f"qa[{i}] must have exactly question, answer, type"
        q, a, t = item["question"], item["answer"], item["type"]
        if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
            return None, f"qa[{i}]: question and answer must be non-empty strings"
        if t not in counts or (counts[t] == 0):
            return None, f"qa[{i}]: type {t!r} was not asked for (asked: {[k for k, v in counts.items() if v]})"
        out.append({"question": q.strip(), "answer": a.strip(), "type": t})
    for t, want in counts.items():
        got = sum(1 for x in out if x["type"] == t)
        if abs(got - want) > 1:
            return None, f"{got} {t} questions, asked for {want}"
    return out, None


class LLMQAGenerator:
    """Session QA from any OpenAI-compatible model through `membuilder.llm.LLMClient` (or anything
    with its `chat` method). Safe to call from several threads if the client is."""

    def __init__(self, client, *, model: str | None = None, per_session: int = PER_SESSION,
                 max_attempts: int = 3, temperature: float = 0.0, max_tokens: int = 1024):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.client = client
        self.model = model
        self.per_session = per_session
        self.max_attempts = max_attempts
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.source = f"llm:{model or getattr(getattr(client, 'config', None), 'model', None) or '?'}"

    def session_qa(self, session: Session, index: int, state: BankState | None) -> SessionQA:
        """Five pairs for `session` (memory `state` before it), or none and the last failure."""
        cross = state is not None and bool(state.meta.core or any(e.status is Status.ACTIVE for e in state.entries))
        counts = mix_counts(self.per_session, cross)
        messages = qa_messages(session, state, counts)
        why = "no attempt"
        for attempt in range(self.max_attempts):
            try:
                result = self.client.chat(messages, model=self.model, temperature=self.temperature,
                                          max_tokens=self.max_tokens, use_cache=attempt == 0)
            except LLMError as exc:
                why = f"{type(exc).__name__}: {exc}"
                continue
            if getattr(result, "truncated", False):
                why = f"answer cut at max_tokens={self.max_tokens}"
                continue
            items, why = parse_generated(result.text, counts)
            if items is not None:
                qa = tuple(QAPair(question=x["question"], answer=x["answer"], qtype=x["type"], source=self.source,
                                  question_date=_iso(session), question_id=f"{session.session_id}/gen{k}")
                           for k, x in enumerate(items))
                return SessionQA(index, session.session_id, qa, None)
        return SessionQA(index, session.session_id, (),
                         f"QA generation failed after {self.max_attempts} attempt(s): {why}")


# --- files ------------------------------------------------------------------------------------------


def read_qa(folder: Path, *, repair: bool = False) -> list[SessionQA]:
    """The lines of `folder/qa.jsonl` ([] when missing); with `repair`, a cut-off last line is removed."""
    path = Path(folder) / QA_FILE
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        if not repair:
            raise ValueError(f"{path}: the last line is incomplete (an interrupted run? resume it)")
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return [SessionQA.from_dict(json.loads(line), f"{path} line {n}")
            for n, line in enumerate(raw[:end].decode("utf-8").splitlines(), start=1)]


def make_session_qa(folder: Path, sessions: Sequence[Session],
                    make: Callable[[int, Session], SessionQA] | None = None,
                    precomputed: Iterable[SessionQA] | None = None) -> list[SessionQA]:
    """QA for every session of `sessions`, continuing `folder/qa.jsonl`: sessions already there are
    kept, the others are made (`make(index, session)`, or taken from `precomputed`) and appended."""
    have = read_qa(folder, repair=True)
    for i, item in enumerate(have):
        if i >= len(sessions) or item.session_index != i or item.session_id != sessions[i].session_id:
            raise ValueError(f"{folder / QA_FILE}: line {i + 1} does not match session {i} of this run")
    ready = list(precomputed) if precomputed is not None else None
    path = Path(folder) / QA_FILE
    for i in range(len(have), len(sessions)):
        item = ready[i] if ready is not None else make(i, sessions[i])
        with open(path, "ab") as fh:
            fh.write((json.dumps(item.to_dict(), ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        have.append(item)
    return have

