"""Does the long/short-term group reward rank splitter behaviours as intended? (offline, world data)

    python -m benchmarks.bench_longshort_reward --conversations 2 --sessions 10

For every session of the first conversations of a generated world, from the expert's state
before it, four splitter samples are scored as one group (`score_longshort_group`; the
long-term and short-term answers come from the world expert given each sample's facts):
expert (the plan's facts), eager (the expert's facts plus two facts memory already holds:
their decisions are NOOP), lazy (only the first half of the expert's important facts) and
invalid (prose, no JSON). Printed: mean T and mean reward per agent for each behaviour, over
the sessions that have QA. Offline: `OfflineAnswerAgent`, `RuleJudge`, hashing embedder.
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from membuilder.bank import MemoryBank
from membuilder.embedders import HashingEmbedder
from membuilder.judging import RuleJudge
from membuilder.longshort import LongShortBuilder, LongShortSample, OfflineAnswerAgent, WorldLongShortExpert
from membuilder.longshort.backends import RoleContext
from membuilder.longshort.builder import retrieve_candidates
from membuilder.longshort.reward import score_longshort_group
from membuilder.store import InMemoryStore
from membuilder.world import generate_world
from reward.types import QAPair

VARIANTS = ("expert", "eager", "lazy", "invalid")


def _sample(expert, bank, session, index, important, unimportant) -> LongShortSample:
    split = json.dumps({"important": important, "unimportant": unimportant})
    base = RoleContext(owner=bank.owner, session=session, session_index=index, annotation=None, state=bank.core)
    lt = st = None
    if important:
        ctx = RoleContext(**{**base.__dict__, "facts": tuple(important),
                             "candidates": retrieve_candidates(bank, important)})
        lt = expert.generate("long_term", [], context=ctx)
    if unimportant:
        st = expert.generate("short_term", [], context=RoleContext(**{**base.__dict__, "unimportant": tuple(unimportant)}))
    return LongShortSample(split, lt, st)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=2)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    world = generate_world(args.seed, conversations=args.conversations, sessions=args.sessions)
    expert = WorldLongShortExpert(world)
    embedder = HashingEmbedder()
    totals = {v: {"T": [], "splitter": [], "long_term": []} for v in VARIANTS}
    for wc in world:
        bank = MemoryBank(InMemoryStore(), wc.conversation_id, embedder=embedder)
        builder = LongShortBuilder(expert)
        for index, session in enumerate(tqdm(wc.conversation.sessions, desc=wc.conversation_id)):
            qa = tuple(QAPair.from_dict(q) for q in wc.session_qa(index))
            if qa:
                state = bank.snapshot()
                ctx = RoleContext(owner=bank.owner, session=session, session_index=index, annotation=None,
                                  state=bank.core)
                important, unimportant, _ = expert.facts(ctx)
                stored = [e.text for e in bank.entries()][:2]
                samples = [_sample(expert, bank, session, index, important, unimportant),
                           _sample(expert, bank, session, index, important + stored, unimportant),
                           _sample(expert, bank, session, index, important[: len(important) // 2], unimportant),
                           LongShortSample("The important facts are about a pet.")]
                reward = score_longshort_group(state, session, qa, samples, answerer=OfflineAnswerAgent(),
                                               judge=RuleJudge(), embedder=embedder, noop_weight=0.5)
                for g, v in enumerate(VARIANTS):
                    totals[v]["T"].append(reward.task_rewards[g])
                    for agent in ("splitter", "long_term"):
                        s = next((s for s in reward.samples if s.agent == agent and s.index == g), None)
                        if s is not None and s.reward is not None:
                            totals[v][agent].append(s.reward)
            builder.add_session(bank, session, session_index=index)
    print("| behaviour | sessions | mean T | mean R splitter | mean R long-term |\n|---|---|---|---|---|")
    for v in VARIANTS:
        t = totals[v]

        def mean(xs):
            return f"{sum(xs) / len(xs):.3f}" if xs else "-"
        print(f"| {v} | {len(t['T'])} | {mean(t['T'])} | {mean(t['splitter'])} | {mean(t['long_term'])} |")


if __name__ == "__main__":
    main()
