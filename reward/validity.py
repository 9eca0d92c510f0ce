"""The validity gate v(g, m) (DESIGN section 6): 1 when the agent's raw output parses against
its schema and the bank accepts every one of its operations as written, else 0.

The verdict itself is `membuilder.agents.apply.apply_agent_outputs`' (`AgentApplication.valid`),
the same code that applies the expert's and the builder's outputs, so SFT targets and RL samples
are judged by one rule. A core change over the core limit is invalid (no compression step here).
"""

from __future__ import annotations

from membuilder.agents.apply import AgentApplication


def validity(app: AgentApplication | None) -> tuple[bool, str | None]:
    """(valid, why not) of one agent's output in a candidate; None: the agent gave no output."""
    if app is None:
        return False, "no output"
    return app.valid, app.invalid_reason
