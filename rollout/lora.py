"""Policy weights for a push, under the base model's names, for plain and peft (LoRA) policies.

For a LoRA-adapted policy the generator needs merged weights `W + scaling * B @ A` under the base
model's names (`model.layers.0.self_attn.q_proj.weight`, not
`base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`), and no `lora_A`/`lora_B`
tensors. The merge is computed into new tensors with peft's own `get_delta_weight`, instead of
peft's in-place `merge_adapter()` / `unmerge_adapter()`: `W + d - d` does not round back to `W`,
and in bf16 that round trip moves frozen base weights by up to an ulp on every push. The trainer's
model is left bit-for-bit unchanged. The merge of a layer runs only when a consumer reaches it
(`rollout.weight_sync.LazyWeights`): an engine holds about one merged weight (or bucket) at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from rollout.types import WeightSyncError
from rollout.weight_sync import LazyWeights, TensorMeta


def policy_weights(model: nn.Module) -> LazyWeights:
    """(name, tensor) of every parameter to push, merged and renamed for peft models.

    Returns a `LazyWeights`: iterable like a list of pairs, with names, shapes and dtypes known
    before any merge is computed, so an engine validates the push first and then merges one
    weight at a time while it streams (no second copy of the model)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return LazyWeights(
            [(TensorMeta(name, tuple(p.shape), p.dtype), _detached(p)) for name, p in model.named_parameters()]
        )
    return LazyWeights(list(_merged_peft_weights(model.get_base_model())))


def _detached(p: Tensor) -> Callable[[], Tensor]:
    return lambda: p.detach()


def _merged_peft_weights(base: nn.Module) -> Iterator[tuple[TensorMeta, Callable[[], Tensor]]]:
    from peft.tuners.lora import LoraLayer
    from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    done_prefixes: list[str] = []
    seen: set[int] = set()

    def plain(name: str, p: Tensor) -> tuple[TensorMeta, Callable[[], Tensor]]:
        return TensorMeta(name, tuple(p.shape), p.dtype), _detached(p)

    for mod_name, module in base.named_modules():
        if any(mod_name.startswith(p) for p in done_prefixes):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, LoraLayer):
            done_prefixes.append(prefix)
            yield from _merged_lora_layer(prefix, mod_name, module)
        elif isinstance(module, ModulesToSaveWrapper):
            done_prefixes.append(prefix)
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            source = (
                module.original_module if module.disable_adapters or not active else module.modules_to_save[active[0]]
            )
            for pname, p in source.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield plain(prefix + pname, p)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise WeightSyncError(
                f"{mod_name}: peft wrapper {type(module).__name__} is not supported for weight export"
            )
        else:
            for pname, p in module.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield plain(prefix + pname, p)


def _merged_lora_layer(
    prefix: str, mod_name: str, module: nn.Module
) -> Iterator[tuple[TensorMeta, Callable[[], Tensor]]]:
    """Entries of one LoRA layer's base parameters; the merge runs when an entry is called."""
    base_layer = module.get_base_layer()
    adapters = []
    if not module.disable_adapters:
        adapters = [a for a in module.active_adapters if a in module.scaling and a not in module.merged_adapters]
    for a in adapters:  # refused while listing, before anything is pushed
        if module.use_dora.get(a, False):
            raise WeightSyncError(f"{mod_name}: DoRA adapter {a!r} cannot be exported as merged weights")
    for pname, p in base_layer.named_parameters(recurse=False):
        meta = TensorMeta(prefix + pname, tuple(p.shape), p.dtype)
        if pname == "weight" and adapters:
            yield meta, _merge(p, lambda a: module.get_delta_weight(a), adapters)
        elif pname == "bias" and any(module.lora_bias.get(a, False) for a in adapters):
            biased = [a for a in adapters if module.lora_bias.get(a, False)]
            yield meta, _merge(p, lambda a: module.lora_B[a].bias * module.scaling[a], biased)
        else:
            yield meta, _detached(p)


def _merge(p: Tensor, delta: Callable[[str], Tensor], adapters: list[str]) -> Callable[[], Tensor]:
    @torch.no_grad()
    def make() -> Tensor:
        value = p.detach().clone()
        for a in adapters:
            value += delta(a).to(value.dtype)
        return value

    return make
