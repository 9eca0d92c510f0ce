"""MemoryAgentBench and MemoryBench loaders on small fixtures in their published formats."""

import json
from pathlib import Path

import pytest

from membuilder.datasets import DatasetFormatError, load_dataset
from membuilder.memory_benchmarks import (
    chunk_text,
    default_count_tokens,
    load_memoryagentbench_items,
    load_memorybench_items,
    score_item,
)

FIX = Path(__file__).parent / "fixtures"


def test_chunking_keeps_every_piece_in_order_within_the_bound():
    text = "One two three. Four five!\nSix seven eight nine ten eleven twelve thirteen."
    # pieces: "One two three." (4 tokens), "Four five!" (3), "Six ... thirteen." (9 > 5: cut by words)
    assert chunk_text(text, 5) == ["One two three.", "Four five!", "Six seven eight nine ten",
                                   "eleven twelve thirteen."]
    # bound 7: 4 + 3 = 7 tokens share a chunk; the long piece cut after 7 words, "thirteen." (2) left
    assert chunk_text(text, 7) == ["One two three. Four five!", "Six seven eight nine ten eleven twelve",
                                   "thirteen."]
    for n in (3, 5, 8, 100):
        chunks = chunk_text(text, n)
        assert all(default_count_tokens(c) <= n for c in chunks)
        assert " ".join(chunks).split() == text.split()


def test_memoryagentbench_rows_to_sessions_and_metrics(tmp_path):
    items = load_memoryagentbench_items(FIX / "memoryagentbench", chunk_tokens=8)
    assert [i.source for i in items] == ["factconsolidation_sh_6k", "detective_qa"]
    conv = items[0].conversation
    assert [s.messages[0].text for s in conv.sessions] == [
        "Alice moved to Paris in 2019.", "She works as a baker.", "Later, Alice moved to Lyon.", "Bob owns a red car."]
    assert [q.question_id for q in conv.questions] == ["fc0", "fc1"]
    assert items[0].questions[0].aliases == ("Lyon", "Lyon, France")
    assert items[0].questions[0].metric == "substring_exact_match" and items[1].questions[0].metric == "exact_match"
    # substring EM: "she lives in lyon" holds "lyon"; f1 vs best alias "Lyon": P=1/4,R=1 -> 0.4
    s = score_item(items[0], {"fc0": "She lives in Lyon"})
    assert s["substring_exact_match"] == {"mean": 1.0, "n": 1} and s["f1"]["mean"] == pytest.approx(0.4)
    assert len(load_memoryagentbench_items(FIX / "memoryagentbench", source="detective")) == 1
    # the same rows as Parquet, the hub's format
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(x) for x in (FIX / "memoryagentbench/Conflict_Resolution.jsonl").read_text().splitlines()]
    rows[1]["metadata"] = json.loads(rows[1]["metadata"])
    for r in rows:
        r["metadata"] = json.dumps(r["metadata"])  # one column type for the table
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "Conflict_Resolution.parquet")
    again = load_dataset("memoryagentbench", tmp_path, split="Conflict_Resolution", chunk_tokens=8)
    assert [c.conversation_id for c in again] == ["factconsolidation_sh_6k_0", "detective_qa_1"]


def test_memoryagentbench_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface.co/datasets/ai-hyz/MemoryAgentBench"):
        load_memoryagentbench_items(tmp_path / "nothing")
    (tmp_path / "Accurate_Retrieval.jsonl").write_text(json.dumps(
        {"context": "x", "questions": ["q1", "q2"], "answers": [["a"]], "metadata": {"source": "ruler_qa1"}}) + "\n")
    with pytest.raises(DatasetFormatError, match="2 questions but 1 answers"):
        load_memoryagentbench_items(tmp_path)
    with pytest.raises(ValueError, match="unknown MemoryAgentBench split"):
        load_memoryagentbench_items(tmp_path, split="Nope")


def test_memorybench_feedback_dialogs_become_sessions():
    [item] = load_memorybench_items(FIX / "memorybench", "LexEval-QA")
    conv = item.conversation
    assert [m.text for m in conv.sessions[0].messages][-1] == "No: a tort is a civil wrong causing harm."
    assert [(q.question_id, q.question, q.answer) for q in conv.questions] == [
        ("LexEval-QA_3", "Define tort.", "a civil wrong causing harm"),
        ("LexEval-QA_4", "What is a contract?", "an enforceable agreement")]
    assert {q.metric for q in item.questions} == {"rouge_l"}
    # "a civil wrong" vs "a civil wrong causing harm": tokens [civil wrong] / [civil wrong causing harm]
    # LCS 2, P = 1, R = 2/4 -> ROUGE-L F = 2/3
    assert score_item(item, {"LexEval-QA_3": "a civil wrong"})["rouge_l"]["mean"] == pytest.approx(2 / 3)


def test_memorybench_locomo_reads_the_corpus_conversation():
    [conv] = load_dataset("memorybench", FIX / "memorybench", config="Locomo-0")
    assert conv.speakers == ("Ann", "Ben") and conv.sessions[0].messages[0].text == "I adopted a cat named Tom."
    assert conv.annotations[0].observations[0].text == "Ann adopted a cat named Tom."
    assert conv.questions[0].answer == "Tom" and conv.questions[0].evidence_sessions == ("session_1",)
    with pytest.raises(FileNotFoundError, match="THUIR/MemoryBench"):
        load_dataset("memorybench", FIX / "memorybench", config="JuDGE")
    with pytest.raises(ValueError, match="needs a config"):
        load_dataset("memorybench", FIX / "memorybench")
