"""The paper's sparse-reward ablation, on policy: one task reward per whole conversation.

`ConversationEpisodes` is an `EpisodeSource` (`trainers.episodes`) whose unit is a conversation
of the RL set's train split. For each conversation of a step and each g < G, trajectory g builds
its own memory bank, starting from the conversation's initial state (the snapshot of its first
RL session, normally empty):

    for each session k in order:
        render the four agents' prompts from bank g's current state, exactly as the expert's
        prompts were rendered (`rollout.session.session_prompts` with the settings recorded in
        `conversations.jsonl`; the engine applies the chat template as for the dense rows);
        sample ONE answer per prompt (the G x 4 prompts of session k of every conversation of
        the step go to the engine in one `generate` call, n = 1, seed derived from the step's
        seed and k: identical prompts still get different samples, `rollout.types.prompt_seeds`);
        apply trajectory g's four answers to bank g (`apply_agent_outputs`, an invalid agent's
        operations left out, as the reward's candidates are built)
    after the last session, answer the conversation's QA (all its sessions' QA pairs, once per
    question id) from bank g's final memory and judge the answers: T_g.

Reward of sample (g, k, m) = v(g, k, m) * T_g * (1 - lambda * l(g, k, m)), with v the validity
gate of agent m's answer in session k against bank g's state before it, l the length penalty
against the expert's answer of that session's agent (RL rows), and the attribution weight of the
dominant kind of T_g's answering. Advantage groups are (conversation, session k, agent m) with
their G samples; for k > 1 their prompts differ (each trajectory has its own memory), which the
trainer handles (it packs consecutive samples that share a prompt).

Scoring reuses the reward library unchanged in meaning: for each g one `reward.score_session`
call in its sparse mode (`RewardConfig.dense=False`), one request per (conversation, session)
whose snapshot is trajectory g's OWN state before that session (an in-memory snapshot store).
The library then answers the QA from the last request's candidate, which is bank g's final
memory, and computes validity, length penalties, masks and attribution exactly as for dense
rewards. Attribution choice: the dominant kind is counted over the final answering's retrieved
entries that trajectory g wrote anywhere in the conversation (every session's created or changed
entries, `score_session(prior_own_ids=...)`), not only in the last session (what `score_session`
counts by itself); entries of the initial state are never counted.

Masks (never a made-up reward): a conversation without QA -> all its samples NO_QA; the reward
call raising `RewardComputationError` -> the samples of its trajectories REWARD_FAILED; an answer
or verdict that failed -> the library masks trajectory g's valid samples (REWARD_MASKED, its
reason); bank g failing while an answer is applied (store or embedder error) -> all of
trajectory g's samples REWARD_MASKED; a session without RL rows in the middle of a conversation
(an expert agent failed there in preparation) is rolled out and applied, its samples masked
(their expert lengths are unknown). Empty and (with `mask_truncated`) cut answers as in
`trainers.rl_batch.collect_samples`. The rolled-out part of a conversation runs from its first to
its last session with RL rows.

Not thread-safe: one `collect` at a time per instance (the trainer's loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from membuilder.agents.apply import apply_agent_outputs
from membuilder.agents.prompts import speakers_of
from membuilder.bank import MemoryBank
from membuilder.datasets import Conversation, Session
from membuilder.snapshots import SnapshotStore, UnknownSnapshotError, check_snapshot_id, state_digest
from membuilder.store import InMemoryStore
from membuilder.types import BankState
from reward.types import AGENTS, QAPair, RewardComputationError, SessionReward, SessionRewardRequest
from rollout.session import session_prompts
from rollout.types import MAX_SEED, Completion, RolloutEngine, SamplingParams
from trainers.config import ConfigError
from trainers.data.rl_rows import RLRow
from trainers.data.trajectories import session_clock
from trainers.episodes import Episodes
from trainers.rl_batch import MaskReason, RLSession, Sample, group_sessions

if TYPE_CHECKING:
    from trainers.engines import RewardParts
    from trainers.episodes import SourceContext

logger = logging.getLogger(__name__)

# scorer(requests, prior_own_ids=...) -> one SessionReward per request (`reward.score_session` bound)
Scorer = Callable[..., list[SessionReward]]

COUNT_KEYS = (
    "conversations", "sessions", "trajectories", "conversations_without_qa", "sessions_without_rows",
    "failed_trajectories", "reward_failed_calls", "validity_mismatch",
)


# ---------------------------------------------------------------------------------------------
# Conversations of the RL set
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLConversation:
    """One conversation as the sparse ablation rolls it out."""

    key: str  # conversation id
    owner: str  # bank owner (the RL rows')
    speakers: tuple[str, ...]
    sessions: tuple[Session, ...]  # rolled out in this order
    indices: tuple[int, ...]  # each session's index in its conversation (the bank clock of undated ones)
    rows: tuple[RLSession | None, ...]  # each session's RL rows (all four agents), None where it has none
    initial_snapshot_id: str  # state before the first rolled-out session
    qa: tuple[QAPair, ...]  # every session's QA, each question once

    @property
    def last(self) -> int:
        return len(self.sessions) - 1


def _qa_key(pair: QAPair) -> tuple:
    return ("id", pair.question_id) if pair.question_id else ("text", pair.question, pair.answer, pair.question_date)


def conversation_set(rows: Sequence[RLRow], conversations: Mapping[str, Conversation], *,
                     split: str | None = "train") -> list[RLConversation]:
    """The RL set's conversations of `split` (first-appearance order), with their sessions' text.

    Raises ValueError naming the conversation or session when the RL rows and the conversations
    file disagree (a conversation missing from it, a session id at another index, a session
    without all four agents' rows, two owners for one conversation or one owner for two).
    """
    by_conv: dict[str, list[RLSession]] = {}
    for s in group_sessions(rows, AGENTS, split):
        by_conv.setdefault(s.first.conversation_id, []).append(s)
    out, owners = [], {}
    for cid, sessions in by_conv.items():
        conv = conversations.get(cid)
        if conv is None:
            raise ValueError(f"conversation {cid!r} of the RL set is not in the conversations file")
        by_index: dict[int, RLSession] = {}
        for s in sessions:
            if len(s.rows) != len(AGENTS):
                raise ValueError(f"session {s.key} has rows for {[r.agent for r in s.rows]}; the sparse ablation "
                                 f"needs all of {list(AGENTS)}")
            i = s.first.session_index
            if not 0 <= i < len(conv.sessions) or conv.sessions[i].session_id != s.first.session_id:
                raise ValueError(f"session {s.key}: index {i} of conversation {cid!r} in the conversations file is "
                                 "not that session (prepared from other data?)")
            by_index[i] = s
        first, last = min(by_index), max(by_index)
        owner = sessions[0].first.owner
        if any(s.first.owner != owner for s in sessions):
            raise ValueError(f"conversation {cid!r}: its RL rows name more than one owner")
        if owners.setdefault(owner, cid) != cid:
            raise ValueError(f"conversations {owners[owner]!r} and {cid!r} share the owner {owner!r}")
        seen, qa = set(), []
        for i in sorted(by_index):
            for pair in by_index[i].first.qa:
                if _qa_key(pair) not in seen:
                    seen.add(_qa_key(pair))
                    qa.append(pair)
        span = range(first, last + 1)
        out.append(RLConversation(
            key=cid, owner=owner, speakers=tuple(conv.speakers), sessions=tuple(conv.sessions[i] for i in span),
            indices=tuple(span), rows=tuple(by_index.get(i) for i in span),
            initial_snapshot_id=by_index[first].first.snapshot_id, qa=tuple(qa)))
    return out


# ---------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------


class MemorySnapshots(SnapshotStore):
    """A `SnapshotStore` held in memory (no files): the trajectories' own states during one step."""

    def __init__(self) -> None:
        super().__init__(Path("<memory>"), cache_size=0)
        self._states: dict[str, BankState] = {}

    def put(self, state: BankState) -> str:
        snapshot_id = state_digest(state)
        self._states.setdefault(snapshot_id, state)
        return snapshot_id

    def get(self, snapshot_id: str) -> BankState:
        state = self._states.get(check_snapshot_id(snapshot_id))
        if state is None:
            raise UnknownSnapshotError(f"no snapshot {snapshot_id} in this step's trajectory states")
        return state

    def __contains__(self, snapshot_id: object) -> bool:
        return isinstance(snapshot_id, str) and snapshot_id in self._states

    def ids(self) -> list[str]:
        return sorted(self._states)


class _Clock:
    """The bank time of a conversation's banks: the date of the session being added."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Trajectory:
    """Trajectory g of one conversation: its bank and what each session did to it."""

    bank: MemoryBank
    before: list[str] = field(default_factory=list)  # snapshot id of the state before each session
    own: set[str] = field(default_factory=set)  # entries it created or changed so far
    own_before: list[frozenset[str]] = field(default_factory=list)  # `own` before each session
    outputs: list[dict[str, Completion]] = field(default_factory=list)  # per session: agent -> answer
    valid: list[dict[str, bool]] = field(default_factory=list)  # per session: agent -> its validity
    failure: str | None = None  # the bank raised while an answer was applied: nothing is scored


def _session_seed(seed: int | None, k: int) -> int | None:
    """The seed of session k's generate call in a step (None: unseeded, as the step's)."""
    return None if seed is None else (seed * 1_000_003 + 7_919 * (k + 1)) % (MAX_SEED + 1)


# ---------------------------------------------------------------------------------------------
# The episode source
# ---------------------------------------------------------------------------------------------


class ConversationEpisodes:
    """Sparse ADRPO over whole conversations (module docstring). `len()` counts conversations.

    `parts`: the in-process reward's answerer, judge, embedder (also the trajectory banks'; the
    one the data was prepared with), token counter and library config (`trainers.engines
    .build_reward_parts`). `snapshots`: the RL set's snapshot store (initial states). `render`:
    keyword arguments of `render_session_prompts` the RL prompts were rendered with. `scorer`
    replaces `reward.score_session` (same call; e.g. a scorer that raises in tests).
    """

    def __init__(self, conversations: Sequence[RLConversation], parts: "RewardParts", snapshots: SnapshotStore, *,
                 render: Mapping[str, Any] | None = None, mask_truncated: bool = False,
                 scorer: Scorer | None = None):
        self.conversations = list(conversations)
        self.parts = parts
        self.snapshots = snapshots
        self.render = dict(render or {})
        self.mask_truncated = mask_truncated
        self.config = replace(parts.config, dense=False)  # the library's sparse mode (module docstring)
        self.scorer = scorer
        self._store: MemorySnapshots | None = None  # the trajectories' states, during `collect` only

    def __len__(self) -> int:
        return len(self.conversations)

    # -- rollout -----------------------------------------------------------------------------

    def _bank(self, conv: RLConversation, clock: _Clock) -> MemoryBank:
        bank = MemoryBank(InMemoryStore(), conv.owner, embedder=self.parts.embedder, clock=clock)
        state = self.snapshots.get(conv.initial_snapshot_id)
        bank.restore(state if state.owner == conv.owner else replace(state, owner=conv.owner))
        return bank

    def _rollout(self, convs: Sequence[RLConversation], engine: RolloutEngine, params: SamplingParams,
                 store: MemorySnapshots, times: dict[str, float]) -> list[list[_Trajectory]]:
        """Every conversation's G trajectories, session by session (one engine call per session index)."""
        group = params.n
        clocks = [_Clock() for _ in convs]
        trajs = [[_Trajectory(self._bank(c, clock)) for _ in range(group)] for c, clock in zip(convs, clocks)]
        for k in range(max((len(c.sessions) for c in convs), default=0)):
            started = time.perf_counter()
            prompts, keys = [], []
            for ci, conv in enumerate(convs):
                if k >= len(conv.sessions):
                    continue
                session = conv.sessions[k]
                clocks[ci].now = session_clock(session, conv.indices[k])
                speakers = conv.speakers or speakers_of(session)  # what MemoryBuilder.add_session passes
                for g, traj in enumerate(trajs[ci]):
                    for p in session_prompts(traj.bank, session, speakers=speakers, **self.render):
                        prompts.append(p.prompt)
                        keys.append((ci, g, p.agent))
            rendered = time.perf_counter()
            outs = engine.generate(prompts, replace(params, n=1, seed=_session_seed(params.seed, k)))
            generated = time.perf_counter()
            if len(outs) != len(prompts) or any(len(o) != 1 for o in outs):
                raise RuntimeError(
                    f"the engine returned {[len(o) for o in outs]} samples for {len(prompts)} prompts x 1")
            answers: dict[tuple[int, int], dict[str, Completion]] = {}
            for (ci, g, agent), (completion,) in zip(keys, outs, strict=True):
                answers.setdefault((ci, g), {})[agent] = completion
            for (ci, g), outputs in answers.items():
                conv, traj = convs[ci], trajs[ci][g]
                clocks[ci].now = session_clock(conv.sessions[k], conv.indices[k])
                traj.before.append(store.put(traj.bank.snapshot()))
                traj.own_before.append(frozenset(traj.own))
                traj.outputs.append(outputs)
                try:
                    app = apply_agent_outputs(traj.bank, {a: c.text for a, c in outputs.items()},
                                              session_id=conv.sessions[k].session_id, drop_invalid_agents=True)
                except Exception as exc:  # the bank's own failure (store, embedder): this trajectory only
                    traj.valid.append({})
                    traj.failure = traj.failure or (f"trajectory {g}'s bank failed in session "
                                                    f"{conv.sessions[k].session_id}: {type(exc).__name__}: {exc}")
                    continue
                traj.own.update(app.result.touched)
                traj.valid.append({kind.value: a.valid for kind, a in app.agents.items()})
            times["rollout"] += generated - rendered
            times["memory"] += (rendered - started) + (time.perf_counter() - generated)
        return trajs

    # -- reward --------------------------------------------------------------------------------

    def _score(self, requests: list[SessionRewardRequest], prior: list[frozenset[str]]) -> list[SessionReward]:
        if self.scorer is not None:
            return self.scorer(requests, prior_own_ids=prior)
        from reward.score import BaseCache, score_session

        p = self.parts
        # A cache per call: every base is a trajectory state of this step only.
        return score_session(requests, snapshots=self._store, token_counter=p.token_counter, answerer=p.answerer,
                             judge=p.judge, config=self.config, embedder=p.embedder, cache=BaseCache(1),
                             prior_own_ids=prior)

    def _rewards(self, convs: Sequence[RLConversation], trajs: list[list[_Trajectory]], group: int, *, step: int,
                 counts: dict[str, float]) -> dict[tuple[int, int, int], SessionReward | str]:
        """(conversation, g, session) -> its SessionReward, or why the call for it failed."""
        out: dict[tuple[int, int, int], SessionReward | str] = {}
        for g in range(group):
            requests, prior, where = [], [], []
            for ci, conv in enumerate(convs):
                traj = trajs[ci][g]
                if not conv.qa or traj.failure is not None:
                    continue
                scored = [k for k, rows in enumerate(conv.rows) if rows is not None]
                for k in scored:  # the conversation's last scored request is its anchor: the final bank
                    rows = conv.rows[k]
                    requests.append(SessionRewardRequest(
                        owner=conv.owner, snapshot_id=traj.before[k], session_id=conv.sessions[k].session_id,
                        qa=conv.qa if k == conv.last else (),
                        expert_tokens={r.agent: r.expert_tokens for r in rows.rows},
                        outputs=({a: c.text for a, c in traj.outputs[k].items()},),
                        session_date=rows.first.session_date))
                    prior.append(traj.own_before[k])
                    where.append((ci, g, k))
            if not requests:
                continue
            try:
                rewards = self._score(requests, prior)
            except RewardComputationError as exc:
                logger.warning("step %d: the reward failed for trajectory %d of %d conversations (%s); their samples "
                               "are masked", step, g, len({ci for ci, _, _ in where}), exc)
                counts["reward_failed_calls"] += 1
                out.update({w: f"reward failed: {exc}" for w in where})
                continue
            if len(rewards) != len(requests):
                raise ValueError(f"the scorer returned {len(rewards)} results for {len(requests)} requests")
            out.update(zip(where, rewards, strict=True))
        return out

    # -- samples -------------------------------------------------------------------------------

    def collect(self, indices: Sequence[int], engine: RolloutEngine, params: SamplingParams, *, step: int) -> Episodes:
        convs = [self.conversations[i] for i in indices]
        group = params.n
        times = {"rollout": 0.0, "memory": 0.0, "reward": 0.0}
        counts = {k: 0.0 for k in COUNT_KEYS}
        self._store = MemorySnapshots()
        try:
            trajs = self._rollout(convs, engine, params, self._store, times)
            started = time.perf_counter()
            rewards = self._rewards(convs, trajs, group, step=step, counts=counts)
            times["reward"] = time.perf_counter() - started
        finally:
            self._store = None  # the step's states are not needed any more
        samples: list[Sample] = []
        for ci, conv in enumerate(convs):
            counts["conversations"] += 1
            counts["sessions"] += len(conv.sessions)
            counts["trajectories"] += group
            counts["conversations_without_qa"] += int(not conv.qa)
            counts["sessions_without_rows"] += sum(rows is None for rows in conv.rows)
            counts["failed_trajectories"] += sum(t.failure is not None for t in trajs[ci])
            for k, session in enumerate(conv.sessions):
                for agent in AGENTS:
                    group_id = samples[-1].group + 1 if samples else 0
                    for g, traj in enumerate(trajs[ci]):
                        sample = Sample(group_id, f"{conv.key}/{session.session_id}", agent, g, traj.outputs[k][agent])
                        self._fill(sample, conv, k, traj, rewards.get((ci, g, k)), counts)
                        samples.append(sample)
        if counts["validity_mismatch"]:
            logger.warning("step %d: %d samples' validity differs between the trajectory's bank and the reward's "
                           "rebuild of it (a bug: please report it)", step, counts["validity_mismatch"])
        return Episodes(samples, group, counts=counts, times=times)

    def _fill(self, sample: Sample, conv: RLConversation, k: int, traj: _Trajectory,
              reward: SessionReward | str | None, counts: dict[str, float]) -> None:
        """Set one sample's reward, or its mask and why (the order of the checks is the priority)."""
        if not conv.qa:
            sample.mask, sample.mask_detail = MaskReason.NO_QA, "the conversation has no QA pairs"
            return
        if traj.failure is not None:
            sample.mask, sample.mask_detail = MaskReason.REWARD_MASKED, traj.failure
            return
        if conv.rows[k] is None:
            sample.mask = MaskReason.REWARD_MASKED
            sample.mask_detail = "the session has no RL rows (an expert agent failed there): no expert lengths"
            return
        if isinstance(reward, str):
            sample.mask, sample.mask_detail = MaskReason.REWARD_FAILED, reward
            return
        if reward is None:  # every case without a reward call is handled above
            raise RuntimeError(f"no reward for {sample.session} trajectory {sample.index}")
        r = reward.sample(sample.agent, 0)
        if r.valid != traj.valid[k].get(sample.agent):
            # The library rebuilt this session's candidate over the same state: a difference is a bug.
            counts["validity_mismatch"] += 1
        if r.masked or r.reward is None:
            sample.mask = MaskReason.REWARD_MASKED
            sample.mask_detail = r.mask_reason or "masked by the reward function"
            return
        sample.reward, sample.task_reward = float(r.reward), r.task_reward
        sample.length_penalty, sample.valid = float(r.length_penalty), bool(r.valid)
        sample.weight, sample.dominant_kind = float(r.weight), r.dominant_kind
        if sample.num_tokens == 0:
            sample.mask = MaskReason.EMPTY
        elif self.mask_truncated and sample.truncated:
            sample.mask = MaskReason.TRUNCATED


# ---------------------------------------------------------------------------------------------
# From the trainer's config
# ---------------------------------------------------------------------------------------------


def conversation_source(ctx: "SourceContext") -> ConversationEpisodes:
    """The sparse ablation's source as `cfg` asks for it (`reward.dense=false`, membuilder agents).

    Reads the RL set (`data.path`, or the bundled world prepared into `<output_dir>/data` by
    process 0, as the dense default does) and the `conversations.jsonl` beside it.
    """
    from transformers import AutoTokenizer

    from trainers.data.conversations import FILENAME, read_conversations
    from trainers.data.rl_rows import read_rl_rows
    from trainers.distributed import barrier
    from trainers.engines import build_reward_parts

    cfg = ctx.cfg
    if cfg.reward.kind != "local":
        raise ConfigError(
            "reward.dense=false with reward.kind=remote is not supported: the sparse ablation scores each "
            "trajectory's own memory states, which exist only in the trainer's process (use reward.kind=local)"
        )
    if sorted(cfg.data.agents) != sorted(AGENTS):
        raise ConfigError(f"reward.dense=false needs all four agents (data.agents={list(AGENTS)}): a trajectory's "
                          f"memory is built by all of them, got {cfg.data.agents}")
    d = cfg.data
    path = Path(d.path) if d.path else None
    if path is None:
        from trainers.prepare_data import WORLD_CONVERSATIONS, WORLD_SESSIONS, prepare_world

        out = ctx.output_dir / "data"
        if ctx.is_main_process:
            prepare_world(out, seed=cfg.train.seed, conversations=d.world_conversations or WORLD_CONVERSATIONS,
                          sessions=d.world_sessions or WORLD_SESSIONS, tokenizer=str(ctx.base_path),
                          progress=cfg.logging.progress_bar)
        barrier()
        path = out / "rl.parquet"
    rl_set = read_rl_rows(path)
    conv_file = read_conversations(path.parent / FILENAME)
    if conv_file.embedder != cfg.reward.embedder:
        raise ConfigError(f"reward.embedder={cfg.reward.embedder!r}, but the data was prepared with the "
                          f"{conv_file.embedder!r} embedder (a trajectory's prompts must show what the expert's "
                          "showed)")
    conversations = conversation_set(rl_set.rows, conv_file.by_id(), split=d.split)
    if not conversations:
        raise ValueError(f"no conversations of split {d.split!r} in {path}")
    tokenizer = AutoTokenizer.from_pretrained(ctx.base_path)
    parts = build_reward_parts(cfg.reward, tokenizer=tokenizer)
    snapshots = SnapshotStore(ctx.snapshots_dir or rl_set.snapshots_dir)
    return ConversationEpisodes(conversations, parts, snapshots, render=conv_file.render,
                                mask_truncated=cfg.rollout.mask_truncated)
