"""benchmarks/bench_reward.py end to end on tiny settings: the report is written and the
copy-on-write path agrees with the naive rebuild."""

from benchmarks.bench_reward import main


def test_bench_reward_tiny(tmp_path, capsys):
    out = tmp_path / "reward.md"
    main(["--sizes", "60", "--reps", "1", "--group", "3", "--questions", "2", "--skip-part2", "--out", str(out)])
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 60 entries"))
    assert row.endswith("| True |")  # same task rewards as the naive path
    assert "Command: `python -m benchmarks.bench_reward --sizes 60" in text
    assert "Not run (--skip-part2, or the data or package is absent)." in text
