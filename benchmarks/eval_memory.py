"""Accuracy benchmark runner: build memory for a dataset's conversations, answer the questions
from it, judge the answers, and summarise accuracy per category.

    python -m benchmarks.eval_memory --dataset locomo --builder annotation \\
        --answerer extractive --judge rule --embedder hashing --out runs/locomo-annotation
    python -m benchmarks.eval_memory --dataset world --builder world \\
        --answerer extractive --judge rule --embedder hashing --out runs/world
    python -m benchmarks.eval_memory --dataset longmemeval --data longmemeval_s.json \\
        --builder gpt-4.1-mini --answerer gpt-4.1-mini --judge gpt-4.1 --concurrency 8 --out runs/lme
    ... --mode build            build (and save) the banks only
    ... --mode answer           answer from banks saved by an earlier --mode build in the same --out
    ... --resume                continue an interrupted run: done questions are skipped

Builders: `annotation` (offline, LoCoMo's observation / event_summary annotations through the
four-agent MemoryBuilder), `world` (offline, the exact expert of the generated world: only with
`--dataset world`), `rag` (raw-turn chunks, top-5), `full-context` (the whole history when
it fits the character budget; otherwise the question is recorded as skipped), or any other value:
a chat model name for the four LLM agents. Answerer: `extractive` or a model name; judge: `rule`
or a model name. Models are reached through `membuilder.llm.LLMClient` (`--base-url`, key from
MEMBUILDER_LLM_API_KEY / OPENAI_API_KEY), with an on-disk response cache in the output folder;
the runner loads no model itself (serve a local one, e.g. with the rollout server, and point
`--base-url` at it). `--builder-max-tokens` / `--answerer-max-tokens` / `--judge-max-tokens` set
each role's completion budget (an agent answer cut at its budget is recorded as that agent's
error). `--structured-output` sends each agent's JSON schema as `response_format` (json_schema) so
a server with guided decoding (`vllm serve`) emits only well-formed answers: for evaluating and
serving a model, off by default (RL sampling never uses it: there, validity is what is learned).
While a conversation is built, a second bar moves once per agent call (sessions x 4 agents).

Files under --out:
  config.json              the settings; banks and results are reused only under the same ones
  banks/<conv>.sqlite      one SQLite bank per conversation (owner = conversation id), built as
                           <conv>.sqlite.partial and renamed when complete (a crash never leaves a
                           half-built bank that looks finished); banks/<conv>.build.jsonl: per
                           session, the operations, rejections and errors of each agent
  results.jsonl            one line per question, appended and flushed as soon as it is judged;
                           when a run completes, re-written in dataset order, so a resumed run
                           gives the same file as an uninterrupted one (`elapsed_s` aside)
  runs.jsonl               one line per invocation: mode, wall time, token usage per role
  accuracy.png             the same accuracies as bars (benchmarks.plot_accuracy compares runs)
  summary.json, summary.md overall and per-category accuracy; LoCoMo's category 5 (adversarial)
                           and LongMemEval's abstention questions are reported apart from the
                           overall score; judge and answer errors are counted apart, never as wrong

With `--sessions N` only the first N sessions of each conversation are used, and only questions
whose evidence lies entirely in them are asked. Retrieval recall is the share of answerable
questions whose normalised gold answer occurs in the context given to the answerer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from hashlib import blake2b
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from membuilder.answering import (
    DEFAULT_TOP_K,
    AnswerContext,
    ExtractiveAnswerer,
    LLMAnswerer,
    answer_with_context,
    build_answer_context,
)
from membuilder.api import make_embedder
from membuilder.bank import MemoryBank
from membuilder.datasets import (
    DATASET_NAMES,
    LOCOMO_MAIN_CATEGORIES,
    Conversation,
    Question,
    load_dataset,
    load_longmemeval,
    load_locomo,
    load_perltqa,
)
from membuilder.judging import LLMJudge, RuleJudge, Verdict, context_contains_answer
from membuilder.llm import LLMClient, LLMConfig
from membuilder.rag import (
    DEFAULT_FULL_CONTEXT_CHARS,
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_TURNS,
    RAG_TOP_K,
    ContextTooLong,
    full_context,
    index_turns,
    rag_context,
)
from membuilder.store import SQLiteStore

OFFLINE_BUILDERS = ("annotation", "world", "rag", "full-context")
BUILD_KEYS = ("dataset", "data", "builder", "embedder", "sessions", "chunk_turns", "chunk_chars", "world_seed",
              "world_sessions", "builder_max_tokens", "structured_output", "architecture", "state_limit",
              "dataset_options")
ANSWER_KEYS = ("answerer", "judge", "top_k", "full_context_chars", "full_context_policy", "answerer_max_tokens",
               "judge_max_tokens")
# Completion budgets of the model roles (the library's defaults); a small model that loops in its
# JSON is better cut early (the cut answer is an agent error, recorded, never parsed).
DEFAULT_MAX_TOKENS = {"builder": 2048, "answerer": 256, "judge": 256}
TIMING_FIELDS = ("elapsed_s",)
ERROR_STATUSES = ("answer_error", "judge_error")


class RunError(RuntimeError):
    """The run cannot start or continue as asked (the message says what to change)."""


# --- arguments --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_memory", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True,
                   choices=sorted({"locomo", "longmemeval", "perltqa", *DATASET_NAMES}),
                   help="'longmemeval' reads --data (any LongMemEval variant), else longmemeval_s")
    p.add_argument("--data", help="dataset file or folder (default: the shared data folder)")
    p.add_argument("--builder", required=True, help="annotation | world | rag | full-context | MODEL")
    p.add_argument("--answerer", default="extractive", help="extractive | MODEL")
    p.add_argument("--judge", default="rule", help="rule | MODEL")
    p.add_argument("--mode", choices=("build", "answer", "full"), default="full")
    p.add_argument("--conversations", type=int, help="use the first N conversations")
    p.add_argument("--sessions", type=int, help="use the first N sessions of each conversation")
    p.add_argument("--questions", type=int, help="ask the first N eligible questions of each conversation")
    p.add_argument("--top-k", type=int, help=f"entries retrieved per question (default {DEFAULT_TOP_K}; "
                                            f"rag: {RAG_TOP_K} chunks)")
    p.add_argument("--concurrency", type=int, default=1, help="conversations built / questions answered at once")
    p.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished work")
    p.add_argument("--retry-errors", action="store_true", help="with --resume: redo questions that ended in an error")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint for model builders/answerers/judges")
    p.add_argument("--embedder", choices=("hashing", "minilm", "none"), default="minilm",
                   help="bank embeddings: local all-MiniLM-L6-v2, deterministic hashing, or none (BM25 only)")
    p.add_argument("--chunk-turns", type=int, default=DEFAULT_MAX_TURNS, help="rag: turns per chunk")
    p.add_argument("--chunk-chars", type=int, default=DEFAULT_MAX_CHARS, help="rag: characters per chunk")
    p.add_argument("--full-context-chars", type=int, default=DEFAULT_FULL_CONTEXT_CHARS,
                   help="full-context: character budget of the whole history")
    p.add_argument("--full-context-policy", choices=("skip", "truncate"), default="skip",
                   help="full-context: what to do when the history does not fit")
    p.add_argument("--world-seed", type=int, default=0, help="world: the generator's seed")
    p.add_argument("--world-sessions", type=int, default=None,
                   help="world: sessions generated per conversation (default membuilder.world.DEFAULT_SESSIONS)")
    p.add_argument("--no-llm-cache", action="store_true", help="do not cache model responses on disk")
    p.add_argument("--save-trajectories", action="store_true",
                   help="model/annotation builders: also save each agent's prompt, raw output and operations")
    for role, default in DEFAULT_MAX_TOKENS.items():
        p.add_argument(f"--{role}-max-tokens", type=int, default=default,
                       help=f"model {role}: completion token budget per call (default {default})")
    p.add_argument("--structured-output", action="store_true",
                   help="model builder: send each agent's JSON schema as response_format (json_schema), so a "
                        "server with guided decoding (vllm serve) emits only answers of that shape; off by default")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the summary is still printed)")
    p.add_argument("--architecture", choices=("membuilder", "longshort"), default="membuilder",
                   help="membuilder: the four agents; longshort: fact splitter -> long-term CRUD agent + "
                        "short-term state -> answer agent (membuilder.longshort; builders world, annotation, MODEL)")
    p.add_argument("--state-limit", type=int, default=None,
                   help="longshort: characters of the short-term state (default membuilder.longshort.DEFAULT_STATE_LIMIT)")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="memoryagentbench: split= source= chunk_tokens=; memorybench: config= split= (repeatable)")
    args = p.parse_args(argv)
    for name in ("conversations", "sessions", "questions", "top_k", "concurrency", "chunk_turns",
                 "chunk_chars", "full_context_chars", "builder_max_tokens", "answerer_max_tokens",
                 "judge_max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.top_k is None:
        args.top_k = RAG_TOP_K if args.builder == "rag" else DEFAULT_TOP_K
    if args.data is not None:
        args.data = str(Path(args.data).resolve())
    if args.retry_errors and not args.resume:
        p.error("--retry-errors needs --resume")
    if args.dataset == "world":
        from membuilder.world import DEFAULT_CONVERSATIONS, DEFAULT_SESSIONS

        if args.data is not None:
            p.error("--dataset world is generated: use --world-seed / --world-sessions, not --data")
        if args.world_seed < 0 or (args.world_sessions is not None and args.world_sessions < 1):
            p.error("--world-seed must be >= 0 and --world-sessions >= 1")
        args.world_sessions = args.world_sessions or DEFAULT_SESSIONS
        args.world_conversations = args.conversations or DEFAULT_CONVERSATIONS
    else:
        args.world_seed = args.world_sessions = None
    if args.architecture == "longshort":
        if args.builder in ("rag", "full-context"):
            p.error("--architecture longshort builds with its own agents: --builder world, annotation or a model")
        if args.save_trajectories:
            p.error("--save-trajectories writes the four-agent record format; not with --architecture longshort")
        if args.state_limit is not None and args.state_limit < 1:
            p.error("--state-limit must be >= 1")
    else:
        args.state_limit = None
    options = {}
    for item in args.dataset_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--dataset-option takes KEY=VALUE, got {item!r}")
        options[key] = int(value) if value.isdigit() else value
    args.dataset_options = options or None
    if args.builder == "world" and args.dataset != "world":
        p.error("--builder world is the generated world's own expert: it needs --dataset world")
    return args


# --- data selection ---------------------------------------------------------------------------------


def load_conversations(dataset: str, data: str | None, options: dict | None = None) -> list[Conversation]:
    if dataset in ("memoryagentbench", "memorybench"):  # membuilder.memory_benchmarks; options pick the subset
        return load_dataset(dataset, data, **(options or {}))
    if data is not None:
        family = dataset_family(dataset)
        loader = {"locomo": load_locomo, "longmemeval": load_longmemeval, "perltqa": load_perltqa}[family]
        return loader(data)
    return load_dataset("longmemeval_s" if dataset == "longmemeval" else dataset)


def dataset_family(dataset: str) -> str:
    return "longmemeval" if dataset.startswith("longmemeval") else dataset


def select_questions(conv: Conversation, sessions: int | None, questions: int | None) -> list[Question]:
    """The questions asked of `conv`: with a session limit, only those whose evidence it covers."""
    if sessions is None:
        eligible = list(conv.questions)
    else:
        built = {s.session_id for s in conv.sessions[:sessions]}
        eligible = [q for q in conv.questions if q.evidence_sessions and set(q.evidence_sessions) <= built]
    return eligible[:questions] if questions is not None else eligible


def apart_label(q: Question) -> str | None:
    """Questions reported apart from the overall score (REFERENCE item 11)."""
    if q.is_adversarial:
        return "adversarial"
    if q.is_abstention:
        return "abstention"
    return None


def last_session_date(conv: Conversation, sessions: int | None):
    used = conv.sessions[:sessions] if sessions is not None else conv.sessions
    dates = [s.date for s in used if s.date is not None]
    return max(dates) if dates else None


def bank_file(bank_dir: Path, conversation_id: str) -> Path:
    """A file name for any conversation id (PerLTQA ids are names); a hash keeps altered ids unique."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", conversation_id)
    if safe != conversation_id:
        safe += "-" + blake2b(conversation_id.encode(), digest_size=4).hexdigest()
    return bank_dir / f"{safe}.sqlite"


# --- run configuration ------------------------------------------------------------------------------


def check_config(args: argparse.Namespace, out: Path, answering: bool) -> None:
    """Refuse to mix banks or results made under other settings; then record ours."""
    path = out / "config.json"
    ours = {k: getattr(args, k) for k in BUILD_KEYS + ANSWER_KEYS}
    if args.builder != "rag":
        ours["chunk_turns"] = ours["chunk_chars"] = None
    if args.builder != "full-context":
        ours["full_context_chars"] = ours["full_context_policy"] = None
    if args.builder in OFFLINE_BUILDERS:  # no model: its settings change nothing
        ours["builder_max_tokens"] = ours["structured_output"] = None
    if args.answerer == "extractive":
        ours["answerer_max_tokens"] = None
    if args.judge == "rule":
        ours["judge_max_tokens"] = None
    saved = json.loads(path.read_text()) if path.exists() else {}
    results_exist = (out / "results.jsonl").exists() and (out / "results.jsonl").stat().st_size > 0
    keys = BUILD_KEYS + (ANSWER_KEYS if answering and results_exist and saved.get("answerer") else ())
    for key in keys:
        if key in saved and saved[key] != ours[key]:
            raise RunError(f"{out} was made with {key}={saved[key]!r}, this run asks for {ours[key]!r}; "
                           "use another --out")
    if not answering:
        for key in ANSWER_KEYS:
            ours[key] = saved.get(key)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ours, indent=2) + "\n")


# --- building ---------------------------------------------------------------------------------------


def make_builder(args: argparse.Namespace, client: LLMClient | None, world=None):
    """The MemoryBuilder for `annotation`, `world` or a model name (imported here: rag needs no agents)."""
    from membuilder.agents import AnnotationExpert, LLMAgentBackend, MemoryBuilder

    if args.architecture == "longshort":
        from membuilder import longshort as ls

        if args.builder == "world":
            role_backend = ls.WorldLongShortExpert(world)
        elif args.builder == "annotation":
            role_backend = ls.AnnotationLongShortExpert()
        else:
            role_backend = ls.LLMRoleBackend(client, model=args.builder, max_tokens=args.builder_max_tokens,
                                             constrained=args.structured_output)
        return ls.LongShortBuilder(role_backend, state_limit=args.state_limit or ls.DEFAULT_STATE_LIMIT)
    if args.builder == "world":
        from membuilder.world import WorldExpert

        backend = WorldExpert(world)
    elif args.builder == "annotation":
        backend = AnnotationExpert()
    else:
        backend = LLMAgentBackend(client, model=args.builder, max_tokens=args.builder_max_tokens,
                                  constrained=args.structured_output)
    # the state before each session is only needed for training data, i.e. for saved trajectories
    return MemoryBuilder(backend, snapshots=args.save_trajectories)


def build_banks(args: argparse.Namespace, convs: list[Conversation], out: Path, embedder,
                client: LLMClient | None, progress: bool, world=None) -> int:
    """Build and save one bank per conversation; returns how many were built in this call."""
    if args.builder == "full-context":
        return 0
    bank_dir = out / "banks"
    bank_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for conv in convs:
        path = bank_file(bank_dir, conv.conversation_id)
        if path.exists():
            if not args.resume:
                raise RunError(f"{path} already exists: pass --resume to reuse the saved banks, or use another --out")
            continue
        todo.append(conv)
    builder = None if args.builder == "rag" else make_builder(args, client, world)

    def one(conv: Conversation) -> None:
        build_one(args, conv, bank_file(bank_dir, conv.conversation_id), embedder, builder, progress)

    bar = tqdm(total=len(todo), desc="build", unit="conv", disable=not progress)
    if args.concurrency == 1:
        for conv in todo:
            one(conv)
            bar.update()
    else:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            for future in [pool.submit(one, c) for c in todo]:
                future.result()
                bar.update()
    bar.close()
    return len(todo)


def agent_progress(conv: Conversation, sessions: int | None, enabled: bool, agents_per_session: int = 4):
    """A bar over one conversation's agent calls (sessions x agents), and the builder hook that moves it."""
    n = len(conv.sessions[:sessions] if sessions is not None else conv.sessions)
    bar = tqdm(total=n * agents_per_session, desc=f"  {conv.conversation_id}", unit="agent", leave=False,
               disable=not enabled)
    failed = 0

    def on_agent(index: int, agent, error: str | None) -> None:
        nonlocal failed
        failed += error is not None
        name = getattr(agent, "value", agent)  # a MemoryKind, or a long/short role name
        bar.set_postfix_str(f"session {index + 1}/{n}, {name} done, {failed} agent errors", refresh=False)
        bar.update()

    return bar, on_agent


def agents_per_session(args) -> int:
    """Agent calls per session of the builder `args` ask for (compression steps aside)."""
    if getattr(args, "architecture", "membuilder") == "longshort":
        from membuilder.longshort.schema import ROLES

        return len(ROLES)
    from membuilder.agents.prompts import AGENT_KINDS

    return len(AGENT_KINDS)


def build_one(args, conv: Conversation, path: Path, embedder, builder, progress: bool = False) -> None:
    partial = path.with_name(path.name + ".partial")
    for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)
    log_lines: list[dict] = []
    trajectories: list = []  # SessionRecords
    store = SQLiteStore(partial)
    try:
        bank = MemoryBank(store, conv.conversation_id, embedder=embedder)
        if builder is None:
            chunks = index_turns(bank, conv, max_sessions=args.sessions, max_turns=args.chunk_turns,
                                 max_chars=args.chunk_chars)
            log_lines.append({"conversation_id": conv.conversation_id, "chunks": chunks})
        else:
            bar, on_agent = agent_progress(conv, args.sessions, progress, agents_per_session(args))
            try:
                for record in builder.build(bank, conv, max_sessions=args.sessions, on_agent=on_agent):
                    log_lines.append(session_log(record))
                    if args.save_trajectories:
                        trajectories.append(record)
            finally:
                bar.close()
        log_lines.append({"conversation_id": conv.conversation_id, "active_entries": len(bank),
                          "core_chars": len(bank.core)})
    finally:
        store.close()
    write_jsonl(path.with_suffix(".build.jsonl"), log_lines)
    if args.save_trajectories and trajectories:
        # the one trajectory format (membuilder.agents.records), written whole then renamed
        from membuilder.agents.records import write_records
        final = path.with_suffix(".trajectories.jsonl")
        tmp = final.with_name(final.name + ".tmp")
        tmp.unlink(missing_ok=True)
        write_records(tmp, trajectories)
        os.replace(tmp, final)
    os.replace(partial, path)


def session_log(record) -> dict:
    return {
        "session_id": record.session_id,
        "created": len(record.result.created), "updated": len(record.result.updated),
        "retired": len(record.result.retired), "core_changed": record.result.core_changed,
        "agents": {kind.value: {"operations": [op["action"] if isinstance(op, dict) else op.action  # longshort: dicts
                                               for op in rec.operations],
                                "rejected": list(rec.rejected), "error": rec.error}
                   for kind, rec in record.agents.items()},
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --- answering --------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    """Parsed result lines; a last line cut short by a crash is removed from the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete_end = raw.rfind(b"\n") + 1
    if complete_end < len(raw):  # a partial last line: the write it belongs to never finished
        with open(path, "r+b") as fh:
            fh.truncate(complete_end)
    rows = []
    for n, line in enumerate(raw[:complete_end].decode("utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RunError(f"{path}: line {n} is not JSON ({exc.msg}); the results file is damaged") from None
    return rows


def make_line(q: Question, conv_id: str, ctx: AnswerContext | None, answer: str | None,
              verdict: Verdict | None, status: str, error: str | None, elapsed: float) -> dict:
    recall = None
    if ctx is not None and not q.is_abstention:
        recall = context_contains_answer(ctx.text, q.answer)
    return {
        "question_id": q.question_id, "conversation_id": conv_id, "category": q.category,
        "apart": apart_label(q), "question": q.question, "gold": q.answer, "answer": answer,
        "status": status, "correct": verdict.correct if verdict is not None else None,
        "judge_reason": verdict.reason if verdict is not None else None, "error": error,
        "context_ids": [h.entry.id for h in ctx.hits] if ctx else [],
        "context_kinds": [ctx.hit_label or h.entry.kind.value for h in ctx.hits] if ctx else [],
        "recall": recall, "current_date": ctx.question_date if ctx else None,
        "date_inferred": ctx.date_is_inferred if ctx else False,
        "elapsed_s": round(elapsed, 4),
    }


def evaluate(q: Question, conv_id: str, ctx: AnswerContext, answerer, judge) -> dict:
    start = time.perf_counter()
    record = answer_with_context(q, ctx, answerer)
    if record.error is not None:
        return make_line(q, conv_id, ctx, None, None, "answer_error", record.error, time.perf_counter() - start)
    verdict = judge.judge(q, record.answer)
    status = "ok" if verdict.error is None else "judge_error"
    return make_line(q, conv_id, ctx, record.answer, verdict, status, verdict.error, time.perf_counter() - start)


@dataclass
class _Task:
    question: Question
    conversation_id: str
    context: AnswerContext | None
    ready: dict | None = None  # a line decided without answering (skipped)


def contexts(args, plan: list[tuple[Conversation, list[Question]]], out: Path, embedder) -> Iterator[_Task]:
    """Answer contexts, one conversation (and bank) at a time, in dataset order."""
    for conv, questions in plan:
        when = last_session_date(conv, args.sessions)
        if args.builder == "full-context":
            for q in questions:
                try:
                    ctx = full_context(conv, q, max_chars=args.full_context_chars, max_sessions=args.sessions,
                                       policy=args.full_context_policy, current_date=when)
                except ContextTooLong as exc:
                    yield _Task(q, conv.conversation_id, None,
                                make_line(q, conv.conversation_id, None, None, None, "skipped", str(exc), 0.0))
                    continue
                yield _Task(q, conv.conversation_id, ctx)
            continue
        path = bank_file(out / "banks", conv.conversation_id)
        if not path.exists():
            raise RunError(f"no bank for {conv.conversation_id} at {path}: run --mode build (or full) first")
        store = SQLiteStore(path)
        try:
            bank = MemoryBank(store, conv.conversation_id, embedder=embedder)
            for q in questions:
                if args.builder == "rag":
                    ctx = rag_context(bank, q, k=args.top_k, current_date=when)
                else:
                    ctx = build_answer_context(bank, q, k=args.top_k, current_date=when)
                yield _Task(q, conv.conversation_id, ctx)
        finally:
            store.close()


def answer_all(args, convs: list[Conversation], out: Path, embedder, answerer, judge, progress: bool,
               on_record: Callable[[dict], None] | None) -> int:
    """Answer and judge every pending question, appending one flushed line each; returns the count."""
    path = out / "results.jsonl"
    rows = read_results(path)
    if rows and not args.resume:
        raise RunError(f"{path} already holds {len(rows)} results: pass --resume to continue, or use another --out")
    if args.retry_errors:
        kept = [r for r in rows if r["status"] not in ERROR_STATUSES]
        if len(kept) != len(rows):
            write_jsonl(path, kept)
        rows = kept
    done = {r["question_id"] for r in rows}
    plan = []
    for conv in convs:
        pending = [q for q in select_questions(conv, args.sessions, args.questions) if q.question_id not in done]
        if pending:
            plan.append((conv, pending))
    total = sum(len(qs) for _, qs in plan)
    bar = tqdm(total=total, desc="answer", unit="q", disable=not progress)
    written = 0
    with open(path, "a", encoding="utf-8") as fh:
        def write(line: dict) -> None:
            nonlocal written
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            fh.flush()
            written += 1
            bar.update()
            if on_record is not None:
                on_record(line)

        tasks = contexts(args, plan, out, embedder)
        if args.concurrency == 1:
            for task in tasks:
                write(task.ready or evaluate(task.question, task.conversation_id, task.context, answerer, judge))
        else:
            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                in_flight = set()
                for task in tasks:
                    if task.ready is not None:
                        write(task.ready)
                        continue
                    in_flight.add(pool.submit(evaluate, task.question, task.conversation_id, task.context,
                                              answerer, judge))
                    if len(in_flight) >= 2 * args.concurrency:
                        finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                        for future in finished:
                            write(future.result())
                for future in wait(in_flight).done:
                    write(future.result())
    bar.close()
    return written


def canonicalise_results(path: Path, convs: list[Conversation]) -> None:
    """Re-write the results in dataset order (lines of questions unknown here go last, as they were)."""
    rows = read_results(path)
    order = {q.question_id: i for i, q in enumerate(q for c in convs for q in c.questions)}
    ids = [r["question_id"] for r in rows]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise RunError(f"{path}: questions answered twice: {dupes[:5]}")
    rows.sort(key=lambda r: (0, order[r["question_id"]]) if r["question_id"] in order else (1, 0))
    write_jsonl(path, rows)


# --- summary ----------------------------------------------------------------------------------------


def group_stats(rows: list[dict]) -> dict:
    judged = [r for r in rows if r["correct"] is not None]
    correct = sum(1 for r in judged if r["correct"])
    recall_rows = [r for r in rows if r["recall"] is not None]
    return {
        "questions": len(rows), "judged": len(judged), "correct": correct,
        "accuracy": correct / len(judged) if judged else None,
        "judge_errors": sum(r["status"] == "judge_error" for r in rows),
        "answer_errors": sum(r["status"] == "answer_error" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "recall": sum(bool(r["recall"]) for r in recall_rows) / len(recall_rows) if recall_rows else None,
        "recall_questions": len(recall_rows),
    }


def summarise(rows: list[dict], family: str) -> dict:
    main = [r for r in rows if r["apart"] is None]
    cats = sorted({r["category"] for r in main},
                  key=lambda c: (LOCOMO_MAIN_CATEGORIES.index(c), c) if c in LOCOMO_MAIN_CATEGORIES else (9, c))
    apart = sorted({r["apart"] for r in rows if r["apart"] is not None})
    overall_name = "categories 1-4" if family == "locomo" else "answerable questions"
    return {
        "overall_covers": overall_name,
        "overall": group_stats(main),
        "categories": {c: group_stats([r for r in main if r["category"] == c]) for c in cats},
        "apart": {a: group_stats([r for r in rows if r["apart"] == a]) for a in apart},
        "all": group_stats(rows),
    }


def subset_metrics(dataset: str, data: str | None, options: dict | None, rows: list[dict]) -> dict | None:
    """MemoryAgentBench / MemoryBench: each question's own metric (substring EM, EM, Recall@5, F1,
    ROUGE-L as its subset defines, `memory_benchmarks.score_item`) plus token F1, pooled over the
    answered questions as {metric: {"mean", "n"}}; None for the other datasets."""
    if dataset not in ("memoryagentbench", "memorybench"):
        return None
    from membuilder.memory_benchmarks import load_memoryagentbench_items, load_memorybench_items, score_item

    load = load_memoryagentbench_items if dataset == "memoryagentbench" else load_memorybench_items
    answers = {r["question_id"]: r["answer"] for r in rows if r["answer"] is not None}
    pooled: dict[str, list[float]] = {}
    for item in load(data, **(options or {})):
        for metric, st in score_item(item, answers).items():
            acc = pooled.setdefault(metric, [0.0, 0])
            acc[0] += st["mean"] * st["n"]
            acc[1] += st["n"]
    return {m: {"mean": total / n, "n": n} for m, (total, n) in sorted(pooled.items())}


def build_summary(out: Path) -> dict:
    totals = {"banks": 0, "sessions": 0, "agent_errors": 0, "rejected_operations": 0, "active_entries": 0}
    for log in sorted((out / "banks").glob("*.build.jsonl")) if (out / "banks").exists() else []:
        if not Path(str(log)[: -len(".build.jsonl")] + ".sqlite").exists():
            continue
        totals["banks"] += 1
        for line in read_results(log):
            if "agents" in line:
                totals["sessions"] += 1
                totals["agent_errors"] += sum(a["error"] is not None for a in line["agents"].values())
                totals["rejected_operations"] += sum(len(a["rejected"]) for a in line["agents"].values())
            totals["active_entries"] += line.get("active_entries", 0)
    return totals


def usage_totals(runs: list[dict]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for run in runs:
        for role, usage in run["usage"].items():
            acc = out.setdefault(role, {})
            for key, value in usage.items():
                acc[key] = acc.get(key, 0) + value
    return out


def fmt(value, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" if pct else str(value)


def render_markdown(summary: dict) -> str:
    s = summary
    head = (f"# eval_memory: {s['dataset']}, builder `{s['builder']}`, answerer `{s['answerer']}`, "
            f"judge `{s['judge']}`, embedder `{s['embedder']}`, top-k {s['top_k']}\n\n")
    table = ["| group | questions | judged | correct | accuracy % | judge errors | answer errors | skipped "
             "| retrieval recall % |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, st: dict) -> str:
        recall = fmt(st["recall"], True)
        if st["recall"] is not None and st["recall_questions"] != st["questions"]:
            recall += f" (of {st['recall_questions']})"  # abstention questions have no gold text to find
        return (f"| {name} | {st['questions']} | {st['judged']} | {st['correct']} | {fmt(st['accuracy'], True)} "
                f"| {st['judge_errors']} | {st['answer_errors']} | {st['skipped']} | {recall} |")

    table.append(row(f"**overall ({s['overall_covers']})**", s["overall"]))
    table += [row(c, st) for c, st in s["categories"].items()]
    table += [row(f"{a} (apart)", st) for a, st in s["apart"].items()]
    table.append(row("all questions", s["all"]))
    tokens = "\n".join(f"- {role}: {u.get('prompt_tokens', 0)} prompt + {u.get('completion_tokens', 0)} "
                       f"completion tokens, {u.get('calls', 0)} calls ({u.get('cache_hits', 0)} cached)"
                       for role, u in s["tokens"].items()) or "- none (no model was called)"
    b = s["build"]
    if s.get("subset_metrics"):
        table += ["", "| subset metric | answered questions | mean % |", "|---|---|---|"]
        table += [f"| {m} | {st['n']} | {100 * st['mean']:.2f} |" for m, st in s["subset_metrics"].items()]
    return (head + "\n".join(table) + "\n\nAccuracy = correct / judged; errors are counted apart, not as wrong. "
            "Retrieval recall = share of answerable questions whose normalised gold answer occurs in the "
            "retrieved context.\n\n"
            f"Banks: {b['banks']} ({b['sessions']} agent sessions, {b['agent_errors']} agent errors, "
            f"{b['rejected_operations']} rejected operations, {b['active_entries']} active entries).\n\n"
            f"Tokens:\n{tokens}\n\nWall time: {s['wall_s']['total']:.1f} s over {s['runs']} invocation(s) "
            f"(this one {s['wall_s']['this_run']:.1f} s).\n")


def write_summary(args, out: Path, wall_this_run: float) -> dict:
    rows = read_results(out / "results.jsonl")
    runs = read_results(out / "runs.jsonl")
    summary = {
        "dataset": args.dataset, "data": args.data, "builder": args.builder, "answerer": args.answerer,
        "architecture": args.architecture,
        "judge": args.judge, "embedder": args.embedder, "top_k": args.top_k, "sessions": args.sessions,
        **summarise(rows, dataset_family(args.dataset)),
        "subset_metrics": subset_metrics(args.dataset, args.data, args.dataset_options, rows),
        "build": build_summary(out), "tokens": usage_totals(runs),
        "wall_s": {"this_run": wall_this_run, "total": sum(r["wall_s"] for r in runs)}, "runs": len(runs),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render_markdown(summary))
    if summary["all"]["judged"]:
        from benchmarks.plot_accuracy import plot_accuracy

        plot_accuracy([summary], out / "accuracy.png")
    return summary


# --- main -------------------------------------------------------------------------------------------


def make_client(args, out: Path) -> LLMClient:
    cache = None if args.no_llm_cache else str(out / "llm_cache.sqlite")
    return LLMClient(LLMConfig.from_env(base_url=args.base_url, cache_path=cache,
                                        max_concurrency=max(8, args.concurrency)))


def run(argv: list[str] | None = None, *, on_record: Callable[[dict], None] | None = None) -> dict:
    """Run the benchmark; returns the summary. `on_record` sees every results line once written."""
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    world = None
    if args.dataset == "world":  # generated; conversation k is the same whatever the world's size
        from membuilder.world import generate_world

        world = generate_world(args.world_seed, conversations=args.world_conversations, sessions=args.world_sessions)
        convs = world.dataset()
    else:
        convs = load_conversations(args.dataset, args.data, args.dataset_options)
    selected = convs[: args.conversations] if args.conversations else convs
    answering = args.mode in ("answer", "full")
    check_config(args, out, answering)
    progress = not args.no_progress
    embedder = make_embedder(None if args.embedder == "none" else args.embedder)
    clients: dict[str, LLMClient] = {}
    if args.mode in ("build", "full") and args.builder not in OFFLINE_BUILDERS:
        clients["build"] = make_client(args, out)
    if answering and args.answerer != "extractive":
        clients["answer"] = make_client(args, out)
    if answering and args.judge != "rule":
        clients["judge"] = make_client(args, out)
    written = 0

    def record_hook(line: dict) -> None:
        nonlocal written
        written += 1
        if on_record is not None:
            on_record(line)

    try:
        if args.mode in ("build", "full"):
            build_banks(args, selected, out, embedder, clients.get("build"), progress, world)
        if answering:
            answerer = (ExtractiveAnswerer() if args.answerer == "extractive"
                        else LLMAnswerer(clients["answer"], model=args.answerer, max_tokens=args.answerer_max_tokens))
            if args.architecture == "longshort":  # the answer agent: state + long-term memories + query
                from membuilder.longshort import LongShortAnswerer, OfflineAnswerAgent

                answerer = (OfflineAnswerAgent() if args.answerer == "extractive" else
                            LongShortAnswerer(clients["answer"], model=args.answerer,
                                              max_tokens=args.answerer_max_tokens))
            judge = (RuleJudge() if args.judge == "rule"
                     else LLMJudge(clients["judge"], model=args.judge, max_tokens=args.judge_max_tokens))
            answer_all(args, selected, out, embedder, answerer, judge, progress, record_hook)
            canonicalise_results(out / "results.jsonl", convs)
    finally:
        wall = time.perf_counter() - started
        log = {"mode": args.mode, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "wall_s": round(wall, 3), "questions_written": written, "argv": argv if argv is not None else sys.argv[1:],
               "usage": {role: asdict(c.usage()) for role, c in clients.items()}}
        with open(out / "runs.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(log) + "\n")
        for client in clients.values():
            client.close()
    summary = write_summary(args, out, wall)
    # --no-progress hides the bars only: the summary and where it went are always printed
    print(render_markdown(summary))
    print(results_line(args, out))
    return summary


def results_line(args, out: Path) -> str:
    """The last line of a run: where its results went."""
    parts = []
    if args.mode in ("answer", "full"):
        parts.append(f"results in {out / 'results.jsonl'}")
    if args.mode in ("build", "full") and args.builder != "full-context":
        parts.append(f"banks in {out / 'banks'}")
    parts.append(f"summary in {out / 'summary.md'} and summary.json")
    if (out / "accuracy.png").exists():
        parts.append("plot in accuracy.png")
    return "eval_memory: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except RunError as exc:
        print(f"eval_memory: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
