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
whatever T is. Masked samples are logged (one warning per call). One bad sample never takes the
call down: a candidate whose bank cannot be built (the embedder raises or gives NaN on one of its
texts) or whose retrieval fails has all its samples masked with the reason; a token counter that
raises on an output (a Rust tokenizer on a lone surrogate) or returns anything but a count >= 0
masks that sample when it is valid (its penalty is unknown). Hostile outputs (lone surrogates in a
memory, JSON nested 50,000 deep, actions or ids of another kind, huge strings) are invalid with
the parser's or the bank's reason. A request with wrong Python types (an output that is not a
string, an expert length that is not an integer >= 0, a QA pair that is not a `QAPair`) is a
`RewardInputError` naming the field, raised before any work.

Reward farming (reviewed; `python -m benchmarks.bench_reward`, part 3, has the numbers):
- fixed: a memory written as one giant "sentence" (a session transcript with its full stops
  removed) was returned whole by the extractive answerer for every question, and the rule judge's
  containment test then found every gold answer in it: T 0.683 against the expert's 0.496 on the
  world data (4 conversations), free of length penalty there. `ExtractiveAnswerer` now cuts a
  sentence longer than 40 words into 40-word pieces whose boundaries do not depend on the
  question; the same output now scores about what the plain transcript does (0.557 vs 0.550).
- inherent to the design, not to the offline answerer: the length penalty is the only price of
  storing a session verbatim (an LLM answerer would use a verbatim transcript too). With
  `min_diff` = 200 tokens, an output within 200 tokens of the expert's is free, so on the world
  data's short sessions the semantic agent storing the transcript as one ADD raises T (0.550 vs
  0.496), and T is shared by the candidate's four agents; on LoCoMo's long sessions the penalty
  bites (length penalty 0.92, reward 0.039 against the expert's 0.191). Raising `min_diff` or a
  per-session budget is a design decision, left to the config.
- blind spot of the offline answerer: `ExtractiveAnswerer` reads retrieved entries only, never
  the core block, so offline the core agent's reward cannot tell a good block from an emptied one
  (core REWRITE "": T 0.496, the expert's 0.496). Train the core agent with an LLM answerer.
- not profitable on either data set: a list of every name and number mentioned ("Paris, London,
  Rome, ..."; the containment judge accepts a list holding the gold, an LLM judge may not), an
  abstention note ("not mentioned, unknown"), the expert's operations repeated ten times (same
  T, length penalty). Duplicates do inflate the retrieval counts of attribution, which scales
  that agent's advantage (both signs), not its reward.
- sparse mode (`RewardConfig.dense=False`) answers from the last request's candidate g only. Fed
  the usual requests (each session over the EXPERT's state before it) it is only the session-level
  approximation of the paper's sparse ablation: the earlier sessions' outputs are not in the bank
  that is answered, so their T does not depend on them (their validity and length penalty do); do
  not train on it. The faithful ablation is the trainer's `reward.dense=false`
  (`trainers/conversation_episodes.py`): each of the G trajectories builds its own memory session
  after session, and its requests carry its OWN state before each session, so the anchor's bank
  is the trajectory's final memory; `prior_own_ids` then counts attribution over every entry the
  trajectory wrote, not only the last session's.

Speed: the state before is a `BaseBank` built once per (snapshot, owner, embedder) and cached
(`BaseCache`, shared across calls and threads); a candidate is an `OverlayStore` over it with
its own small index (`reward.overlay`); identical candidates (same outputs) are built and
answered once; answering and judging go through `reward.task` (batched or concurrent with a
per-call time limit).
"""

from __future__ import annotations

import logging
import numbers
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

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
    """One built candidate bank and what answering it gave. `app` and `search` are None when the
    bank could not be built (e.g. the embedder failed on one of its texts); `task` says why."""

    app: SessionApplication | None
    search: CandidateSearch | None
    contexts: list[AnswerContext] | None = None
    task: float | CallFailure | None = None
    counts: dict | None = None


def _count_tokens(token_counter: "TokenCounter", text: str) -> int | CallFailure:
    """`token_counter(text)`, or why it could not be had: a counter that raises (a Rust tokenizer
    on a lone surrogate) or returns something that is not a count gives a failure, never a number
    that would become a made-up penalty."""
    try:
        n = token_counter(text)
    except Exception as exc:
        return CallFailure(f"token_counter failed on this output: {type(exc).__name__}: {exc}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        return CallFailure(f"token_counter returned {n!r}, not a count >= 0")
    return int(n)


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
        # the library path gets no JSON validation (`SessionRewardRequest.from_dict`): the same
        # type checks here, so a wrong type is a clear error, not a crash deep in the scorer
        for n, pair in enumerate(req.qa if isinstance(req.qa, (tuple, list)) else [req.qa]):
            if not isinstance(pair, QAPair):
                raise RewardInputError(f"requests[{i}].qa[{n}] is a {type(pair).__name__}, not a QAPair")
        if not isinstance(req.expert_tokens, Mapping):
            raise RewardInputError(f"requests[{i}].expert_tokens must map agents to token counts")
        for agent, n in req.expert_tokens.items():
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
                raise RewardInputError(f"requests[{i}].expert_tokens[{agent!r}] must be an integer >= 0, got {n!r}")
        named = [(f"outputs[{g}]", out) for g, out in enumerate(req.outputs)]
        if req.expert_outputs is not None:
            named.append(("expert_outputs", req.expert_outputs))
        for where, out in named:
            if not isinstance(out, Mapping):
                raise RewardInputError(f"requests[{i}].{where} must map agents to raw text, "
                                       f"got {type(out).__name__}")
            for agent, text in out.items():
                if text is not None and not isinstance(text, str):
                    raise RewardInputError(f"requests[{i}].{where}[{agent!r}] must be a string (or None: "
                                           f"no output), got {type(text).__name__}")
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
    prior_own_ids: Sequence[Collection[str] | None] | None = None,
) -> list[SessionReward]:
    """One `SessionReward` per request, in order (see the module doc for the definition).

    `prior_own_ids` (optional, one item per request): ids of entries of the request's state
    before that its candidates count as their own for attribution, besides what they create or
    change themselves. For requests whose snapshot is a trajectory's own state (conversation
    episodes: the entries it wrote in earlier sessions); default none (the state before is the
    expert's, nothing in it is the candidate's).

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
    if prior_own_ids is not None and len(prior_own_ids) != len(requests):
        raise RewardInputError(f"prior_own_ids has {len(prior_own_ids)} items for {len(requests)} requests")
    prior = [frozenset(ids or ()) for ids in prior_own_ids] if prior_own_ids is not None else None
    started = time.perf_counter()
    bases = [cache.get(snapshots, req.snapshot_id, req.owner, embedder) for req in requests]
    if config.dense:
        anchor_of = {i: i for i in range(len(requests))}
        qa_of = {i: req.qa for i, req in enumerate(requests)}
    else:
        anchor_of, qa_of = _sparse_plan(requests)
    built = [_build_candidates(req, base, embedder, config) for req, base in zip(requests, bases)]
    _answer_candidates(requests, built, anchor_of, qa_of, answerer, judge, config, prior)
    rewards = []
    for i, (req, base) in enumerate(zip(requests, bases)):
        anchor = anchor_of[i]
        samples, task_rewards = [], []
        for g, out in enumerate(req.outputs):
            source = built[anchor][_output_key(requests[anchor].outputs[g])]
            task_rewards.append(source.task if isinstance(source.task, float) else None)
            samples += _candidate_samples(req, g, built[i], source, qa_of[anchor],
                                          _count_tokens(token_counter, base.meta.core), token_counter, config)
        rewards.append((req.session_id, tuple(samples), tuple(task_rewards)))
    elapsed = time.perf_counter() - started
    reasons = [s.mask_reason for _, samples, _ in rewards for s in samples if s.masked]
    if reasons:  # the first reason too: a masked call must say why in the log, not only in the samples
        log.warning("reward: %d of %d samples masked in %d sessions; first reason: %s", len(reasons),
                    sum(len(samples) for _, samples, _ in rewards), len(rewards), reasons[0])
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
            try:
                app = apply_agent_outputs(bank, outputs, session_id=req.session_id, drop_invalid_agents=True)
            except Exception as exc:  # e.g. the embedder gives NaN for one text: this candidate only
                cands[key] = _Candidate(None, None, task=CallFailure(
                    f"the candidate's bank could not be built: {type(exc).__name__}: {exc}"))
                continue
            cands[key] = _Candidate(app, CandidateSearch(store))
    return cands


def _answer_candidates(requests, built, anchor_of, qa_of, answerer, judge, config: RewardConfig,
                       prior: list[frozenset[str]] | None = None) -> None:
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
            if cand.app is None:  # not built: `task` already says why
                continue
            try:
                cand.contexts = [build_answer_context(cand.search, q, k=config.top_k, current_date=fallback)
                                 for q in questions]
            except Exception as exc:  # retrieval failed (e.g. a NaN query embedding): mask, do not guess
                cand.task = CallFailure(f"retrieval for the candidate failed: {type(exc).__name__}: {exc}")
                continue
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
        own = cand.app.result.touched if prior is None else prior[i].union(cand.app.result.touched)
        cand.counts = retrieval_counts(cand.contexts, own)


def _candidate_samples(req: SessionRewardRequest, g: int, cands: dict[tuple, _Candidate], source: _Candidate,
                       qa: tuple[QAPair, ...], core_before_tokens: int | CallFailure, token_counter: TokenCounter,
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
        raw = out[agent]
        if cand.app is None:  # the candidate could not be built: nothing about it is known
            samples.append(SampleReward(
                agent=agent, index=g, valid=False, task_reward=None, length_penalty=0.0, reward=None,
                weight=1.0, dominant_kind=None, retrieval_counts={}, masked=True, mask_reason=cand.task.reason))
            continue
        app = cand.app.agents[MemoryKind(agent)]
        valid, invalid_reason = validity(app)
        tokens = _count_tokens(token_counter, raw) if isinstance(raw, str) else 0
        penalty: float | CallFailure = 0.0
        if not config.length_penalty:
            pass
        elif agent == "core":
            if app.proposed_core is not None:
                after = _count_tokens(token_counter, app.proposed_core)
                if isinstance(after, CallFailure) or isinstance(core_before_tokens, CallFailure):
                    penalty = after if isinstance(after, CallFailure) else core_before_tokens
                else:
                    penalty = core_length_penalty(after - core_before_tokens, config)
        else:
            penalty = tokens if isinstance(tokens, CallFailure) else \
                ratio_length_penalty(tokens, req.expert_tokens[agent], config)
        task = cands[_output_key({**req.expert_outputs, agent: raw})].task if config.counterfactual else source.task
        masked_reason = None
        if not qa:
            masked_reason = "the session has no QA pairs" if config.dense else "the conversation has no QA pairs"
        elif isinstance(task, CallFailure) and valid:
            masked_reason = task.reason
        elif isinstance(penalty, CallFailure) and valid:
            masked_reason = penalty.reason
        task_value = task if isinstance(task, float) else None
        penalty = penalty if isinstance(penalty, float) else 0.0
        tokens = tokens if isinstance(tokens, int) else 0
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
