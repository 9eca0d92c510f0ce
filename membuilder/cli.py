"""Command line: inspect, export, import and search banks, and a demo of the memory library.

    python -m membuilder inspect BANK [--owner O] [--kind K] [--retired] [--history]
    python -m membuilder export BANK [--owner O] [--out FILE] [--embeddings]
    python -m membuilder import BANK FILE [--owner O]
    python -m membuilder search BANK QUERY --owner O [--k 10] [--kind K] [--embedder none|hashing|minilm]
    python -m membuilder demo [--bank PATH] [--embedder minilm|hashing|none]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .api import make_embedder
from .bank import MemoryBank
from .operations import parse_operations
from .store import SQLiteStore
from .types import BankState, MemBuilderError


def _open_existing(path: str) -> SQLiteStore:
    if not Path(path).exists():
        raise MemBuilderError(f"no bank at {path}")
    return SQLiteStore(path)


def _embedder(name: str):
    return None if name == "none" else make_embedder(name)


def cmd_inspect(args) -> int:
    with _open_existing(args.bank) as store:
        owners = [args.owner] if args.owner else store.owners()
        if args.owner and args.owner not in store.owners():
            raise MemBuilderError(f"bank {args.bank} has no owner {args.owner!r} (owners: {store.owners()})")
        for owner in owners:
            bank = MemoryBank(store, owner)
            entries = bank.entries(args.kind, include_retired=args.retired)
            counts: dict[str, int] = {}
            for e in bank.entries(include_retired=False):
                counts[e.kind.value] = counts.get(e.kind.value, 0) + 1
            print(f"== owner {owner}: {sum(counts.values())} active entries {counts}")
            print(f"-- core ({len(bank.core)} chars)\n{bank.core}" if bank.core else "-- core: (empty)")
            if args.owner or args.kind or args.retired:
                for e in entries:
                    when = f" [{e.event_time}]" if e.event_time else ""
                    flag = "" if e.status.value == "active" else f" (retired -> {e.retired_by})"
                    print(f"{e.id:>6} {e.kind.value:<10}{when} {e.text}{flag}")
            if args.history:
                for h in bank.history():
                    print(f"#{h.seq} {h.event} {h.entry_id}: {h.old_text!r} -> {h.new_text!r}")
    return 0


def cmd_export(args) -> int:
    with _open_existing(args.bank) as store:
        owners = [args.owner] if args.owner else store.owners()
        states = [store.snapshot(o).to_dict(with_embeddings=args.embeddings) for o in owners]
    doc = states[0] if args.owner else {"format": "membuilder.banks", "banks": states}
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {len(states)} bank(s) to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_import(args) -> int:
    try:
        doc = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MemBuilderError(f"cannot read export {args.file}: {exc}") from exc
    docs = doc["banks"] if isinstance(doc, dict) and doc.get("format") == "membuilder.banks" else [doc]
    states = [BankState.from_dict(d) for d in docs]  # validate everything before writing anything
    if args.owner and len(states) != 1:
        raise MemBuilderError("--owner needs an export of exactly one bank")
    with SQLiteStore(args.bank) as store:
        with store.transaction():
            for state in states:
                store.restore(state, owner=args.owner or state.owner)
    print(f"imported {len(states)} bank(s) into {args.bank}", file=sys.stderr)
    return 0


def cmd_search(args) -> int:
    with _open_existing(args.bank) as store:
        bank = MemoryBank(store, args.owner, embedder=_embedder(args.embedder))
        for hit in bank.search(args.query, k=args.k, kinds=args.kind):
            e = hit.entry
            print(f"{hit.score:.4f} {e.id:>6} {e.kind.value:<10} {e.event_time or '':<10} {e.text}")
    return 0


# A two-session dialogue's memory operations, as the four agents would emit them.
_DEMO_SESSIONS = [
    (
        "session_1",
        {
            "core": {"action": "APPEND", "content": "Caroline: transgender woman, counsellor in training."},
            "episodic": {"operations": [
                {"action": "ADD", "memory": "Caroline went to an LGBTQ support group.", "time": "2023-05-07"},
                {"action": "ADD", "memory": "Melanie ran a charity race for mental health.", "time": "2023-05-06"},
            ]},
            "semantic": {"operations": [
                {"action": "ADD", "memory": "Melanie has two kids and loves painting."},
            ]},
            "procedural": {"operations": [
                {"action": "ADD", "memory": "Melanie's self-care: run in the morning, then paint for an hour."},
            ]},
        },
    ),
    (
        "session_2",
        {
            "core": {"action": "REPLACE", "old_text": "counsellor in training", "new_text": "counsellor"},
            "episodic": {"operations": [
                {"action": "MERGE", "ids": ["E1", "E3"], "new_memory":
                    "Melanie ran two charity races for mental health (May and June 2023)."},
            ]},
            "semantic": {"operations": [
                {"action": "UPDATE", "id": "S4", "new_memory": "Melanie has three kids and loves painting."},
            ]},
            "procedural": {"operations": []},
        },
    ),
]


def cmd_demo(args) -> int:
    path = Path(args.bank) if args.bank else Path(tempfile.mkdtemp()) / "demo.sqlite"
    with SQLiteStore(path) as store:
        bank = MemoryBank(store, "conv-demo", embedder=_embedder(args.embedder))
        bank.apply(parse_operations("episodic", {"operations": [
            {"action": "ADD", "memory": "Melanie ran another charity race.", "time": "2023-06-10"}]}),
            session_id="session_0")
        for session_id, outputs in _DEMO_SESSIONS:
            state_before = bank.snapshot()
            ops = [op for kind, out in outputs.items() for op in parse_operations(kind, out)]
            result = bank.apply(ops, session_id=session_id)
            print(f"{session_id}: created {list(result.created)}, updated {list(result.updated)}, "
                  f"retired {list(result.retired)}, core changed: {result.core_changed}")
        print(f"\ncore: {bank.core}")
        for query in ("charity race", "how many kids does Melanie have", "self-care routine"):
            print(f"\nsearch {query!r}:")
            for hit in bank.search(query, k=3):
                print(f"  {hit.score:.4f} {hit.entry.id} [{hit.entry.kind.value}] {hit.entry.text}")
        print("\nhistory of S4:")
        for h in bank.history("S4"):
            print(f"  {h.event}: {h.old_text!r} -> {h.new_text!r}")
        bank.restore(state_before)
        print(f"\nrestored the state before session_2: core = {bank.core!r}")
    print(f"\nbank written to {path}; inspect it with: python -m membuilder inspect {path} --owner conv-demo")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="membuilder", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="summarise a bank, or list one owner's entries")
    s.add_argument("bank")
    s.add_argument("--owner")
    s.add_argument("--kind", choices=["episodic", "semantic", "procedural"])
    s.add_argument("--retired", action="store_true", help="include retired entries")
    s.add_argument("--history", action="store_true", help="print the change history")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("export", help="export banks as JSON")
    s.add_argument("bank")
    s.add_argument("--owner")
    s.add_argument("--out")
    s.add_argument("--embeddings", action="store_true", help="include embeddings (base64 float32)")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("import", help="import a JSON export (replaces those owners' state)")
    s.add_argument("bank")
    s.add_argument("file")
    s.add_argument("--owner", help="import a single-bank export under this owner id")
    s.set_defaults(fn=cmd_import)
    s = sub.add_parser("search", help="hybrid search in one owner's bank")
    s.add_argument("bank")
    s.add_argument("query")
    s.add_argument("--owner", required=True)
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--kind", choices=["episodic", "semantic", "procedural"])
    s.add_argument("--embedder", choices=["none", "hashing", "minilm"], default="none")
    s.set_defaults(fn=cmd_search)
    s = sub.add_parser("demo", help="build a small bank from two sessions and show search/history/restore")
    s.add_argument("--bank", help="SQLite file to write (default: a temporary file)")
    s.add_argument("--embedder", choices=["none", "hashing", "minilm"], default="minilm")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MemBuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
