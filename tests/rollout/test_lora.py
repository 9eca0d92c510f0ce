"""Merged LoRA weights under base names (rollout.lora), pushed into the transformers engine."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rollout.chat import render_prompt
from rollout.hf_engine import HFEngine
from rollout.lora import policy_weights
from rollout.types import SamplingParams, WeightSyncError
from tests.rollout.conftest import PROMPTS, forward_logprobs, load_model, load_tokenizer, train_step


def lora_policy(tiny_dir, **config):
    """A LoRA policy after one optimizer step on its adapter (lora_B starts at zero, so it moves now)."""
    model = get_peft_model(
        load_model(tiny_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **config)
    )
    train_step(model, load_tokenizer(tiny_dir), lr=5e-2, params=[p for p in model.parameters() if p.requires_grad])
    return model


@pytest.fixture(scope="module")
def peft_model(tiny_dir):
    return lora_policy(tiny_dir)


def test_export_merges_under_base_names_and_leaves_the_policy_unchanged(peft_model, tiny_dir):
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    exported = dict(policy_weights(peft_model))
    assert set(exported) == {n for n, _ in load_model(tiny_dir).named_parameters()}  # base names, no lora_A/B
    # By hand for one targeted layer: W + (alpha / r) * B @ A, with alpha / r = 8 / 4 = 2.
    q = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    by_hand = q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(exported["model.layers.1.self_attn.q_proj.weight"], by_hand, atol=1e-7, rtol=0)
    assert not torch.equal(exported["model.layers.1.self_attn.q_proj.weight"], q.base_layer.weight)
    # Independent reference: peft's own merge on a copy.
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name, p in merged.named_parameters():
        torch.testing.assert_close(exported[name], p, atol=1e-6, rtol=0)
    assert all(torch.equal(before[n], p) for n, p in peft_model.named_parameters())  # nothing merged in place


def test_plain_model_exports_its_parameters(tiny_dir):
    model = load_model(tiny_dir)
    assert [(n, t.data_ptr()) for n, t in policy_weights(model)] == [
        (n, p.data_ptr()) for n, p in model.named_parameters()
    ]


def test_lora_push_into_the_engine_is_exact(peft_model, tiny_dir):
    engine = HFEngine(tiny_dir)
    prompt = render_prompt(engine.tokenizer, PROMPTS[0])
    params = SamplingParams(n=2, max_tokens=10, seed=1)
    before, _ = engine.generate([PROMPTS[0]], params)[0]
    assert (forward_logprobs(peft_model, prompt, before.token_ids) - torch.tensor(before.logprobs)).abs().max() > 1e-3
    engine.update_weights(policy_weights(peft_model))
    for c in engine.generate([PROMPTS[0]], params)[0]:
        ref = forward_logprobs(peft_model, prompt, c.token_ids)  # the adapted policy itself
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)


def test_dora_is_refused(tiny_dir):
    model = get_peft_model(load_model(tiny_dir), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(WeightSyncError, match="DoRA"):
        list(policy_weights(model))


class _MergeCounter:
    """Wraps `rollout.lora._merge` so the test sees every merged tensor made and which still live."""

    def __init__(self, monkeypatch):
        import weakref

        import rollout.lora as lora

        self.made = 0
        self.alive_at_make: list[int] = []  # merged tensors still alive each time a new one is made
        self._refs: list = []
        original = lora._merge

        def counting_merge(p, delta, adapters):
            make = original(p, delta, adapters)

            def counted():
                self.alive_at_make.append(sum(r() is not None for r in self._refs))
                t = make()
                self.made += 1
                self._refs.append(weakref.ref(t))
                return t

            return counted

        monkeypatch.setattr(lora, "_merge", counting_merge)


def test_metadata_comes_before_any_merge(peft_model, monkeypatch):
    counter = _MergeCounter(monkeypatch)
    lazy = policy_weights(peft_model)
    metas = lazy.metas()
    assert counter.made == 0  # names, shapes and dtypes without a single merge
    from rollout.weight_sync import tensor_metas

    assert metas == tensor_metas(list(lazy))
    # 2 layers x 3 targeted modules (q_proj, v_proj, down_proj): 6 merged weights per pass.
    assert counter.made == 6


def test_lora_push_streams_one_merge_at_a_time_and_refuses_before_merging(peft_model, tiny_dir, monkeypatch):
    from rollout.weight_sync import WeightSpec

    engine = HFEngine(tiny_dir)
    counter = _MergeCounter(monkeypatch)
    engine.update_weights(policy_weights(peft_model))
    # Materialising the push first (list(...)) would leave 0, 1, ..., 5 merged tensors alive.
    assert counter.made == 6 and max(counter.alive_at_make) <= 1, counter.alive_at_make
    prompt = render_prompt(engine.tokenizer, PROMPTS[1])
    (c,) = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=6, seed=2))[0]
    ref = forward_logprobs(peft_model, prompt, c.token_ids)
    torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)
    # An engine that does not know one of the names refuses the push before merging anything.
    shapes = dict(engine.weight_spec.shapes)
    del shapes["model.layers.1.self_attn.q_proj.weight"]
    engine.weight_spec = WeightSpec(shapes, engine.weight_spec.aliases)
    with pytest.raises(WeightSyncError, match="unknown weight name 'model.layers.1.self_attn.q_proj.weight'"):
        engine.update_weights(policy_weights(peft_model))
    assert counter.made == 6
