"""Hand-computed values for the reference ADRPO policy loss (trainers.losses)."""

import math

import pytest
import torch

from trainers.losses import Aggregation, PolicyLossConfig, aggregation_scales, policy_loss

# One sequence of three tokens with log-ratios logp - old = [0.1, 0.3, -0.3]:
# rho = [e^0.1, e^0.3, e^-0.3] = [1.105171, 1.349859, 0.740818]; clip range [0.8, 1.2].
LOG_RATIOS = torch.tensor([[0.1, 0.3, -0.3]])
OLD = torch.tensor([[-2.0, -1.0, -0.5]])
RHO = [math.exp(0.1), math.exp(0.3), math.exp(-0.3)]


def _logp():
    return (OLD + LOG_RATIOS).clone().requires_grad_(True)


def _run(config, advantage, weight=1.0, mask=None):
    logp = _logp()
    mask = torch.ones(1, 3, dtype=torch.bool) if mask is None else mask
    loss, metrics = policy_loss(logp, OLD, torch.tensor([advantage]), torch.tensor([weight]), mask, config)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), metrics, grad[0]


def test_positive_advantage_clips_high_ratio_only():
    # A = 2:
    #  t0: rho 1.105171 < 1.2 -> min(2.210342, 2.210342) = 2.210342
    #  t1: rho 1.349859 > 1.2 -> min(2.699718, 1.2 * 2 = 2.4) = 2.4          (clipped high)
    #  t2: rho 0.740818 < 0.8 -> min(1.481636, 0.8 * 2 = 1.6) = 1.481636     (clip inactive for A > 0)
    # loss = -(2.210342 + 2.4 + 1.481636) / 3 = -2.030659
    loss, metrics, grad = _run(PolicyLossConfig(), 2.0)
    assert loss == pytest.approx(-2.030659, abs=1e-5)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 3)
    assert metrics["clip_frac_low"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx(sum(RHO) / 3, rel=1e-6)
    assert metrics["ratio_min"] == pytest.approx(RHO[2], rel=1e-6)
    assert metrics["ratio_max"] == pytest.approx(RHO[1], rel=1e-6)
    assert metrics["num_tokens"] == 3.0
    # d/dlogp of -rho*A/3 is -rho*A/3; the clipped token gets no gradient:
    # [-2.210342/3, 0, -1.481636/3] = [-0.736781, 0, -0.493879]
    torch.testing.assert_close(grad, torch.tensor([-0.736781, 0.0, -0.493879]), atol=1e-5, rtol=0)


def test_negative_advantage_clips_low_ratio_only():
    # A = -1:
    #  t0: min(-1.105171, -1.105171) -> loss 1.105171
    #  t1: min(-1.349859, -1.2) = -1.349859 -> 1.349859 (a high ratio is not clipped when A < 0)
    #  t2: min(-0.740818, -0.8) = -0.8 -> 0.8             (clipped low)
    # loss = (1.105171 + 1.349859 + 0.8) / 3 = 1.085010
    loss, metrics, grad = _run(PolicyLossConfig(), -1.0)
    assert loss == pytest.approx(1.085010, abs=1e-5)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 3)
    assert metrics["clip_frac_high"] == 0.0
    torch.testing.assert_close(grad, torch.tensor([1.105171 / 3, 1.349859 / 3, 0.0]), atol=1e-5, rtol=0)


def test_asymmetric_clip_range():
    # eps_high = 0.4: t1's rho 1.349859 < 1.4 is no longer clipped:
    # loss = -(2.210342 + 2.699718 + 1.481636) / 3 = -2.130565
    loss, metrics, _ = _run(PolicyLossConfig(eps_low=0.2, eps_high=0.4), 2.0)
    assert loss == pytest.approx(-2.130565, abs=1e-5)
    assert metrics["clip_frac_high"] == 0.0


def test_weight_scales_whole_policy_term():
    # w = 4 multiplies the min: 4 * -2.030659 = -8.122636, same clipped token.
    loss, metrics, grad = _run(PolicyLossConfig(), 2.0, weight=4.0)
    assert loss == pytest.approx(-8.122636, abs=1e-4)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 3)
    torch.testing.assert_close(grad, 4 * torch.tensor([-0.736781, 0.0, -0.493879]), atol=1e-5, rtol=0)


def test_dual_clip_bounds_negative_advantage_only():
    # c = 1.2 (so that rho = 1.349859 crosses it), A = -1; the bound is c * A = -1.2:
    #  t0: min(-1.105171, -1.105171) = -1.105171 > -1.2            -> loss 1.105171
    #  t1: min(-1.349859, -1.2)      = -1.349859 < -1.2: dual clip -> loss 1.2, no gradient
    #  t2: min(-0.740818, -0.8)      = -0.8 (clipped low)          -> loss 0.8, no gradient
    # loss = (1.105171 + 1.2 + 0.8) / 3 = 1.035057
    loss, metrics, grad = _run(PolicyLossConfig(dual_clip=1.2), -1.0)
    assert loss == pytest.approx(1.035057, abs=1e-5)
    assert metrics["clip_frac_dual"] == pytest.approx(1 / 3)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 3)
    torch.testing.assert_close(grad, torch.tensor([1.105171 / 3, 0.0, 0.0]), atol=1e-5, rtol=0)
    # A > 0: the dual clip never acts; same as test_positive_advantage_clips_high_ratio_only.
    loss, metrics, _ = _run(PolicyLossConfig(dual_clip=1.2), 2.0)
    assert loss == pytest.approx(-2.030659, abs=1e-5)
    assert metrics["clip_frac_dual"] == 0.0


def test_weight_scales_dual_clipped_term_too():
    # w = 4 multiplies the bounded surrogate: 4 * 1.035057 = 4.140228.
    loss, _, grad = _run(PolicyLossConfig(dual_clip=1.2), -1.0, weight=4.0)
    assert loss == pytest.approx(4.140228, abs=1e-4)
    torch.testing.assert_close(grad, torch.tensor([4 * 1.105171 / 3, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_kl_clamp_bounds_k3_and_stops_its_gradient():
    # A = 0, rho = 1: only beta * k3. ref - logp = [3, 0.5]:
    #  k3 = [e^3 - 3 - 1, e^0.5 - 0.5 - 1] = [16.085537, 0.148721]; clamped at 10 -> [10, 0.148721]
    # loss = 0.02 * (10 + 0.148721) / 2 = 0.10148721 (unclamped: 0.02 * 16.234258 / 2 = 0.16234258)
    # gradient: t0 clamped -> 0; t1: 0.02 / 2 * (1 - e^0.5) = -0.00648721
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[2.0, -0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    args = (logp, logp.detach(), torch.zeros(1), torch.ones(1), mask)
    loss, _ = policy_loss(*args, PolicyLossConfig(beta=0.02, kl_clamp=10.0), ref_logp=ref)
    assert loss.item() == pytest.approx(0.10148721, abs=1e-7)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.00648721]]), atol=1e-7, rtol=0)
    loss, _ = policy_loss(*args, PolicyLossConfig(beta=0.02), ref_logp=ref)
    assert loss.item() == pytest.approx(0.16234258, abs=1e-6)


def _aggregation_batch():
    # rho = 1 everywhere, so each token's loss is -w * A:
    #  seq0: w = 2, A = 1,    1 valid token  -> token losses [-2]
    #  seq1: w = 1, A = -0.5, 3 valid tokens -> token losses [0.5, 0.5, 0.5]
    #  seq2: a failed sample, fully masked (A = 100 must not leak in)
    logp = torch.full((3, 4), -1.0)
    mask = torch.tensor(
        [[True, False, False, False], [True, True, True, False], [False, False, False, False]]
    )
    return logp, logp.clone(), torch.tensor([1.0, -0.5, 100.0]), torch.tensor([2.0, 1.0, 1.0]), mask


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        # mean of per-sequence means over the 2 live sequences: (-2 + 0.5) / 2 = -0.75
        (Aggregation.SEQ_MEAN_TOKEN_MEAN, -0.75),
        # all 4 valid tokens: (-2 + 3 * 0.5) / 4 = -0.125
        (Aggregation.TOKEN_MEAN, -0.125),
        # sequence sums -2 and 1.5, each / norm_length 4, mean over 2 sequences: -0.5 / 8 = -0.0625
        (Aggregation.SEQ_SUM_NORM, -0.0625),
    ],
)
def test_aggregations(aggregation, expected):
    logp, old, adv, w, mask = _aggregation_batch()
    cfg = PolicyLossConfig(aggregation=aggregation, norm_length=4)
    loss, metrics = policy_loss(logp, old, adv, w, mask, cfg)
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert metrics["num_tokens"] == 4.0
    # Per-token advantages equal to the broadcast per-sequence ones give the same loss.
    loss_tok, _ = policy_loss(logp, old, adv[:, None].expand(3, 4), w, mask, cfg)
    assert loss_tok.item() == pytest.approx(expected, abs=1e-7)


def test_aggregation_scales_hand_values():
    # Tokens of sequences [0, 1, 1, 1] (all valid), 3 sequences of which one is empty.
    mask = torch.tensor([True, True, True, True])
    seq = torch.tensor([0, 1, 1, 1])
    # seq mean: 1 / (len * live sequences) = [1/2, 1/6, 1/6, 1/6]
    s = aggregation_scales(mask, seq, 3, PolicyLossConfig())
    torch.testing.assert_close(s, torch.tensor([1 / 2, 1 / 6, 1 / 6, 1 / 6]))
    s = aggregation_scales(mask, seq, 3, PolicyLossConfig(aggregation=Aggregation.TOKEN_MEAN))
    torch.testing.assert_close(s, torch.full((4,), 0.25))
    # sum norm: 1 / (live sequences * norm_length) = 1 / (2 * 10)
    cfg = PolicyLossConfig(aggregation=Aggregation.SEQ_SUM_NORM, norm_length=10)
    torch.testing.assert_close(aggregation_scales(mask, seq, 3, cfg), torch.full((4,), 0.05))


def test_kl_k3_hand_value_and_gradient():
    # rho = 1 and A = 0, so only beta * k3 remains; k3 = e^(ref - logp) - (ref - logp) - 1:
    #  t0: ref - logp = -0.5 -> 0.606531 + 0.5 - 1 = 0.106531
    #  t1: ref - logp = +0.5 -> 1.648721 - 0.5 - 1 = 0.148721
    # loss = 0.02 * (0.106531 + 0.148721) / 2 = 0.00255252
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = PolicyLossConfig(beta=0.02)
    loss, metrics = policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1), mask, cfg, ref_logp=ref)
    assert loss.item() == pytest.approx(0.00255252, abs=1e-8)
    assert metrics["kl_mean"] == pytest.approx(0.127626, abs=1e-6)
    # d k3 / d logp = 1 - e^(ref - logp): [0.393469, -0.648721], times beta / 2 = 0.01
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.00393469, -0.00648721]]), atol=1e-8, rtol=0)


def test_attribution_weight_never_scales_the_kl_term():
    # Same case as test_kl_k3_hand_value_and_gradient (A = 0, so only beta * k3 = 0.00255252
    # remains); a weight of 4 must leave both the loss and its gradient unchanged.
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = PolicyLossConfig(beta=0.02)
    loss, _ = policy_loss(logp, logp.detach(), torch.zeros(1), torch.full((1,), 4.0), mask, cfg, ref_logp=ref)
    assert loss.item() == pytest.approx(0.00255252, abs=1e-8)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.00393469, -0.00648721]]), atol=1e-8, rtol=0)


def test_kl_reported_but_not_added_when_beta_zero():
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-1.5]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, metrics = policy_loss(logp, logp, torch.zeros(1), torch.ones(1), mask, PolicyLossConfig(), ref_logp=ref)
    assert loss.item() == 0.0
    assert metrics["kl_mean"] == pytest.approx(0.106531, abs=1e-6)


def test_masked_garbage_stays_out_of_loss_and_gradient():
    # Padding positions hold -inf / nan log-probs; they must not poison the result.
    logp = torch.tensor([[-1.0, float("-inf"), float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0, float("nan")]])
    ref = torch.tensor([[-1.0, 5.0, 0.0]])
    mask = torch.tensor([[True, False, False]])
    cfg = PolicyLossConfig(beta=0.1)
    loss, metrics = policy_loss(logp, old, torch.ones(1), torch.ones(1), mask, cfg, ref_logp=ref)
    # Only token 0: rho = 1, A = 1, k3 = 0 -> loss -1.
    assert loss.item() == pytest.approx(-1.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(grad).all()
    assert grad[0, 1] == 0.0 and grad[0, 2] == 0.0
    assert metrics["ratio_max"] == 1.0


def test_all_masked_gives_zero_loss_and_nan_stats():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, metrics = policy_loss(logp, logp.detach(), torch.ones(2), torch.ones(2), mask, PolicyLossConfig())
    assert loss.item() == 0.0
    assert metrics["num_tokens"] == 0.0 and metrics["clip_frac_low"] == 0.0
    assert math.isnan(metrics["ratio_mean"])


def test_entropy_metric_is_masked_mean():
    logp = torch.zeros(1, 3)
    ent = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    _, metrics = policy_loss(logp, logp, torch.ones(1), torch.ones(1), mask, PolicyLossConfig(), entropy=ent)
    assert metrics["entropy_mean"] == 2.0


def test_bad_inputs_raise_clear_errors():
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, torch.ones(2), torch.ones(2), mask, PolicyLossConfig(beta=0.02))
    with pytest.raises(ValueError, match="weights"):
        policy_loss(logp, logp, torch.ones(2), torch.ones(2, 3), mask, PolicyLossConfig())
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, logp, torch.ones(3), torch.ones(2), mask, PolicyLossConfig())
    with pytest.raises(TypeError, match="mask"):
        policy_loss(logp, logp, torch.ones(2), torch.ones(2), mask.float(), PolicyLossConfig())
    with pytest.raises(ValueError, match="norm_length"):
        PolicyLossConfig(aggregation=Aggregation.SEQ_SUM_NORM)
    with pytest.raises(TypeError, match="Aggregation"):
        PolicyLossConfig(aggregation="token_mean")
    with pytest.raises(ValueError, match="eps_low"):
        PolicyLossConfig(eps_low=1.5)
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=1.0)
    with pytest.raises(ValueError, match="kl_clamp"):
        PolicyLossConfig(kl_clamp=0.0)
