"""Per-sample rewards of a group of G long/short-term rollouts of one chunk (for the trainer).

The rollout unit is one chunk (one `Session`) from one state before it: the trainer samples G
splitter outputs; for each sample g it renders the long-term prompt from *that* sample's
important facts and their candidates (`rollout_prompts`), samples the long-term agent once, and
the short-term agent once (plus a consolidation answer if its state was over the limit). The G
(splitter, long_term, short_term[, consolidation]) texts are `LongShortSample`s, and
`score_longshort_group` returns one `reward.types.SessionReward` with a `SampleReward` per
(agent, g), agents named "splitter", "long_term", "short_term":

    candidate g  = state before + sample g's decisions and state, applied in one transaction
                   (`apply_longshort`; an invalid agent's part left out)
    v(g, m)      = 1 if agent m's answer parses against what it was shown and the bank took all of
                   it (the validity gate), else 0
    T(g)         = fraction of the chunk's QA judged correct, answered from candidate g
    l(g, m)      = ratio length penalty against the expert's tokens (`reward.length`), when
                   `expert_tokens`, `count_tokens` and a `RewardConfig` with the penalty on are given
    R(g, lt/st)  = v * T * (1 - lambda * l)
    R(g, split)  = v * (T - noop_weight * noops(g) / max(1, m(g))) * (1 - lambda * l)
                   noops(g): important facts whose long-term decision is NOOP (the splitter said
                   "important" about something memory already held); m(g): its important facts

An agent with no input in sample g (no important facts -> no long-term turn; no unimportant facts
-> no short-term turn) has no sample. Masking, never a made-up value: no QA -> every sample masked;
an answer or judge failure -> that candidate's valid samples masked (T unknown); an invalid sample
keeps R = 0. The long-term sample's candidates are recomputed here with `retrieve_candidates` on
the restored state, which is deterministic for a state and an embedder: use the same embedder and
`top_k` as the rollout, or the ids the policy saw will not be the ids checked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from membuilder.answering import build_answer_context
from membuilder.bank import MemoryBank
from membuilder.datasets import Session
from membuilder.store import InMemoryStore
from membuilder.types import BankState
from reward.config import RewardConfig
from reward.length import ratio_length_penalty
from reward.task import qa_question
from reward.types import QAPair, RewardInputError, SampleReward, SessionReward, SessionRewardRequest

from .backends import DEFAULT_STATE_LIMIT
from .builder import DEFAULT_TOP_K, apply_longshort, retrieve_candidates, session_time
from .prompts import render_consolidation, render_long_term, render_short_term
from .schema import is_over_limit, parse_decisions, parse_split, parse_state

LS_AGENTS = ("splitter", "long_term", "short_term")


@dataclass(frozen=True)
class LongShortSample:
    """Sample g's raw outputs; `long_term` / `short_term` None when that agent had no input."""

    splitter: str
    long_term: str | None = None
    short_term: str | None = None
    consolidation: str | None = None


def _bank(state: BankState, embedder) -> MemoryBank:
    bank = MemoryBank(InMemoryStore(), state.owner, embedder=embedder)
    bank.restore(state)
    return bank


def rollout_prompts(state: BankState, session: Session, splitter_output: str, *, embedder=None,
                    top_k: int = DEFAULT_TOP_K, state_limit: int = DEFAULT_STATE_LIMIT) -> dict[str, list[dict]]:
    """The long-term and short-term prompts that follow one splitter sample ({} if it is invalid;
    a role is absent when it has no input). Uses the same retrieval as `score_longshort_group`."""
    split = parse_split(splitter_output)
    if not split.ok:
        return {}
    bank = _bank(state, embedder)
    out = {}
    if split.value.important:
        cands = retrieve_candidates(bank, split.value.important, top_k)
        out["long_term"] = render_long_term(split.value.important, cands, session).messages
    if split.value.unimportant:
        out["short_term"] = render_short_term(bank.core, split.value.unimportant, session,
                                              state_limit=state_limit).messages
    return out


def consolidation_prompt(short_term_output: str, state_limit: int = DEFAULT_STATE_LIMIT) -> list[dict] | None:
    """The consolidation prompt when a short-term answer is over the limit, else None."""
    parsed = parse_state(short_term_output, state_limit)
    return render_consolidation(parsed.value, state_limit=state_limit).messages if is_over_limit(parsed) else None


def _candidate(state, session, sample, embedder, top_k, state_limit):
    """Build candidate g: (bank, {agent: (valid, why not, output text)}, noops, m)."""
    bank = _bank(state, embedder)
    verdicts: dict[str, tuple[bool, str | None, str]] = {}
    split = parse_split(sample.splitter)
    verdicts["splitter"] = (split.ok, split.error, sample.splitter)
    if not split.ok:
        return bank, verdicts, 0, 0
    facts, decisions, new_state = split.value.important, None, None
    if facts and sample.long_term is not None:
        cands = retrieve_candidates(bank, facts, top_k)
        p = parse_decisions(sample.long_term, tuple(tuple(e.id for e in c) for c in cands))
        verdicts["long_term"] = (p.ok, p.error, sample.long_term)
        decisions = p.value if p.ok else None
    elif facts:
        verdicts["long_term"] = (False, "no long-term answer for this sample's important facts", "")
    if split.value.unimportant and sample.short_term is not None:
        p = parse_state(sample.short_term, state_limit)
        text = sample.short_term
        if is_over_limit(p) and sample.consolidation is not None:
            p = parse_state(sample.consolidation, state_limit)
            text = sample.short_term + sample.consolidation
        elif is_over_limit(p):
            p = type(p)("short_term", False, error=p.error + " and no consolidation answer")
        verdicts["short_term"] = (p.ok, p.error, text)
        new_state = p.value if p.ok else None
    elif split.value.unimportant:
        verdicts["short_term"] = (False, "no short-term answer for this sample's unimportant facts", "")
    _, lt_rej, st_rej = apply_longshort(bank, decisions, new_state, session_id=session.session_id,
                                        when=session_time(session))
    if lt_rej:
        verdicts["long_term"] = (False, "bank rejected: " + "; ".join(lt_rej), verdicts["long_term"][2])
    if st_rej:
        verdicts["short_term"] = (False, "bank rejected: " + "; ".join(st_rej), verdicts["short_term"][2])
    noops = sum(d.action == "NOOP" for d in decisions) if decisions else 0
    return bank, verdicts, noops, len(facts)


def score_longshort_group(state: BankState, session: Session, qa: Sequence[QAPair],
                          samples: Sequence[LongShortSample], *, answerer, judge, embedder=None,
                          top_k: int = DEFAULT_TOP_K, state_limit: int = DEFAULT_STATE_LIMIT,
                          answer_k: int = 10, noop_weight: float = 0.5,
                          expert_tokens: Mapping[str, int] | None = None,
                          count_tokens: Callable[[str], int] | None = None,
                          config: RewardConfig | None = None) -> SessionReward:
    """The G samples' rewards (module doc), in order g = 0..G-1, agents in `LS_AGENTS` order."""
    if not 0.0 <= noop_weight:
        raise ValueError(f"noop_weight must be >= 0, got {noop_weight}")
    if not all(isinstance(q, QAPair) for q in qa):
        raise TypeError("qa must be reward.types.QAPair objects")
    if not all(isinstance(s, LongShortSample) for s in samples):
        raise TypeError("samples must be LongShortSample objects")
    started = time.perf_counter()
    questions = [qa_question(q, i) for i, q in enumerate(qa)]
    penalise = expert_tokens is not None and count_tokens is not None and config is not None and config.length_penalty
    out: list[SampleReward] = []
    task_rewards: list[float | None] = []
    for g, sample in enumerate(samples):
        bank, verdicts, noops, m = _candidate(state, session, sample, embedder, top_k, state_limit)
        task, mask_reason = None, None
        if not questions:
            mask_reason = "the chunk has no QA"
        else:
            try:
                correct = 0
                for q in questions:
                    ctx = build_answer_context(bank, q, k=answer_k)
                    if judge.judge(q, answerer.answer(q, ctx)).correct:
                        correct += 1
                task = correct / len(questions)
            except Exception as exc:  # noqa: BLE001 - T unknown: mask, never a made-up value
                mask_reason = f"answer or judge failed: {type(exc).__name__}: {exc}"
        task_rewards.append(task)
        for agent in LS_AGENTS:
            if agent not in verdicts:
                continue
            valid, why, text = verdicts[agent]
            tokens = count_tokens(text) if count_tokens is not None else 0
            lp = 0.0
            if penalise and valid and agent in expert_tokens:
                lp = ratio_length_penalty(tokens, expert_tokens[agent], config)
            lam = config.lam if config is not None else 0.0
            if not valid:
                reward, masked, reason = 0.0, False, None
            elif task is None:
                reward, masked, reason = None, True, mask_reason
            else:
                base = task - (noop_weight * noops / max(1, m) if agent == "splitter" else 0.0)
                reward, masked, reason = base * (1.0 - lam * lp), False, None
            out.append(SampleReward(agent=agent, index=g, valid=valid,
                                    task_reward=None if masked else task,
                                    length_penalty=lp, reward=reward, weight=1.0, dominant_kind=None,
                                    masked=masked, mask_reason=reason, invalid_reason=why,
                                    output_tokens=tokens))
    return SessionReward(session_id=session.session_id, samples=tuple(out), task_rewards=tuple(task_rewards),
                         elapsed_s=time.perf_counter() - started)


def make_longshort_reward_fn(snapshots, session_of: Callable[[str], Session], *, answerer, judge,
                             **options) -> Callable[[Sequence[SessionRewardRequest]], list[SessionReward]]:
    """The trainer's `reward_fn` (`reward.types.RewardFn`) for this agent set.

    Each `SessionRewardRequest` names the state before (`snapshot_id` in `snapshots`, a
    `membuilder.snapshots.SnapshotStore`), its chunk (`session_of(session_id)` returns the
    `Session`), its QA, and per candidate g `outputs[g]` = {"splitter": text, "long_term": text,
    "short_term": text, "consolidation": text}, the last three optional (absent: the agent had
    no input in that sample). Build requests with the constructor: `SessionRewardRequest.from_dict`
    accepts only the four MemBuilder agents. `options` go to `score_longshort_group` (embedder,
    top_k, state_limit, noop_weight, expert_tokens ...; `expert_tokens` from the request is used
    when it is non-empty). Not safe to share one answerer or judge that is not thread-safe; this
    function itself is sequential.
    """

    def reward_fn(requests: Sequence[SessionRewardRequest]) -> list[SessionReward]:
        out = []
        for req in requests:
            samples = []
            for g, o in enumerate(req.outputs):
                if not isinstance(o.get("splitter"), str):
                    raise RewardInputError(f"request {req.session_id}: outputs[{g}].splitter must be a string")
                samples.append(LongShortSample(o["splitter"], o.get("long_term"), o.get("short_term"),
                                               o.get("consolidation")))
            opts = dict(options)
            if req.expert_tokens:
                opts["expert_tokens"] = req.expert_tokens
            out.append(score_longshort_group(snapshots.get(req.snapshot_id), session_of(req.session_id), req.qa,
                                             samples, answerer=answerer, judge=judge, **opts))
        return out

    return reward_fn
