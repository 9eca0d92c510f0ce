"""Supervised fine-tuning on chat-format (prompt messages, target) pairs.

Objective: the mean negative log-likelihood of the target tokens (the assistant turn up to and
including its end-of-turn token), averaged over all target tokens of the global batch, i.e. of
all micro-batches of all processes of one optimizer step. Prompt tokens carry no loss. Each
micro-batch's summed token loss is divided by that global token count (all-reduced before the
step), so the gradient is the same whatever the split into processes and accumulation steps;
a per-micro-batch mean would weight short examples more whenever batches hold different numbers
of target tokens.

The LM head runs only on the positions that predict a target token (`head_target_nll_sum`), in
chunks (`trainers.fused_loss.fused_token_nll`): prompt tokens are most of a sequence (about 97 % in
the agent pairs), and the `[B, T, V]` logits with their float32 copy would dominate memory at a
151,936-token vocabulary. Padding and prompt rows never reach the head's matmuls.

Optimizer AdamW, learning rate linear warmup then cosine decay to `min_lr_ratio * lr`, global
gradient-norm clipping. Batches are length-grouped (no packing, see `trainers.sft_data`).
Full fine-tuning or LoRA (peft); FSDP2 over several processes, also on CPU (gloo).

Run:
    python trainers/sft.py                                   # tiny model, built-in pairs, CPU
    python trainers/sft.py --config sft.toml --data pairs.jsonl optim.lr=5e-7 train.epochs=10
    accelerate launch trainers/sft.py --config sft.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/sft.py distributed.fsdp=true
    python trainers/sft.py --resume latest                   # continue from the latest checkpoint
    python trainers/sft.py --overwrite                       # replace the run in the output dir

One run per output folder (`trainers/run_dir.py`): a new run refuses a folder that holds a run.

(`--multi_gpu` is Accelerate's flag for "start several processes"; it works on CPU-only machines.)
From Python: `SFTTrainer(cfg).train()` or `train(cfg)`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python trainers/sft.py`: put the repository root, not trainers/, first on the path.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import Tensor
from torch.distributed.tensor import DTensor

from trainers.checkpoint import TrainState, load_checkpoint, load_policy, save_checkpoint
from trainers.config import ConfigError, SFTConfig, load_config
from trainers.distributed import (
    accumulation_sync,
    all_reduce_sum,
    make_accelerator,
)
from trainers.fused_loss import fused_token_nll
from trainers.logprobs import DEFAULT_CHUNK_SIZE, lm_head_params
from trainers.metrics import MetricsLogger, progress_bar
from trainers.optim import build_optimizer, build_scheduler
from trainers.recipe import base_model_path
from trainers.run_dir import (
    add_run_flags,
    finished_message,
    report_results,
    run_command,
    run_overrides,
    start_run,
)
from trainers.sft_data import (
    stop_at_end_of_turn,
    BUILTIN_PAIRS,
    IGNORE_INDEX,
    SFTPair,
    collate,
    epoch_batches,
    micro_batches,
    read_pairs,
    tokenize_pairs,
)


def target_nll_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token NLL over positions whose label is not IGNORE_INDEX (a 0-dim fp32 tensor).

    The full-logits formula: the reference that `head_target_nll_sum` (what training uses) is
    tested against.

    logits: [B, T, V] model outputs; labels: [B, T] token ids (IGNORE_INDEX on prompt/padding).
    The prediction at position t is scored against the label at t + 1.
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def target_hidden_states(
    model: torch.nn.Module,
    input_ids: Tensor,  # [B, T]
    attention_mask: Tensor,  # [B, T]
    labels: Tensor,  # [B, T], IGNORE_INDEX on prompt/padding
    *,
    forward: torch.nn.Module | None = None,
) -> tuple[Tensor, Tensor]:  # hidden [N, H] predicting each target token, target ids [N]
    """The final hidden states at the N positions that predict a target token, and those tokens.

    Runs the model's own forward with the head on no position (`logits_to_keep` empty), so no
    logits exist, and keeps the decoder body's output with a forward hook. `forward` is the module
    to call when it wraps `model` (DDP, whose forward must run for its gradient hooks); by default
    `model` itself (also an FSDP2 model). Position ids follow the attention mask. Only the target
    rows are returned: whatever the other rows hold (padding may even be NaN) never reaches the head.
    """
    captured: list[Tensor] = []

    def keep_last_hidden(module: torch.nn.Module, args: tuple, output) -> None:
        captured.append(output[0])  # last_hidden_state of the decoder's ModelOutput

    handle = model.get_decoder().register_forward_hook(keep_last_hidden)
    try:
        (forward if forward is not None else model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0),
            use_cache=False,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
        )
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder forward, captured {len(captured)}")
    # The prediction at position t is scored against the label at t + 1.
    targets = labels[:, 1:] != IGNORE_INDEX
    return captured[0][:, :-1][targets], labels[:, 1:][targets]


def head_target_nll_sum(
    model: torch.nn.Module,
    input_ids: Tensor,  # [B, T]
    attention_mask: Tensor,  # [B, T]
    labels: Tensor,  # [B, T], IGNORE_INDEX on prompt/padding
    *,
    forward: torch.nn.Module | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:  # 0-dim float32
    """`target_nll_sum(model(...).logits, labels)` with the LM head applied at target positions only.

    The head runs on the target rows, `chunk_size` at a time (`fused_token_nll`), so the logits
    memory is `[chunk_size, V]` whatever the sequence length, instead of `[B, T, V]` plus a
    float32 copy. Under FSDP2 `lm_head_params` unshards the head if needed. `forward`: see
    `target_hidden_states`.
    """
    hidden, target_ids = target_hidden_states(model, input_ids, attention_mask, labels, forward=forward)
    weight, bias = lm_head_params(model)
    return fused_token_nll(hidden, weight, target_ids, head_bias=bias, chunk_size=chunk_size)


@dataclass
class SFTResult:
    losses: list[float] = field(default_factory=list)  # global target-token mean loss per step
    state: TrainState = field(default_factory=TrainState)
    checkpoint: Path | None = None  # the last checkpoint written


class SFTTrainer:
    """Sets up accelerator, model, data, optimizer and schedule from an `SFTConfig`; `train()` runs.

    `pairs` replaces the configured data (the data file, or the built-in pairs).
    """

    def __init__(self, cfg: SFTConfig, pairs: list[SFTPair] | None = None):
        self.cfg = cfg
        acc = self.accelerator = make_accelerator(
            cfg.distributed, activation_checkpointing=cfg.train.gradient_checkpointing
        )
        set_seed(cfg.train.seed)
        # One run per output folder; a resume must match the saved config (trainers/run_dir.py).
        self.run = start_run(cfg, main_process=acc.is_main_process)
        self.output_dir = self.run.output_dir
        self.checkpoints_dir = self.output_dir / "checkpoints"
        resume = self.run.resume

        # Model and tokenizer; the weights come from the checkpoint when resuming.
        self.base_path = base_model_path(cfg.model, self.output_dir)
        model, self.tokenizer = load_policy(self.base_path, cfg.model, cfg.lora, checkpoint=resume)
        model.config.use_cache = False
        stop_at_end_of_turn(model, self.tokenizer, cfg.data.chat_template_kwargs)
        if cfg.train.gradient_checkpointing and not acc.is_fsdp2:
            # Under FSDP2 the plugin checkpoints each decoder layer instead.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # Data.
        if pairs is None:
            pairs = read_pairs(cfg.data.path) if cfg.data.path else list(BUILTIN_PAIRS)
        self.examples = tokenize_pairs(
            self.tokenizer, pairs, cfg.data.max_length, cfg.data.truncation, cfg.data.chat_template_kwargs
        )
        self.global_batch_size = cfg.train.batch_size * acc.num_processes * cfg.train.grad_accum_steps
        self.batches_per_epoch = math.ceil(len(self.examples) / self.global_batch_size)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.batches_per_epoch

        # Optimizer and schedule; `prepare` shards the model (FSDP2) or wraps it (DDP).
        self.torch_optimizer = build_optimizer(model, cfg.optim)
        self.model, self.optimizer = acc.prepare(model, self.torch_optimizer)
        self.scheduler = build_scheduler(self.torch_optimizer, cfg.optim, self.total_steps)

        self.state = TrainState(global_batch_size=self.global_batch_size)
        if resume is not None:
            self.state = load_checkpoint(
                resume, model=self.unwrapped_model, optimizer=self.torch_optimizer, scheduler=self.scheduler
            )
            if self.state.global_batch_size != self.global_batch_size:
                raise ConfigError(
                    f"{resume} was trained with a global batch of {self.state.global_batch_size} examples, this "
                    f"run has {self.global_batch_size}; the position in the data would not carry over"
                )
        self.metrics = MetricsLogger(
            self.output_dir,
            enabled=acc.is_main_process,
            tensorboard=cfg.logging.tensorboard,
            resume_step=self.state.step if resume is not None else None,
        )

    # -- setup helpers ---------------------------------------------------------------------

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The model without a DDP wrapper (FSDP2 models are their own module)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # -- training --------------------------------------------------------------------------

    def train_step(self, global_batch: list[int]) -> dict[str, float]:
        """One optimizer step on a global batch of example indices; returns its metrics."""
        acc, cfg = self.accelerator, self.cfg
        parts = micro_batches(global_batch, acc.num_processes, acc.process_index, cfg.train.grad_accum_steps)
        batches = [collate([self.examples[i] for i in part], self.tokenizer.pad_token_id) for part in parts]
        local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        local_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        counts = all_reduce_sum(torch.tensor([local_targets, local_tokens], dtype=torch.float64, device=acc.device))
        n_targets = counts[0].item()

        nll_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        self.model.train()
        for a, batch in enumerate(batches):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            last = a == len(batches) - 1
            # DDP reduces on the last micro-batch only; FSDP2 as `distributed.grad_accum_sync` says.
            with accumulation_sync(acc, self.model, cfg.distributed, last):
                nll = head_target_nll_sum(
                    self.unwrapped_model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["labels"],
                    forward=self.model,
                )
                # DDP/FSDP average gradients over processes; multiplying by their number turns
                # the average into the sum that the global token mean needs.
                acc.backward(nll * (acc.num_processes / n_targets))
            nll_sum += nll.detach().double()

        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = all_reduce_sum(nll_sum).item() / n_targets
        return {
            "train/loss": loss,
            "train/grad_norm": float(grad_norm),
            "train/lr": lr,
            "train/target_tokens": n_targets,
            "train/tokens": counts[1].item(),
        }

    def train(self, stop_at: int | None = None) -> SFTResult:
        """Train until `train.max_steps` / `train.epochs` are done, or until step `stop_at`.

        Checkpoints every `checkpoint.every_steps` steps and where it stops.
        """
        cfg, state = self.cfg, self.state
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        result = SFTResult(state=state)
        bar = progress_bar(
            self.total_steps, initial=state.step, enabled=self.accelerator.is_main_process and cfg.logging.progress_bar
        )
        while state.step < end:
            batches = epoch_batches(
                [len(e) for e in self.examples],
                self.global_batch_size,
                seed=cfg.train.seed,
                epoch=state.epoch,
                shuffle=cfg.data.shuffle,
                group_by_length=cfg.data.group_by_length,
            )
            if state.batch_in_epoch >= len(batches):
                state.epoch += 1
                state.batch_in_epoch = 0
                continue
            started = time.perf_counter()
            metrics = self.train_step(batches[state.batch_in_epoch])
            elapsed = time.perf_counter() - started
            state.step += 1
            state.batch_in_epoch += 1
            state.examples_seen += self.global_batch_size
            state.target_tokens_seen += int(metrics["train/target_tokens"])
            result.losses.append(metrics["train/loss"])
            if state.step % cfg.logging.every_steps == 0 or state.step == end:
                metrics["train/tokens_per_s"] = metrics["train/tokens"] / elapsed
                metrics["train/epoch"] = state.epoch + state.batch_in_epoch / len(batches)
                self.metrics.log(state.step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            every = cfg.checkpoint.every_steps
            if (every > 0 and state.step % every == 0) or state.step == end:
                result.checkpoint = self.save()
        bar.close()
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
            lora_base_path=self.base_path,
            save_merged=self.cfg.lora.save_merged,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    def close(self) -> None:
        self.metrics.close()


def train(cfg: SFTConfig, pairs: list[SFTPair] | None = None) -> SFTResult:
    """Run SFT to the end of `cfg`'s schedule (does not tear down the process group). Process 0
    then draws the training curves and prints where the metrics, curves and checkpoint went."""
    trainer = SFTTrainer(cfg, pairs)
    main_process = trainer.accelerator.is_main_process
    try:
        if main_process and trainer.state.step >= trainer.total_steps:
            print(finished_message(trainer.output_dir, trainer.state.step, trainer.total_steps), flush=True)
        result = trainer.train()
    finally:
        trainer.close()
    if main_process:
        report_results(cfg)
    return result


def parse_args(argv: list[str] | None = None) -> SFTConfig:
    parser = argparse.ArgumentParser(description="Supervised fine-tuning on chat (prompt, target) pairs.")
    parser.add_argument("--config", help="JSON, TOML or YAML file with the config sections")
    parser.add_argument("--data", help="JSONL file of pairs (same as data.path=...)")
    add_run_flags(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    overrides = run_overrides(args) + ([f"data.path={args.data}"] if args.data else [])
    try:
        return load_config(SFTConfig, args.config, overrides)
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None, *, exit_process: bool = False) -> None:
    """The command line (`trainers.run_dir.run_command`: user errors in one line, exit status 2)."""
    run_command("sft.py", parse_args(argv), train, exit_process=exit_process)


if __name__ == "__main__":
    main(exit_process=True)
