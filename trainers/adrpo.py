"""ADRPO: the memory agents' policy trained by group-relative RL on the session reward.

Each step (DESIGN section 7):
1. take `data.sessions_per_step` sessions (a seeded per-epoch order; each process takes every
   world-th of them); sample G completions for each (session, agent) prompt from the rollout
   engine at temperature T and top-p;
2. score candidate g of each session (state before + the g-th output of every agent) with the
   reward function: R(g, m) = v(g, m) * T(g) * (1 - lambda * l(g, m)), attribution weight w;
3. A = (R - mean) / (std + eps) per (session, agent) group (unbiased std, eps 1e-6; all-equal
   groups give 0 and are counted; masked samples are out of the statistics and of the loss);
4. recompute, with the weights that generated the rollout, the log-probs at the sampling
   temperature (logits / T) of the policy (`logp_old`) and of the frozen reference (`logp_ref`),
   and the policy's temperature-1 log-probs, compared with the engine's (which are temperature 1)
   only for the mismatch metrics and the truncated importance-sampling factor `c`;
5. minimise, over the completion tokens t of the step's samples i,

       L = sum_{i,t} s_{i,t} * [ -w_i c_{i,t} max( min(rho A_i, clip(rho, 1-eps_lo, 1+eps_hi) A_i), d(A_i) )
                                 + beta * min(k3_{i,t}, kl_clamp) ]

   with rho = exp(logp - logp_old), d(A) = dual_clip * A for A < 0 (else -inf),
   k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1, and the aggregation scale s: token mean
   (default, 1 / number of completion tokens of the whole step), or a per-sequence mean. The
   normaliser counts the tokens (or sequences) of ALL micro-batches of ALL processes of the
   step, so the gradient does not depend on how the batch is split;
6. one optimizer step per rollout batch (or `loss.updates_per_batch` steps over the same batch),
   then push the weights to the engine.

Departures from the paper's run (veRL ~0.4), all named by config fields:
- old log-probs at the sampling temperature on both sides, never mixed with the engine's;
  a truncated importance-sampling correction (`rollout.tis`, cap 2) for engine/trainer mismatch,
  on by default for vLLM and remote rollouts (the paper had none);
- the token mean is over the whole step, not inside micro-batches of 4 sequences;
- masked samples (reward failure, session without QA) are excluded and counted, never scored 0;
- a step whose every sample is masked (or empty) makes no optimizer step at all, rather than
  one of weight decay and stale momentum; it is logged (`train/skipped_update`);
- `ADRPOConfig()` has the paper's sizes but SmolLM2-135M and the generated world; the command
  line without --config runs `trainers/configs/adrpo_cpu.yaml` (G = 4, answers up to 64 tokens,
  1 session per step, 2 steps); `trainers/configs/adrpo_paper_gpu.yaml` is the paper's setting
  (Qwen3-4B after SFT, vLLM, API answerer and judge).

Run:
    accelerate launch trainers/adrpo.py                       # trainers/configs/adrpo_cpu.yaml
    python trainers/adrpo.py --config trainers/configs/adrpo_paper_gpu.yaml --resume latest
    python trainers/adrpo.py --overwrite                      # replace the run in the output dir
    accelerate launch --multi_gpu --num_processes 2 trainers/adrpo.py distributed.fsdp=true
From Python: `ADRPOTrainer(cfg, reward_fn=my_reward).train()`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python trainers/adrpo.py`: put the repository root, not trainers/, first on the path.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM

from reward.types import RewardFn
from rollout.types import RolloutEngine, SamplingParams
from trainers.adrpo_config import ADRPOConfig
from trainers.checkpoint import TrainState, load_checkpoint, load_policy, save_checkpoint
from trainers.config import ConfigError, load_config
from trainers.data.rl_rows import RLRow, read_rl_rows
from trainers.episodes import Episodes, EpisodeSource, SessionEpisodes, SourceContext, configured_source
from trainers.distributed import (
    all_reduce_sum,
    barrier,
    make_accelerator,
    shard_frozen_model,
)
from trainers.engines import build_engine, build_reward, connect_remote_weights, push_weights
from trainers.metrics import MetricsLogger, progress_bar
from trainers.optim import build_optimizer, build_scheduler
from trainers.packing import enable_shared_prompt_attention
from trainers.recipe import base_model_path
from trainers.run_dir import (
    add_run_flags,
    finished_message,
    report_results,
    run_command,
    run_overrides,
    start_run,
)
from trainers.rl_batch import (
    RLSession,
    assign_advantages,
    batch_counts,
    counts_to_metrics,
    epoch_order,
    group_sessions,
    step_sessions,
)
from trainers.rl_step import PolicyBatch, policy_update, prepare_policy_batch

logger = logging.getLogger(__name__)


@dataclass
class ADRPOResult:
    metrics: list[dict[str, float]] = field(default_factory=list)  # one row per step
    state: TrainState = field(default_factory=TrainState)
    checkpoint: Path | None = None
    plot: Path | None = None


class ADRPOTrainer:
    """Sets up policy, reference, optimizer, engine and reward from an `ADRPOConfig`; `train()` runs.

    `reward_fn` replaces the configured reward, `rows` the configured RL set, `engine` the
    configured rollout engine (the trainer then owns it and closes it). `episodes` replaces the
    whole data + reward side (`trainers.episodes`): another agent set or reward scheme; the
    default is `SessionEpisodes` over the RL set's sessions with `reward_fn`.
    """

    def __init__(
        self,
        cfg: ADRPOConfig,
        *,
        reward_fn: RewardFn | None = None,
        rows: list[RLRow] | None = None,
        engine: RolloutEngine | None = None,
        episodes: EpisodeSource | None = None,
    ):
        self.cfg = cfg
        acc = self.accelerator = make_accelerator(
            cfg.distributed, activation_checkpointing=cfg.train.gradient_checkpointing
        )
        if acc.num_processes > 1 and not acc.is_fsdp2:
            # The packed forward reads the decoder of the module it is given; a DDP wrapper has
            # none, and FSDP2 is the design's distributed mode anyway.
            raise ConfigError("several processes need distributed.fsdp=true (ADRPO does not run under DDP)")
        set_seed(cfg.train.seed)
        # One run per output folder; a resume must match the saved config (trainers/run_dir.py).
        self.run = start_run(cfg, main_process=acc.is_main_process)
        self.output_dir = self.run.output_dir
        self.checkpoints_dir = self.output_dir / "checkpoints"
        resume = self.run.resume

        # Data: sessions of the RL set (or the given episode source), the same on every process.
        self.base_path = base_model_path(cfg.model, self.output_dir)
        self.snapshots_dir = Path(cfg.data.snapshots) if cfg.data.snapshots else None
        self.sessions: list[RLSession] = []
        if episodes is None:
            episodes = configured_source(
                SourceContext(cfg, self.output_dir, self.base_path, self.snapshots_dir, acc.is_main_process)
            )
            if episodes is not None and (reward_fn is not None or rows is not None):
                raise ConfigError(
                    f"reward_fn= / rows= feed the dense session source; data.architecture={cfg.data.architecture!r} "
                    f"with reward.dense={cfg.reward.dense} builds its own data and reward (pass episodes= instead)"
                )
        if episodes is None:
            rows = rows if rows is not None else self._read_rows()
            self.sessions = group_sessions(rows, cfg.data.agents, cfg.data.split)
            if not self.sessions:
                raise ValueError(f"no sessions of split {cfg.data.split!r} for agents {cfg.data.agents} in the RL set")
        num_units = len(episodes) if episodes is not None else len(self.sessions)
        if num_units == 0:
            raise ValueError("the episode source is empty")
        if cfg.data.sessions_per_step % acc.num_processes:
            raise ConfigError(
                f"data.sessions_per_step={cfg.data.sessions_per_step} must divide by the "
                f"{acc.num_processes} processes (each rolls out the same number of sessions)"
            )
        self.steps_per_epoch = math.ceil(num_units / cfg.data.sessions_per_step)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

        # Policy (from the checkpoint when resuming) and the frozen reference (the base model).
        model, self.tokenizer = load_policy(self.base_path, cfg.model, cfg.lora, checkpoint=resume)
        model.config.use_cache = False
        self._shared_prompt_attention(model)
        if cfg.train.gradient_checkpointing and not acc.is_fsdp2:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.torch_optimizer = build_optimizer(model, cfg.optim)
        self.model, self.optimizer = acc.prepare(model, self.torch_optimizer)
        self.scheduler = build_scheduler(self.torch_optimizer, cfg.optim, self.total_steps)
        self.ref_model = self._reference_model() if cfg.loss.beta > 0 else None

        self.state = TrainState(global_batch_size=cfg.data.sessions_per_step)
        if resume is not None:
            self.state = load_checkpoint(
                resume, model=self.unwrapped_model, optimizer=self.torch_optimizer, scheduler=self.scheduler
            )
            if self.state.global_batch_size != cfg.data.sessions_per_step:
                raise ConfigError(
                    f"{resume} was trained with {self.state.global_batch_size} sessions per step, this run has "
                    f"{cfg.data.sessions_per_step}; the position in the data would not carry over"
                )

        # Rollout engine and reward; the engine starts from the policy's current weights.
        weights = resume / "model" if resume is not None else self.base_path
        self.engine = engine if engine is not None else build_engine(cfg.rollout, weights, seed=cfg.train.seed)
        self.pushes_weights = acc.is_main_process or cfg.rollout.engine != "remote"
        # A colocated vLLM engine frees its KV cache and offloads its weights while the trainer
        # works (GPU only; a no-op on CPU); the push wakes the weights, the next rollout the rest.
        self.sleeps = engine is None and cfg.rollout.engine == "vllm"
        if engine is None and cfg.rollout.engine == "remote" and acc.is_main_process:
            connect_remote_weights(self.engine, cfg.rollout)
        push_weights(self.unwrapped_model, self.engine, is_sender=self.pushes_weights)
        if reward_fn is None and episodes is None:
            if cfg.reward.kind == "local" and self.snapshots_dir is None:
                raise ConfigError("the in-process reward needs the snapshots of the states before: set data.snapshots")
            reward_fn = build_reward(cfg.reward, snapshots_dir=self.snapshots_dir, tokenizer=self.tokenizer)
        self.reward_fn = reward_fn
        self.episodes: EpisodeSource = episodes or SessionEpisodes(
            self.sessions, reward_fn, mask_truncated=cfg.rollout.mask_truncated
        )
        self.metrics = MetricsLogger(
            self.output_dir,
            enabled=acc.is_main_process,
            tensorboard=cfg.logging.tensorboard,
            resume_step=self.state.step if resume is not None else None,
        )

    # -- setup helpers ---------------------------------------------------------------------

    def _read_rows(self) -> list[RLRow]:
        """The configured RL set; without one, the bundled world set (prepared once, by process 0)."""
        d = self.cfg.data
        path = d.path
        if path is None:
            from trainers.prepare_data import WORLD_CONVERSATIONS, WORLD_SESSIONS, prepare_world

            out = self.output_dir / "data"
            if self.accelerator.is_main_process:
                prepare_world(
                    out,
                    seed=self.cfg.train.seed,
                    conversations=d.world_conversations or WORLD_CONVERSATIONS,
                    sessions=d.world_sessions or WORLD_SESSIONS,
                    tokenizer=str(self.base_path),  # expert lengths in the policy's own tokens
                    progress=self.cfg.logging.progress_bar,
                )
            barrier()
            path = out / "rl.parquet"
        rl_set = read_rl_rows(path)
        if self.snapshots_dir is None:
            self.snapshots_dir = rl_set.snapshots_dir
        return list(rl_set.rows)

    def _reference_model(self) -> torch.nn.Module:
        cfg = self.cfg
        ref = AutoModelForCausalLM.from_pretrained(
            self.base_path, dtype=getattr(torch, cfg.model.dtype), attn_implementation=cfg.model.attn_implementation
        )
        ref.requires_grad_(False)
        ref.config.use_cache = False
        self._shared_prompt_attention(ref)
        ref.eval()
        if self.accelerator.is_fsdp2:
            return shard_frozen_model(ref, cfg.distributed)
        return ref.to(self.accelerator.device)

    def _shared_prompt_attention(self, model: torch.nn.Module) -> None:
        # Packed groups through plain sdpa need a dense [L, L] mask and lose sdpa's causal fast
        # path; the registered attention computes each prompt once and each answer against it
        # (benchmarks/results/adrpo_step.md). Must happen before any wrapping (FSDP, peft).
        if self.cfg.loss.layout == "packed" and self.cfg.model.attn_implementation == "sdpa":
            enable_shared_prompt_attention(model)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The policy without a DDP wrapper (FSDP2 models are their own module)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # -- one step --------------------------------------------------------------------------

    def _sampling_params(self) -> SamplingParams:
        r = self.cfg.rollout
        acc, step = self.accelerator, self.state.step
        seed = (self.cfg.train.seed * 1_000_003 + step * 1009 + acc.process_index) % 2**31
        return SamplingParams(n=r.group_size, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=seed)

    def _collect(self, indices: list[int]) -> Episodes:
        """The step's scored samples from the episode source; an engine or server gone stops the run."""
        step = self.state.step + 1
        try:
            return self.episodes.collect(indices, self.engine, self._sampling_params(), step=step)
        except (OSError, ConnectionError) as exc:
            raise RuntimeError(f"step {step}: the rollout engine failed ({type(exc).__name__}: {exc}); stopping") from exc

    def train_step(self) -> dict[str, float]:
        """Rollout, reward, advantages, log-probs, update(s), weight push; returns the step's metrics."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        times: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            times[f"time/{name}_s"] = now - clock
            clock = now

        order = epoch_order(len(self.episodes), cfg.train.seed, state.epoch, cfg.data.shuffle)
        indices = step_sessions(
            order, state.batch_in_epoch, cfg.data.sessions_per_step, acc.process_index, acc.num_processes
        )
        if self.sleeps:
            self.engine.wake_up()
        episodes = self._collect(indices)
        if self.sleeps:
            self.engine.sleep(1)
        # Rollout and reward are one phase here: a source may interleave them (sparse rewards roll
        # a conversation out session by session); sources report their own split in `times`.
        samples = episodes.samples
        masked = Counter(s.mask_detail for s in samples if s.mask is not None and s.mask_detail)
        if masked:
            logger.warning("step %d: masked samples by reason: %s", state.step + 1, dict(masked))
        groups = assign_advantages(samples, episodes.group_size, cfg.loss.adv_eps)
        lap("episodes")
        times.update({f"time/{k}_s": v for k, v in episodes.times.items()})

        batch: PolicyBatch = prepare_policy_batch(
            self.model, self.ref_model, samples, cfg, pad_id=self.tokenizer.pad_token_id
        )
        lap("logprobs")
        update = policy_update(self.model, self.optimizer, self.scheduler, acc, batch, cfg)
        lap("update")
        push_weights(self.unwrapped_model, self.engine, is_sender=self.pushes_weights)
        lap("weight_push")

        counts = batch_counts(samples, groups).values
        keys = sorted(counts)
        summed = all_reduce_sum(torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=acc.device))
        metrics = counts_to_metrics(dict(zip(keys, summed.tolist(), strict=True)))
        metrics.update(batch.metrics)
        metrics.update(update)
        generated = all_reduce_sum(torch.tensor(float(sum(s.num_tokens for s in samples)), device=acc.device))
        if episodes.counts:
            ekeys = sorted(episodes.counts)
            esum = all_reduce_sum(torch.tensor([episodes.counts[k] for k in ekeys], dtype=torch.float64, device=acc.device))
            metrics.update({f"episodes/{k}": v for k, v in zip(ekeys, esum.tolist(), strict=True)})
        rollout_s = times.get("time/rollout_s", times["time/episodes_s"])
        metrics["rollout/tokens_per_s"] = float(generated) / max(rollout_s, 1e-9)
        metrics["train/tokens_per_s"] = batch.global_tokens * cfg.loss.updates_per_batch / max(
            times["time/update_s"] + times["time/logprobs_s"], 1e-9
        )
        metrics.update(times)
        return metrics

    # -- the loop --------------------------------------------------------------------------

    def train(self, stop_at: int | None = None) -> ADRPOResult:
        """Train until `train.max_steps` / `train.epochs` are done, or until step `stop_at`."""
        cfg, state = self.cfg, self.state
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        result = ADRPOResult(state=state)
        main = self.accelerator.is_main_process
        bar = progress_bar(self.total_steps, initial=state.step, enabled=main and cfg.logging.progress_bar, desc="adrpo")
        while state.step < end:
            if state.batch_in_epoch >= self.steps_per_epoch:
                state.epoch += 1
                state.batch_in_epoch = 0
            metrics = self.train_step()
            state.step += 1
            state.batch_in_epoch += 1
            state.examples_seen += self.cfg.data.sessions_per_step
            state.target_tokens_seen += int(metrics["train/loss_tokens"])
            metrics["train/epoch"] = state.epoch + state.batch_in_epoch / self.steps_per_epoch
            result.metrics.append(metrics)
            if state.step % cfg.logging.every_steps == 0 or state.step == end:
                self.metrics.log(state.step, metrics)
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward/mean']:.3f}", valid=f"{metrics['reward/valid_rate']:.2f}",
                kl=f"{metrics.get('train/kl_mean', float('nan')):.4f}",
            )
            every = cfg.checkpoint.every_steps
            if (every > 0 and state.step % every == 0) or state.step == end:
                result.checkpoint = self.save()
        bar.close()
        if main:
            from trainers.plots import plot_reward_curves

            result.plot = plot_reward_curves(self.output_dir / "metrics.jsonl", self.output_dir / "reward_curve.png")
        return result

    def save(self) -> Path:
        """Write a checkpoint of the current state (every process must call it)."""
        return save_checkpoint(
            self.checkpoints_dir,
            self.state,
            model=self.unwrapped_model,
            optimizer=self.torch_optimizer,
            scheduler=self.scheduler,
            tokenizer=self.tokenizer,
            config=self.cfg,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    def close(self) -> None:
        self.metrics.close()
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def train(cfg: ADRPOConfig, **kwargs) -> ADRPOResult:
    """Run ADRPO to the end of `cfg`'s schedule (does not tear down the process group). Process 0
    then prints where the metrics, curves and checkpoint went."""
    trainer = ADRPOTrainer(cfg, **kwargs)
    main_process = trainer.accelerator.is_main_process
    try:
        if main_process and trainer.state.step >= trainer.total_steps:
            print(finished_message(trainer.output_dir, trainer.state.step, trainer.total_steps), flush=True)
        result = trainer.train()
    finally:
        trainer.close()
    if main_process:
        report_results(cfg, extra={"reward curve": result.plot})
    return result


# What the command line runs without --config: the CPU-sized run on the bundled world.
EMBEDDED_DEFAULT = Path(__file__).resolve().parent / "configs" / "adrpo_cpu.yaml"


def parse_args(argv: list[str] | None = None) -> ADRPOConfig:
    parser = argparse.ArgumentParser(description="ADRPO reinforcement learning of the memory agents.")
    parser.add_argument(
        "--config", default=str(EMBEDDED_DEFAULT), help="JSON, TOML or YAML config (default: %(default)s)"
    )
    add_run_flags(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    try:
        return load_config(ADRPOConfig, args.config, run_overrides(args))
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None, *, exit_process: bool = False) -> None:
    """The command line (`trainers.run_dir.run_command`: user errors in one line, exit status 2)."""
    run_command("adrpo.py", parse_args(argv), train, exit_process=exit_process)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(exit_process=True)
