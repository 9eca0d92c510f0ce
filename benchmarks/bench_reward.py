"""Reward benchmark: throughput of `score_session` against the naive approach, and whether the
reward tells good memory from bad.

    python -m benchmarks.bench_reward [--sizes 1000 10000] [--reps 5] [--group 8] [--questions 5]
                                      [--locomo PATH] [--world-conversations 4] [--out benchmarks/results/reward.md]

Part 1 (throughput). A state before of N synthetic entries (the store benchmark's seeded
templates, hashing embedder, 384-d), 5 questions, G = 8 candidates whose four agents each write
a few operations (core APPEND, episodic ADDs, semantic UPDATE + ADD, procedural ADD). Offline
extractive answerer and rule judge. Timed, in the same run:
  - `score_session`, cold: a fresh base cache, so the state-before bank is built inside the call
    (a session seen for the first time);
  - `score_session`, warm: the base already cached (the same session's snapshot seen again, or
    more requests of one session);
  - naive: per candidate, restore the state into a new in-memory bank, apply the outputs, search
    (which rebuilds the whole BM25 + dense index), answer, judge (`naive_task_rewards`).
The task rewards of both paths are compared (they must be equal). Medians over `--reps` runs.

Part 2 (does the reward tell good from bad?). LoCoMo with the annotation expert: for each session
of each conversation, the state before is the expert's, the session QA are the questions whose
evidence turns all lie in that session; three candidates are scored: the expert's own outputs,
empty outputs, and the expert's outputs of another session of the same conversation (the next
one; the previous one for the last session). Mean task reward per LoCoMo category and overall.
The same on the bundled synthetic world data when `membuilder.world` is present.

Part 3 (can a policy farm the reward?). On the same sessions, with the full reward (length penalty
on, whitespace tokens on both sides, the expert's own lengths): the expert's outputs against the
expert's outputs with the semantic agent's replaced by a gaming output (the session transcript as
one ADD, the same with its full stops removed so that it is one "sentence", every capitalised word
and number of the session as one ADD, an abstention note, the expert's operations repeated ten
times), or the core agent's by a REWRITE to an empty block. Mean over sessions of T, of the gaming
agent's reward and length penalty, and of the other three agents' reward (they share T).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.bench_store import NAMES, PLACES, make_corpus
from membuilder.agents.apply import apply_agent_outputs
from membuilder.answering import ExtractiveAnswerer, build_answer_context
from membuilder.bank import MemoryBank
from membuilder.embedders import HashingEmbedder
from membuilder.judging import RuleJudge
from membuilder.operations import Add
from membuilder.snapshots import SnapshotStore
from membuilder.store import InMemoryStore
from reward import RewardConfig, score_session
from reward.score import BaseCache
from reward.task import parse_date, qa_question
from reward.types import QAPair, SessionRewardRequest


def whitespace_tokens(text: str) -> int:
    return len(text.split())


# --- part 1 ----------------------------------------------------------------------------------------


def build_state(n: int, embedder, owner: str = "bench") -> object:
    bank = MemoryBank(InMemoryStore(), owner, embedder=embedder, clock=lambda: 1.0)
    corpus = make_corpus(n, seed=n)
    for start in tqdm(range(0, n, 500), desc=f"state of {n}", leave=False):
        bank.apply([Add(k, t, w) for k, t, w in corpus[start:start + 500]], session_id=f"s{start // 500}")
    return bank.snapshot()


def make_candidates(state, group: int, seed: int = 0) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """G candidates writing a few operations per agent, and the (name, other, place) each moved."""
    rng = random.Random(seed)
    semantic_ids = [e.id for e in state.entries if e.kind.value == "semantic"]
    cands, moves = [], []
    for g in range(group):
        name, other, place = rng.choice(NAMES), rng.choice(NAMES), rng.choice(PLACES)
        moves.append((name, other, place))
        cands.append({
            "core": json.dumps({"action": "APPEND", "content": f"{name} is close friends with {other}."}),
            "episodic": json.dumps({"operations": [
                {"action": "ADD", "memory": f"{name} moved to {place} with {other} in the new year.",
                 "time": f"2024-0{1 + g % 9}-1{g % 9}"},
                {"action": "ADD", "memory": f"{other} visited {name} last week."}]}),
            "semantic": json.dumps({"operations": [
                {"action": "UPDATE", "id": rng.choice(semantic_ids), "new_memory": f"{name} now lives in {place}."},
                {"action": "ADD", "memory": f"{other}'s favourite drink is green tea."}]}),
            "procedural": json.dumps({"operations": [
                {"action": "ADD", "memory": f"{name}'s moving checklist: pack, label boxes, call {other}."}]}),
        })
    return cands, moves


def make_qa(moves: list[tuple[str, str, str]], n: int) -> tuple[QAPair, ...]:
    """Questions about the first n candidates' moves: each candidate can answer its own."""
    return tuple(QAPair(f"Where did {name} move to with {other} in the new year?", place, "single-session",
                        question_date="2024-12-01", question_id=f"q{i}")
                 for i, (name, other, place) in enumerate(moves[:n]))


def naive_task_rewards(req: SessionRewardRequest, snapshots: SnapshotStore, embedder, answerer, judge,
                       config: RewardConfig) -> list[float | None]:
    """The task reward of every candidate with a fully rebuilt bank per candidate (the baseline)."""
    state = snapshots.get(req.snapshot_id)
    questions = [qa_question(q, i) for i, q in enumerate(req.qa)]
    fallback = parse_date(req.session_date)
    out = []
    for outputs in req.outputs:
        bank = MemoryBank(InMemoryStore(), req.owner, embedder=embedder, clock=lambda: 0.0)
        bank.restore(state)
        apply_agent_outputs(bank, outputs, session_id=req.session_id, drop_invalid_agents=True)
        correct = []
        for q in questions:
            context = build_answer_context(bank, q, k=config.top_k, current_date=fallback)
            verdict = judge.judge(q, answerer.answer(q, context))
            correct.append(verdict.correct)
        out.append(None if any(c is None for c in correct) else sum(correct) / len(correct))
    return out


def throughput(sizes: list[int], reps: int, group: int, n_questions: int, tmp: Path) -> list[dict]:
    embedder = HashingEmbedder(dim=384)
    answerer, judge, config = ExtractiveAnswerer(), RuleJudge(), RewardConfig()
    snapshots = SnapshotStore(tmp / "snapshots")
    rows = []
    for n in sizes:
        state = build_state(n, embedder)
        sid = snapshots.put(state)
        cands, moves = make_candidates(state, group)
        req = SessionRewardRequest(owner="bench", snapshot_id=sid, session_id="new", qa=make_qa(moves, n_questions),
                                   expert_tokens={a: whitespace_tokens(t) for a, t in cands[0].items()},
                                   outputs=tuple(cands), session_date="2024-12-01")

        def ours(cache):
            t = time.perf_counter()
            [r] = score_session([req], snapshots=snapshots, token_counter=whitespace_tokens, answerer=answerer,
                                judge=judge, config=config, embedder=embedder, cache=cache)
            return time.perf_counter() - t, r

        cold, warm, naive = [], [], []
        equal = True
        for _ in tqdm(range(reps), desc=f"{n} entries", leave=False):
            cache = BaseCache()
            t, r = ours(cache)
            cold.append(t)
            t2, r2 = ours(cache)
            warm.append(t2)
            t = time.perf_counter()
            ref = naive_task_rewards(req, snapshots, embedder, answerer, judge, config)
            naive.append(time.perf_counter() - t)
            equal &= list(r.task_rewards) == ref and r2.task_rewards == r.task_rewards
        med = {k: statistics.median(v) for k, v in (("cold", cold), ("warm", warm), ("naive", naive))}
        rows.append({"entries": n, "group": group, "questions": n_questions, **med, "equal": equal,
                     "task_rewards": list(r.task_rewards)})
    return rows


# --- part 2 ----------------------------------------------------------------------------------------

EMPTY = '{"operations": []}'


def _other_index(s: int, n: int) -> int:
    return s + 1 if s + 1 < n else s - 1


def locomo_sessions(path: Path, snapshots: SnapshotStore, embedder, max_conversations: int | None):
    """Per session of LoCoMo: (owner, snapshot id, session, expert outputs, {category: [QAPair]})."""
    from membuilder.agents import AnnotationExpert, MemoryBuilder
    from membuilder.datasets import load_locomo

    out = []
    convs = load_locomo(path)[:max_conversations]
    for conv in tqdm(convs, desc="locomo: expert build", leave=False):
        bank = MemoryBank(InMemoryStore(), conv.conversation_id, embedder=embedder, clock=lambda: 0.0)
        records = MemoryBuilder(AnnotationExpert()).build(bank, conv)
        by_session = defaultdict(lambda: defaultdict(list))
        for q in conv.questions:
            if len(q.evidence_sessions) == 1:
                qtype = "abstention" if q.is_abstention else ("temporal" if q.category == "temporal" else "single-session")
                by_session[q.evidence_sessions[0]][q.category].append(
                    QAPair(q.question, q.answer, qtype, source=f"locomo-evidence:{q.category}",
                           question_id=q.question_id))
        for rec in records:
            sid = snapshots.put(rec.state_before)
            expert = {k.value: a.raw_output for k, a in rec.agents.items()}
            session = next(s for s in conv.sessions if s.session_id == rec.session_id)
            out.append((conv.conversation_id, sid, session, expert, by_session.get(rec.session_id, {})))
    return out


def discrimination(items, snapshots: SnapshotStore, embedder) -> dict[str, dict[str, tuple[float, int]]]:
    """{condition: {category: (mean task reward, questions)}} over every session's QA."""
    answerer, judge, config = ExtractiveAnswerer(), RuleJudge(), RewardConfig(length_penalty=False)
    sums: dict[str, dict[str, list[float]]] = {c: defaultdict(lambda: [0.0, 0]) for c in ("expert", "empty", "other")}
    by_owner = defaultdict(list)
    for item in items:
        by_owner[item[0]].append(item)
    for owner, sessions in tqdm(by_owner.items(), desc="scoring", leave=False):
        for s, (_, sid, session, expert, qa_by_cat) in enumerate(sessions):
            other = sessions[_other_index(s, len(sessions))][3] if len(sessions) > 1 else {a: EMPTY for a in expert}
            cands = (expert, {a: EMPTY for a in expert}, other)
            date = session.date.isoformat() if session.date else None
            reqs, cats = [], []
            for cat, qa in qa_by_cat.items():
                reqs.append(SessionRewardRequest(owner=owner, snapshot_id=sid, session_id=session.session_id,
                                                 qa=tuple(qa), expert_tokens={a: 0 for a in expert},
                                                 outputs=cands, session_date=date))
                cats.append((cat, len(qa)))
            if not reqs:
                continue
            results = score_session(reqs, snapshots=snapshots, token_counter=whitespace_tokens, answerer=answerer,
                                    judge=judge, config=config, embedder=embedder)
            for (cat, n), r in zip(cats, results):
                for cond, t in zip(("expert", "empty", "other"), r.task_rewards):
                    if t is None:
                        continue
                    keys = (cat, "all") if cat in ("adversarial", "abstention") else (cat, "all", "all answerable")
                    for key in keys:
                        sums[cond][key][0] += t * n
                        sums[cond][key][1] += n
    return {c: {cat: (v[0] / v[1], v[1]) for cat, v in d.items() if v[1]} for c, d in sums.items()}


def world_sessions(snapshots: SnapshotStore, embedder, n_conversations: int, sessions: int = 10):
    """The same items for the bundled synthetic world (None when `membuilder.world` is absent):
    the world expert's outputs and the world's exact session QA, by QA type."""
    try:
        from membuilder.world import build_expert_memory, generate_world
    except ImportError:
        return None
    out = []
    for wc in tqdm(generate_world(0, conversations=n_conversations, sessions=sessions),
                   desc="world: expert build", leave=False):
        bank = MemoryBank(InMemoryStore(), wc.conversation_id, embedder=embedder, clock=lambda: 0.0)
        _, records = build_expert_memory(wc, bank=bank, snapshots=True)
        for index, rec in enumerate(records):
            by_type = defaultdict(list)
            for d in wc.session_qa(index):
                qa = QAPair.from_dict(d)
                by_type[qa.qtype].append(qa)
            session = wc.conversation.sessions[index]
            out.append((wc.conversation_id, snapshots.put(rec.state_before), session,
                        {k.value: a.raw_output for k, a in rec.agents.items()}, by_type))
    return out


# --- part 3 ----------------------------------------------------------------------------------------

# (candidate, the agent that games in it)
FARMS = (("expert", "semantic"), ("transcript as one ADD", "semantic"), ("transcript as one sentence", "semantic"),
         ("every name and number", "semantic"), ("abstention note", "semantic"),
         ("expert's operations x10", "semantic"), ("core block emptied (core REWRITE \"\")", "core"))


def _add(memory: str) -> str:
    return json.dumps({"operations": [{"action": "ADD", "memory": memory}]})


def farm_outputs(session, expert: dict) -> list[dict]:
    """The candidates of part 3, in `FARMS` order: the expert's, then one agent gaming."""
    from membuilder.agents.parsing import find_json_object

    text = " ".join(f"{m.speaker}: {m.text}" for m in session.messages)
    one_sentence = re.sub(r"[.!?\n]+", ",", text)
    names = sorted(set(re.findall(r"\b[A-Z][a-z]+\b|\b\d+\b", text)))
    found, _, _ = find_json_object(expert.get("semantic") or "")
    repeated = (json.dumps({"operations": found["operations"] * 10})
                if isinstance(found, dict) and isinstance(found.get("operations"), list) else expert.get("semantic"))
    gaming = [_add(text), _add(one_sentence), _add("Mentioned: " + ", ".join(names)),
              _add("Anything else about them is not mentioned and unknown."), repeated]
    return ([dict(expert)] + [{**expert, "semantic": g} for g in gaming]
            + [{**expert, "core": json.dumps({"action": "REWRITE", "content": ""})}])


def farming(items, snapshots: SnapshotStore, embedder) -> dict[str, dict[str, float]]:
    """{candidate: {"T", "R gaming", "l gaming", "R others", "sessions"}}, means over sessions."""
    answerer, judge = ExtractiveAnswerer(), RuleJudge()
    sums: dict[str, dict[str, float]] = {f: defaultdict(float) for f, _ in FARMS}
    for owner, sid, session, expert, qa_by_cat in tqdm(items, desc="farming", leave=False):
        qa = tuple(q for qs in qa_by_cat.values() for q in qs)
        if not qa or not session.messages:
            continue
        req = SessionRewardRequest(owner=owner, snapshot_id=sid, session_id=session.session_id, qa=qa,
                                   expert_tokens={a: whitespace_tokens(t or "") for a, t in expert.items()},
                                   outputs=tuple(farm_outputs(session, expert)),
                                   session_date=session.date.isoformat() if session.date else None)
        [r] = score_session([req], snapshots=snapshots, token_counter=whitespace_tokens, answerer=answerer,
                            judge=judge, config=RewardConfig(), embedder=embedder)
        if any(s.masked for s in r.samples):
            continue
        for g, (name, agent) in enumerate(FARMS):
            sem = r.sample(agent, g)
            others = [s.reward for s in r.samples if s.index == g and s.agent != agent]
            acc = sums[name]
            acc["T"] += r.task_rewards[g]
            acc["R gaming"] += sem.reward
            acc["l gaming"] += sem.length_penalty
            acc["R others"] += sum(others) / len(others)
            acc["sessions"] += 1
    return {f: {k: (v / d["sessions"] if k != "sessions" else v) for k, v in d.items()}
            for f, d in sums.items() if d["sessions"]}


# --- report ----------------------------------------------------------------------------------------


def report(args, rows, locomo, world, elapsed: float, farms: dict | None = None) -> str:
    lines = ["# Reward benchmark", "",
             f"Command: `python -m benchmarks.bench_reward {' '.join(args.argv)}`".rstrip(), "",
             f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}, "
             f"numpy {np.__version__}, {os.cpu_count()} CPUs (shared with other jobs; load average at start "
             f"{args.load0:.2f}, at end {os.getloadavg()[0]:.2f}); total {elapsed:.0f} s.", "",
             "## 1. Throughput (session-candidates scored per second)", "",
             f"G = {rows[0]['group'] if rows else '?'} candidates, {rows[0]['questions'] if rows else '?'} questions, "
             "offline extractive answerer + rule judge, hashing embedder (384-d), one thread. Median of "
             f"{args.reps} runs. Cold: the state-before bank is built inside the call (fresh cache); warm: "
             "it is cached. Naive: restore + apply + full index rebuild per candidate.", "",
             "| state before | ours, cold | ours, warm | naive | cold / naive | warm / naive | same task rewards |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["group"]
        lines.append(f"| {r['entries']:,} entries | {g / r['cold']:.1f} cand/s ({r['cold'] * 1e3:.0f} ms) | "
                     f"{g / r['warm']:.1f} cand/s ({r['warm'] * 1e3:.0f} ms) | {g / r['naive']:.2f} cand/s "
                     f"({r['naive'] * 1e3:.0f} ms) | {r['naive'] / r['cold']:.1f}x | {r['naive'] / r['warm']:.1f}x | "
                     f"{r['equal']} |")
    if rows:
        big = rows[-1]
        met = big["naive"] / big["cold"] >= 10
        lines += ["", f"Goal: >= 10x the naive approach at {big['entries']:,} entries: "
                      f"**{'met' if met else 'not met'}** cold ({big['naive'] / big['cold']:.1f}x), "
                      f"warm {big['naive'] / big['warm']:.1f}x."]
    lines += ["", "Why cold is not G times faster than naive: the state-before bank (tokenising every entry, "
              "BM25 postings, unit vectors) is built once per call instead of once per candidate, and building "
              "it costs about what one naive rebuild does; each candidate then costs only its own few entries "
              "plus answering. Warm is the steady state when a session's snapshot is scored again (later "
              "epochs, or several requests of one session), since bases are cached by snapshot id."]
    for title, table in (("LoCoMo, annotation expert", locomo), ("Synthetic world, world expert", world)):
        lines += ["", f"## 2. Does the reward tell good memory from bad? {title}", ""]
        if table is None:
            lines.append("Not run (--skip-part2, or the data or package is absent).")
            continue
        cats = sorted(table["expert"], key=lambda c: (c.startswith("all"), c))
        lines += ["Mean task reward T (fraction of the session's QA judged correct; extractive answerer, rule "
                  "judge, hashing embedder, length penalty off), weighted by questions. State before = the "
                  "expert's; candidates: the expert's own outputs for the session, empty outputs "
                  "(`{\"operations\": []}` for all four agents), and the expert's outputs of the next session of "
                  "the same conversation (the previous one for the last session). Session QA: "
                  + ("LoCoMo questions whose evidence turns all lie in the session (category 5, adversarial, "
                     "kept and reported apart)." if title.startswith("LoCoMo") else
                     "the world generator's exact QA of the session (seed 0)."),
                  "Abstention / adversarial questions reward memory that holds nothing on the topic, so empty "
                  "outputs score higher there by construction; \"all answerable\" leaves them out.", "",
                  "| QA type | questions | expert outputs | empty outputs | another session's outputs |",
                  "|---|---|---|---|---|"]
        for cat in cats:
            n = table["expert"][cat][1]
            vals = [table[c].get(cat, (float("nan"), 0))[0] for c in ("expert", "empty", "other")]
            lines.append(f"| {cat} | {n} | {vals[0]:.3f} | {vals[1]:.3f} | {vals[2]:.3f} |")
        ans = [table[c].get("all answerable", (float("nan"), 0))[0] for c in ("expert", "empty", "other")]
        best = ans[0] > max(ans[1:])
        lines += ["", f"Expert outputs score highest over the answerable questions: **{'yes' if best else 'no'}** "
                      f"({ans[0]:.3f} vs {ans[1]:.3f} empty and {ans[2]:.3f} another session's)."]
    lines += ["", "## 3. Can a policy farm the reward?", ""]
    if not farms:
        lines.append("Not run (--skip-part2, or the data or package is absent).")
        return "\n".join(lines) + "\n"
    lines += ["Full reward (length penalty on, whitespace tokens on both sides, the expert's own lengths; "
              "extractive answerer, rule judge, hashing embedder). Candidates: the expert's outputs, and the "
              "expert's outputs with one agent's answer replaced by a gaming one (the semantic agent's, the core "
              "agent's in the last row). Means over sessions (all QA types). \"R gaming\": the gaming sample's "
              "reward; \"R others\": the other three agents' (they share T).", ""]
    for title, table in farms.items():
        if not table:
            continue
        lines += [f"{title} ({int(table['expert']['sessions'])} sessions):", "",
                  "| gaming output | T | R gaming | length penalty | R others |", "|---|---|---|---|---|"]
        for name, row in table.items():
            lines.append(f"| {name} | {row['T']:.3f} | {row['R gaming']:.3f} | {row['l gaming']:.3f} | "
                         f"{row['R others']:.3f} |")
        lines.append("")
    lines += ["Before the extractive answer was bounded (`ExtractiveAnswerer.max_answer_words`), \"transcript as "
              "one sentence\" was answered whole for every question and the rule judge found every gold answer "
              "inside it: on the world data (4 conversations) T 0.683 against the expert's 0.496. What remains "
              "is not a fault of the offline answerer: a verbatim transcript is real information that an LLM "
              "answerer would use too, and the length penalty is its only price; with `min_diff` = 200 tokens "
              "a session shorter than the expert's answer plus 200 tokens is stored whole for free (the world "
              "sessions are), while on LoCoMo's long sessions the penalty bites (see `reward/score.py`). The last row "
              "shows a blind spot of the offline answerer: it reads retrieved entries only, never the core block, "
              "so the core agent's offline reward cannot tell a good core block from an empty one (an LLM "
              "answerer is shown the core block)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--locomo", type=Path, default=None, help="locomo10.json (default: the shared data folder)")
    p.add_argument("--locomo-conversations", type=int, default=None)
    p.add_argument("--world-conversations", type=int, default=4)
    p.add_argument("--skip-part2", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/reward.md"))
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else os.sys.argv[1:]
    args.load0 = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = throughput(args.sizes, args.reps, args.group, args.questions, tmp)
        locomo = world = None
        farms: dict[str, dict] = {}
        if not args.skip_part2:
            from membuilder.datasets import default_data_dir
            path = args.locomo or default_data_dir() / "locomo" / "locomo10.json"
            embedder = HashingEmbedder(dim=384)
            snapshots = SnapshotStore(tmp / "p2")
            if path.exists():
                locomo_items = locomo_sessions(path, snapshots, embedder, args.locomo_conversations)
                locomo = discrimination(locomo_items, snapshots, embedder)
                farms["LoCoMo, annotation expert"] = farming(locomo_items, snapshots, embedder)
            items = world_sessions(snapshots, embedder, args.world_conversations)
            if items is not None:
                world = discrimination(items, snapshots, embedder)
                farms["Synthetic world, world expert"] = farming(items, snapshots, embedder)
    text = report(args, rows, locomo, world, time.perf_counter() - started, farms)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
