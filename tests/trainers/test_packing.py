"""Shared-prompt packing: same values and gradients as G separate sequences, and micro-batching.

References: the plain layout (one right-padded row per completion, the computation every trainer
does), itself checked against the model's own full logits one sequence at a time. The slow test at
the end launches two processes under FSDP2 on CPU (gloo) with this file as the worker.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen3ForCausalLM

from trainers.fused_loss import fused_policy_loss
from trainers.logprobs import lm_head_params
from trainers.losses import PolicyLossConfig
from trainers.packing import (
    SHARED_PROMPT_ATTENTION,
    Layout,
    MicroBatch,
    PromptGroup,
    RowLayout,
    completion_hidden_states,
    completion_logprobs,
    enable_shared_prompt_attention,
    pack_groups,
    shared_prompt_mask,
    split_by_token_budget,
)
from trainers.tiny import tiny_qwen3_config

from tests.trainers.launch import launch_two_processes

VOCAB = 512
LAUNCH_TIMEOUT_S = 300

# In fp32 the two layouts add the same terms in different orders: the G completions' gradients
# reach a prompt token summed (packed) or one copy each (plain), and the model's RMSNorms round
# to float32 inside (even in a float64 model, seen here as ~1e-7 relative). Differences measured
# were <= ~3e-6 relative to each tensor's largest entry; the tolerance is a few times that.
RTOL, ATOL_REL = 2e-5, 2e-5
ATTENTIONS = ["sdpa", "eager", SHARED_PROMPT_ATTENTION]


def make_model(attention: str = "sdpa", seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    base = "eager" if attention == "eager" else "sdpa"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(VOCAB, attn_implementation=base, **overrides))
    if attention == SHARED_PROMPT_ATTENTION:
        enable_shared_prompt_attention(model)
    return model


def random_groups(seed: int, spec: list[tuple[int, list[int]]]) -> list[PromptGroup]:
    """Groups of random tokens: spec = [(prompt length, [completion lengths])]."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [PromptGroup(tokens(p), [tokens(n) for n in lens]) for p, lens in spec]


# Different prompt lengths, different answer lengths, an empty completion, a 1-token completion,
# a group with G = 1.
MIXED = [(13, [5, 1, 0, 9]), (6, [4]), (21, [7, 3, 7])]


def separate_sequence_logprobs(model, groups, temperature=1.0) -> torch.Tensor:
    """Independent reference: full logits of each `prompt + completion` alone, no padding."""
    out = []
    for group in groups:
        p = len(group.prompt_ids)
        for comp in group.completions:
            if not comp:
                continue
            logits = model(input_ids=torch.tensor([group.prompt_ids + comp])).logits[0]
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            out.append(logp[p - 1 : p - 1 + len(comp)].gather(1, torch.tensor(comp)[:, None]).squeeze(1))
    return torch.cat(out)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL_REL * max(scale, 1e-6), msg=msg)


# ---------------------------------------------------------------------------------------------
# Layout and mask, by hand
# ---------------------------------------------------------------------------------------------


def test_pack_groups_layout_worked_by_hand():
    groups = [
        PromptGroup([11, 12, 13], [[21, 22], [31], [], [41, 42, 43]]),
        PromptGroup([51], [[61, 62]]),
    ]
    rows = pack_groups(groups)
    # Row 0: prompt, then each completion but its last token: [21], [], [], [41, 42]. Row 1:
    # [51, 61], right-padded to 6 with pad id 0, position 0, segment -1.
    assert rows.input_ids.tolist() == [[11, 12, 13, 21, 41, 42], [51, 61, 0, 0, 0, 0]]
    # Each completion restarts at the prompt length (3 in row 0, 1 in row 1).
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 0, 0, 0, 0]]
    assert rows.segments.tolist() == [[0, 0, 0, 1, 4, 4], [0, 1, -1, -1, -1, -1]]
    # Token 0 of every completion is predicted by the prompt's last position (col 2 in row 0);
    # 22 by 21 (col 3); 42 by 41 (col 4), 43 by 42 (col 5); in row 1, 61 by 51, 62 by 61.
    pairs = list(zip(rows.predictor_row.tolist(), rows.predictor_col.tolist()))
    assert pairs == [(0, 2), (0, 3), (0, 2), (0, 2), (0, 4), (0, 5), (1, 0), (1, 1)]
    assert rows.layouts == (RowLayout(3, ((3, 1), (4, 0), (4, 0), (4, 2))), RowLayout(1, ((1, 1),)))
    assert [g.packed_length for g in groups] == [6, 2]
    assert groups[0].plain_lengths == [5, 4, 3, 6]


def test_shared_prompt_mask_worked_by_hand():
    segments = torch.tensor([[0, 0, 0, 1, 4, 4], [0, 1, -1, -1, -1, -1]])
    mask = shared_prompt_mask(segments)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    # Row 0: the prompt (0-2) causally; 21 (pos 3) sees the prompt and itself; 41 sees the prompt
    # and itself but not 21; 42 sees the prompt, 41 and itself.
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 1, 0],
        [1, 1, 1, 0, 1, 1],
    ]
    # Row 1: pads see the prompt and earlier pads (never an empty row); nothing real sees a pad.
    assert mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 0, 1, 1, 1, 1],
    ]


# ---------------------------------------------------------------------------------------------
# Values and gradients against separate sequences
# ---------------------------------------------------------------------------------------------


def test_plain_layout_matches_each_sequence_alone():
    model = make_model()
    groups = random_groups(0, MIXED)
    with torch.no_grad():
        reference = separate_sequence_logprobs(model, groups, temperature=0.8)
    logp, _ = completion_logprobs(model, groups, temperature=0.8, layout="plain")
    torch.testing.assert_close(logp, reference, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, groups, layout, old_logp, advantages):
    model.zero_grad(set_to_none=True)
    states = completion_hidden_states(model, groups, layout=layout)
    weight, bias = lm_head_params(model)
    n = states.hidden.shape[0]
    loss, metrics = fused_policy_loss(
        states.hidden, weight, states.token_ids, old_logp, advantages[states.seq_index],
        torch.ones(n), torch.ones(n, dtype=torch.bool), states.seq_index, states.num_seqs,
        PolicyLossConfig(), head_bias=bias, temperature=0.8,
    )  # fmt: skip
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return states, loss.detach(), metrics, grads


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_packed_equals_separate_sequences_values_and_gradients(attention):
    model = make_model(attention)
    groups = random_groups(1, MIXED)
    num_seqs = sum(len(g.completions) for g in groups)
    advantages = torch.linspace(-1.5, 1.5, num_seqs)
    with torch.no_grad():
        reference = separate_sequence_logprobs(model, groups, temperature=0.8)
    # Old log-probs of the sampling policy = the current ones: ratio 1, as on the first update.
    old, _ = completion_logprobs(model, groups, temperature=0.8, layout="packed")
    torch.testing.assert_close(old, reference, rtol=1e-5, atol=1e-5)

    packed = _loss_and_grads(model, groups, "packed", old, advantages)
    plain = _loss_and_grads(model, groups, "plain", old, advantages)
    states_p, states_q = packed[0], plain[0]
    # Completion tokens 5+1+0+9 + 4 + 7+3+7 = 36 in 4 + 1 + 3 = 8 sequences.
    assert states_p.hidden.shape == (36, 128) and states_p.num_seqs == 8
    for name in ("token_ids", "seq_index", "group_index", "completion_index"):
        assert torch.equal(getattr(states_p, name), getattr(states_q, name)), name
    # Tokens 0-4 are sequence 0, 5 sequence 1, none sequence 2, 6-14 sequence 3 (the last of group
    # 0), 15-18 sequence 4 (group 1's only one), 19-25 sequence 5.
    assert states_p.seq_index.tolist()[14:20] == [3, 4, 4, 4, 4, 5]
    assert states_p.group_index.tolist()[14:20] == [0, 1, 1, 1, 1, 2]
    assert states_p.completion_index.tolist()[14:20] == [3, 0, 0, 0, 0, 0]
    assert_close_rel(states_p.hidden.detach(), states_q.hidden.detach(), "hidden")
    assert packed[2]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(packed[1], plain[1], rtol=1e-5, atol=1e-6)
    assert plain[1].abs() > 1e-3  # a loss with a real gradient, not a trivially zero one
    for name, expected in plain[3].items():
        assert expected.abs().max() > 0, name
        assert_close_rel(packed[3][name], expected, name)


@pytest.mark.parametrize("attention", ["sdpa", SHARED_PROMPT_ATTENTION])
def test_llama_packed_equals_plain(attention):
    """Llama (SmolLM2's architecture, the CPU default policy) takes the same 4-D mask and kwargs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=VOCAB, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    if attention == SHARED_PROMPT_ATTENTION:
        enable_shared_prompt_attention(model)
    groups = random_groups(5, MIXED)
    advantages = torch.linspace(-1.0, 1.0, 8)
    with torch.no_grad():
        reference = separate_sequence_logprobs(model, groups, temperature=0.8)
    old, _ = completion_logprobs(model, groups, temperature=0.8)
    torch.testing.assert_close(old, reference, rtol=1e-5, atol=1e-5)
    packed = _loss_and_grads(model, groups, "packed", old, advantages)
    plain = _loss_and_grads(model, groups, "plain", old, advantages)
    torch.testing.assert_close(packed[1], plain[1], rtol=1e-5, atol=1e-6)
    for name, expected in plain[3].items():
        assert_close_rel(packed[3][name], expected, name)


@pytest.fixture(scope="module")
def shared_model() -> Qwen3ForCausalLM:
    return make_model(SHARED_PROMPT_ATTENTION)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 1000),
    spec=st.lists(
        st.tuples(st.integers(1, 9), st.lists(st.integers(0, 6), min_size=1, max_size=4)), min_size=1, max_size=3
    ),
)
def test_packed_hidden_states_equal_plain_for_any_groups(shared_model, seed, spec):
    model = shared_model
    groups = random_groups(seed, spec)
    with torch.no_grad():
        packed = completion_hidden_states(model, groups, layout="packed")
        masked = _mask_only(model, groups)
        plain = completion_hidden_states(model, groups, layout="plain")
    n = sum(len(c) for g in groups for c in g.completions)
    assert packed.hidden.shape == (n, 128)
    tokens = [t for g in groups for c in g.completions for t in c]
    assert torch.equal(packed.token_ids, torch.tensor(tokens, dtype=torch.long))
    torch.testing.assert_close(packed.hidden, plain.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, plain.hidden, rtol=1e-5, atol=1e-5)


def _mask_only(model, groups) -> torch.Tensor:
    """The same model's packed hidden states through plain sdpa and the dense 4-D mask."""
    model.set_attn_implementation("sdpa")
    try:
        return completion_hidden_states(model, groups, layout="packed").hidden
    finally:
        model.set_attn_implementation(SHARED_PROMPT_ATTENTION)


def test_gradient_checkpointing_gives_the_same_gradients():
    groups = random_groups(2, MIXED)
    advantages = torch.linspace(1.0, -1.0, 8)
    reference_model = make_model("sdpa")
    old, _ = completion_logprobs(reference_model, groups, temperature=0.8, layout="plain")
    reference = _loss_and_grads(reference_model, groups, "plain", old, advantages)
    for attention in ("sdpa", SHARED_PROMPT_ATTENTION):
        model = make_model(attention)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing acts in training mode only (dropout is 0 in this config)
        assert model.model.layers[0].gradient_checkpointing
        packed = _loss_and_grads(model, groups, "packed", old, advantages)
        torch.testing.assert_close(packed[1], reference[1], rtol=1e-5, atol=1e-6)
        for name, expected in reference[3].items():
            assert_close_rel(packed[3][name], expected, f"{attention} {name}")


def test_groups_without_completion_tokens_still_run_forward_and_backward():
    model = make_model(SHARED_PROMPT_ATTENTION)
    groups = [PromptGroup([5, 6, 7], [[], []]), PromptGroup([8], [[]])]
    states = completion_hidden_states(model, groups)
    assert states.hidden.shape == (0, 128) and states.num_seqs == 3
    assert states.hidden.requires_grad  # attached to the model: FSDP ranks stay in step
    weight, _ = lm_head_params(model)
    loss, _ = fused_policy_loss(
        states.hidden, weight, states.token_ids, torch.zeros(0), torch.zeros(0), torch.zeros(0),
        torch.zeros(0, dtype=torch.bool), states.seq_index, states.num_seqs, PolicyLossConfig(),
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_enabled_attention_is_plain_sdpa_for_ordinary_calls():
    sdpa_model, shared_model = make_model("sdpa"), make_model(SHARED_PROMPT_ATTENTION)
    assert shared_model.config._attn_implementation == SHARED_PROMPT_ATTENTION
    ids = torch.tensor([[0, 0, 17, 18, 19, 20], [21, 22, 23, 24, 25, 26]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding
    with torch.no_grad():
        expected = sdpa_model(input_ids=ids, attention_mask=mask).logits
        actual = shared_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(actual[mask.bool()], expected[mask.bool()])
    assert "attn_implementation" not in shared_model.config.to_dict()  # never saved with the model
    enable_shared_prompt_attention(shared_model)  # idempotent
    assert shared_model.config._attn_implementation == SHARED_PROMPT_ATTENTION


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_prompt_group_rejects_bad_input_and_normalises_ids():
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        PromptGroup([], [[1]])
    with pytest.raises(ValueError, match="completions is empty"):
        PromptGroup([1], [])
    with pytest.raises(ValueError, match=r"completions\[1\] holds negative"):
        PromptGroup([1], [[2], [3, -4]])
    with pytest.raises(TypeError, match="prompt_ids must hold int"):
        PromptGroup([1.5], [[2]])
    group = PromptGroup((1, torch.tensor(2)), [(3,)])
    assert group.prompt_ids == [1, 2] and group.completions == [[3]]


def test_unsupported_models_and_arguments_are_refused():
    groups = random_groups(3, [(4, [2, 2])])
    model = make_model("sdpa")
    with pytest.raises(ValueError, match="'bogus' is not a valid Layout"):
        completion_hidden_states(model, groups, layout="bogus")
    with pytest.raises(ValueError, match="at least one group"):
        completion_hidden_states(model, [])
    with pytest.raises(TypeError, match=r"groups\[0\] must be a PromptGroup"):
        completion_hidden_states(model, [([1], [[2]])])
    model.config._attn_implementation = "flash_attention_2"  # ignores a 4-D mask: refused
    with pytest.raises(ValueError, match="the model uses 'flash_attention_2'"):
        completion_hidden_states(model, groups)
    sliding = make_model("sdpa", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding-window"):
        completion_hidden_states(sliding, groups)
    completion_hidden_states(sliding, groups, layout=Layout.PLAIN)  # the plain layout is fine
    with pytest.raises(ValueError, match="builds on 'sdpa'"):
        enable_shared_prompt_attention(make_model("eager"))


# ---------------------------------------------------------------------------------------------
# Micro-batches by token budget
# ---------------------------------------------------------------------------------------------


def _groups_of_lengths(spec):
    return [PromptGroup([1] * p, [[2] * n for n in lens]) for p, lens in spec]


# Packed lengths: A = 10 + 4 + 4 = 18, B = 4 + 2 = 6, C = 20 + 1 + 1 + 1 = 23.
ABC = [(10, [5, 5]), (4, [3]), (20, [2, 2, 2])]


def _summary(batches: list[MicroBatch]):
    return [(len(b.groups), b.sample_ids, b.cost, b.over_budget) for b in batches]


def test_split_by_token_budget_worked_by_hand():
    groups = _groups_of_lengths(ABC)
    # Budget 30: A (18); A + B would be 2 rows x 18 = 36 > 30, so B starts a new batch (6);
    # B + C = 2 x 23 = 46 > 30, so C alone (23).
    assert _summary(split_by_token_budget(groups, 30)) == [
        (1, (0, 1), 18, False), (1, (2,), 6, False), (1, (3, 4, 5), 23, False),
    ]  # fmt: skip
    # Budget 40: A + B = 36 fits; + C = 3 x 23 = 69 does not.
    assert _summary(split_by_token_budget(groups, 40)) == [(2, (0, 1, 2), 36, False), (1, (3, 4, 5), 23, False)]
    # Budget 22: C (23) alone exceeds it, so it is cut: C's first two completions 20 + 1 + 1 = 22,
    # the third 20 + 1 = 21, each part with its own prompt. A and B are not split.
    batches = split_by_token_budget(groups, 22)
    assert _summary(batches) == [
        (1, (0, 1), 18, False), (1, (2,), 6, False), (1, (3, 4), 22, False), (1, (5,), 21, False),
    ]  # fmt: skip
    assert batches[2].groups[0] == PromptGroup([1] * 20, [[2, 2], [2, 2]])
    # Budget 20: even C's prompt + one completion (21) is over: each completion alone, flagged.
    assert _summary(split_by_token_budget(groups, 20))[2:] == [
        (1, (3,), 21, True), (1, (4,), 21, True), (1, (5,), 21, True),
    ]  # fmt: skip
    # Plain rows: A is 2 rows of 15 = 30; B is 1 row of 7; together 3 x 15 = 45 > 40.
    assert _summary(split_by_token_budget(groups, 40, layout="plain"))[:2] == [
        (1, (0, 1), 30, False), (1, (2,), 7, False),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        split_by_token_budget(groups, 0)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.lists(st.tuples(st.integers(1, 30), st.lists(st.integers(0, 12), min_size=1, max_size=6)), max_size=8),
    budget=st.integers(1, 120),
    layout=st.sampled_from(["packed", "plain"]),
)
def test_split_by_token_budget_properties(spec, budget, layout):
    groups = _groups_of_lengths(spec)
    batches = split_by_token_budget(groups, budget, layout=layout)
    flat = [(p, c) for p, lens in spec for c in lens]
    # Every completion exactly once, in order, with its own prompt.
    assert [i for b in batches for i in b.sample_ids] == list(range(len(flat)))
    for b in batches:
        got = [(len(g.prompt_ids), len(c)) for g in b.groups for c in g.completions]
        assert got == [flat[i] for i in b.sample_ids]
        rows = len(b.groups) if layout == "packed" else sum(len(g.completions) for g in b.groups)
        width = max(g.packed_length if layout == "packed" else max(g.plain_lengths) for g in b.groups)
        assert b.cost == rows * width
        assert b.cost <= budget or (b.over_budget and len(b.sample_ids) == 1)
        assert b.over_budget == (b.cost > budget)
    # A group is cut only when it alone exceeds the budget.
    starts = {b.sample_ids[0] for b in batches}
    first = 0
    for group in groups:
        inside = set(range(first + 1, first + len(group.completions)))
        rows = 1 if layout == "packed" else len(group.completions)
        width = group.packed_length if layout == "packed" else max(group.plain_lengths)
        if rows * width <= budget:
            assert not (starts & inside)
        first += len(group.completions)


# ---------------------------------------------------------------------------------------------
# Two processes under FSDP2 (gloo), activation checkpointing on
# ---------------------------------------------------------------------------------------------

FSDP_SPEC = [(13, [5, 1, 0, 9]), (6, [4]), (21, [7, 3, 7]), (9, [2, 6])]


def _rank_groups(rank: int, world: int) -> list[PromptGroup]:
    return random_groups(4, FSDP_SPEC)[rank::world]


def _fsdp_loss(model, groups, layout):
    states = completion_hidden_states(model, groups, layout=layout)
    weight, bias = lm_head_params(model)
    n = states.hidden.shape[0]
    advantages = torch.linspace(0.5, 1.5, states.num_seqs)[states.seq_index]
    # Old log-probs 0: rho = exp(logp) ~ 1/512, and with A > 0 min(rho A, clip(rho) A) takes the
    # unclipped rho A, so every token has a gradient.
    loss, _ = fused_policy_loss(
        states.hidden, weight, states.token_ids, torch.zeros(n), advantages, torch.ones(n),
        torch.ones(n, dtype=torch.bool), states.seq_index, states.num_seqs, PolicyLossConfig(), head_bias=bias,
    )  # fmt: skip
    return loss


def _worker_main(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from trainers.config import DistributedConfig
    from trainers.distributed import exit_launched_process, make_accelerator, shutdown

    try:
        accelerator = make_accelerator(DistributedConfig(fsdp=True, precision="no"), activation_checkpointing=True)
        if not accelerator.is_fsdp2:
            raise RuntimeError("the accelerator did not switch to FSDP2")
        rank, world = dist.get_rank(), dist.get_world_size()
        model = make_model(SHARED_PROMPT_ATTENTION)
        # Accelerate's FSDP2 prepare wants the optimizer along; it is never stepped here.
        model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
        model.train()
        groups = _rank_groups(rank, world)
        result = {}
        for layout in ("packed", "plain"):
            model.zero_grad(set_to_none=True)
            loss = _fsdp_loss(model, groups, layout)
            accelerator.backward(loss)
            # FSDP's activation checkpointing wraps each layer: drop the wrapper from the names.
            grads = {
                name.replace("_checkpoint_wrapped_module.", ""): (
                    p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                ).detach().clone()
                for name, p in model.named_parameters()
            }
            result[layout] = {"loss": loss.item(), "grads": grads}
        layer = model.model.layers[0]
        sharded = isinstance(layer.mlp.up_proj.weight, DTensor) and "CheckpointWrapper" in type(layer).__name__
        losses = [None] * world
        dist.all_gather_object(losses, {k: v["loss"] for k, v in result.items()})
        if rank == 0:
            torch.save({k: v["grads"] for k, v in result.items()}, out / "grads.pt")
            (out / "run.json").write_text(json.dumps({"losses": losses, "sharded": sharded, "world": world}))
    except BaseException:
        shutdown(failed=True)
        raise
    exit_launched_process(0)


@pytest.mark.slow
def test_packed_gradients_equal_plain_under_two_process_fsdp2(tmp_path):
    launch_two_processes(__file__, [tmp_path], timeout_s=LAUNCH_TIMEOUT_S, what="FSDP run")
    run = json.loads((tmp_path / "run.json").read_text())
    grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert run["sharded"] and run["world"] == 2  # sharded, and the layers checkpointed

    # Single-process reference: each rank's groups alone, plain layout, no checkpointing. FSDP2
    # averages the ranks' gradients (reduce-scatter divided by the world size).
    expected_grads: dict[str, torch.Tensor] = {}
    expected_losses = []
    for rank in range(2):
        model = make_model("sdpa")
        loss = _fsdp_loss(model, _rank_groups(rank, 2), "plain")
        loss.backward()
        expected_losses.append(loss.item())
        for name, p in model.named_parameters():
            expected_grads[name] = expected_grads.get(name, 0) + p.grad / 2
    for rank in range(2):
        for layout in ("packed", "plain"):
            assert run["losses"][rank][layout] == pytest.approx(expected_losses[rank], rel=1e-5, abs=1e-7)
    assert grads["packed"].keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        assert expected.abs().max() > 0, name
        assert_close_rel(grads["packed"][name], grads["plain"][name], f"packed vs plain {name}")
        assert_close_rel(grads["packed"][name], expected, f"packed vs single process {name}")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(Path(sys.argv[2]))
