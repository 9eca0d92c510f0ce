"""The four agents on LLMAgentBackend against a local OpenAI-compatible server with scripted answers."""

import json

import pytest

from membuilder.agents import LLMAgentBackend, MemoryBuilder, response_format
from membuilder.llm import LLMClient, LLMConfig, ResponseCache
from membuilder.operations import Add
from membuilder.types import MemoryKind

from .agent_server import AgentServer, answer, sleep, status
from .conftest import make_session

SESSION = make_session([("Caroline", "I adopted a dog named Max yesterday!"),
                        ("Melanie", "Congrats! We went camping last weekend.")])
EPISODIC = {"operations": [{"action": "ADD", "memory": "Caroline adopted a dog named Max.", "time": "2023-05-07"}]}
SEMANTIC = {"operations": [{"action": "ADD", "memory": "Max is Caroline's dog."}]}


@pytest.fixture
def server():
    s = AgentServer()
    yield s
    s.close()


def _client(server, tmp_path=None, **overrides):
    settings = {"timeout_s": 5.0, "max_retries": 2, "backoff_base_s": 0.0, **overrides}
    config = LLMConfig(base_url=server.url, api_key="test", model="scripted",
                       cache_path=str(tmp_path / "cache.sqlite") if tmp_path else None, **settings)
    return LLMClient(config, sleep=lambda s: None)


def _entries(bank):
    return sorted((e.id, e.text, e.event_time) for e in bank.entries())


def test_valid_answers_from_the_server_are_applied(server, bank):
    server.push("core", answer({"action": "APPEND", "content": "Caroline has a dog named Max."}))
    server.push("episodic", answer(EPISODIC))
    server.push("semantic", answer(SEMANTIC))
    with _client(server) as client:
        record = MemoryBuilder(LLMAgentBackend(client)).add_session(bank, SESSION)
        assert client.usage().calls == 4
    assert record.errors == {}
    assert bank.core == "Caroline has a dog named Max."
    assert _entries(bank) == [("E1", "Caroline adopted a dog named Max.", "2023-05-07"),
                              ("S2", "Max is Caroline's dog.", None)]
    body = server.bodies("semantic")[0]
    assert body["temperature"] == 0.0 and body["max_tokens"] == 2048 and "response_format" not in body
    assert body["messages"] == record.agents[MemoryKind.SEMANTIC].messages


def test_malformed_answer_is_asked_again_without_cache_and_applied_once(server, bank, tmp_path):
    bad = "Sure! Here are the operations: {operations: [ADD Max]}"
    server.push("semantic", answer(bad), answer("```json\n" + json.dumps(SEMANTIC) + "\n```"))
    with _client(server, tmp_path) as client:
        record = MemoryBuilder(LLMAgentBackend(client)).add_session(bank, SESSION)
    sem = record.agents[MemoryKind.SEMANTIC]
    assert sem.ok and sem.attempts == (bad,) and sem.raw_output.startswith("```json")
    assert sem.notes == ("attempt 1 unusable: no JSON object found in the output",)
    assert _entries(bank) == [("S1", "Max is Caroline's dog.", None)]
    first, second = server.bodies("semantic")
    # the retry carries the bad answer and the parser's error (re-asking at temperature 0 verbatim
    # would get the same answer back)
    assert second["messages"][:2] == first["messages"]
    assert second["messages"][2] == {"role": "assistant", "content": bad}
    assert "no JSON object found in the output" in second["messages"][3]["content"]
    # only answers that parse are cached: the three other agents' first answers; not semantic's bad
    # first answer (a rerun would replay it), nor its retry (the re-ask bypasses the cache)
    assert len(ResponseCache(tmp_path / "cache.sqlite")) == 3


def test_truncated_answer_is_an_error_and_not_reasked_with_the_same_budget(server, bank):
    cut = '{"operations": [{"action": "ADD", "memory": "Caroline adopted'
    server.push("episodic", answer(cut, finish="length"))
    server.push("semantic", answer(SEMANTIC))
    with _client(server) as client:
        record = MemoryBuilder(LLMAgentBackend(client, max_tokens=64)).add_session(bank, SESSION)
    epi = record.agents[MemoryKind.EPISODIC]
    assert epi.error == "output cut at max_tokens=64 (finish_reason 'length'); not parsed"
    assert epi.raw_output == cut and epi.operations == () and epi.parsed == ()
    assert len(server.bodies("episodic")) == 1
    assert _entries(bank) == [("S1", "Max is Caroline's dog.", None)]


def test_truncated_answer_is_asked_once_with_a_larger_budget(server, bank):
    server.push("episodic", answer('{"operations": [', finish="length"), answer(EPISODIC))
    with _client(server) as client:
        backend = LLMAgentBackend(client, max_tokens=64, truncation_max_tokens=256)
        record = MemoryBuilder(backend).add_session(bank, SESSION)
    assert [b["max_tokens"] for b in server.bodies("episodic")] == [64, 256]
    assert record.agents[MemoryKind.EPISODIC].ok
    assert record.agents[MemoryKind.EPISODIC].notes == (
        "output cut at max_tokens=64; asked again with max_tokens=256",)
    assert _entries(bank) == [("E1", "Caroline adopted a dog named Max.", "2023-05-07")]
    with pytest.raises(ValueError, match="must be larger"):
        LLMAgentBackend(client, max_tokens=64, truncation_max_tokens=64)


def test_wrong_action_fails_the_agent_after_bounded_retries(server, bank):
    merge = answer({"operations": [{"action": "MERGE", "ids": ["S1", "S2"], "new_memory": "x"}]})
    server.push("semantic", merge, merge, merge, answer(SEMANTIC))  # the 4th would be valid: never asked
    server.push("episodic", answer(EPISODIC))
    with _client(server) as client:
        record = MemoryBuilder(LLMAgentBackend(client, max_parse_retries=2)).add_session(bank, SESSION)
    sem = record.agents[MemoryKind.SEMANTIC]
    assert len(server.bodies("semantic")) == 3
    assert sem.error.startswith("no valid output after 3 attempt(s): invalid semantic answer: operations[0]: "
                                "action 'MERGE' is not allowed for semantic memory")
    assert len(sem.attempts) == 2 and sem.raw_output == merge[1]
    assert _entries(bank) == [("E1", "Caroline adopted a dog named Max.", "2023-05-07")]


def test_unknown_id_is_rejected_and_the_rest_applied(server, bank):
    bank.apply([Add("episodic", "Caroline went camping.", "2023-05-01")])  # E1
    server.push("episodic", answer({"operations": [
        {"action": "UPDATE", "id": "E7", "new_memory": "nope"},
        {"action": "ADD", "memory": "Melanie went camping.", "time": "2023-05-06"}]}))
    with _client(server) as client:
        record = MemoryBuilder(LLMAgentBackend(client)).add_session(bank, SESSION)
    epi = record.agents[MemoryKind.EPISODIC]
    assert epi.ok and epi.rejected == ("operations[0] UPDATE: no entry with id 'E7'",)
    assert epi.operations == (Add("episodic", "Melanie went camping.", "2023-05-06"),)
    assert _entries(bank) == [("E1", "Caroline went camping.", "2023-05-01"),
                              ("E2", "Melanie went camping.", "2023-05-06")]


def test_server_errors_are_retried_by_the_client_then_reported(server, bank):
    server.push("core", status(500), status(503), answer({"action": "APPEND", "content": "Caroline has a dog."}))
    server.push("procedural", status(500), status(500), status(500))  # max_retries=2: 3 attempts, all fail
    server.push("semantic", answer(SEMANTIC))
    with _client(server) as client:
        record = MemoryBuilder(LLMAgentBackend(client)).add_session(bank, SESSION)
    assert record.agents[MemoryKind.CORE].ok and bank.core == "Caroline has a dog."
    proc = record.agents[MemoryKind.PROCEDURAL]
    assert proc.error.startswith("LLMRetriesExhausted: chat completion failed after 3 attempt(s)")
    assert "HTTP 500" in proc.error
    assert len(server.bodies("core")) == 3 and len(server.bodies("procedural")) == 3
    assert _entries(bank) == [("S1", "Max is Caroline's dog.", None)]
    assert len(bank.history()) == 2  # core append + one ADD: nothing applied twice


def test_timeouts_are_reported_and_do_not_block_the_others(server, bank):
    server.push("episodic", sleep(1.5))
    server.push("semantic", answer(SEMANTIC))
    with _client(server, timeout_s=0.4, max_retries=0) as client:
        record = MemoryBuilder(LLMAgentBackend(client)).add_session(bank, SESSION)
    assert record.agents[MemoryKind.EPISODIC].error.startswith("LLMRetriesExhausted")
    assert "Timeout" in record.agents[MemoryKind.EPISODIC].error
    assert _entries(bank) == [("S1", "Max is Caroline's dog.", None)]


def test_constrained_decoding_sends_the_schema_and_compression_its_own(server, clock):
    from membuilder.bank import MemoryBank
    from membuilder.operations import CoreAppend
    from membuilder.store import InMemoryStore

    bank = MemoryBank(InMemoryStore(), "o", clock=clock, core_limit=60)
    bank.apply([CoreAppend("Caroline lives in Boston and works as a counsellor.")])  # 51 characters
    server.push("core", answer({"action": "APPEND", "content": "Caroline has a dog named Max."}))
    server.push("compress", answer({"action": "REWRITE", "content": "Caroline: Boston, counsellor, dog Max."}))
    with _client(server) as client:
        record = MemoryBuilder(LLMAgentBackend(client, constrained=True)).add_session(bank, SESSION)
    assert server.bodies("semantic")[0]["response_format"] == response_format("semantic")
    assert server.bodies("compress")[0]["response_format"] == response_format(
        "core", compression=True, core_limit=60)
    assert record.agents[MemoryKind.CORE].compression.operation.content == "Caroline: Boston, counsellor, dog Max."
    assert bank.core == "Caroline: Boston, counsellor, dog Max."
