import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reward.types import QAPair
from trainers.data.rl_rows import RLDataError, RLRow, read_rl_rows, write_rl_rows


def _row(agent="episodic", row_id=None, qa=None):
    return RLRow(row_id=row_id or f"c1/s1/{agent}", conversation_id="c1", owner="c1", session_id="s1",
                 session_index=0, session_date="2023-05-08", agent=agent,
                 prompt=({"role": "system", "content": "sys"}, {"role": "user", "content": "u"}),
                 snapshot_id="a" * 64,
                 qa=qa if qa is not None else (QAPair("Where did Ann go?", "Paris", "single-session", "world",
                                                      "2023-05-09"),),
                 expert_output='{"operations": []}', expert_tokens=5)


def test_round_trip_with_metadata(tmp_path):
    rows = [_row(a) for a in ("core", "episodic")] + [_row("semantic", qa=())]
    path = write_rl_rows(tmp_path / "rl.parquet", rows, tokenizer="tiny", snapshots="snapshots", source="world")
    got = read_rl_rows(path)
    assert list(got.rows) == rows
    assert got.tokenizer == "tiny" and got.source == "world"
    assert got.snapshots_dir == (tmp_path / "snapshots").resolve()
    assert got.sessions() == [("c1", "s1")]


def test_duplicate_row_ids_refused(tmp_path):
    with pytest.raises(RLDataError, match="unique"):
        write_rl_rows(tmp_path / "rl.parquet", [_row(), _row()], tokenizer="t", snapshots="s")
    assert not (tmp_path / "rl.parquet").exists()


def test_bad_rows_name_row_and_column(tmp_path):
    rec = _row().to_record()
    rec["agent"] = "dream"
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([_row().to_record(), rec]), path)
    with pytest.raises(RLDataError, match="bad.parquet row 1: agent"):
        read_rl_rows(path)
    rec = _row().to_record()
    rec["qa"] = '[{"question": "q"}]'
    pq.write_table(pa.Table.from_pylist([rec]), path)
    with pytest.raises(RLDataError, match=r"row 0.qa\[0\].answer is missing"):
        read_rl_rows(path)
    pq.write_table(pa.Table.from_pylist([{"row_id": "x"}]), path)
    with pytest.raises(RLDataError, match="missing columns"):
        read_rl_rows(path)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(RLDataError, match="not a readable Parquet"):
        read_rl_rows(tmp_path / "junk.parquet")
