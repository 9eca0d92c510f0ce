"""Session rollout: G samples for each (session, agent) prompt, grouped for rewards and advantages.

`session_prompts` renders the four agent prompts of a session from a bank's state with the memory
agents' own renderer (`membuilder.agents.prompts`), so rollouts see exactly what `MemoryBuilder`
sends; prompts rendered elsewhere can be passed as `AgentPrompt`s too. All prompts go to the
engine in one `generate` call with `n = G`, so the engine batches across sessions and agents.
The result is keyed by (session, agent, sample index); `candidates(session)` lines the agents'
samples up by index: candidate g of a session is the g-th output of each of its agents, applied
together to the state before the session (DESIGN.md, section 5).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rollout.types import Completion, Prompt, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from membuilder.bank import MemoryBank
    from membuilder.datasets import Session


@dataclass(frozen=True)
class AgentPrompt:
    session_id: str
    agent: str  # the memory kind: core, episodic, semantic, procedural
    prompt: Prompt


@dataclass(frozen=True)
class SessionRollout:
    """G completions per (session, agent), in sample order."""

    group_size: int
    groups: dict[tuple[str, str], tuple[Completion, ...]]

    def sample(self, session_id: str, agent: str, index: int) -> Completion:
        return self.groups[(session_id, agent)][index]

    def sessions(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.groups))

    def agents(self, session_id: str) -> list[str]:
        return [a for s, a in self.groups if s == session_id]

    def candidates(self, session_id: str) -> list[dict[str, Completion]]:
        """Candidate g (g < G) of a session: agent -> its g-th completion."""
        agents = self.agents(session_id)
        if not agents:
            raise KeyError(f"no rollout for session {session_id!r}")
        return [{a: self.groups[(session_id, a)][g] for a in agents} for g in range(self.group_size)]

    def items(self) -> list[tuple[str, str, int, Completion]]:
        """Every sample as (session, agent, sample index, completion)."""
        return [(s, a, g, c) for (s, a), samples in self.groups.items() for g, c in enumerate(samples)]


def session_prompts(bank: MemoryBank, session: Session, **render_kwargs: Any) -> list[AgentPrompt]:
    """The four agents' prompts for `session` against the bank's current state, in agent order.

    `render_kwargs` go to `membuilder.agents.prompts.render_session_prompts` (top_k, speakers, size
    limits); pass the same values as the `MemoryBuilder` that will apply the chosen operations.
    """
    from membuilder.agents.prompts import render_session_prompts

    rendered = render_session_prompts(bank, session, **render_kwargs)
    return [AgentPrompt(session.session_id, kind.value, r.messages) for kind, r in rendered.items()]


def rollout_sessions(engine: RolloutEngine, prompts: Sequence[AgentPrompt], params: SamplingParams) -> SessionRollout:
    """Sample `params.n` (= G) completions for every agent prompt, grouped by (session, agent)."""
    if not prompts:
        raise ValueError("rollout_sessions needs at least one agent prompt")
    keys = [(p.session_id, p.agent) for p in prompts]
    duplicates = sorted(k for k, count in Counter(keys).items() if count > 1)
    if duplicates:
        raise ValueError(f"each (session, agent) may appear once, repeated: {duplicates[:5]}")
    outputs = engine.generate([p.prompt for p in prompts], params)
    if len(outputs) != len(prompts) or any(len(o) != params.n for o in outputs):
        raise RuntimeError(
            f"the engine returned {[len(o) for o in outputs]} samples for {len(prompts)} prompts x {params.n}"
        )
    return SessionRollout(params.n, {k: tuple(o) for k, o in zip(keys, outputs, strict=True)})
