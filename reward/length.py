"""Length penalties l(g, m) in [0, 1] (DESIGN section 6), one unit on both sides: tokens of the
policy's tokenizer (REFERENCE item 7).

Core: on the growth of the block, max(0, tokens(after) - tokens(before)), where `after` is the
block the agent's own operations give (a REPLACE counts its growth, a REWRITE that shrinks the
block is free; REFERENCE item 17):

    l = 0 for growth <= theta_min, 1 for growth >= theta_max, linear in between.

Other kinds: on r = model tokens / expert tokens of the whole raw answer,

    l = 0                                   when |model - expert| < min_diff tokens
    l = 0                                   for gamma_l <= r <= gamma_u
    l = min(1, (r - gamma_u) / (upper - gamma_u))   above
    l = min(1, (gamma_l - r) / (gamma_l - lower))   below

An expert answer of 0 tokens makes r infinite: only an output of min_diff tokens or more is
penalised, and fully (REFERENCE item 18); an output as long as the expert's is never penalised.
"""

from __future__ import annotations

from .config import RewardConfig


def core_length_penalty(growth_tokens: int, config: RewardConfig) -> float:
    """Penalty of a core change that grows the block by `growth_tokens` (negative: shrinks)."""
    growth = max(0, growth_tokens)
    if growth <= config.theta_min:
        return 0.0
    if growth >= config.theta_max:
        return 1.0
    return (growth - config.theta_min) / (config.theta_max - config.theta_min)


def ratio_length_penalty(model_tokens: int, expert_tokens: int, config: RewardConfig) -> float:
    """Penalty of an episodic / semantic / procedural answer against the expert's length."""
    if model_tokens < 0 or expert_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got {model_tokens}, {expert_tokens}")
    if abs(model_tokens - expert_tokens) < config.min_diff:
        return 0.0
    if expert_tokens == 0:
        return 1.0  # r is infinite, and the output is at least min_diff tokens long
    r = model_tokens / expert_tokens
    if r > config.gamma_u:
        return min(1.0, (r - config.gamma_u) / (config.upper - config.gamma_u))
    if r < config.gamma_l:
        return min(1.0, (config.gamma_l - r) / (config.gamma_l - config.lower))
    return 0.0
