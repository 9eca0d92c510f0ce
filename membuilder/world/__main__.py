"""Check a generated world end to end: `python -m membuilder.world --seed 0 --conversations 10 --sessions 20`.

Builds every conversation's memory with the world expert through `MemoryBuilder` and reports, as
Markdown: the world's size, the expert's operations by kind and action, its fallbacks (an entry to
change that the prompt did not show), agent errors and rejected operations (both must be 0), and
the session-level QA answered right after each session by the offline pipeline (extractive
answerer, rule judge) from the expert's memory and from an empty memory, per QA type.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from tqdm import tqdm

from membuilder.agents import MemoryBuilder
from membuilder.answering import ExtractiveAnswerer, answer_with_context, build_answer_context
from membuilder.api import make_embedder
from membuilder.bank import MemoryBank
from membuilder.judging import RuleJudge
from membuilder.store import InMemoryStore

from . import DEFAULT_CONVERSATIONS, DEFAULT_SESSIONS, QTYPES, WorldExpert, generate_world


def check_world(seed: int, conversations: int, sessions: int, *, embedder: str | None = "hashing",
                progress: bool = True) -> dict:
    """The numbers of the module doc, as a dict."""
    world = generate_world(seed, conversations=conversations, sessions=sessions)
    emb = make_embedder(embedder)
    answerer, judge = ExtractiveAnswerer(), RuleJudge()
    ops, notes, errors, rejected = Counter(), 0, 0, 0
    correct = {"expert": Counter(), "empty": Counter()}
    asked = Counter()
    empty = MemoryBank(InMemoryStore(), "empty", embedder=emb)
    bar = tqdm(total=conversations * sessions, desc="world check", unit="session", disable=not progress)
    for wc in world:
        bank = MemoryBank(InMemoryStore(), wc.conversation_id, embedder=emb)
        builder = MemoryBuilder(WorldExpert(wc), snapshots=False, max_workers=1)
        for i, session in enumerate(wc.conversation.sessions):
            record = builder.add_session(bank, session, session_index=i, speakers=wc.conversation.speakers)
            for kind, agent in record.agents.items():
                errors += agent.error is not None
                rejected += len(agent.rejected)
                notes += sum("not shown" in n for n in agent.notes)
                ops.update((kind.value, op.action) for op in agent.operations)
            for qa in wc.plans[i].qa:
                q = qa.to_question()
                asked[qa.qtype] += 1
                for name, memory in (("expert", bank), ("empty", empty)):
                    answer = answer_with_context(q, build_answer_context(memory, q), answerer).answer
                    correct[name][qa.qtype] += bool(judge.judge(q, answer).correct)
            bar.update()
    bar.close()
    return {"seed": seed, "conversations": conversations, "sessions": conversations * sessions,
            "turns": sum(c.num_turns for c in world.dataset()),
            "conversation_questions": Counter(q.category for c in world.dataset() for q in c.questions),
            "operations": ops, "fallbacks": notes, "agent_errors": errors, "rejected": rejected,
            "session_qa": asked, "correct": correct}


def render(report: dict) -> str:
    r = report
    lines = [f"World seed {r['seed']}: {r['conversations']} conversations, {r['sessions']} sessions, "
             f"{r['turns']} turns; agent errors {r['agent_errors']}, rejected operations {r['rejected']}, "
             f"fallbacks (entry to change not shown: ADD) {r['fallbacks']}.", "",
             "Expert operations: " + ", ".join(f"{k} {a} {n}" for (k, a), n in sorted(r["operations"].items())),
             "", "Session QA right after each session (extractive answerer, rule judge):", "",
             "| QA type | questions | expert memory % | empty memory % |", "|---|---|---|---|"]
    for qtype in [*QTYPES, "all"]:
        n = sum(r["session_qa"].values()) if qtype == "all" else r["session_qa"][qtype]
        if not n:
            continue
        pct = {name: 100 * (sum(c.values()) if qtype == "all" else c[qtype]) / n for name, c in r["correct"].items()}
        lines.append(f"| {qtype} | {n} | {pct['expert']:.1f} | {pct['empty']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m membuilder.world", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conversations", type=int, default=DEFAULT_CONVERSATIONS)
    p.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS)
    p.add_argument("--embedder", choices=("hashing", "minilm", "none"), default="hashing")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    report = check_world(args.seed, args.conversations, args.sessions,
                         embedder=None if args.embedder == "none" else args.embedder, progress=not args.no_progress)
    print(render(report))
    return 0 if report["agent_errors"] == 0 and report["rejected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
