"""Policy weights for a push, under the base model's names, for plain and peft (LoRA) policies.

For a LoRA-adapted policy the generator needs merged weights `W + scaling * B @ A` under the base
model's names (`model.layers.0.self_attn.q_proj.weight`, not
`base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`), and no `lora_A`/`lora_B`
tensors. The merge is computed into new tensors with peft's own `get_delta_weight`, instead of
peft's in-place `merge_adapter()` / `unmerge_adapter()`: `W + d - d` does not round back to `W`,
and in bf16 that round trip moves frozen base weights by up to an ulp on every push. The trainer's
model is left bit-for-bit unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rollout.types import WeightSyncError


def policy_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of every parameter to push, merged and renamed for peft models."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        for name, p in model.named_parameters():
            yield name, p.detach()
        return
    yield from _merged_peft_weights(model.get_base_model())


def _merged_peft_weights(base: nn.Module) -> Iterator[tuple[str, Tensor]]:
    from peft.tuners.lora import LoraLayer
    from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    done_prefixes: list[str] = []
    seen: set[int] = set()
    for mod_name, module in base.named_modules():
        if any(mod_name.startswith(p) for p in done_prefixes):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, LoraLayer):
            done_prefixes.append(prefix)
            for pname, value in _merged_lora_layer(mod_name, module):
                yield prefix + pname, value
        elif isinstance(module, ModulesToSaveWrapper):
            done_prefixes.append(prefix)
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            source = (
                module.original_module if module.disable_adapters or not active else module.modules_to_save[active[0]]
            )
            for pname, p in source.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + pname, p.detach()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise WeightSyncError(
                f"{mod_name}: peft wrapper {type(module).__name__} is not supported for weight export"
            )
        else:
            for pname, p in module.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + pname, p.detach()


@torch.no_grad()
def _merged_lora_layer(mod_name: str, module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    base_layer = module.get_base_layer()
    adapters = []
    if not module.disable_adapters:
        adapters = [a for a in module.active_adapters if a in module.scaling and a not in module.merged_adapters]
    for a in adapters:
        if module.use_dora.get(a, False):
            raise WeightSyncError(f"{mod_name}: DoRA adapter {a!r} cannot be exported as merged weights")
    for pname, p in base_layer.named_parameters(recurse=False):
        value = p.detach()
        if pname == "weight" and adapters:
            value = value.clone()
            for a in adapters:
                value += module.get_delta_weight(a).to(value.dtype)
        elif pname == "bias":
            biased = [a for a in adapters if module.lora_bias.get(a, False)]
            if biased:
                value = value.clone()
                for a in biased:
                    value += (module.lora_B[a].bias * module.scaling[a]).to(value.dtype)
        yield pname, value
