"""Prepare training data: expert trajectories, session QA, the SFT set and the RL set.

    python trainers/prepare_data.py --dataset world|locomo|longmemeval \\
        --expert world|annotation|MODEL --out DIR [--conversations N] [--sessions N] \\
        [--tokenizer smollm2|tiny|PATH] [--qa world|evidence|MODEL] [--resume]

writes

    DIR/manifest.json                 settings, counts, what was skipped or masked and why
    DIR/snapshots/                    content-addressed bank states (`membuilder.snapshots`)
    DIR/trajectories/<conv>/          records.jsonl (one SessionRecord per session), qa.jsonl,
                                      done.json
    DIR/sft.jsonl                     (prompt messages, expert answer) pairs for trainers/sft.py
    DIR/rl.parquet                    one row per (session, agent) for trainers/adrpo.py
    DIR/conversations.jsonl           the RL conversations' sessions (as far as prepared) and the
                                      prompt settings, for the sparse ablation's on-policy rollouts
                                      (`trainers.data.conversations`)

Steps, in order (each a module of `trainers/data/`):
1. load the conversations; LongMemEval keeps only the ids of the splits file's `sft` and `rl`
   sides, minus any whose `_abs` twin is a test id (`rl_set.guard_longmemeval`);
2. run the memory builder with the expert over every selected session (`trajectories`): world
   (the generator's exact answers), annotation (LoCoMo's annotations) or any OpenAI-compatible
   MODEL (`--base-url` / OPENAI_BASE_URL; responses cached in DIR/llm_cache.sqlite);
3. 5 QA pairs per session (`session_qa`): exact from the world, from dataset evidence, or from an
   LLM generator; a session without QA is kept with an empty list (the reward masks it) and counted;
4. the SFT set (`sft_set`): the agents' own answers that pass the RL validity gate, shortened in
   the middle of the session (or skipped, `--overlong`) when longer than `--max-length` tokens;
5. the RL set (`rl_set`): four rows per session, expert lengths in `--tokenizer` tokens, split
   train / heldout by conversation. For LongMemEval, SFT pairs come from the `sft` side only and
   RL rows from the `rl` side only.

`--resume` continues an interrupted run in DIR: finished sessions are not redone (trajectories and
QA are appended per session), the sets and the manifest are rebuilt from what is on disk. The
settings that shape trajectories and QA must be the ones DIR was made with. Not safe to run twice
at once on one DIR.

From Python: `prepare(PrepareSettings(...))`, or `prepare_world(out_dir, ...)` for the bundled
world data that the trainer's default run uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Literal

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from membuilder.agents import AnnotationExpert, LLMAgentBackend, MemoryBuilder
from membuilder.agents.records import SessionRecord
from membuilder.api import make_embedder
from membuilder.datasets import (
    Conversation,
    default_data_dir,
    load_dataset,
    load_longmemeval,
    load_longmemeval_splits,
    longmemeval_base_id,
)
from membuilder.llm import LLMClient, LLMConfig
from membuilder.snapshots import SnapshotStore
from membuilder.world import DEFAULT_CONVERSATIONS as WORLD_CONVERSATIONS
from membuilder.world import DEFAULT_SESSIONS as WORLD_SESSIONS
from membuilder.world import WorldExpert, generate_world
from reward.types import QAPair
from trainers.data.conversations import FILENAME as CONVERSATIONS_FILE
from trainers.data.conversations import write_conversations
from trainers.data.policy_tokenizer import load_policy_tokenizer
from trainers.data.rl_rows import write_rl_rows
from trainers.data.rl_set import RLStats, assign_splits, guard_longmemeval, session_rows
from trainers.data.session_qa import (
    PER_SESSION,
    LLMQAGenerator,
    SessionQA,
    evidence_qa,
    make_session_qa,
    pick_mix,
)
from trainers.data.sft_set import SFTStats, expert_target, fit_pair, write_sft
from trainers.data.trajectories import (
    ConversationTrajectory,
    build_trajectories,
    write_json_atomic,
)
from trainers.sft_data import SFTPair

MANIFEST_FORMAT = "membuilder.prepared_data"
# Settings that shape what is stored per session: a resumed run must use the same values.
STORED_SETTINGS = ("dataset", "data", "expert", "qa", "embedder", "sessions", "keep_embeddings", "world_seed",
                   "world_sessions", "splits", "sft_side", "rl_side")


DATASETS = ("world", "locomo", "longmemeval", "longmemeval_s", "longmemeval_m", "longmemeval_oracle",
            "longmemeval_s_dev", "longmemeval_oracle_dev")
# `longmemeval` without --data: the development questions of LongMemEval_S in the shared data folder
DEFAULT_LONGMEMEVAL = "longmemeval_s_dev"


class PrepareError(RuntimeError):
    """The run cannot start or continue as asked (the message says what to change)."""


@dataclass(frozen=True)
class PrepareSettings:
    dataset: str  # one of DATASETS
    expert: str  # world | annotation | MODEL
    out: str
    data: str | None = None  # dataset file (default: the shared data folder)
    conversations: int | None = None  # the first N (after the LongMemEval guard)
    sessions: int | None = None  # the first N sessions of each conversation
    qa: str | None = None  # world | evidence | MODEL; None: world for the world, evidence otherwise
    tokenizer: str = "smollm2"
    max_length: int | None = 8192  # SFT pair limit in policy tokens (SmolLM2's context); None: no limit
    overlong: Literal["shorten", "skip"] = "shorten"
    # Chat-template options SFT will render with (its `data.chat_template_kwargs`), so that pair
    # lengths are counted as SFT sees them.
    chat_template_kwargs: dict | None = None
    heldout_fraction: float = 0.1
    seed: int = 0
    embedder: Literal["hashing", "minilm", "none"] = "hashing"
    keep_embeddings: bool = False
    skip_empty_qa: bool = False  # leave sessions without QA out of the RL set (default: kept, masked)
    base_url: str | None = None
    world_seed: int = 0
    # size of the generated world when --conversations / --sessions are not given: the bundled set
    world_conversations: int = WORLD_CONVERSATIONS
    world_sessions: int = WORLD_SESSIONS
    splits: str | None = None  # LongMemEval splits file (default: longmemeval/splits_dev.json)
    sft_side: str = "sft"
    rl_side: str = "rl"
    concurrency: int = 1  # conversations built (and their QA generated) at once
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise PrepareError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.expert == "world" and self.dataset != "world":
            raise PrepareError("--expert world works only with --dataset world")
        if self.qa == "world" and self.dataset != "world":
            raise PrepareError("--qa world works only with --dataset world")
        if self.concurrency < 1:
            raise PrepareError(f"--concurrency must be >= 1, got {self.concurrency}")
        for name in ("conversations", "sessions", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PrepareError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise PrepareError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")

    @property
    def qa_source(self) -> str:
        return self.qa or ("world" if self.dataset == "world" else "evidence")


@dataclass
class PreparedData:
    """Paths of what `prepare` wrote, and its manifest."""

    out: Path
    manifest: dict = field(default_factory=dict)

    @property
    def sft(self) -> Path:
        return self.out / "sft.jsonl"

    @property
    def rl(self) -> Path:
        return self.out / "rl.parquet"

    @property
    def snapshots(self) -> Path:
        return self.out / "snapshots"

    @property
    def trajectories(self) -> Path:
        return self.out / "trajectories"


# --- 1. data ------------------------------------------------------------------------------------------


@dataclass
class Selection:
    conversations: list[Conversation]  # everything that gets trajectories
    sft_ids: set[str]  # conversations whose pairs go to the SFT set
    rl_ids: set[str]  # conversations whose rows go to the RL set
    excluded: dict[str, str]  # conversation id -> why it was left out
    world: object | None = None  # the generated World, for its expert and QA


def select_data(s: PrepareSettings) -> Selection:
    if s.dataset == "world":
        # conversation i of a world depends only on (seed, i, sessions): the first N are the same
        # whatever N is
        world = generate_world(s.world_seed, conversations=s.conversations or s.world_conversations,
                               sessions=s.sessions or s.world_sessions)
        convs = world.dataset()
        ids = {c.conversation_id for c in convs}
        return Selection(convs, ids, ids, {}, world)
    if s.dataset == "longmemeval":
        convs = load_longmemeval(s.data) if s.data else load_dataset(DEFAULT_LONGMEMEVAL)
    else:
        convs = load_dataset(s.dataset, s.data)
    if s.dataset == "locomo":
        convs = convs[: s.conversations]
        ids = {c.conversation_id for c in convs}
        return Selection(convs, ids, ids, {})
    splits_path = Path(s.splits) if s.splits else default_data_dir() / "longmemeval" / "splits_dev.json"
    if not splits_path.is_file():
        raise PrepareError(f"LongMemEval training data needs a splits file ({splits_path} is missing; pass --splits)")
    splits = load_longmemeval_splits(splits_path)  # raises SplitLeakageError on base-id leakage
    guard = guard_longmemeval(convs, splits, (s.sft_side, s.rl_side))
    kept = list(guard.kept)[: s.conversations]
    return Selection(kept, {c.conversation_id for c in kept if c.conversation_id in splits[s.sft_side]},
                     {c.conversation_id for c in kept if c.conversation_id in splits[s.rl_side]},
                     dict(guard.excluded))


# --- 2. expert trajectories -----------------------------------------------------------------------------


def make_client(s: PrepareSettings) -> LLMClient:
    return LLMClient(LLMConfig.from_env(base_url=s.base_url, cache_path=str(Path(s.out) / "llm_cache.sqlite"),
                                        max_concurrency=max(8, 4 * s.concurrency)))


def make_backend(s: PrepareSettings, selection: Selection, client: LLMClient | None):
    if s.expert == "world":
        return WorldExpert(selection.world)
    if s.expert == "annotation":
        return AnnotationExpert()
    return LLMAgentBackend(client, model=s.expert)


# --- 3. session QA ----------------------------------------------------------------------------------------


def session_qa(s: PrepareSettings, selection: Selection, trajectories: list[ConversationTrajectory],
               snapshots: SnapshotStore, client: LLMClient | None) -> dict[str, list[SessionQA]]:
    source = s.qa_source
    generator = None if source in ("world", "evidence") else LLMQAGenerator(client, model=source)

    def one(conv: Conversation, traj: ConversationTrajectory) -> list[SessionQA]:
        sessions = conv.sessions[: len(traj.records)]
        if source == "world":
            wc = next(w for w in selection.world if w.conversation_id == conv.conversation_id)
            ready = []
            for i, sess in enumerate(sessions):
                pairs = pick_mix(_qa_pairs(wc.session_qa(i)), PER_SESSION)
                ready.append(SessionQA(i, sess.session_id, pairs,
                                       None if pairs else "the world asks nothing about this session"))
            return make_session_qa(traj.folder, sessions, precomputed=ready)
        if source == "evidence":
            return make_session_qa(traj.folder, sessions, precomputed=evidence_qa(conv, sessions))
        return make_session_qa(traj.folder, sessions, make=lambda i, sess: generator.session_qa(
            sess, i, snapshots.get(traj.records[i].snapshot_id)))

    with ThreadPoolExecutor(max_workers=s.concurrency) as pool:  # one folder per conversation
        made = list(pool.map(one, selection.conversations, trajectories))
    return {conv.conversation_id: qa for conv, qa in zip(selection.conversations, made)}


def _qa_pairs(items: list[dict]) -> list[QAPair]:
    return [QAPair.from_dict(d) for d in items]


# --- 4. SFT set -------------------------------------------------------------------------------------------


def sft_set(s: PrepareSettings, selection: Selection, trajectories: list[ConversationTrajectory],
            snapshots: SnapshotStore, tokenizer) -> SFTStats:
    stats = SFTStats()
    pairs = []
    for conv, traj in zip(selection.conversations, trajectories):
        if conv.conversation_id not in selection.sft_ids:
            continue
        for record in traj.records:
            state = snapshots.get(record.snapshot_id)
            for agent in record.agents.values():
                target, why = expert_target(agent, state)
                if target is None:
                    stats.skipped[why] += 1
                    continue
                pair = SFTPair(tuple({"role": m["role"], "content": m["content"]} for m in agent.messages), target)
                pair = fit_pair(tokenizer, pair, conv.sessions[record.session_index], s.max_length, s.overlong, stats,
                                s.chat_template_kwargs)
                if pair is not None:
                    pairs.append(pair)
    stats.written = write_sft(Path(s.out) / "sft.jsonl", pairs)
    return stats


# --- 5. RL set ---------------------------------------------------------------------------------------------


def rl_set(s: PrepareSettings, selection: Selection, trajectories: list[ConversationTrajectory],
           qa: dict[str, list[SessionQA]], tokenizer, tokenizer_name: str) -> RLStats:
    group = longmemeval_base_id if s.dataset.startswith("longmemeval") else (lambda cid: cid)
    rl_convs = [c for c in selection.conversations if c.conversation_id in selection.rl_ids]
    splits = assign_splits([c.conversation_id for c in rl_convs], s.heldout_fraction, seed=s.seed, group=group)
    stats = RLStats()
    rows = []
    for conv, traj in zip(selection.conversations, trajectories):
        if conv.conversation_id not in selection.rl_ids:
            continue
        for record, session_qa_ in zip(traj.records, qa[conv.conversation_id]):
            rows += session_rows(conv, conv.sessions[record.session_index], record, session_qa_.qa,
                                 splits[conv.conversation_id], tokenizer, stats, skip_empty_qa=s.skip_empty_qa)
    write_rl_rows(Path(s.out) / "rl.parquet", rows, tokenizer=tokenizer_name, snapshots="snapshots",
                  source=f"{s.dataset}/{s.expert}")
    return stats


def rl_conversations(s: PrepareSettings, selection: Selection, trajectories: list[ConversationTrajectory],
                     builder: MemoryBuilder) -> None:
    """DIR/conversations.jsonl: the RL conversations cut to their prepared sessions, with the settings
    their prompts were rendered with (the sparse ablation renders a trajectory's prompts the same way)."""
    convs = [replace(conv, sessions=conv.sessions[: len(traj.records)])
             for conv, traj in zip(selection.conversations, trajectories) if conv.conversation_id in selection.rl_ids]
    render = {"top_k": builder.top_k, "max_prompt_chars": builder.max_prompt_chars,
              "max_turn_chars": builder.max_turn_chars, "max_entry_chars": builder.max_entry_chars}
    write_conversations(Path(s.out) / CONVERSATIONS_FILE, convs, render=render, embedder=s.embedder)


# --- the run ---------------------------------------------------------------------------------------------


def check_out(s: PrepareSettings) -> None:
    """Refuse to mix runs: a used DIR needs --resume, and then the same stored settings."""
    out = Path(s.out)
    manifest = out / "manifest.json"
    if not out.exists() or not any(out.iterdir()):
        return
    if not s.resume:
        raise PrepareError(f"{out} is not empty: pass --resume to continue the run there, or use another --out")
    if not manifest.is_file():
        raise PrepareError(f"{out} holds no manifest.json: it was not made by prepare_data, will not resume into it")
    before = json.loads(manifest.read_text()).get("settings", {})
    now = asdict(s)
    changed = [k for k in STORED_SETTINGS if before.get(k) != now.get(k)]
    if changed:
        raise PrepareError(f"{out} was made with other settings: {', '.join(f'{k}={before.get(k)!r}' for k in changed)} "
                           f"(this run: {', '.join(f'{k}={now.get(k)!r}' for k in changed)})")


def prepare(s: PrepareSettings, *, after_session: Callable[[SessionRecord], None] | None = None) -> PreparedData:
    """Run every step (see the module doc); returns the paths and the manifest. `after_session` is
    called after each session's record is on disk (tests simulate a kill with it)."""
    started = time.perf_counter()
    check_out(s)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    selection = select_data(s)
    if not selection.conversations:
        raise PrepareError(f"no conversation left to prepare ({len(selection.excluded)} excluded)")
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "status": "running", "settings": asdict(s)}
    write_json_atomic(out / "manifest.json", manifest)
    tokenizer, tokenizer_name = load_policy_tokenizer(s.tokenizer)
    needs_client = s.expert not in ("world", "annotation") or s.qa_source not in ("world", "evidence")
    client = make_client(s) if needs_client else None
    try:
        snapshots = SnapshotStore(out / "snapshots")
        embedder = make_embedder(None if s.embedder == "none" else s.embedder)
        builder = MemoryBuilder(make_backend(s, selection, client))
        trajectories = build_trajectories(selection.conversations, builder, out / "trajectories", snapshots,
                                          max_sessions=s.sessions, embedder=embedder,
                                          keep_embeddings=s.keep_embeddings, progress=s.progress,
                                          workers=s.concurrency, after_session=after_session)
        qa = session_qa(s, selection, trajectories, snapshots, client)
        sft_stats = sft_set(s, selection, trajectories, snapshots, tokenizer)
        rl_stats = rl_set(s, selection, trajectories, qa, tokenizer, tokenizer_name)
        rl_conversations(s, selection, trajectories, builder)
    finally:
        if client is not None:
            client.close()
    manifest.update(status="complete", tokenizer=tokenizer_name, wall_s=round(time.perf_counter() - started, 3),
                    counts=_counts(selection, trajectories, qa), sft=sft_stats.to_dict(), rl=rl_stats.to_dict(),
                    excluded=selection.excluded, sft_conversations=sorted(selection.sft_ids),
                    rl_conversations=sorted(selection.rl_ids), conversations_file=CONVERSATIONS_FILE,
                    overlong_policy=f"{s.overlong} (pairs over {s.max_length} tokens)")
    write_json_atomic(out / "manifest.json", manifest)
    return PreparedData(out, manifest)


def _counts(selection: Selection, trajectories: list[ConversationTrajectory], qa: dict[str, list[SessionQA]]) -> dict:
    agent_errors: Counter = Counter()
    for traj in trajectories:
        for record in traj.records:
            for kind in record.errors:
                agent_errors[kind.value] += 1
    items = [x for per_conv in qa.values() for x in per_conv]
    reasons = Counter(x.reason for x in items if not x.qa)
    qtypes = Counter(q.qtype for x in items for q in x.qa)
    return {"conversations": len(trajectories), "sessions": sum(len(t.records) for t in trajectories),
            "agent_errors": dict(sorted(agent_errors.items())),
            "qa_pairs": sum(len(x.qa) for x in items), "qa_types": dict(sorted(qtypes.items())),
            "sessions_without_qa": len([x for x in items if not x.qa]),
            "sessions_without_qa_reasons": dict(sorted(reasons.items()))}


def prepare_world(out_dir: str | Path, *, seed: int = 0, conversations: int = WORLD_CONVERSATIONS,
                  sessions: int = WORLD_SESSIONS,
                  tokenizer: str = "smollm2", max_length: int | None = 8192, heldout_fraction: float = 0.1,
                  progress: bool = False) -> PreparedData:
    """The bundled world data (world expert, exact QA) in `out_dir`, made once: a complete
    earlier run with the same settings is reused, an interrupted one is continued."""
    s = PrepareSettings(dataset="world", expert="world", out=str(out_dir), world_seed=seed,
                        world_conversations=conversations, world_sessions=sessions, tokenizer=tokenizer,
                        max_length=max_length, heldout_fraction=heldout_fraction, resume=True, progress=progress)
    manifest = Path(out_dir) / "manifest.json"
    if manifest.is_file():
        before = json.loads(manifest.read_text())
        # (data prepared before conversations.jsonl existed is completed by a resumed run)
        complete = before.get("status") == "complete" and (Path(out_dir) / CONVERSATIONS_FILE).is_file()
        if complete and before.get("settings") == asdict(s):
            return PreparedData(Path(out_dir), before)
    return prepare(s)


# --- command line ---------------------------------------------------------------------------------------


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> PrepareSettings:
    p = argparse.ArgumentParser(prog="python trainers/prepare_data.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help=f"longmemeval: the file given by --data, else {DEFAULT_LONGMEMEVAL}")
    p.add_argument("--expert", required=True, help="world | annotation | MODEL (OpenAI-compatible)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", help="dataset file (default: the shared data folder)")
    p.add_argument("--conversations", type=int, help="the first N conversations")
    p.add_argument("--sessions", type=int, help="the first N sessions of each conversation")
    p.add_argument("--qa", help="world | evidence | MODEL (default: world for the world, evidence otherwise)")
    p.add_argument("--tokenizer", default="smollm2", help="smollm2 | tiny | tokenizer folder | .gguf file "
                   "(counts expert_tokens; default: SmolLM2-135M-Instruct, the trainer's default policy)")
    p.add_argument("--max-length", type=int, default=8192, help="SFT pair limit in policy tokens (0: none)")
    p.add_argument("--overlong", choices=("shorten", "skip"), default="shorten",
                   help="an SFT pair over --max-length: cut its session in the middle, or skip it")
    p.add_argument("--chat-template-kwargs", type=_json_object, metavar="JSON",
                   help='chat-template options SFT will use (its data.chat_template_kwargs), e.g. '
                        '\'{"enable_thinking": false}\': pair lengths are counted with them')
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of conversations held out of RL")
    p.add_argument("--seed", type=int, default=0, help="seed of the train / heldout split")
    p.add_argument("--embedder", choices=("hashing", "minilm", "none"), default="hashing",
                   help="embedder of the expert's bank (which entries its prompts show)")
    p.add_argument("--keep-embeddings", action="store_true", help="store embeddings in the snapshots")
    p.add_argument("--skip-empty-qa", action="store_true", help="leave sessions without QA out of the RL set")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint for a MODEL expert or QA generator")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--world-conversations", type=int, default=WORLD_CONVERSATIONS,
                   help="conversations of the generated world when --conversations is not given")
    p.add_argument("--world-sessions", type=int, default=WORLD_SESSIONS,
                   help="sessions per world conversation when --sessions is not given")
    p.add_argument("--splits", help="LongMemEval splits file (default: longmemeval/splits_dev.json in the data folder)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="conversations built at once (for model experts; the four agents of a session "
                        "always run concurrently)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    names = {f.name for f in fields(PrepareSettings)}
    values = {k: v for k, v in vars(a).items() if k in names}
    values["max_length"] = a.max_length or None
    values["progress"] = not a.no_progress
    return PrepareSettings(**values)


def main(argv: list[str] | None = None) -> int:
    try:
        result = prepare(parse_args(argv))
    except PrepareError as exc:
        print(f"prepare_data: {exc}", file=sys.stderr)
        return 2
    m = result.manifest
    print(f"{result.out}: {m['counts']['sessions']} sessions, {m['sft']['written']} SFT pairs "
          f"({m['sft']['shortened']} shortened, {sum(m['sft']['skipped'].values())} skipped), "
          f"RL rows {m['rl']['rows']}, {m['counts']['sessions_without_qa']} sessions without QA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
