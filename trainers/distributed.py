"""Distributed setup: an Accelerator with FSDP2 on GPU and on CPU, full state dicts, clean exit.

On GPU, FSDP2 comes from Accelerate's own plugin (`fsdp_version=2`, each decoder layer its own
fully sharded unit, bf16 mixed precision). On a CPU-only machine Accelerate never turns FSDP on
by itself (`Accelerator(cpu=True)` under several processes gives DDP over gloo), so
`_enable_fsdp2_on_cpu` switches the already created state to FSDP; `Accelerator.prepare` then
shards with `fully_shard` over the gloo group as it does on GPUs. The tests rely on this path.

Full state dicts come from `torch.distributed.checkpoint.state_dict.get_model_state_dict`:
`Accelerator.get_state_dict` was seen returning wrong values for FSDP2 on CPU.

Gradient accumulation: `accumulation_sync` picks, per micro-batch, whether gradients are reduced
(`distributed.grad_accum_sync`; under FSDP2 the default reduce-scatters every micro-batch so a
rank never holds more than its gradient shard). `gradient_bytes` measures what a rank holds.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import NoReturn

import torch
import torch.distributed as dist
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from trainers.config import DistributedConfig

logger = logging.getLogger(__name__)


def resolve_precision(cfg: DistributedConfig) -> str:
    """Accelerate's `mixed_precision` value: "bf16" or "no"."""
    if cfg.precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "no"
    return cfg.precision


def fsdp2_plugin(cfg: DistributedConfig, activation_checkpointing: bool = False) -> FullyShardedDataParallelPlugin:
    """FSDP2 plugin: decoder layers (or `cfg.wrap_class`) each a fully sharded unit."""
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        # None lets Accelerate take the model's `_no_split_modules` (its decoder layer class).
        transformer_cls_names_to_wrap=[cfg.wrap_class] if cfg.wrap_class else None,
        reshard_after_forward=cfg.reshard_after_forward,
        activation_checkpointing=activation_checkpointing,
        # Our checkpoints gather full state dicts themselves (`full_state_dict`).
        state_dict_type="SHARDED_STATE_DICT",
    )


def _enable_fsdp2_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Turn a multi-process CPU Accelerator (gloo) into an FSDP2 one.

    Accelerate only selects FSDP for GPU-like devices; the sharding itself (`fully_shard` over
    the default process group) works on CPU tensors with gloo. Must run right after the
    Accelerator is created and before `prepare`.
    """
    if accelerator.num_processes < 2 or dist.get_backend() != "gloo":
        raise RuntimeError("FSDP2 on CPU needs several processes in a gloo process group")
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    state.device = torch.device("cpu")
    # AcceleratorState mirrors its distributed type into PartialState at the end of its own
    # init, and every later `AcceleratorState()` (Accelerate builds one per prepared optimizer)
    # copies PartialState's values back; without the mirror FSDP would silently revert to DDP.
    PartialState().distributed_type = DistributedType.FSDP


def make_accelerator(cfg: DistributedConfig, activation_checkpointing: bool = False) -> Accelerator:
    """An Accelerator for `cfg`: FSDP2 when `cfg.fsdp` and several processes, else DDP or none.

    `activation_checkpointing` is applied by the FSDP plugin (per decoder layer) under FSDP;
    without FSDP the caller enables the model's own gradient checkpointing instead.
    """
    precision = resolve_precision(cfg)
    on_cpu = not torch.cuda.is_available()
    if on_cpu and precision != "no":
        raise ValueError(f"distributed.precision={cfg.precision!r} needs a CUDA GPU; use 'no' or 'auto' on CPU")
    plugin = fsdp2_plugin(cfg, activation_checkpointing) if cfg.fsdp else None
    if on_cpu:
        accelerator = Accelerator(cpu=True, mixed_precision=precision)
        if plugin is not None and accelerator.num_processes > 1:
            _enable_fsdp2_on_cpu(accelerator, plugin)
    else:
        accelerator = Accelerator(mixed_precision=precision, fsdp_plugin=plugin)
    if cfg.fsdp and not accelerator.is_fsdp2:
        logger.warning("distributed.fsdp is set but only one process runs: training without sharding")
    return accelerator


def accumulation_sync(
    accelerator: Accelerator, model: torch.nn.Module, cfg: DistributedConfig, last: bool
) -> AbstractContextManager:
    """The context for one micro-batch's backward during gradient accumulation.

    The last micro-batch of a step always reduces gradients across processes. Before it, DDP
    skips the all-reduce (`no_sync`: its gradients are full-size on every rank anyway, so this
    only saves communication). Under FSDP2 `cfg.grad_accum_sync` decides: "every_micro_batch"
    (default) lets FSDP2 reduce-scatter after every backward, so a rank holds only its gradient
    shard; "last_micro_batch" uses `no_sync`, which keeps the full unsharded gradients of every
    parameter on every rank until the last backward. Both give the same gradients up to float
    summation order. `model` is the prepared model.
    """
    if last:
        return nullcontext()
    if accelerator.is_fsdp2 and cfg.grad_accum_sync == "every_micro_batch":
        return nullcontext()
    return accelerator.no_sync(model)


def gradient_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of gradient this process holds for `model` now, by kind (for measurements and tests).

    "sharded": the `.grad` of every parameter, counting a DTensor's local shard only (under
    FSDP2 a reduce-scattered gradient is a shard; a plain parameter's gradient counts whole).
    "unsharded": FSDP2's full-size gradients kept between backward passes without a reduce
    (`no_sync`), read from FSDP2's private per-parameter state (torch 2.13), since no public API
    exposes them.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sharded = 0
    for p in model.parameters():
        if p.grad is not None:
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            sharded += local.numel() * local.element_size()
    # Each FSDP parameter once: a module can hold the state of its own FSDP-wrapped parent.
    fsdp_params = {
        id(fsdp_param): fsdp_param
        for module in model.modules()
        if isinstance(module, FSDPModule)
        for group in module._get_fsdp_state()._fsdp_param_groups
        for fsdp_param in group.fsdp_params
    }
    unsharded = 0
    for fsdp_param in fsdp_params.values():
        kept = [fsdp_param.unsharded_accumulated_grad]
        if hasattr(fsdp_param, "_unsharded_param"):
            kept.append(fsdp_param._unsharded_param.grad)
        unsharded += sum(g.numel() * g.element_size() for g in kept if g is not None)
    return {"sharded": sharded, "unsharded": unsharded}


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's full (unsharded) state dict on CPU, on rank 0; `{}` on the other ranks.

    A collective under FSDP/DDP: every rank must call it. Keys are the plain module names
    (no FSDP or checkpoint-wrapper prefixes), as `from_pretrained` expects.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: Tensor) -> Tensor:
    """Sum of `value` over processes (a new tensor; unchanged when not distributed)."""
    out = value.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def shutdown(*, failed: bool = False) -> None:
    """Barrier, then destroy the process group.

    Without it two-process gloo runs sometimes aborted at interpreter exit ("terminate called
    without an active exception") after finishing their work. `failed=True` (the run is ending
    on an exception) skips the barrier: the other processes may be waiting in a collective this
    one will never join, and a barrier against them would hang both for good; this process
    exits instead, and the launcher stops the others.
    """
    if dist.is_available() and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def exit_launched_process(code: int = 0) -> NoReturn:
    """End a launched worker whose work is done: `shutdown()`, flush, then `os._exit(code)`.

    With the default gloo group, a run-loop thread of `ProcessGroupGloo` may still be releasing
    the last collective's work object when the interpreter finalizes; the tensor it frees then
    asks a dying interpreter for the GIL and the process aborts (SIGABRT, "terminate called
    without an active exception") after all its work is done. `destroy_process_group` does not
    stop those threads while other objects (device meshes, FSDP state) still reference the group.
    Seen in about one two-process run in ten here, caught under gdb (`~AsyncBarrierWork` in
    `runLoop` during `Py_FinalizeEx`). Leaving with `os._exit` skips finalization; logging and the
    standard streams are flushed first. Without a process group this is a plain `sys.exit(code)`.
    """
    distributed = dist.is_available() and dist.is_initialized()
    shutdown()
    if not distributed:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shard_frozen_model(model: torch.nn.Module, cfg: DistributedConfig) -> torch.nn.Module:
    """Shard a frozen model (the reference policy) with FSDP2 the way the policy is sharded.

    `Accelerator.prepare` shards only models it trains (with their optimizer), so the reference
    gets `fully_shard` on each decoder layer (`cfg.wrap_class` or the model's `_no_split_modules`)
    and on the root, over the default process group. Its forward then gathers one layer at a
    time, like the policy's. Call on every process, after the process group exists.
    """
    from torch.distributed.fsdp import fully_shard

    names = {cfg.wrap_class} if cfg.wrap_class else set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(model).__name__} names no layer class to shard; set distributed.wrap_class")
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"no module of class {sorted(names)} in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    return model
