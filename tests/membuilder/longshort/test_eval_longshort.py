"""benchmarks.eval_memory with --architecture longshort, and the benchmark datasets through it."""

import json
from pathlib import Path

import pytest

from benchmarks.eval_memory import run

FIX = Path(__file__).parents[1] / "fixtures"


def test_world_longshort_offline_end_to_end(tmp_path):
    args = ["--dataset", "world", "--builder", "world", "--architecture", "longshort", "--world-sessions", "4",
            "--conversations", "1", "--embedder", "hashing", "--no-progress", "--out", str(tmp_path / "ls")]
    summary = run(args)
    assert summary["architecture"] == "longshort" and summary["all"]["judged"] > 0
    assert summary["build"]["agent_errors"] == 0 and summary["build"]["rejected_operations"] == 0
    log = [json.loads(x) for x in (tmp_path / "ls/banks").glob("*.build.jsonl").__next__().read_text().splitlines()]
    assert set(log[0]["agents"]) == {"splitter", "long_term", "short_term"}
    # the saved settings refuse mixing architectures in one --out
    with pytest.raises(Exception, match="architecture"):
        run([*args[:5], "membuilder", *args[6:], "--resume"])


def test_memoryagentbench_fixture_through_eval_memory(tmp_path):
    summary = run(["--dataset", "memoryagentbench", "--data", str(FIX / "memoryagentbench"), "--builder", "rag",
                   "--dataset-option", "chunk_tokens=8", "--embedder", "hashing", "--no-progress",
                   "--out", str(tmp_path / "mab")])
    assert summary["all"]["questions"] == 3


def test_longshort_refuses_rag_builders(tmp_path):
    with pytest.raises(SystemExit):
        run(["--dataset", "world", "--builder", "rag", "--architecture", "longshort", "--out", str(tmp_path)])


def test_benchmark_subset_metrics_in_the_summary(tmp_path):
    from membuilder.metrics_text import score

    out = tmp_path / "mab"
    summary = run(["--dataset", "memoryagentbench", "--data", str(FIX / "memoryagentbench"), "--builder", "rag",
                   "--dataset-option", "chunk_tokens=8", "--embedder", "hashing", "--no-progress", "--out", str(out)])
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    # The fixture's subsets: factconsolidation (substring EM, two questions), detective_qa (EM, one).
    gold = {"Where does Alice live now?": (["Lyon", "Lyon, France"], "substring_exact_match"),
            "What does Bob own?": (["a red car"], "substring_exact_match"), "Who lied?": (["the butler"], "exact_match")}
    expect: dict[str, list[float]] = {}
    for r in rows:
        aliases, metric = gold[r["question"]]
        for m in (metric, "f1"):
            expect.setdefault(m, []).append(score(m, r["answer"], aliases))
    got = summary["subset_metrics"]
    assert {m: st["n"] for m, st in got.items()} == {"exact_match": 1, "f1": 3, "substring_exact_match": 2}
    for m, values in expect.items():
        assert got[m]["mean"] == pytest.approx(sum(values) / len(values))
    assert "| substring_exact_match | 2 |" in (out / "summary.md").read_text()
