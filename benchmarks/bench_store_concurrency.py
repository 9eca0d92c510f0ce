"""Concurrent writers and readers on one owner: applies per second, reads per second, and a check
that nothing was lost, duplicated or resurrected.

    python -m benchmarks.bench_store_concurrency [--seconds 5] [--out benchmarks/results/store_concurrency.md]

SQLite: W writer processes and R reader processes open one bank file. A writer applies random
batches (ADD 50 %, UPDATE of a random semantic id 25 %, MERGE of two random episodic ids 25 %;
about half of the UPDATEs and MERGEs name missing or retired ids and are rejected); a reader
alternates a hybrid search and a full snapshot. In-memory: the same with threads on one
`Memory()`-style store. Afterwards the committed batches are replayed serially in commit order
(the order of their history records) on a fresh in-memory bank; the final bank must equal the
replay, every batch a writer saw commit must be in the history exactly once, and no id may be
created twice. The figures count what happened; the check counts what went wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tqdm import tqdm

from membuilder.bank import MemoryBank
from membuilder.embedders import HashingEmbedder
from membuilder.operations import Add, Merge, Update, operation_to_dict, parse_operation
from membuilder.store import InMemoryStore, SQLiteStore
from membuilder.types import MemoryKind, OperationRejected, Status

OWNER = "bench"
QUERIES = ["charity race", "dog named Max", "pottery class", "trip to Paris", "violin lessons"]


def _batch(rng: random.Random, tag: str, i: int, next_hint: int) -> list:
    k = rng.randrange(1, max(2, 2 * next_hint))
    choice = rng.random()
    if choice < 0.5:
        return [Add(MemoryKind.SEMANTIC, f"{tag} fact {i}: likes {rng.choice(QUERIES)}"),
                Add(MemoryKind.EPISODIC, f"{tag} event {i}: went to {rng.choice(QUERIES)}", "2023-05-08")]
    if choice < 0.75:
        return [Update(MemoryKind.SEMANTIC, f"S{k}", f"{tag} update {i}: {rng.choice(QUERIES)}")]
    return [Merge(MemoryKind.EPISODIC, (f"E{k}", f"E{k + 1}"), f"{tag} merge {i}")]


def _write_loop(bank: MemoryBank, tag: str, deadline: float) -> dict:
    """Apply batches until the deadline; {session id: [kind, op dicts], created} for each commit."""
    rng = random.Random(tag)
    out, i = {}, 0
    while time.perf_counter() < deadline:
        ops = _batch(rng, tag, i, bank.store.get_meta(OWNER).next_id)
        sid = f"{tag}-{i}"
        i += 1
        try:
            created = bank.apply(ops, session_id=sid).created
        except OperationRejected:
            continue
        out[sid] = [[op.kind.value, operation_to_dict(op)] for op in ops], list(created)
    return out


def _read_loop(bank: MemoryBank, deadline: float) -> int:
    """Search and snapshot until the deadline; returns the number of reads (each checked)."""
    reads = 0
    while time.perf_counter() < deadline:
        for hit in bank.search(QUERIES[reads % len(QUERIES)], k=10):
            if hit.entry.status is not Status.ACTIVE:
                raise AssertionError(f"search returned retired entry {hit.entry.id}")
        bank.snapshot().validate()
        reads += 2
    return reads


def _worker(args) -> None:
    bank = MemoryBank(SQLiteStore(args.bank, busy_timeout=60), OWNER, embedder=HashingEmbedder(dim=64))
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    deadline = time.perf_counter() + args.seconds
    result = _write_loop(bank, args.tag, deadline) if args.worker == "writer" else _read_loop(bank, deadline)
    print(json.dumps(result))


def _check(final, commits: dict) -> dict:
    """Replay the commits in history order; count lost, duplicated and mismatched."""
    order = []
    for h in final.history:
        if not order or order[-1] != h.session_id:
            order.append(h.session_id)
    lost = len(set(commits) - set(order))
    interleaved = len(order) - len(set(order))
    serial = MemoryBank(InMemoryStore(), OWNER, clock=lambda: 0.0)
    created_mismatch = 0
    for sid in order:
        ops = [parse_operation(kind, d) for kind, d in commits[sid][0]]
        created_mismatch += list(serial.apply(ops, session_id=sid).created) != commits[sid][1]
    created = [i for sid in order for i in commits[sid][1]]

    def comparable(state):
        return (state.meta.core, state.meta.next_id, state.meta.next_seq,
                sorted((e.id, e.text, e.status.value, e.merged_from, e.retired_by) for e in state.entries),
                [(h.seq, h.entry_id, h.event, h.new_text, h.session_id) for h in state.history])

    return {
        "lost": lost + interleaved + created_mismatch,
        "duplicated": len(created) - len(set(created)),
        "equal_to_serial_replay": comparable(serial.snapshot()) == comparable(final),
        "entries": len(final.entries),
    }


def run_sqlite(writers: int, readers: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        bank = Path(tmp) / "bank.sqlite"
        SQLiteStore(bank).close()
        procs = []
        for role, n in (("writer", writers), ("reader", readers)):
            for j in range(n):
                procs.append((role, subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.bench_store_concurrency", "--worker", role,
                     "--bank", str(bank), "--tag", f"{role[0]}{j}", "--seconds", str(seconds)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    cwd=Path(__file__).resolve().parents[1])))
        for _, p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(p.stderr.read()[-2000:])
        for _, p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        commits, reads = {}, 0
        for role, p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"{role} failed: {err[-2000:]}")
            if role == "writer":
                commits.update(json.loads(out))
            else:
                reads += json.loads(out)
        with SQLiteStore(bank) as store:
            final = store.snapshot(OWNER)
    return {"commits": len(commits), "reads": reads, **_check(final, commits)}


def run_memory_threads(writers: int, readers: int, seconds: float) -> dict:
    bank = MemoryBank(InMemoryStore(), OWNER, embedder=HashingEmbedder(dim=64))
    deadline = time.perf_counter() + seconds
    commits, reads, errors = {}, [], []

    def guard(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(lambda t=t: commits.update(_write_loop(bank, f"w{t}", deadline)),))
               for t in range(writers)]
    threads += [threading.Thread(target=guard, args=(lambda: reads.append(_read_loop(bank, deadline)),))
                for _ in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"commits": len(commits), "reads": sum(reads), **_check(bank.snapshot(), commits)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--out", default="benchmarks/results/store_concurrency.md")
    p.add_argument("--worker", choices=["writer", "reader"], help=argparse.SUPPRESS)
    p.add_argument("--bank", help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    configs = [("SQLite, processes", 1, 0), ("SQLite, processes", 2, 2), ("SQLite, processes", 4, 2),
               ("in-memory, threads", 1, 0), ("in-memory, threads", 4, 2)]
    load_start = os.getloadavg()[0]
    rows = []
    for name, w, r in tqdm(configs, desc="configurations"):
        fn = run_sqlite if name.startswith("SQLite") else run_memory_threads
        res = fn(w, r, args.seconds)
        rows.append(f"| {name} | {w} x {r} | {res['commits'] / args.seconds:,.0f} | {res['reads'] / args.seconds:,.0f} "
                    f"| {res['entries']:,} | {res['lost']} | {res['duplicated']} | {res['equal_to_serial_replay']} |")
    text = "\n".join([
        "# Concurrent store benchmark",
        "",
        f"Command: `python -m benchmarks.bench_store_concurrency --seconds {args.seconds:g}`",
        "",
        f"Machine: {platform.machine()}, {platform.system()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs visible; hashing embedder (64-d); each configuration runs {args.seconds:g} s. "
        "A batch is 1-2 operations; applies/s counts committed batches (rejected ones are not counted); "
        "reads/s counts searches plus full snapshots, each checked. 1-minute load average at start / end: "
        f"{load_start:.2f} / {os.getloadavg()[0]:.2f}.",
        "",
        "| store | writers x readers | applies/s (all writers) | reads/s (all readers) | entries at end "
        "| lost | duplicated | final == serial replay |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "lost = batches a writer saw commit but missing from the history, plus batches whose history "
        "records interleave with another's, plus batches whose serial replay created other ids.",
    ])
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
