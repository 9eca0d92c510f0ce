"""Loaders for MemoryAgentBench and MemoryBench (formats: ../shared/BENCHMARK-FORMATS.md).

Neither benchmark is on PyPI; both live on the Hugging Face hub. Download them yourself and pass
the files (nothing here touches the network):

    MemoryAgentBench: https://huggingface.co/datasets/ai-hyz/MemoryAgentBench (pin a revision) ->
        one Parquet file per split (Accurate_Retrieval, Test_Time_Learning,
        Long_Range_Understanding, Conflict_Resolution). Pass the file, or a folder holding
        `<Split>.parquet` / `data/<Split>-*.parquet` (JSON / JSONL rows of the same fields work too).
    MemoryBench: https://huggingface.co/datasets/THUIR/MemoryBench -> per dataset config a
        `train` and a `test` split, plus `corpus/<name>.jsonl` for LoCoMo and DialSim. Pass the
        folder; a config's split is found as `<config>/<split>.{jsonl,json,parquet}`,
        `<config>-<split>.*`, `data/<config>/<split>-*.parquet` or `<config>/<split>-*.parquet`.

MemoryAgentBench ("inject once, query many"): a row's `context` is cut into chunks of at most
`chunk_tokens` tokens (default 4,096, as its harness does), each chunk one session of one
"document" turn, in order; the row's questions are asked after all chunks. Chunks end at sentence
or line boundaries where possible (a piece longer than a chunk is cut at token boundaries). The
token count is `count_tokens` (default: words and punctuation marks, `default_count_tokens`; the
harness counts with tiktoken, so chunk boundaries differ slightly unless you pass that counter).

MemoryBench: LoCoMo configs take the conversation from the corpus (a row's `text` is the LoCoMo
sample as a JSON string, parsed by `membuilder.datasets`) and the split's rows as questions;
other configs take their sessions from the corpus rows when a corpus exists, else from the
`train` split's `dialog`s (the feedback logs the memory learns from), and the `test` rows as
questions. `info`, `dialog*`, `implicit_feedback*` and `input_chat_messages` may be stored as
strings (JSON or Python literals): they are parsed.

Each loader returns `BenchItem`s (the `Conversation` plus, per question, the gold aliases and the
metric its subset defines: `membuilder.metrics_text`); `load_dataset` gets the conversations.
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from membuilder.datasets import Conversation, DatasetFormatError, Message, Question, Session

MAB_SPLITS = ("Accurate_Retrieval", "Test_Time_Learning", "Long_Range_Understanding", "Conflict_Resolution")
MAB_HINT = ("download the split's Parquet file from https://huggingface.co/datasets/ai-hyz/MemoryAgentBench "
            "(e.g. `huggingface-cli download ai-hyz/MemoryAgentBench --repo-type dataset --revision <rev> "
            "--local-dir data/MemoryAgentBench`)")
MB_HINT = ("download the config from https://huggingface.co/datasets/THUIR/MemoryBench (train and test "
           "splits, and corpus/<name>.jsonl for LoCoMo and DialSim) into one folder")
DEFAULT_CHUNK_TOKENS = 4096
LLM_JUDGED = "llm_judge"  # subsets whose official metric is an LLM judge; offline we report f1 / rouge_l
_TOKEN = re.compile(r"\w+|[^\w\s]")
_PIECE = re.compile(r"[^\n]*?(?:[.!?](?=\s)|\n|$)")


def default_count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


@dataclass(frozen=True)
class BenchQuestion:
    question_id: str
    aliases: tuple[str, ...]
    metric: str  # a `membuilder.metrics_text.METRICS` name or LLM_JUDGED


@dataclass(frozen=True)
class BenchItem:
    conversation: Conversation
    questions: tuple[BenchQuestion, ...]
    source: str


def _fail(where: str, what: str) -> DatasetFormatError:
    return DatasetFormatError(f"{where}: {what}")


def mab_metric(source: str) -> str:
    """The metric MemoryAgentBench defines for a sub-dataset (`metadata.source`)."""
    s = source.lower()
    if s.startswith(("eventqa", "ruler", "factconsolidation")):
        return "substring_exact_match"
    if s.startswith(("detective", "icl_")):
        return "exact_match"
    if s.startswith("recsys"):
        return "recall@5"
    if s.startswith(("longmemeval", "infbench_sum")):
        return LLM_JUDGED
    return "substring_exact_match"


def chunk_text(text: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               count_tokens: Callable[[str], int] = default_count_tokens) -> list[str]:
    """`text` in consecutive chunks of at most `chunk_tokens` tokens (module doc); the chunks
    joined give back every piece of the text, in order (only whitespace between pieces changes)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    pieces = [p.strip() for p in _PIECE.findall(text) if p.strip()]
    chunks: list[str] = []
    cur: list[str] = []
    cur_n = 0
    for piece in pieces:
        n = count_tokens(piece)
        if n > chunk_tokens:  # one sentence longer than a chunk: cut it at token boundaries
            if cur:
                chunks.append(" ".join(cur))
                cur, cur_n = [], 0
            words = piece.split()
            part: list[str] = []
            for w in words:
                if part and count_tokens(" ".join(part + [w])) > chunk_tokens:
                    chunks.append(" ".join(part))
                    part = []
                part.append(w)
            if part:
                chunks.append(" ".join(part))
            continue
        if cur and cur_n + n > chunk_tokens:
            chunks.append(" ".join(cur))
            cur, cur_n = [], 0
        cur.append(piece)
        cur_n += n
    if cur:
        chunks.append(" ".join(cur))
    return chunks


def _read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise _fail(str(path), f"cannot be read: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise _fail(str(path), "expected a list of rows")
    return data


def _loose(value: Any, where: str) -> Any:
    """A field stored as a string of JSON or of a Python literal, parsed; other values unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise _fail(where, f"is a string that is neither JSON nor a Python literal: {value[:60]!r}") from None


def _mab_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"MemoryAgentBench: {path} does not exist; {MAB_HINT}, then pass the file or folder")
    splits = [split] if split else list(MAB_SPLITS)
    found = []
    for s in splits:
        for pattern in (f"{s}.parquet", f"{s}.jsonl", f"{s}.json", f"data/{s}-*.parquet", f"{s}-*.parquet"):
            found += sorted(path.glob(pattern))
    if not found:
        raise FileNotFoundError(f"MemoryAgentBench: no split file ({', '.join(splits)}) under {path}; {MAB_HINT}")
    return found


def load_memoryagentbench_items(path: str | os.PathLike, *, split: str | None = None, source: str | None = None,
                                chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                count_tokens: Callable[[str], int] = default_count_tokens) -> list[BenchItem]:
    """MemoryAgentBench rows as `BenchItem`s (module doc); `source` keeps rows whose
    `metadata.source` starts with it."""
    if split is not None and split not in MAB_SPLITS:
        raise ValueError(f"unknown MemoryAgentBench split {split!r}; expected one of {MAB_SPLITS}")
    items = []
    for file in _mab_files(Path(path), split):
        for i, row in enumerate(_read_rows(file)):
            where = f"{file.name} row {i}"
            if not isinstance(row, dict):
                raise _fail(where, "expected an object")
            for key, typ in (("context", str), ("questions", list), ("answers", list)):
                if not isinstance(row.get(key), typ):
                    raise _fail(where, f"'{key}' must be a {typ.__name__}")
            meta = _loose(row.get("metadata") or {}, f"{where}.metadata")
            if not isinstance(meta, dict):
                raise _fail(where, "'metadata' must be an object")
            src = str(meta.get("source") or file.stem)
            if source is not None and not src.startswith(source):
                continue
            item = _mab_item(row, meta, src, f"{src}_{i}", where, chunk_tokens, count_tokens)
            items.append(item)
    return items


def _mab_item(row, meta, src, cid, where, chunk_tokens, count_tokens) -> BenchItem:
    questions, answers = row["questions"], row["answers"]
    if len(questions) != len(answers):
        raise _fail(where, f"{len(questions)} questions but {len(answers)} answers")
    qids = meta.get("question_ids") or meta.get("qa_pair_ids") or []
    qids = list(qids) if isinstance(qids, (list, tuple)) and len(qids) == len(questions) else []
    chunks = chunk_text(row["context"], chunk_tokens, count_tokens)
    sessions = tuple(Session(f"{cid}_c{n}", None, None, (Message("document", "user", text, f"{cid}_c{n}:0"),))
                     for n, text in enumerate(chunks))
    metric = mab_metric(src)
    qs, bqs = [], []
    for j, (q, a) in enumerate(zip(questions, answers)):
        aliases = [a] if isinstance(a, str) else list(a) if isinstance(a, (list, tuple)) else None
        if not isinstance(q, str) or not q.strip() or not aliases or not all(isinstance(x, str) for x in aliases):
            raise _fail(where, f"question {j} must be a non-empty string with a string or a list of string answers")
        qid = str(qids[j]) if qids else f"{cid}_q{j}"
        qs.append(Question(qid, q, aliases[0], src, (), None, False, evidence_sessions=tuple(s.session_id for s in sessions)))
        bqs.append(BenchQuestion(qid, tuple(aliases), metric))
    conv = Conversation(cid, ("document",), sessions, tuple(qs), dataset="memoryagentbench")
    return BenchItem(conv, tuple(bqs), src)


def load_memoryagentbench(path: str | os.PathLike, **options) -> list[Conversation]:
    return [item.conversation for item in load_memoryagentbench_items(path, **options)]


# --- MemoryBench ----------------------------------------------------------------------------------


def mb_metric(config: str) -> str:
    """MemoryBench's metric per dataset: LoCoMo token F1, DialSim accuracy (exact match), LexEval
    ROUGE-L; the rest are judged by an LLM or a critic model (not offline)."""
    if config.startswith("Locomo"):
        return "f1"
    if config.startswith("DialSim"):
        return "exact_match"
    if config.startswith("LexEval"):
        return "rouge_l"
    return LLM_JUDGED


def _mb_split(root: Path, config: str, split: str) -> Path:
    for pattern in (f"{config}/{split}.jsonl", f"{config}/{split}.json", f"{config}/{split}.parquet",
                    f"{config}-{split}.jsonl", f"{config}-{split}.json", f"{config}-{split}.parquet",
                    f"data/{config}/{split}-*.parquet", f"{config}/{split}-*.parquet"):
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"MemoryBench: no {split} split of {config} under {root}; {MB_HINT}, then pass the folder")


def _mb_corpus(root: Path, config: str) -> Path | None:
    for name in (config, config.split("-")[0]):
        p = root / "corpus" / f"{name}.jsonl"
        if p.exists():
            return p
    return None


def _mb_question(row: Any, config: str, where: str) -> tuple[Question, BenchQuestion]:
    if not isinstance(row, dict):
        raise _fail(where, "expected an object")
    info = _loose(row.get("info"), f"{where}.info")
    if not isinstance(info, dict) or "golden_answer" not in info:
        raise _fail(where, "'info' must be an object with 'golden_answer'")
    gold = info["golden_answer"]
    gold = gold if isinstance(gold, str) else json.dumps(gold, ensure_ascii=False)
    text = row.get("input_prompt")
    if not isinstance(text, str) or not text.strip():
        msgs = _loose(row.get("input_chat_messages"), f"{where}.input_chat_messages")
        users = [m.get("content") for m in msgs or [] if isinstance(m, dict) and m.get("role") == "user"]
        text = users[-1] if users and isinstance(users[-1], str) else None
    if not text:
        raise _fail(where, "needs 'input_prompt' or 'input_chat_messages' with a user message")
    idx = row.get("test_idx")
    if not isinstance(idx, int) or isinstance(idx, bool):
        raise _fail(where, "'test_idx' must be an integer")
    qid = f"{config}_{idx}"
    category = str(info.get("category", config))
    q = Question(qid, text, gold, category, (), None, category == "5" and config.startswith("Locomo"))
    return q, BenchQuestion(qid, (gold,), mb_metric(config))


def _dialog_session(row: dict, n: int, config: str, where: str) -> Session | None:
    dialog = _loose(row.get("dialog"), f"{where}.dialog") or []
    if not isinstance(dialog, list):
        raise _fail(where, "'dialog' must be a list of messages")
    msgs = []
    for k, m in enumerate(dialog):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise _fail(f"{where}.dialog[{k}]", "expected {role, content}")
        role = "assistant" if m.get("role") == "assistant" else "user"
        msgs.append(Message(role, role, m["content"], f"{config}_train{n}:{k}"))
    return Session(f"{config}_train{n}", None, None, tuple(msgs)) if msgs else None


def load_memorybench_items(path: str | os.PathLike, config: str, *, split: str = "test") -> list[BenchItem]:
    """One MemoryBench config as one `BenchItem` (module doc)."""
    from membuilder.datasets import _locomo_sample  # the one LoCoMo parser

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"MemoryBench: {root} is not a folder; {MB_HINT}, then pass the folder")
    rows = _read_rows(_mb_split(root, config, split))
    pairs = [_mb_question(r, config, f"{config}/{split} row {i}") for i, r in enumerate(rows)]
    corpus = _mb_corpus(root, config)
    if config.startswith("Locomo"):
        if corpus is None:
            raise FileNotFoundError(f"MemoryBench: {config} needs corpus/{config}.jsonl under {root}; {MB_HINT}")
        crow = _read_rows(corpus)
        if len(crow) != 1 or not isinstance(crow[0], dict) or not isinstance(crow[0].get("text"), str):
            raise _fail(str(corpus), "expected one row {\"text\": <the LoCoMo sample as JSON>}")
        conv = _locomo_sample(_loose(crow[0]["text"], f"{corpus.name} text"), 0, corpus.name)
        sessions, speakers, annotations = conv.sessions, conv.speakers, conv.annotations
    else:
        annotations = ()
        if corpus is not None:
            texts = [r.get("text") if isinstance(r, dict) else None for r in _read_rows(corpus)]
            if not all(isinstance(t, str) for t in texts):
                raise _fail(str(corpus), "every row must be {\"text\": string}")
            sessions = tuple(Session(f"{config}_doc{n}", None, None, (Message("document", "user", t, f"{config}_doc{n}:0"),))
                             for n, t in enumerate(texts))
            speakers = ("document",)
        else:
            train = _read_rows(_mb_split(root, config, "train"))
            sessions = tuple(s for n, r in enumerate(train)
                             if (s := _dialog_session(r, n, config, f"{config}/train row {n}")) is not None)
            speakers = ("user", "assistant")
    every = tuple(s.session_id for s in sessions)  # the benchmark gives no evidence: asked after all of them
    conv = Conversation(config, tuple(speakers), tuple(sessions),
                        tuple(replace(q, evidence_sessions=every) for q, _ in pairs),
                        annotations=annotations, dataset="memorybench")
    return [BenchItem(conv, tuple(b for _, b in pairs), config)]


def load_memorybench(path: str | os.PathLike, config: str | None = None, **options) -> list[Conversation]:
    if not config:
        raise ValueError("memorybench needs a config name (e.g. Locomo-0, DialSim-friends, LexEval-QA)")
    return [item.conversation for item in load_memorybench_items(path, config, **options)]


def score_item(item: BenchItem, answers: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per metric, the mean over the item's answered questions: its own metric plus token F1
    (LLM-judged subsets get f1 and rouge_l only). `answers`: question id -> prediction."""
    from membuilder.metrics_text import score

    sums: dict[str, list[float]] = {}
    for q in item.questions:
        if q.question_id not in answers:
            continue
        metrics = ["f1", "rouge_l"] if q.metric == LLM_JUDGED else [q.metric, "f1"]
        for m in dict.fromkeys(metrics):
            value = score(m, answers[q.question_id], list(q.aliases))
            sums.setdefault(m, []).append(value)
    return {m: {"mean": sum(v) / len(v), "n": len(v)} for m, v in sums.items()}


__all__: Sequence[str] = (
    "BenchItem", "BenchQuestion", "chunk_text", "default_count_tokens", "load_memoryagentbench",
    "load_memoryagentbench_items", "load_memorybench", "load_memorybench_items", "mab_metric", "mb_metric",
    "score_item",
)
