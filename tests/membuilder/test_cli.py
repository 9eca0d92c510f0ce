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
