"""Chunked log-probs equal full-logits log_softmax, for raw tensors and for a HF model."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.logprobs import (
    lm_head_params,
    pack_completions,
    policy_hidden_states,
    sequence_logprobs,
    token_logprobs,
)
from trainers.tiny import build_tiny_policy


def _naive(hidden, weight, ids, bias, temperature):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    logp = logprobs.gather(-1, ids[:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    N=st.integers(0, 30),
    H=st.integers(1, 16),
    V=st.integers(1, 60),
    chunk=st.integers(1, 40),
    temperature=st.sampled_from([0.3, 0.8, 1.0, 2.0]),
    with_bias=st.booleans(),
)
def test_token_logprobs_match_log_softmax(seed, N, H, V, chunk, temperature, with_bias):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g) if with_bias else None
    ids = torch.randint(0, V, (N,), generator=g)
    logp, entropy = token_logprobs(hidden, weight, ids, bias, temperature, chunk, with_entropy=True)
    ref_logp, ref_entropy = _naive(hidden, weight, ids, bias, temperature)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-4)
    no_entropy = token_logprobs(hidden, weight, ids, bias, temperature, chunk)
    assert no_entropy[1] is None
    assert torch.equal(no_entropy[0], logp)


def test_bf16_inputs_are_accumulated_in_fp32():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 64, generator=g).bfloat16()
    weight = (torch.randn(2000, 64, generator=g) / 8).bfloat16()
    ids = torch.randint(0, 2000, (50,), generator=g)
    logp, _ = token_logprobs(hidden, weight, ids, chunk_size=16)
    assert logp.dtype == torch.float32
    # The reference takes the same bf16-rounded values in float64: only fp32 round-off remains.
    ref, _ = _naive(hidden.float(), weight.float(), ids, None, 1.0)
    torch.testing.assert_close(logp.double(), ref, rtol=0, atol=1e-4)


def test_bad_inputs_raise_clear_errors():
    h, W, ids = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="token_ids must lie"):
        token_logprobs(h, W, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="weight must be"):
        token_logprobs(h, torch.randn(5, 3), ids)
    with pytest.raises(ValueError, match="bias must be"):
        token_logprobs(h, W, ids, bias=torch.randn(4))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, W, ids, temperature=-1.0)
    with pytest.raises(ValueError, match="completion_mask"):
        pack_completions(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_policy(seed=1)
    model.eval()
    return model, tokenizer


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 500, (3, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :4] = 0  # left padding of row 1
    ids[1, :4] = 0
    cm = torch.zeros_like(ids, dtype=torch.bool)
    cm[:, 7:] = True
    cm[2, 3:] = True
    return ids, attn, cm


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_sequence_logprobs_equal_full_model_logits(tiny, temperature):
    model, _ = tiny
    ids, attn, cm = _batch()
    logp, entropy = sequence_logprobs(model, ids, attn, cm, temperature, chunk_size=5, with_entropy=True)
    with torch.no_grad():
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
    full = torch.log_softmax(logits / temperature, dim=-1)
    expected = torch.zeros_like(logp)
    expected[:, 1:] = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected[~cm] = 0.0
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    exp_entropy = torch.zeros_like(logp)
    exp_entropy[:, 1:] = -(full[:, :-1].exp() * full[:, :-1]).sum(-1)
    exp_entropy[~cm] = 0.0
    torch.testing.assert_close(entropy, exp_entropy, rtol=1e-5, atol=1e-5)
    assert (logp[~cm] == 0).all() and (logp[cm] < 0).all()


def test_left_padded_row_scores_like_the_unpadded_sequence(tiny):
    model, _ = tiny
    ids, attn, cm = _batch()
    logp, _ = sequence_logprobs(model, ids, attn, cm)
    alone, _ = sequence_logprobs(model, ids[1:2, 4:], None, cm[1:2, 4:])
    torch.testing.assert_close(logp[1, 4:], alone[0], rtol=1e-5, atol=1e-5)


def test_hidden_states_and_head_of_the_tiny_model(tiny):
    model, _ = tiny
    ids, attn, _ = _batch()
    hidden = policy_hidden_states(model, ids, attn)
    weight, bias = lm_head_params(model)
    assert weight is model.model.embed_tokens.weight and bias is None
    with torch.no_grad():
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
    torch.testing.assert_close(hidden, out.hidden_states[-1])
    torch.testing.assert_close(hidden @ weight.t(), out.logits, rtol=1e-5, atol=1e-5)
