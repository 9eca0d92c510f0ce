"""`python -m membuilder`: demo, inspect, export/import round trip, search, and clear errors."""

import json
import subprocess
import sys

from membuilder.cli import main
from membuilder.store import SQLiteStore


def test_demo_then_inspect_export_import_search(tmp_path, capsys):
    bank = tmp_path / "demo.sqlite"
    assert main(["demo", "--bank", str(bank), "--embedder", "hashing"]) == 0
    out = capsys.readouterr().out
    assert "session_2: created ['E6'], updated ['S4'], retired ['E1', 'E3']" in out
    assert "restored the state before session_2" in out

    assert main(["inspect", str(bank)]) == 0
    # the demo ends by restoring the state before session 2: E1, E2, E3, S4, P5 all active again
    assert "owner conv-demo: 5 active entries" in capsys.readouterr().out
    assert main(["inspect", str(bank), "--owner", "conv-demo", "--retired", "--history"]) == 0
    listing = capsys.readouterr().out
    assert "Melanie has two kids" in listing and "CORE_APPEND core" in listing
    assert "UPDATE S4" not in listing  # history was restored too

    export = tmp_path / "export.json"
    assert main(["export", str(bank), "--owner", "conv-demo", "--out", str(export), "--embeddings"]) == 0
    doc = json.loads(export.read_text())
    assert doc["format"] == "membuilder.bank" and len(doc["entries"]) == 5
    copy = tmp_path / "copy.sqlite"
    assert main(["import", str(copy), str(export)]) == 0
    with SQLiteStore(bank) as a, SQLiteStore(copy) as b:
        assert a.snapshot("conv-demo") == b.snapshot("conv-demo")

    assert main(["search", str(copy), "charity race", "--owner", "conv-demo", "--k", "1"]) == 0
    assert "charity race" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.sqlite")]) == 2
    assert "no bank at" in capsys.readouterr().err
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    assert main(["inspect", str(junk)]) == 2
    assert "junk.sqlite" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{\"entries\": []}")
    assert main(["import", str(tmp_path / "new.sqlite"), str(bad)]) == 2
    assert "not a MemBuilder bank export" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "membuilder", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "inspect" in r.stdout


# --- issue 11 item 16: one clear error line, exit 2, bank unchanged -------------------------------

import pytest  # noqa: E402

from membuilder.bank import MemoryBank  # noqa: E402
from membuilder.operations import Add  # noqa: E402
from membuilder.types import MemoryKind  # noqa: E402


def _bank_with_one_owner(path):
    with SQLiteStore(path) as store:
        MemoryBank(store, "u").apply([Add(MemoryKind.SEMANTIC, "likes tea"), Add(MemoryKind.EPISODIC, "went out")])
        return store.snapshot("u")


def _export_text(path):
    with SQLiteStore(path) as store:
        return json.dumps(store.snapshot("u").to_dict(with_embeddings=True))


BAD_FILES = [
    ("not UTF-8", lambda good: b"\xff\xfe{\"format\": 1}", "not UTF-8"),
    ("missing banks", lambda good: b'{"format": "membuilder.banks"}', "'banks' must be a list"),
    ("null banks", lambda good: b'{"format": "membuilder.banks", "banks": null}', "'banks' must be a list"),
    ("a bank that is a number", lambda good: b'{"format": "membuilder.banks", "banks": [42]}',
     "not a MemBuilder bank export"),
    ("next_id 1e999", lambda good: good.replace('"next_id": 3', '"next_id": 1e999').encode(),
     "'next_id' must be an integer"),
    ("3-byte embedding", lambda good: good.replace('"embeddings": {}', '"embeddings": {"S1": "YWJj"}')
     .replace('"embedder": null', '"embedder": "hashing"').encode(),
     "3 bytes"),
    ("deep nesting", lambda good: b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    ("not JSON", lambda good: b"{nope", "invalid JSON"),
]


@pytest.mark.parametrize("name,make,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_malformed_import_files_are_one_error_line_and_change_nothing(tmp_path, capsys, name, make, message):
    bank = tmp_path / "bank.sqlite"
    before = _bank_with_one_owner(bank)
    good = _export_text(bank)
    assert '"next_id": 3' in good and '"embeddings": {}' in good  # the edits below apply
    bad = tmp_path / "bad.json"
    bad.write_bytes(make(good))
    assert main(["import", str(bank), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "bad.json" in err and message in err
    with SQLiteStore(bank) as store:
        assert store.snapshot("u") == before


CORRUPT_ROWS = [
    ("kind", "UPDATE entries SET kind='gossip' WHERE id='S1'", "corrupt kind 'gossip'"),
    ("status", "UPDATE entries SET status='zombie' WHERE id='S1'", "corrupt status 'zombie'"),
    ("merged_from", "UPDATE entries SET merged_from='{oops' WHERE id='S1'", "corrupt merged_from"),
    ("event_time", "UPDATE entries SET event_time='yesterday' WHERE id='S1'", "corrupt event_time 'yesterday'"),
    ("text", "UPDATE entries SET text=x'00ff' WHERE id='S1'", "corrupt text"),
]


@pytest.mark.parametrize("field,sql,message", CORRUPT_ROWS, ids=[c[0] for c in CORRUPT_ROWS])
def test_corrupted_rows_are_reported_with_owner_entry_and_field(tmp_path, capsys, field, sql, message):
    import sqlite3

    bank = tmp_path / "bank.sqlite"
    _bank_with_one_owner(bank)
    conn = sqlite3.connect(bank)
    conn.execute(sql)
    conn.commit()
    conn.close()
    payload = bank.read_bytes()
    commands = [["inspect", str(bank), "--owner", "u"], ["export", str(bank)]]
    search = ["search", str(bank), "tea", "--owner", "u", "--embedder", "hashing"]
    if field != "status":  # search reads active rows only: a bad status is never shown (below)
        commands.append(search)
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: bank ") and "Traceback" not in err
        assert "bank.sqlite" in err and "owner 'u' entry 'S1'" in err and message in err
    assert bank.read_bytes() == payload
    if field == "status":  # nothing crashes; the search stores the vectors it computed
        assert main(search) == 0 and "S1" not in capsys.readouterr().out


def test_read_only_banks_and_empty_files(tmp_path, capsys, monkeypatch):
    import os

    bank = tmp_path / "bank.sqlite"
    _bank_with_one_owner(bank)
    real_access = os.access
    # the user may read but not write the bank (chmod does not stop root, so the check is faked)
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not mode & os.W_OK)
    assert main(["inspect", str(bank), "--owner", "u"]) == 0
    assert "likes tea" in capsys.readouterr().out
    assert main(["search", str(bank), "tea", "--owner", "u", "--embedder", "hashing"]) == 0
    assert "likes tea" in capsys.readouterr().out
    monkeypatch.undo()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    for argv in (["export", str(empty)], ["search", str(empty), "q", "--owner", "u"], ["inspect", str(empty)]):
        assert main(argv) == 2
        assert "not a MemBuilder bank" in capsys.readouterr().err
        assert empty.stat().st_size == 0  # no schema was written into it
    assert main(["export", str(bank), "--owner", "nobody"]) == 2
    assert "has no owner 'nobody'" in capsys.readouterr().err


def test_entry_text_is_printed_with_control_characters_escaped(tmp_path, capsys):
    bank = tmp_path / "bank.sqlite"
    with SQLiteStore(bank) as store:
        MemoryBank(store, "u").apply([Add(MemoryKind.SEMANTIC, "evil\x1b[2J\x07 tea\nsecond line\u202e")])
    assert main(["inspect", str(bank), "--owner", "u"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "evil\\x1b[2J\\x07 tea\\nsecond line\\u202e" in out
    assert main(["search", str(bank), "tea", "--owner", "u"]) == 0
    assert "\x1b" not in capsys.readouterr().out
