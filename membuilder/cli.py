"""Command line: inspect, export, import and search banks, and a demo of the memory library.

    python -m membuilder inspect BANK [--owner O] [--kind K] [--retired] [--history]
    python -m membuilder export BANK [--owner O] [--out FILE] [--embeddings]
    python -m membuilder import BANK FILE [--owner O]
    python -m membuilder search BANK QUERY --owner O [--k 10] [--kind K] [--embedder none|hashing|minilm]
    python -m membuilder demo [--bank PATH] [--embedder minilm|hashing|none]

Every failure is one `error: ...` line on stderr naming the file (and owner, entry, field where
there is one) and exit code 2; a failed import leaves the bank as it was. `inspect`, `export`
and `search` never create or initialise a bank, and work on a bank the user may only read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .api import make_embedder
from .bank import MemoryBank
from .operations import parse_operations
from .store import SQLiteStore
from .types import BankState, MemBuilderError, excerpt

_KEEP = {"\n"}  # in multi-line blocks (the core); listings escape newlines too


def _open_existing(path: str, *, write: bool = False) -> SQLiteStore:
    """An existing bank, read-only unless `write` (and writable); never initialises a file."""
    if not Path(path).exists():
        raise MemBuilderError(f"no bank at {path}")
    readonly = not write or not os.access(path, os.W_OK)
    return SQLiteStore(path, readonly=readonly, create=False)


def _safe(text: object, keep: set[str] = frozenset()) -> str:
    """Text for a terminal: control and other non-printable characters escaped (an entry written
    by a model must not be able to move the cursor, clear the screen or retitle the window)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _check_owner_exists(store: SQLiteStore, owner: str, path: str) -> None:
    owners = store.owners()
    if owner not in owners:
        raise MemBuilderError(
            f"bank {path} has no owner {excerpt(owner)} (owners: "
            f"{', '.join(excerpt(o) for o in owners[:20]) or 'none'}{', ...' if len(owners) > 20 else ''})"
        )


def _embedder(name: str):
    return None if name == "none" else make_embedder(name)


def cmd_inspect(args) -> int:
    with _open_existing(args.bank) as store:
        if args.owner:
            _check_owner_exists(store, args.owner, args.bank)
        owners = [args.owner] if args.owner else store.owners()
        for owner in owners:
            bank = MemoryBank(store, owner)
            every = bank.entries(include_retired=True)  # reads (and so checks) every row once
            entries = [e for e in every if (args.retired or e.status.value == "active")
                       and (args.kind is None or e.kind.value == args.kind)]
            counts: dict[str, int] = {}
            for e in every:
                if e.status.value == "active":
                    counts[e.kind.value] = counts.get(e.kind.value, 0) + 1
            core = bank.core
            print(f"== owner {_safe(owner)}: {sum(counts.values())} active entries {counts}")
            print(f"-- core ({len(core)} chars)\n{_safe(core, _KEEP)}" if core else "-- core: (empty)")
            if args.owner or args.kind or args.retired:
                for e in entries:
                    when = f" [{e.event_time}]" if e.event_time else ""
                    flag = "" if e.status.value == "active" else f" (retired -> {e.retired_by})"
                    print(f"{_safe(e.id):>6} {e.kind.value:<10}{when} {_safe(e.text)}{_safe(flag)}")
            if args.history:
                for h in bank.history():  # repr() escapes control characters
                    print(f"#{h.seq} {h.event} {_safe(h.entry_id)}: {h.old_text!r} -> {h.new_text!r}")
    return 0


def cmd_export(args) -> int:
    with _open_existing(args.bank) as store:
        if args.owner:
            _check_owner_exists(store, args.owner, args.bank)
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


def _read_export(path: str) -> list[BankState]:
    """Every bank state of an export file, each validated; errors name the file and the bank."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        doc = json.loads(text)
    except OSError as exc:
        raise MemBuilderError(f"cannot read export {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MemBuilderError(f"cannot read export {path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise MemBuilderError(f"cannot read export {path}: invalid JSON ({exc})") from None
    except RecursionError:
        raise MemBuilderError(f"cannot read export {path}: JSON nested too deeply") from None
    if isinstance(doc, dict) and doc.get("format") == "membuilder.banks":
        docs = doc.get("banks")
        if not isinstance(docs, list):
            raise MemBuilderError(
                f"cannot import {path}: 'banks' must be a list of bank exports, got {excerpt(docs)}"
            )
    else:
        docs = [doc]
    states = []
    for i, d in enumerate(docs):
        try:
            states.append(BankState.from_dict(d))
        except MemBuilderError as exc:
            where = f" (bank {i})" if len(docs) > 1 else ""
            raise MemBuilderError(f"cannot import {path}{where}: {exc}") from None
    owners = [s.owner for s in states]
    if len(set(owners)) != len(owners):
        raise MemBuilderError(f"cannot import {path}: it holds one owner twice")
    return states


def cmd_import(args) -> int:
    states = _read_export(args.file)  # validate everything before writing anything
    if args.owner and len(states) != 1:
        raise MemBuilderError("--owner needs an export of exactly one bank")
    with SQLiteStore(args.bank) as store:
        with store.transaction():
            for state in states:
                store.restore(state, owner=args.owner or state.owner)
    print(f"imported {len(states)} bank(s) into {args.bank}", file=sys.stderr)
    return 0


def cmd_search(args) -> int:
    # writable when the user may write: a search stores the vectors it had to compute (only those)
    with _open_existing(args.bank, write=True) as store:
        _check_owner_exists(store, args.owner, args.bank)
        bank = MemoryBank(store, args.owner, embedder=_embedder(args.embedder))
        for hit in bank.search(args.query, k=args.k, kinds=args.kind):
            e = hit.entry
            print(f"{hit.score:.4f} {_safe(e.id):>6} {e.kind.value:<10} {e.event_time or '':<10} {_safe(e.text)}")
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
        first = bank.apply(parse_operations("episodic", {"operations": [
            {"action": "ADD", "memory": "Melanie ran another charity race.", "time": "2023-06-10"}]}),
            session_id="session_0")
        # shown, so that the E1 which session_2 merges is not a mystery
        print(f"session_0: created {list(first.created)} ({bank.get(first.created[0]).text!r}, 2023-06-10)")
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
        print(f"\nrestored the state before session_2: core = {bank.core!r}, {len(bank)} active entries")
    print(f"\nbank (as restored: the state before session_2) written to {path}; inspect it with: "
          f"python -m membuilder inspect {path} --owner conv-demo")
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
        print(f"error: {_safe(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. --out into a missing folder
        print(f"error: {_safe(exc)}", file=sys.stderr)
        return 2
