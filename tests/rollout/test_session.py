"""Session rollout: G samples per (session, agent), grouped and lined up into candidates."""

from __future__ import annotations

import pytest

from rollout.chat import render_prompt
from rollout.hf_engine import HFEngine
from rollout.session import AgentPrompt, rollout_sessions
from rollout.types import SamplingParams

AGENTS = ["core", "episodic", "semantic", "procedural"]


def agent_prompts(sessions: list[str]) -> list[AgentPrompt]:
    return [
        AgentPrompt(
            s,
            a,
            [
                {"role": "system", "content": f"You are the {a} memory agent."},
                {"role": "user", "content": f"Session {s}."},
            ],
        )
        for s in sessions
        for a in AGENTS
    ]


def test_samples_are_grouped_by_session_agent_and_index(tiny_dir):
    engine = HFEngine(tiny_dir)
    prompts = agent_prompts(["s1", "s2"])
    out = rollout_sessions(engine, prompts, SamplingParams(n=3, max_tokens=6, seed=0))
    assert out.sessions() == ["s1", "s2"] and out.agents("s2") == AGENTS and out.group_size == 3
    for p in prompts:
        samples = out.groups[(p.session_id, p.agent)]
        assert len(samples) == 3
        # Each group holds the samples of its own prompt: the prompt tokens say which one.
        assert all(c.prompt_token_ids == tuple(render_prompt(engine.tokenizer, p.prompt)) for c in samples)
    candidates = out.candidates("s1")
    assert len(candidates) == 3
    for g, cand in enumerate(candidates):
        assert list(cand) == AGENTS
        assert all(cand[a] is out.sample("s1", a, g) for a in AGENTS)
    assert len(out.items()) == 2 * 4 * 3
    with pytest.raises(KeyError, match="s9"):
        out.candidates("s9")


def test_bad_batches_are_refused(tiny_dir):
    engine = HFEngine(tiny_dir)
    with pytest.raises(ValueError, match=r"\('s1', 'core'\)"):
        rollout_sessions(engine, agent_prompts(["s1"]) + agent_prompts(["s1"])[:1], SamplingParams(n=2))
    with pytest.raises(ValueError, match="at least one"):
        rollout_sessions(engine, [], SamplingParams(n=2))


def test_session_prompts_are_the_memory_agents_prompts(tiny_dir):
    from membuilder.agents.prompts import render_session_prompts
    from membuilder.bank import MemoryBank
    from membuilder.embedders import HashingEmbedder
    from membuilder.operations import Add
    from membuilder.store import InMemoryStore
    from rollout.session import session_prompts
    from tests.membuilder.agents.conftest import make_session

    bank = MemoryBank(InMemoryStore(), "conv-1", embedder=HashingEmbedder(dim=32), clock=lambda: 1_700_000_000.0)
    bank.apply([Add("semantic", "Caroline is training for a marathon.")], session_id="s0")
    sessions = [
        make_session([("Caroline", "I ran 20 km today!"), ("Melanie", "Great, the marathon is close.")], "s1"),
        make_session([("Caroline", "I adopted a dog."), ("Melanie", "What is its name?")], "s2", prefix="D2"),
    ]
    prompts = [p for s in sessions for p in session_prompts(bank, s, top_k=3)]
    assert [(p.session_id, p.agent) for p in prompts] == [(s, a) for s in ("s1", "s2") for a in AGENTS]
    expected = render_session_prompts(bank, sessions[0], top_k=3)
    assert [p.prompt for p in prompts[:4]] == [r.messages for r in expected.values()]
    assert "marathon" in prompts[2].prompt[-1]["content"]  # the semantic agent is shown the stored entry
    out = rollout_sessions(HFEngine(tiny_dir), prompts, SamplingParams(n=2, max_tokens=4, seed=0))
    assert out.sessions() == ["s1", "s2"] and len(out.candidates("s2")) == 2
