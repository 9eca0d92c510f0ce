"""Checkpoints that resume exactly, with the model in Hugging Face format.

Layout of `<output_dir>/checkpoints/step-000010/`:

    model/               full fine-tuning: the model (`from_pretrained`-loadable, so vLLM loads
                         it too) with its tokenizer; with LoRA: base + adapter merged, if asked
    adapter/             LoRA only: the peft adapter with the tokenizer
    dcp/                 torch.distributed.checkpoint of {"model": trainable weights,
                         "optimizer": optimizer state}, sharded: `__<rank>_0.distcp` per process
                         plus `.metadata` (which rank's file holds which slice of which tensor)
    scheduler.pt         learning-rate scheduler state
    rng/rank-00000.pt    python, numpy and torch (CPU, CUDA) RNG states of each process
    trainer_state.json   step, epoch, position in the epoch, global batch size
    trainer_config.json  the typed config of the run

Model and optimizer state go through torch.distributed.checkpoint (DCP): under FSDP2 each
process writes the shard it holds and, at resume, reads only the slices of the files that
overlap its shard (with the same number of processes: its own file), so no process ever holds
the full optimizer state (2 x 4 bytes per parameter with AdamW: ~32 GB at 4B parameters).
Tensors that every process holds whole (DDP, or a single process; the optimizer's `step`
counters) are written once. A single process without a process group uses the same format (DCP
then runs without collectives). Only the HF `model/` is gathered in full, on rank 0, for
`from_pretrained` and vLLM; frozen weights (LoRA's base) are not in `dcp/`. DCP reshards when
resuming on a different number of processes. All processes must see the same filesystem: rank
0 writes `.metadata` and renames the finished folder.

Checkpoints of the previous format (a full `optimizer.pt` instead of `dcp/`) still load: every
process then reads the whole optimizer file, as before.

Under FSDP every process takes part in gathering the full HF weights, and only rank 0 writes
them. A checkpoint is written into `step-N.tmp` and renamed when complete, so
`latest_checkpoint` never returns a half-written one. Weights are saved in the dtype they are
trained in (float32 master weights under mixed precision), which is what makes a resume exact.

Resuming is two calls: `load_policy(..., checkpoint=ckpt)` builds the model from the
checkpoint's weights before `Accelerator.prepare` (every process reads them; sharding follows),
then `load_checkpoint(ckpt, ...)` restores the trainable weights and the optimizer from each
process's shard in `dcp/`, the scheduler and the RNG into the prepared objects, and returns the
`TrainState` to continue from.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from trainers.config import LoraConfig, ModelConfig, save_config
from trainers.distributed import barrier, full_state_dict, is_main_process

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where training stands; enough, with the data seed, to regenerate the rest of the data."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # global batches of `epoch` already trained on
    global_batch_size: int = 0  # examples per optimizer step (the data position depends on it)
    examples_seen: int = 0
    target_tokens_seen: int = 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


DCP_DIR = "dcp"  # the sharded model + optimizer state inside a checkpoint
LEGACY_OPTIMIZER_FILE = "optimizer.pt"  # the previous format: the full optimizer state


def _sharded_options(strict: bool = True) -> StateDictOptions:
    # Sharded (DTensor) values under FSDP2, plain tensors otherwise; frozen weights (LoRA's base)
    # come from the base model at resume, so they are neither written nor read.
    return StateDictOptions(full_state_dict=False, ignore_frozen_params=True, strict=strict)


def _without_aliases(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The model `state` with each tied parameter under its first name only.

    A tied head is its embedding's parameter, which DCP would otherwise write and read twice
    (V x H floats: 1.6 GB at Qwen3-4B's vocabulary). The names come from the module structure,
    so every process drops the same keys. Activation checkpointing's wrapper prefix is removed
    from names, as `get_state_dict` does.
    """
    first: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        name = name.replace("_checkpoint_wrapped_module.", "")
        if id(param) in first:
            aliases.add(name)
        else:
            first[id(param)] = name
    return {key: value for key, value in state.items() if key not in aliases}


@contextmanager
def _without_process_group_warning() -> Iterator[None]:
    # DCP warns that it assumes a single process when there is no process group; that is this
    # module's single-process format, not a mistake.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ---------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------


def load_policy(
    base_path: str | Path,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    checkpoint: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The trainable model and tokenizer: from `base_path`, or from `checkpoint` when resuming.

    Full fine-tuning resumes from the checkpoint's `model/`; LoRA resumes from the base model plus
    the checkpoint's `adapter/` (loaded trainable); a fresh LoRA run wraps the base with a new
    adapter (initialised from the current torch seed).
    """
    weights = Path(base_path)
    if checkpoint is not None and not lora_cfg.enabled:
        weights = Path(checkpoint) / "model"
    if not (weights / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model folder at {weights} (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(
        weights, dtype=getattr(torch, model_cfg.dtype), attn_implementation=model_cfg.attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(weights)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token
    if lora_cfg.enabled:
        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, Path(checkpoint) / "adapter", is_trainable=True)
        else:
            peft_config = PeftLoraConfig(
                r=lora_cfg.r,
                lora_alpha=lora_cfg.alpha,
                lora_dropout=lora_cfg.dropout,
                target_modules=list(lora_cfg.target_modules),
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, peft_config)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_model(
    path: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lora_base_path: str | Path | None,
    save_merged: bool,
) -> None:
    """Gather the full weights (all ranks) and write them in HF format (rank 0)."""
    state_dict = full_state_dict(model)
    if not is_main_process():
        return
    if isinstance(model, PeftModel):
        # peft picks the adapter tensors out of the full state dict.
        model.save_pretrained(path / "adapter", state_dict=state_dict)
        tokenizer.save_pretrained(path / "adapter")
        if save_merged:
            if lora_base_path is None:
                raise ValueError("save_merged needs the base model path of the LoRA run")
            # A fresh unsharded copy: merging into the (possibly sharded) training model would
            # change the weights being trained.
            base = AutoModelForCausalLM.from_pretrained(lora_base_path, dtype=torch.float32)
            merged = PeftModel.from_pretrained(base, path / "adapter").merge_and_unload()
            merged.save_pretrained(path / "model")
            tokenizer.save_pretrained(path / "model")
    else:
        model.save_pretrained(path / "model", state_dict=state_dict)
        tokenizer.save_pretrained(path / "model")


def save_checkpoint(
    checkpoints_dir: str | Path,
    state: TrainState,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    tokenizer: PreTrainedTokenizerBase,
    config: Any,
    lora_base_path: str | Path | None = None,
    save_merged: bool = False,
    keep_last: int = 0,
) -> Path:
    """Write `checkpoints_dir/step-<state.step>` (a collective: call on every process).

    `model` is the prepared model without DDP wrapper (`accelerator.unwrap_model`); FSDP2 models
    are passed as they are. `optimizer` is the torch optimizer the model's parameters belong to.
    `keep_last` > 0 deletes older checkpoints beyond that many.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step-{state.step:06d}"
    tmp = checkpoints_dir / f"step-{state.step:06d}.tmp"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    torch.save(_rng_state(), tmp / "rng" / f"rank-{_rank():05d}.pt")

    _save_model(tmp, model, tokenizer, lora_base_path, save_merged)
    # Each process writes its own shard of the trainable weights and of the optimizer state.
    model_state, optim_state = get_state_dict(model, optimizer, options=_sharded_options())
    with _without_process_group_warning():
        dcp.save({"model": _without_aliases(model, model_state), "optimizer": optim_state}, checkpoint_id=tmp / DCP_DIR)
    # Wait for every process's RNG file and shard before the rename.
    barrier()
    if is_main_process():
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        save_config(config, tmp / "trainer_config.json")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep_last > 0:
            for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `checkpoints_dir`, oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints_dir`, or None."""
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def read_train_state(checkpoint: str | Path) -> TrainState:
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint (trainer_state.json missing)")
    return TrainState(**json.loads(path.read_text()))


def load_checkpoint(
    checkpoint: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    """Restore trainable weights, optimizer, scheduler and this process's RNG; return the `TrainState`.

    Call on every process after `prepare` (a collective under FSDP). `model` and `optimizer` as
    for `save_checkpoint`. Each process reads only its shard of `dcp/` (see the module doc); a
    checkpoint of the previous format (`optimizer.pt`) loads too, every process reading the whole
    optimizer state. The weights in `dcp/` equal those `load_policy(..., checkpoint=...)` already
    loaded from `model/`. A process without its own RNG file (more processes than at save time)
    keeps its seeded RNG.
    """
    checkpoint = Path(checkpoint)
    state = read_train_state(checkpoint)
    if (checkpoint / DCP_DIR / ".metadata").is_file():
        _load_sharded(checkpoint / DCP_DIR, model, optimizer)
    elif (checkpoint / LEGACY_OPTIMIZER_FILE).is_file():
        # Previous format: every process reads the full state; set_optimizer_state_dict keeps its shard.
        optim_state = torch.load(checkpoint / LEGACY_OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    else:
        raise FileNotFoundError(
            f"{checkpoint} holds no model/optimizer state: expected a sharded torch.distributed.checkpoint "
            f"folder {DCP_DIR}/ with .metadata (this format) or {LEGACY_OPTIMIZER_FILE} (the previous format)"
        )
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    rng_file = checkpoint / "rng" / f"rank-{_rank():05d}.pt"
    if rng_file.is_file():
        # Written by our own save_checkpoint; python/numpy states are not plain tensors.
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read this process's shard of the weights and optimizer state from the DCP folder `path`."""
    # The model's own (sharded) state dicts are the templates: DCP fills them in place, reading
    # only the slices each one covers, and fails on a key the checkpoint lacks. Taking the
    # optimizer template creates its state (a zero-learning-rate step) if it has none yet.
    model_state, optim_state = get_state_dict(model, optimizer, options=_sharded_options())
    # A tied weight is filled in place through its first key, as it was saved.
    target = {"model": _without_aliases(model, model_state), "optimizer": optim_state}
    with _without_process_group_warning():
        dcp.load(target, checkpoint_id=path)
    # Not strict: frozen weights and tied aliases are deliberately absent.
    set_state_dict(
        model,
        optimizer,
        model_state_dict=target["model"],
        optim_state_dict=target["optimizer"],
        options=_sharded_options(strict=False),
    )
