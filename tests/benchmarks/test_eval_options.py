"""The accuracy runner's model options and output: per-role completion budgets, schema-guided
decoding for the builder's agents (off by default), progress within a conversation (one step per
agent call) and the closing line that says where the results went."""

import json
import threading

import pytest
from tqdm import tqdm

from benchmarks import eval_memory
from benchmarks.eval_memory import RunError, run
from membuilder import InMemoryStore, MemoryBank
from membuilder.agents import AnnotationExpert, MemoryBuilder
from membuilder.agents.prompts import AGENT_KINDS
from membuilder.datasets import default_data_dir, load_locomo
from membuilder.types import MemoryKind
from tests.membuilder.test_judging import ChatServer

LOCOMO = default_data_dir() / "locomo" / "locomo10.json"
pytestmark = pytest.mark.skipif(not LOCOMO.exists(), reason=f"LoCoMo not found at {LOCOMO} (shared data folder absent)")

SAMPLE = ["--dataset", "locomo", "--data", str(LOCOMO), "--conversations", "1", "--sessions", "2",
          "--questions", "2", "--embedder", "hashing"]


def test_builder_reports_each_agent_before_applying():
    conv = load_locomo(LOCOMO)[0]
    bank = MemoryBank(InMemoryStore(), conv.conversation_id)
    seen = []

    def on_agent(index, kind, error):
        # called before the session's operations are applied: the bank still holds only the
        # entries of earlier sessions
        seen.append((index, kind, error, len(bank)))

    records = MemoryBuilder(AnnotationExpert()).build(bank, conv, max_sessions=2, on_agent=on_agent)
    assert [(i, e) for i, _, e, _ in seen] == [(0, None)] * 4 + [(1, None)] * 4  # 2 sessions x 4 agents
    assert {k for i, k, _, _ in seen if i == 0} == set(AGENT_KINDS) == {k for i, k, _, _ in seen if i == 1}
    after_first = len(records[0].result.created)
    assert after_first > 0
    assert [n for *_, n in seen] == [0] * 4 + [after_first] * 4


def test_builder_reports_an_agent_that_timed_out():
    conv = load_locomo(LOCOMO)[0]
    release = threading.Event()
    expert = AnnotationExpert()

    class SlowEpisodic:
        name = "slow-episodic"

        def generate(self, kind, messages, *, context):
            if kind is MemoryKind.EPISODIC:
                release.wait(10)  # held until the test is over: it can only time out
            return expert.generate(kind, messages, context=context)

    seen = []
    try:
        MemoryBuilder(SlowEpisodic(), agent_timeout_s=0.2).build(
            MemoryBank(InMemoryStore(), "o"), conv, max_sessions=1,
            on_agent=lambda i, k, e: seen.append((k, e)))
    finally:
        release.set()
    assert len(seen) == 4 and seen[-1][0] is MemoryKind.EPISODIC  # the three others came first
    assert seen[-1][1] == "no answer within agent_timeout_s=0.2"
    assert all(e is None for _, e in seen[:3])


class RecordingBar(tqdm):
    """tqdm that remembers, per bar, its description, total, final count and postfixes."""

    bars: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.postfixes = []
        RecordingBar.bars.append(self)

    def set_postfix_str(self, s="", refresh=True):
        self.postfixes.append(s)
        super().set_postfix_str(s, refresh)


def test_progress_moves_per_agent_and_the_last_line_says_where(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_memory, "tqdm", RecordingBar)
    RecordingBar.bars = []
    out = tmp_path / "run"
    run([*SAMPLE, "--builder", "annotation", "--out", str(out)])
    captured = capsys.readouterr()
    # the conversation's bar: 2 sessions x 4 agents = 8 steps, with the session in its postfix
    conv_bar = next(b for b in RecordingBar.bars if b.desc.strip() == "conv-26")
    assert (conv_bar.total, conv_bar.n, conv_bar.unit) == (8, 8, "agent")
    assert [p.split(",")[0] for p in conv_bar.postfixes] == ["session 1/2"] * 4 + ["session 2/2"] * 4
    assert conv_bar.postfixes[-1].endswith("done, 0 agent errors")
    assert "conv-26" in captured.err  # drawn on stderr
    last = captured.out.strip().splitlines()[-1]
    assert last == (f"eval_memory: results in {out / 'results.jsonl'}, banks in {out / 'banks'}, "
                    f"summary in {out / 'summary.md'} and summary.json, plot in accuracy.png")
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **overall (categories 1-4)** |" in captured.out

    quiet = tmp_path / "quiet"
    run([*SAMPLE, "--builder", "annotation", "--out", str(quiet), "--no-progress"])
    captured = capsys.readouterr()
    assert "conv-26" not in captured.err and "answer" not in captured.err  # no bars at all
    assert "| **overall (categories 1-4)** |" in captured.out  # ... but the summary stays
    assert captured.out.strip().splitlines()[-1].startswith(f"eval_memory: results in {quiet / 'results.jsonl'}")


def _model_run(tmp_path, name, *extra):
    def reply(body):
        if "Answer to grade" in body["messages"][-1]["content"]:
            return '{"verdict": "WRONG", "reason": "no"}'
        if "operations" in body["messages"][0]["content"]:  # an agent prompt: no change this session
            return '{"operations": []}'
        return "no idea"

    server = ChatServer(default=reply)
    try:
        summary = run([*SAMPLE, "--builder", "build-model", "--answerer", "answer-model", "--judge", "judge-model",
                       "--base-url", server.url, "--no-llm-cache", "--no-progress", "--out", str(tmp_path / name),
                       *extra])
    finally:
        server.close()
    return summary, server.requests


def test_max_tokens_per_role_and_schema_guided_builder(tmp_path):
    summary, requests = _model_run(tmp_path, "guided", "--builder-max-tokens", "300", "--answerer-max-tokens", "40",
                                   "--judge-max-tokens", "20", "--structured-output")
    by_model = {m: [r for r in requests if r["model"] == m] for m in ("build-model", "answer-model", "judge-model")}
    assert summary["build"]["sessions"] == 2 and summary["build"]["agent_errors"] == 0
    assert len(by_model["build-model"]) == 2 * 4  # one call per agent and session, all parsed first time
    assert {r["max_tokens"] for r in by_model["build-model"]} == {300}
    names = sorted(r["response_format"]["json_schema"]["name"] for r in by_model["build-model"])
    assert names == sorted(f"membuilder_{k}_operations" for k in ("core", "episodic", "semantic", "procedural")
                           for _ in range(2))
    assert all(r["response_format"]["type"] == "json_schema" for r in by_model["build-model"])
    assert len(by_model["answer-model"]) == 2 and {r["max_tokens"] for r in by_model["answer-model"]} == {40}
    assert {r["max_tokens"] for r in by_model["judge-model"]} == {20}
    # answers and verdicts are free text: never schema-guided
    assert all("response_format" not in r for r in by_model["answer-model"] + by_model["judge-model"])
    saved = json.loads((tmp_path / "guided" / "config.json").read_text())
    assert (saved["builder_max_tokens"], saved["structured_output"], saved["answerer_max_tokens"]) == (300, True, 40)

    # a run in the same folder with another budget would mix banks built two ways: refused
    with pytest.raises(RunError, match="builder_max_tokens=300"):
        _model_run(tmp_path, "guided", "--builder-max-tokens", "200", "--structured-output", "--resume")


def test_defaults_send_no_schema(tmp_path):
    _, requests = _model_run(tmp_path, "plain")
    builds = [r for r in requests if r["model"] == "build-model"]
    assert len(builds) == 8 and {r["max_tokens"] for r in builds} == {2048}
    assert all("response_format" not in r for r in builds)
    assert {r["max_tokens"] for r in requests if r["model"] != "build-model"} == {256}


@pytest.mark.parametrize("flag", ["--builder-max-tokens", "--answerer-max-tokens", "--judge-max-tokens"])
def test_max_tokens_must_be_positive(tmp_path, flag, capsys):
    with pytest.raises(SystemExit):
        run([*SAMPLE, "--builder", "rag", "--out", str(tmp_path), flag, "0"])
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_progress_counts_the_long_short_architecture_s_three_agents(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_memory, "tqdm", RecordingBar)
    RecordingBar.bars = []
    run([*SAMPLE, "--builder", "annotation", "--architecture", "longshort", "--out", str(tmp_path)])
    conv_bar = next(b for b in RecordingBar.bars if b.desc.strip() == "conv-26")
    assert (conv_bar.total, conv_bar.n) == (6, 6)  # 2 sessions x 3 agents (splitter, long-term, short-term)
    assert conv_bar.postfixes[-1] == "session 2/2, short_term done, 0 agent errors"
