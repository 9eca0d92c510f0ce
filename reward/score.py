"""`score_session`: the reward of every (candidate, agent) sample of a batch of sessions.

For request r and candidate g (DESIGN section 6; `reward.config` has every knob):

    candidate g = the state before (snapshot `r.snapshot_id`, searched under `r.owner`)
                  + the g-th output of each agent, applied by `apply_agent_outputs` in one
                  transaction, an invalid agent's operations left out
    v(g, m)     = 1 if agent m's output is valid (`reward.validity`), else 0
    T(g)        = fraction of the session's QA judged correct, answered from candidate g
    l(g, m)     = length penalty (`reward.length`), 0 when the penalty is off
    R(g, m)     = v(g, m) * T(g) * (1 - lambda * l(g, m))          in [0, 1]
    weight      = alpha for the dominant kind's agent (`reward.attribution`), else 1

Samples come in order g = 0..G-1, and within a candidate in agent order core, episodic,
semantic, procedural; an agent absent from `outputs[g]` has no sample and contributes nothing.

Masking (never a made-up value, REFERENCE items 8 and 19): a session without QA -> every sample
masked; an answer or verdict that failed or timed out -> every valid sample of that candidate
masked (T(g) is unknown). An invalid sample keeps R = 0 even then: v = 0 makes R exactly 0
whatever T is. Masked samples are logged (one warning per call).

Speed: the state before is a `BaseBank` built once per (snapshot, owner, embedder) and cached
(`BaseCache`, shared across calls and threads); a candidate is an `OverlayStore` over it with
its own small index (`reward.overlay`); identical candidates (same outputs) are built and
answered once; answering and judging go through `reward.task` (batched or concurrent with a
per-call time limit).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from membuilder.agents.apply import SessionApplication, apply_agent_outputs
from membuilder.answering import AnswerContext, build_answer_context
from membuilder.bank import MemoryBank
from membuilder.datasets import Question
from membuilder.snapshots import SnapshotStore, check_snapshot_id
from membuilder.types import InvalidInputError, MemoryKind, normalise_time, time_to_posix

from .attribution import dominant_kind, retrieval_counts, sample_weight
from .config import RewardConfig
from .length import core_length_penalty, ratio_length_penalty
from .overlay import BaseBank, CandidateSearch, OverlayStore
from .task import CallFailure, answer_all, judge_all, parse_date, qa_question
from .types import AGENTS, QAPair, RewardFn, RewardInputError, SampleReward, SessionReward, SessionRewardRequest
from .validity import validity

log = logging.getLogger("reward")

TokenCounter = Callable[[str], int]


class BaseCache:
    """LRU cache of `BaseBank`s keyed by (snapshot id, owner, embedder name). Thread-safe: a base
    is built once even when many threads ask for it at the same time."""

    def __init__(self, max_bases: int = 16):
        if max_bases < 1:
            raise InvalidInputError(f"max_bases must be >= 1, got {max_bases}")
        self.max_bases = max_bases
        self._bases: OrderedDict[tuple, BaseBank] = OrderedDict()
        self._building: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, snapshots: SnapshotStore, snapshot_id: str, owner: str, embedder) -> BaseBank:
        key = (snapshot_id, owner, None if embedder is None else embedder.name)
        with self._lock:
            base = self._bases.get(key)
            if base is not None:
                self._bases.move_to_end(key)
                return base
            building = self._building.setdefault(key, threading.Lock())
        with building:
            try:
                with self._lock:
                    base = self._bases.get(key)
                if base is None:
                    base = BaseBank(snapshots.get(snapshot_id), owner, embedder)
                    with self._lock:
                        self._bases[key] = base
                        while len(self._bases) > self.max_bases:
                            self._bases.popitem(last=False)
            finally:
                with self._lock:
                    self._building.pop(key, None)
        return base


_DEFAULT_CACHE = BaseCache()  # content-addressed keys: sharing it between stores is safe


@dataclass
class _Candidate:
    """One built candidate bank and what answering it gave."""

    app: SessionApplication
    search: CandidateSearch
    contexts: list[AnswerContext] | None = None
    task: float | CallFailure | None = None
    counts: dict | None = None


def _check_requests(requests, config: RewardConfig) -> list[SessionRewardRequest]:
    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Sequence):
        raise RewardInputError("requests must be a sequence of SessionRewardRequest")
    for i, req in enumerate(requests):
        if not isinstance(req, SessionRewardRequest):
            raise RewardInputError(f"requests[{i}] is a {type(req).__name__}, not a SessionRewardRequest")
        try:
            check_snapshot_id(req.snapshot_id)
        except InvalidInputError as exc:
            raise RewardInputError(f"requests[{i}].snapshot_id: {exc}") from None
        if not isinstance(req.owner, str) or not req.owner.strip():
            raise RewardInputError(f"requests[{i}].owner must be a non-empty string")
        dates = [("session_date", req.session_date)] + [(f"qa[{n}].question_date", q.question_date)
                                                       for n, q in enumerate(req.qa)]
        for where, value in dates:
            try:
                parse_date(value)
            except (InvalidInputError, ValueError) as exc:
                raise RewardInputError(f"requests[{i}].{where}: {exc}") from None
        for g, out in enumerate(req.outputs):
            unknown = set(out) - set(AGENTS)
            if unknown:
                raise RewardInputError(f"requests[{i}].outputs[{g}] has unknown agent(s) {sorted(unknown)}")
            if config.length_penalty:
                missing = [a for a in out if a != "core" and a not in req.expert_tokens]
                if missing:
                    raise RewardInputError(f"requests[{i}].expert_tokens lacks {missing} (needed by the length penalty)")
        if config.counterfactual and req.expert_outputs is None:
            raise RewardInputError(f"requests[{i}].expert_outputs is needed for counterfactual attribution")
    return list(requests)


def _sparse_plan(requests: list[SessionRewardRequest]) -> tuple[dict[int, int], dict[int, tuple[QAPair, ...]]]:
    """(request -> its conversation's anchor request, anchor -> the conversation's QA)."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(req.owner, []).append(i)
    anchor_of, qa_of = {}, {}
    for members in groups.values():
        anchor = members[-1]
        sizes = {requests[i].group_size for i in members}
        if len(sizes) > 1:
            raise RewardInputError(f"sparse reward: the sessions of owner {requests[anchor].owner!r} have "
                                   f"different group sizes {sorted(sizes)}")
        seen, qa = set(), []
        for i in members:
            for pair in requests[i].qa:
                key = (pair.question, pair.answer, pair.question_date)
                if key not in seen:
                    seen.add(key)
                    qa.append(pair)
        qa_of[anchor] = tuple(qa)
        for i in members:
            anchor_of[i] = anchor
    return anchor_of, qa_of


def _output_key(outputs: Mapping[str, str | None]) -> tuple:
    return tuple(sorted(outputs.items()))


def score_session(
    requests: Sequence[SessionRewardRequest],
    *,
    snapshots: SnapshotStore,
    token_counter: TokenCounter,
    answerer,
    judge,
    config: RewardConfig | None = None,
    embedder=None,
    cache: BaseCache | None = None,
) -> list[SessionReward]:
    """One `SessionReward` per request, in order (see the module doc for the definition).

    `token_counter(text) -> int` counts tokens of the policy's tokenizer; `answerer` has
    `answer(Question, AnswerContext) -> str` (optionally `answer_batch`), `judge` has
    `judge(Question, answer) -> Verdict` (optionally `judge_batch`): e.g. `ExtractiveAnswerer`
    and `RuleJudge` offline, `LLMAnswerer` / `LLMJudge` on any OpenAI-compatible model.
    `embedder` must be the one the answer step uses (None: BM25 only). Thread-safe as long as
    the answerer, judge, embedder and token counter are (the offline ones and `LLMClient` are). Raises
    `RewardInputError` for malformed requests and `UnknownSnapshotError` for an unknown snapshot
    id, before any answering.
    """
    config = config or RewardConfig()
    cache = cache or _DEFAULT_CACHE
    requests = _check_requests(requests, config)
    started = time.perf_counter()
    bases = [cache.get(snapshots, req.snapshot_id, req.owner, embedder) for req in requests]
    if config.dense:
        anchor_of = {i: i for i in range(len(requests))}
        qa_of = {i: req.qa for i, req in enumerate(requests)}
    else:
        anchor_of, qa_of = _sparse_plan(requests)
    built = [_build_candidates(req, base, embedder, config) for req, base in zip(requests, bases)]
    _answer_candidates(requests, built, anchor_of, qa_of, answerer, judge, config)
    rewards = []
    for i, (req, base) in enumerate(zip(requests, bases)):
        anchor = anchor_of[i]
        samples, task_rewards = [], []
        for g, out in enumerate(req.outputs):
            source = built[anchor][_output_key(requests[anchor].outputs[g])]
            task_rewards.append(source.task if isinstance(source.task, float) else None)
            samples += _candidate_samples(req, g, built[i], source, qa_of[anchor], token_counter(base.meta.core),
                                          token_counter, config)
        rewards.append((req.session_id, tuple(samples), tuple(task_rewards)))
    elapsed = time.perf_counter() - started
    masked = sum(s.masked for _, samples, _ in rewards for s in samples)
    if masked:
        log.warning("reward: %d of %d samples masked in %d sessions", masked,
                    sum(len(samples) for _, samples, _ in rewards), len(rewards))
    return [SessionReward(sid, samples, tasks, elapsed) for sid, samples, tasks in rewards]


def _build_candidates(req: SessionRewardRequest, base: BaseBank, embedder, config: RewardConfig
                      ) -> dict[tuple, _Candidate]:
    """Every distinct candidate bank of a request (and, for counterfactuals, each agent's variant:
    the expert's outputs with that agent's output swapped in), keyed by its outputs."""
    clock_value = time_to_posix(normalise_time(req.session_date)) if req.session_date else time.time()
    variants = [dict(out) for out in req.outputs]
    if config.counterfactual:
        variants += [{**req.expert_outputs, agent: text} for out in req.outputs for agent, text in out.items()]
    cands: dict[tuple, _Candidate] = {}
    for outputs in variants:
        key = _output_key(outputs)
        if key not in cands:
            store = OverlayStore(base)
            bank = MemoryBank(store, req.owner, embedder=embedder, clock=lambda v=clock_value: v)
            app = apply_agent_outputs(bank, outputs, session_id=req.session_id, drop_invalid_agents=True)
            cands[key] = _Candidate(app, CandidateSearch(store))
    return cands


def _answer_candidates(requests, built, anchor_of, qa_of, answerer, judge, config: RewardConfig) -> None:
    """Retrieve for every question of every candidate that is answered (dense: all; sparse: the
    conversation's last session), answer and judge all at once; sets `task` and `counts`."""
    jobs: list[tuple[Question, AnswerContext]] = []
    owners: list[tuple[int, tuple]] = []
    for i, (req, cands) in enumerate(zip(requests, built)):
        if anchor_of[i] != i or not qa_of[i]:
            continue
        questions = [qa_question(q, n) for n, q in enumerate(qa_of[i])]
        fallback = parse_date(req.session_date)
        for key, cand in cands.items():
            cand.contexts = [build_answer_context(cand.search, q, k=config.top_k, current_date=fallback)
                             for q in questions]
            jobs += [(q, ctx) for q, ctx in zip(questions, cand.contexts)]
            owners += [(i, key)] * len(questions)
    answers = answer_all(answerer, jobs, config)
    verdicts = iter(judge_all(judge, [(q, a) for (q, _), a in zip(jobs, answers) if isinstance(a, str)], config))
    results: dict[tuple[int, tuple], list] = {}
    for owner, answer in zip(owners, answers):
        results.setdefault(owner, []).append(answer if isinstance(answer, CallFailure) else next(verdicts))
    for (i, key), outcome in results.items():
        cand = built[i][key]
        failures = [v for v in outcome if isinstance(v, CallFailure)]
        if failures:
            cand.task = CallFailure(f"{len(failures)} of {len(outcome)} questions could not be scored; "
                                    f"first: {failures[0].reason}")
        else:
            cand.task = sum(outcome) / len(outcome)
        cand.counts = retrieval_counts(cand.contexts, cand.app.result.touched)


def _candidate_samples(req: SessionRewardRequest, g: int, cands: dict[tuple, _Candidate], source: _Candidate,
                       qa: tuple[QAPair, ...], core_before_tokens: int, token_counter: TokenCounter,
                       config: RewardConfig) -> list[SampleReward]:
    """The samples of candidate g: its own validity and lengths, the task reward and attribution
    of `source` (itself, or in sparse mode the conversation's last session's candidate g)."""
    out = req.outputs[g]
    cand = cands[_output_key(out)]
    counts = source.counts or {}
    dominant = dominant_kind(counts, config.tie_order) if counts else None
    samples = []
    for agent in AGENTS:
        if agent not in out:
            continue
        app = cand.app.agents[MemoryKind(agent)]
        valid, invalid_reason = validity(app)
        raw = out[agent]
        tokens = token_counter(raw or "")
        if not config.length_penalty:
            penalty = 0.0
        elif agent == "core":
            grown = token_counter(app.proposed_core) - core_before_tokens if app.proposed_core is not None else 0
            penalty = core_length_penalty(grown, config)
        else:
            penalty = ratio_length_penalty(tokens, req.expert_tokens[agent], config)
        task = cands[_output_key({**req.expert_outputs, agent: raw})].task if config.counterfactual else source.task
        masked_reason = None
        if not qa:
            masked_reason = "the session has no QA pairs" if config.dense else "the conversation has no QA pairs"
        elif isinstance(task, CallFailure) and valid:
            masked_reason = task.reason
        task_value = task if isinstance(task, float) else None
        if masked_reason is not None:
            reward = None
        elif not valid:
            reward = 0.0  # v = 0: R is exactly 0 whatever T is
        else:
            reward = task_value * (1.0 - config.lam * penalty)
        samples.append(SampleReward(
            agent=agent, index=g, valid=valid, task_reward=task_value, length_penalty=penalty, reward=reward,
            weight=sample_weight(agent, dominant, config), dominant_kind=dominant, retrieval_counts=dict(counts),
            masked=masked_reason is not None, mask_reason=masked_reason, invalid_reason=invalid_reason,
            output_tokens=tokens))
    return samples


class RewardService:
    """`score_session` with everything bound: a `RewardFn` (requests -> rewards) for the trainer.

    Keeps its own base cache (state-before banks stay loaded between calls). Thread-safe: any
    number of threads may call it at once.
    """

    def __init__(self, *, snapshots: SnapshotStore, token_counter: TokenCounter, answerer, judge,
                 config: RewardConfig | None = None, embedder=None):
        if not isinstance(snapshots, SnapshotStore):
            raise InvalidInputError(f"snapshots must be a SnapshotStore, got {type(snapshots).__name__}")
        if not callable(token_counter):
            raise InvalidInputError("token_counter must be a callable str -> int")
        self.snapshots = snapshots
        self.token_counter = token_counter
        self.answerer = answerer
        self.judge = judge
        self.config = config or RewardConfig()
        self.embedder = embedder
        self.cache = BaseCache(self.config.base_cache)

    def __call__(self, requests: Sequence[SessionRewardRequest]) -> list[SessionReward]:
        return score_session(requests, snapshots=self.snapshots, token_counter=self.token_counter,
                             answerer=self.answerer, judge=self.judge, config=self.config,
                             embedder=self.embedder, cache=self.cache)


def make_reward_fn(*, snapshots: SnapshotStore, token_counter: TokenCounter, answerer, judge,
                   config: RewardConfig | None = None, embedder=None) -> RewardFn:
    """A thread-safe `RewardFn` bound to these parts (a `RewardService`)."""
    return RewardService(snapshots=snapshots, token_counter=token_counter, answerer=answerer, judge=judge,
                         config=config, embedder=embedder)
