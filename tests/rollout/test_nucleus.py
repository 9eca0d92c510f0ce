"""Sort-free nucleus truncation (rollout.nucleus) against hand-worked cases and sorting references."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TopPLogitsWarper

from rollout.nucleus import TOP_P_KEY, top_p_mask_

NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits)


def mass_before(logits: torch.Tensor) -> torch.Tensor:
    """Float64 reference: per token, the probability of the tokens ranked above it (sorting)."""
    values, order = logits.double().sort(dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    return torch.empty_like(probs).scatter_(1, order, probs.cumsum(-1) - probs)


def assert_nucleus(out: torch.Tensor, logits: torch.Tensor, p: float, tol: float = 1e-5) -> None:
    """Kept exactly the tokens whose preceding mass is below p (up to float32 rounding within tol)."""
    before = mass_before(logits)
    assert kept(out)[before < p - tol].all()
    assert not kept(out)[before > p + tol].any()
    torch.testing.assert_close(out[kept(out)], logits[kept(out)], rtol=0, atol=0)


def test_hand_worked_rows():
    # Probabilities 0.5, 0.3, 0.15, 0.05: the mass before each token is 0, 0.5, 0.8, 0.95.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4, 1)
    top_p = torch.tensor([0.4, 0.7, 0.85, 1.0])
    out = top_p_mask_(logits.clone(), top_p, first_k=1, small_vocab=0)  # rows 1, 2 need more than k=1
    # p=0.4: only the first (0 < 0.4); p=0.7: first two (0.5 < 0.7 <= 0.8); p=0.85: three; p=1: all.
    assert kept(out).tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
    torch.testing.assert_close(out[kept(out)], logits[kept(out)], rtol=0, atol=0)


def test_token_order_does_not_matter_and_ties_at_the_boundary_are_all_kept():
    # Mass before each token in decreasing order: 0, 0.4, 0.7; the last two tie at 0.3. At p=0.5
    # a sort keeps one of the tied tokens; the threshold keeps both.
    logits = torch.tensor([[math.log(0.3), math.log(0.4), math.log(0.3)]])
    out = top_p_mask_(logits.clone(), torch.tensor([0.5]))
    assert kept(out).tolist() == [[True, True, True]]
    out = top_p_mask_(logits.clone(), torch.tensor([0.3]))
    assert kept(out).tolist() == [[False, True, False]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])  # flat (grows k to the full vocabulary) to peaked
@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_matches_a_float64_sort(seed, scale, p):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(32, 3000, generator=gen) * scale
    logits[:4, 100:] = NEG_INF  # rows already restricted by an earlier processor
    out = top_p_mask_(logits.clone(), torch.full((32,), p), first_k=4, small_vocab=0)
    assert_nucleus(out, logits, p)


def test_agrees_with_transformers_top_p_warper():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 5000, generator=gen) * 2.5
    logits[:, :10] += 6  # a few likely tokens, as after a trained model
    expected = kept(TopPLogitsWarper(0.9)(None, logits.clone()))
    out = top_p_mask_(logits.clone(), torch.full((64,), 0.9), small_vocab=0)
    # Both round in float32 (in different orders); rows may differ only by tokens at the boundary.
    before = mass_before(logits)
    clear = ((before - 0.9).abs() > 1e-5).all(dim=-1)
    assert clear.sum() >= 60
    assert torch.equal(kept(out)[clear], expected[clear])


def test_only_rows_below_one_change():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 200, generator=gen)
    top_p = torch.tensor([1.0, 0.5, 1.0, 0.2, 1.0])
    out = top_p_mask_(logits.clone(), top_p, first_k=8, small_vocab=0)
    for row in (0, 2, 4):
        assert torch.equal(out[row], logits[row])
    for row in (1, 3):
        assert_nucleus(out[row : row + 1], logits[row : row + 1], float(top_p[row]))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        top_p_mask_(torch.zeros(3, 10), torch.ones(2))


def _processor():
    pytest.importorskip("vllm")
    from rollout.nucleus import make_vllm_processor

    return make_vllm_processor()


def _update(added=(), removed=(), moved=(), size=4):
    from vllm.v1.sample.logits_processor import BatchUpdate

    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def _params(top_p=None):
    from vllm import SamplingParams

    return SamplingParams(extra_args=None if top_p is None else {TOP_P_KEY: top_p})


def test_processor_follows_the_persistent_batch():
    from vllm.v1.sample.logits_processor import MoveDirectionality

    proc = _processor()(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant()
    proc.update_state(_update(added=[(0, _params(0.5), [1], []), (1, _params(), [1], []), (2, _params(0.2), [1], [])]))
    assert proc.top_p == {0: 0.5, 2: 0.2}
    proc.update_state(None)  # no change in the batch
    assert proc.top_p == {0: 0.5, 2: 0.2}
    proc.update_state(_update(moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert proc.top_p == {1: 0.5, 2: 0.2}
    proc.update_state(_update(moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.top_p == {0: 0.2, 1: 0.5}
    proc.update_state(_update(removed=[1], added=[(3, _params(1.0), [1], [])]))
    assert proc.top_p == {0: 0.2}

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen)
    out = proc.apply(logits.clone())
    assert_nucleus(out[:1], logits[:1], 0.2)
    assert torch.equal(out[1:], logits[1:])


def test_processor_refuses_a_bad_top_p():
    proc = _processor()
    proc.validate_params(_params(0.9))
    with pytest.raises(ValueError, match=TOP_P_KEY):
        proc.validate_params(_params(1.5))
