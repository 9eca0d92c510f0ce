"""Rollout: generation engines (transformers, colocated vLLM, HTTP server), weight sync, session rollout.

Engines live in their own modules so that importing this package pulls in neither vLLM nor a
server: `rollout.hf_engine.HFEngine`, `rollout.vllm_engine.VLLMEngine`,
`rollout.client.RemoteEngine` (a `rollout.server` seen from the trainer).
"""

from rollout.lora import policy_weights
from rollout.weight_sync import LazyWeights, push_weights_all_ranks
from rollout.session import AgentPrompt, SessionRollout, rollout_sessions
from rollout.types import (
    MAX_SEED,
    Completion,
    GenerationCancelled,
    InvalidRequestError,
    Prompt,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    WeightSyncError,
)

__all__ = [
    "MAX_SEED",
    "AgentPrompt",
    "Completion",
    "GenerationCancelled",
    "InvalidRequestError",
    "LazyWeights",
    "Prompt",
    "RolloutEngine",
    "RolloutError",
    "SamplingParams",
    "SessionRollout",
    "WeightSyncError",
    "policy_weights",
    "push_weights_all_ranks",
    "rollout_sessions",
]
