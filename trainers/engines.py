"""The trainer's ends of rollout and reward: build the engine and the reward function, push weights.

`build_engine(cfg, weights_path)` makes the configured `RolloutEngine`: transformers (a copy of
the policy in this process), colocated vLLM, or a remote rollout server (only process 0 joins the
weight-sync group). `build_reward(cfg)` makes the `RewardFn`: the reward library in process, or
the reward server's client. `push_weights(model, engine, is_sender)` sends the policy's current
weights (full tensors gathered from FSDP2 shards: every process must call it) to the engine.
`build_reward_parts(cfg)` gives the in-process reward's pieces (answerer, judge, embedder, token
counter, library config) on their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reward.types import RewardFn
from rollout.lora import policy_weights
from rollout.types import RolloutEngine
from rollout.weight_sync import full_tensor
from trainers.adrpo_config import RewardConfig, RolloutConfig


def build_engine(cfg: RolloutConfig, weights_path: str | Path, *, seed: int = 0) -> RolloutEngine:
    """The configured rollout engine, loaded from (or, remote, pushed) the weights at `weights_path`."""
    if cfg.engine == "transformers":
        from rollout.hf_engine import HFEngine

        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        return HFEngine(weights_path, dtype=torch.float32, device=device, max_batch_size=cfg.max_batch_size,
                        chat_template_kwargs=cfg.chat_template_kwargs)
    if cfg.engine == "vllm":
        from rollout.vllm_engine import VLLMEngine

        # On CPU vLLM reads this fraction as the share of the machine's memory it reserves.
        return VLLMEngine(
            weights_path,
            dtype=cfg.vllm_dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            chat_template_kwargs=cfg.chat_template_kwargs,
        )
    from rollout.client import RemoteEngine

    try:
        engine = RemoteEngine(cfg.url, timeout_s=cfg.timeout_s, chat_template_kwargs=cfg.chat_template_kwargs)
    except OSError as exc:
        raise ConnectionError(f"rollout.url={cfg.url}: the rollout server does not answer ({exc})") from exc
    return engine


def connect_remote_weights(engine: RolloutEngine, cfg: RolloutConfig) -> None:
    """Form the weight-sync group with a remote engine (process 0 only)."""
    engine.connect_weights(host=cfg.weight_sync_host, timeout_s=cfg.timeout_s)


@dataclass
class RewardParts:
    """The in-process reward's pieces: what `build_reward` binds, and what reward schemes that
    call the reward library themselves (`trainers.conversation_episodes`) use."""

    answerer: Any
    judge: Any
    embedder: Any  # None: BM25 only
    token_counter: Callable[[str], int]  # tokens of the policy's tokenizer
    config: Any  # reward.config.RewardConfig


def build_reward_parts(cfg: RewardConfig, *, tokenizer) -> RewardParts:
    """The configured answerer / judge / embedder / token counter / library config (in process)."""
    from membuilder.answering import ExtractiveAnswerer, LLMAnswerer
    from membuilder.api import make_embedder
    from membuilder.judging import LLMJudge, RuleJudge
    from reward.config import RewardConfig as LibraryRewardConfig

    client = None
    if cfg.answerer != "extractive" or cfg.judge != "rule":
        from membuilder.llm import LLMClient, LLMConfig

        client = LLMClient(LLMConfig.from_env(base_url=cfg.base_url))
    answerer = ExtractiveAnswerer() if cfg.answerer == "extractive" else LLMAnswerer(client, model=cfg.answerer)
    judge = RuleJudge() if cfg.judge == "rule" else LLMJudge(client, model=cfg.judge)
    return RewardParts(
        answerer=answerer,
        judge=judge,
        embedder=make_embedder(None if cfg.embedder == "none" else cfg.embedder),
        token_counter=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        config=LibraryRewardConfig(alpha=cfg.alpha, lam=cfg.length_lambda, call_timeout_s=cfg.call_timeout_s),
    )


def build_reward(cfg: RewardConfig, *, snapshots_dir: str | Path, tokenizer) -> RewardFn:
    """The configured reward function (same signature in process and remote).

    In process: the reward library over the snapshots at `snapshots_dir`, lengths counted with
    the policy's `tokenizer`, the configured answerer / judge / embedder (`build_reward_parts`).
    """
    if cfg.kind == "remote":
        from reward.client import RemoteReward

        token = os.environ.get(cfg.token_env) if cfg.token_env else None
        return RemoteReward(cfg.url, token=token or None, timeout_s=cfg.timeout_s)
    from membuilder.snapshots import SnapshotStore
    from reward.score import make_reward_fn

    parts = build_reward_parts(cfg, tokenizer=tokenizer)
    return make_reward_fn(
        snapshots=SnapshotStore(snapshots_dir),
        token_counter=parts.token_counter,
        answerer=parts.answerer,
        judge=parts.judge,
        config=parts.config,
        embedder=parts.embedder,
    )


@torch.no_grad()
def push_weights(model: nn.Module, engine: RolloutEngine, *, is_sender: bool = True) -> int:
    """Load the policy's current weights into `engine`; returns the bytes pushed.

    Every process must call it: gathering an FSDP2 shard is a collective. A process whose engine
    is shared (a remote server fed by process 0) passes `is_sender=False`: it joins the gathers
    and pushes nothing.
    """
    # Activation checkpointing under FSDP wraps each layer; the engine knows the plain HF names.
    named = [(name.replace("._checkpoint_wrapped_module", ""), full_tensor(t)) for name, t in policy_weights(model)]
    if not is_sender:
        return 0
    engine.update_weights(named)
    return sum(t.numel() * t.element_size() for _, t in named)
