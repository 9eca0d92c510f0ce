"""The four memory agents (core, episodic, semantic, procedural): prompts, answer schemas, the
output parser (also the reward's validity gate), backends (any OpenAI-compatible LLM, or the
offline LoCoMo annotation expert) and `MemoryBuilder`, which turns sessions into memory."""

from .backends import (
    AgentBackend,
    AgentContext,
    AgentGenerationError,
    AgentReply,
    DetailedAgentBackend,
    LLMAgentBackend,
    run_backend,
)
from .apply import AgentApplication, SessionApplication, apply_agent_outputs
from .builder import MemoryBuilder, state_digest
from .records import AgentRecord, CompressionRecord, SessionRecord, read_records, write_records
from .expert import AnnotationExpert
from .parsing import ParsedOutput, find_json_object, parse_agent_output
from .prompts import (
    AGENT_KINDS,
    PromptBudgetError,
    RenderedPrompt,
    chars_for_tokens,
    render_compression_prompt,
    render_prompt,
    render_session_prompts,
    select_entries,
    session_query,
)
from .schema import agent_schema, compression_schema, response_format

__all__ = [
    "AGENT_KINDS", "AgentApplication", "AgentBackend", "AgentContext", "AgentGenerationError", "AgentRecord", "AgentReply",
    "AnnotationExpert", "CompressionRecord", "DetailedAgentBackend", "LLMAgentBackend", "MemoryBuilder",
    "ParsedOutput", "PromptBudgetError", "RenderedPrompt", "SessionRecord", "agent_schema", "chars_for_tokens",
    "compression_schema", "find_json_object", "parse_agent_output", "render_compression_prompt",
    "render_prompt", "render_session_prompts", "response_format", "run_backend", "select_entries",
    "session_query", "state_digest", "SessionApplication", "apply_agent_outputs", "read_records", "write_records",
]
