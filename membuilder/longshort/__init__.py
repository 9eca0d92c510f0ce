"""The second memory architecture (DESIGN section 9): fact splitter -> long-term CRUD agent +
short-term state -> answer agent, on the same `membuilder` store, search and snapshots.

Long-term facts are `semantic` entries; the short-term state is the bank's core block (see
`membuilder.longshort.builder`). Trainer integration: `membuilder.longshort.reward`.
"""

from .answer import LongShortAnswerer, OfflineAnswerAgent
from .backends import (
    DEFAULT_STATE_LIMIT,
    AnnotationLongShortExpert,
    DetailedRoleBackend,
    LLMRoleBackend,
    RoleBackend,
    RoleContext,
    WorldLongShortExpert,
)
from .builder import LONG_TERM_KIND, LongShortBuilder, LongShortRecord, RoleRecord, apply_longshort, retrieve_candidates
from .prompts import render
from .reward import (
    LongShortSample,
    consolidation_prompt,
    make_longshort_reward_fn,
    rollout_prompts,
    score_longshort_group,
)
from .schema import Decision, Split, parse_decisions, parse_split, parse_state
from .tools import TOOLS, MemoryTools, ToolResult

__all__ = [
    "AnnotationLongShortExpert", "DEFAULT_STATE_LIMIT", "Decision", "DetailedRoleBackend", "LLMRoleBackend",
    "LONG_TERM_KIND", "LongShortAnswerer", "LongShortBuilder", "LongShortRecord", "LongShortSample",
    "MemoryTools", "OfflineAnswerAgent", "RoleBackend", "RoleContext", "RoleRecord", "Split", "TOOLS",
    "ToolResult", "WorldLongShortExpert", "apply_longshort", "consolidation_prompt", "make_longshort_reward_fn", "parse_decisions",
    "parse_split", "parse_state", "render", "retrieve_candidates", "rollout_prompts", "score_longshort_group",
]
