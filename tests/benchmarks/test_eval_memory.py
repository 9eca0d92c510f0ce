"""The accuracy runner end to end on a small LoCoMo sample (first conversation, sessions 1-4,
the 50 questions whose evidence lies there), offline: annotation-expert memory or RAG over raw
turns, the extractive answerer, the rule judge and the hashing embedder. Pinned scores are what
this deterministic pipeline gives; a change in any of its parts shows up here."""

import json

import pytest

from benchmarks.eval_memory import TIMING_FIELDS, RunError, bank_file, run, select_questions
from membuilder.datasets import default_data_dir, load_locomo
from tests.membuilder.test_judging import ChatServer

LOCOMO = default_data_dir() / "locomo" / "locomo10.json"
pytestmark = pytest.mark.skipif(not LOCOMO.exists(), reason=f"LoCoMo not found at {LOCOMO} (shared data folder absent)")

SAMPLE = ["--dataset", "locomo", "--data", str(LOCOMO), "--conversations", "1", "--sessions", "4",
          "--embedder", "hashing", "--no-progress"]


def results(out):
    with open(out / "results.jsonl", encoding="utf-8") as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in fh]


def evaluate(out, builder="annotation", *extra, on_record=None):
    return run([*SAMPLE, "--builder", builder, "--out", str(out), *extra], on_record=on_record)


def test_sample_selection():
    conv = load_locomo(LOCOMO)[0]
    chosen = select_questions(conv, 4, None)
    assert len(chosen) == 50  # 35 in categories 1-4, 15 adversarial
    assert all(set(q.evidence_sessions) <= {"session_1", "session_2", "session_3", "session_4"} for q in chosen)
    assert select_questions(conv, 4, 3) == chosen[:3]


def test_annotation_memory_pinned_score(tmp_path):
    summary = evaluate(tmp_path)
    overall, apart = summary["overall"], summary["apart"]
    assert summary["overall_covers"] == "categories 1-4"
    assert (overall["questions"], overall["judged"], overall["correct"]) == (35, 35, 6)
    assert overall["recall"] == pytest.approx(10 / 35)
    assert {c: (s["questions"], s["correct"]) for c, s in summary["categories"].items()} == {
        "multi-hop": (5, 0), "temporal": (9, 0), "open-domain": (2, 0), "single-hop": (19, 6)}
    assert list(apart) == ["adversarial"] and (apart["adversarial"]["questions"], apart["adversarial"]["correct"]) == (15, 1)
    assert summary["all"]["questions"] == 50 and summary["tokens"] == {}
    assert summary["build"]["banks"] == 1 and summary["build"]["sessions"] == 4
    assert bank_file(tmp_path / "banks", "conv-26").exists()
    rows = results(tmp_path)
    first = rows[0]
    assert first["question_id"] == "conv-26/q0" and first["gold"] == "7 May 2023"
    assert first["answer"] == "[8 May 2023] Caroline attends an LGBTQ support group for the first time."
    assert first["correct"] is False and first["status"] == "ok"
    # LoCoMo has no question dates: the last used session's date (session 4) stands in, and says so
    assert first["current_date"] == "27 June 2023, 10:37" and first["date_inferred"] is True
    assert set(first["context_kinds"]) <= {"episodic", "semantic", "procedural"} and len(first["context_ids"]) == 10
    assert (tmp_path / "summary.md").read_text().count("\n| ") >= 7


def test_rag_pinned_score(tmp_path):
    summary = evaluate(tmp_path, "rag")
    assert (summary["overall"]["questions"], summary["overall"]["correct"]) == (35, 4)
    assert summary["overall"]["recall"] == pytest.approx(11 / 35)
    assert summary["apart"]["adversarial"]["correct"] == 0
    rows = results(tmp_path)
    assert all(r["context_kinds"] == ["raw"] * len(r["context_ids"]) and len(r["context_ids"]) <= 5 for r in rows)


def test_resume_after_a_crash_gives_the_same_results(tmp_path):
    evaluate(tmp_path / "whole")
    crashed = tmp_path / "crashed"
    seen = []

    def crash_after_seven(line):
        seen.append(line["question_id"])
        if len(seen) == 7:
            raise KeyboardInterrupt  # what a Ctrl-C between two questions looks like

    with pytest.raises(KeyboardInterrupt):
        evaluate(crashed, on_record=crash_after_seven)
    assert [r["question_id"] for r in results(crashed)] == seen  # every finished question was flushed
    with open(crashed / "results.jsonl", "a") as fh:  # and a line cut short by the crash
        fh.write('{"question_id": "conv-26/q4')
    with pytest.raises(RunError, match="pass --resume"):
        evaluate(crashed)
    summary = evaluate(crashed, "annotation", "--resume")
    assert results(crashed) == results(tmp_path / "whole")
    assert summary["runs"] == 3 and summary["overall"]["correct"] == 6


def test_resume_with_question_limits_and_concurrency(tmp_path):
    evaluate(tmp_path / "whole", "rag")
    part = tmp_path / "part"
    evaluate(part, "rag", "--questions", "3")
    assert len(results(part)) == 3
    evaluate(part, "rag", "--resume", "--concurrency", "3")
    assert results(part) == results(tmp_path / "whole")


def test_build_then_answer_reuses_banks(tmp_path):
    with pytest.raises(RunError, match="no bank for conv-26"):
        evaluate(tmp_path / "empty", "annotation", "--mode", "answer")
    out = tmp_path / "two-step"
    evaluate(out, "annotation", "--mode", "build")
    bank = bank_file(out / "banks", "conv-26")
    stamp = bank.stat().st_mtime_ns
    assert not (out / "results.jsonl").exists()
    evaluate(out, "annotation", "--mode", "answer")
    assert bank.stat().st_mtime_ns == stamp
    evaluate(tmp_path / "one-step", "annotation")
    assert results(out) == results(tmp_path / "one-step")


def test_refuses_to_mix_settings(tmp_path):
    evaluate(tmp_path, "rag", "--questions", "2")
    with pytest.raises(RunError, match="builder='rag'"):
        evaluate(tmp_path, "annotation", "--resume")
    with pytest.raises(RunError, match="judge='rule'"):
        evaluate(tmp_path, "rag", "--resume", "--judge", "some-model")
    with pytest.raises(RunError, match="already exists: pass --resume"):
        evaluate(tmp_path, "rag", "--mode", "build")


def test_full_context_skips_what_does_not_fit(tmp_path):
    summary = evaluate(tmp_path / "small", "full-context", "--full-context-chars", "1000", "--questions", "4")
    assert summary["all"]["skipped"] == 4 and summary["all"]["judged"] == 0 and summary["overall"]["accuracy"] is None
    row = results(tmp_path / "small")[0]
    assert row["status"] == "skipped" and "over the budget of 1000; does not fit" in row["error"]
    fits = evaluate(tmp_path / "fits", "full-context", "--questions", "4")
    assert fits["all"]["skipped"] == 0 and fits["all"]["judged"] == 4
    assert results(tmp_path / "fits")[0]["context_ids"] == ["session_1", "session_2", "session_3", "session_4"]


def test_model_answerer_and_judge_errors_count_apart(tmp_path):
    def reply(body):
        user = body["messages"][-1]["content"]
        if "Answer to grade" not in user:
            return "Caroline went to an LGBTQ support group."
        # the judge answers properly for questions about Caroline and never for the others
        if "Caroline" in user.split("Question: ")[1].split("\n")[0]:
            return '{"verdict": "CORRECT", "reason": "fine"}'
        return "looks right to me"

    server = ChatServer(default=reply)
    models = ["--answerer", "answer-model", "--judge", "judge-model", "--questions", "4", "--no-llm-cache"]
    try:
        summary = evaluate(tmp_path, "rag", *models, "--base-url", server.url)
    finally:
        server.close()
    rows = results(tmp_path)
    when = [r for r in rows if "Caroline" in r["question"]]
    assert [r["question_id"] for r in rows if r not in when] == ["conv-26/q1"]  # an error mid-file
    assert all(r["status"] == "ok" and r["correct"] is True for r in when)
    others = [r for r in rows if r not in when]
    assert all(r["status"] == "judge_error" and r["correct"] is None for r in others)
    stats = summary["all"]
    assert (stats["judged"], stats["correct"], stats["judge_errors"]) == (len(when), len(when), len(others))
    assert stats["accuracy"] == 1.0  # judge errors are not wrong answers
    # usage per role: 11 prompt + 5 completion tokens per call; the judge retried twice per failure
    assert summary["tokens"]["answer"]["prompt_tokens"] == 11 * 4
    assert summary["tokens"]["judge"]["calls"] == len(when) + 3 * len(others)

    # --retry-errors redoes exactly the errored questions; the file ends in dataset order again
    order = [r["question_id"] for r in rows]
    fixed = ChatServer(default=lambda body: ('{"verdict": "WRONG", "reason": "no"}'
                                             if "Answer to grade" in body["messages"][-1]["content"] else "x"))
    try:
        again = evaluate(tmp_path, "rag", *models, "--base-url", fixed.url, "--resume", "--retry-errors")
    finally:
        fixed.close()
    assert len(fixed.requests) == 2 * len(others)  # one answer and one judge call per redone question
    rows = results(tmp_path)
    assert [r["question_id"] for r in rows] == order
    assert [r["correct"] for r in rows] == [r["question_id"] != "conv-26/q1" for r in rows]
    assert again["all"]["judge_errors"] == 0 and again["all"]["correct"] == len(when)
