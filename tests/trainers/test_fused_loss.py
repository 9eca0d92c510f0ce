"""The fused kernel against the reference: same loss, same gradients, same metrics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.fused_loss import fused_policy_loss
from trainers.logprobs import lm_head_params, pack_completions, policy_hidden_states
from trainers.losses import Aggregation, PolicyLossConfig, policy_loss
from trainers.tiny import build_tiny_policy


def _make_case(seed, B, T, H, V, with_bias, with_ref, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype) if with_bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    adv = torch.randn(B, generator=g)
    w = torch.where(torch.rand(B, generator=g) < 0.4, 4.0, 1.0)
    # Old and reference log-probs near the real ones, so ratios fall on both sides of the clip.
    noise_old = 0.3 * torch.randn(B, T, generator=g)
    noise_ref = 0.3 * torch.randn(B, T, generator=g) if with_ref else None
    return hidden, weight, bias, ids, mask, adv, w, noise_old, noise_ref


def _reference(hidden, weight, bias, ids, mask, adv, w, old, ref, cfg, temperature, round_logits=None):
    """Full logits in float32, log_softmax, gather, then the reference loss over [B, T].

    `round_logits` (a dtype) rounds h @ W.T to it once, as a model's own bf16 `lm_head` does;
    everything else stays float32.
    """
    h = hidden.detach().float().requires_grad_(True)
    W = weight.detach().float().requires_grad_(True)
    b = bias.detach().float().requires_grad_(True) if bias is not None else None
    logits = h @ W.t()
    if round_logits is not None:
        # Round the value, keep the float32 derivative (straight through): the rounding is a
        # value error of the forward, not part of the function being differentiated.
        logits = logits + (logits.detach().to(round_logits).float() - logits.detach())
    logits = logits + (b if b is not None else 0.0)
    logits.retain_grad()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    logp = logprobs.gather(-1, ids[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()
    loss, metrics = policy_loss(logp, old, adv, w, mask, cfg, ref_logp=ref, entropy=entropy)
    loss.backward()
    grads = tuple(t.grad for t in [h, W] + ([b] if b is not None else []))
    return loss.detach(), metrics, grads, logp.detach(), logits.grad.abs().max()


def _fused(hidden, weight, bias, ids, mask, adv, w, old, ref, cfg, temperature, chunk, packed=False):
    B, T, H = hidden.shape
    h = hidden.detach().clone().requires_grad_(True)
    W = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    seq = torch.arange(B).repeat_interleave(T)
    flat = dict(
        hidden=h.reshape(-1, H),
        token_ids=ids.reshape(-1),
        old_logp=old.reshape(-1),
        advantages=adv[:, None].expand(B, T).reshape(-1),
        weights=w[:, None].expand(B, T).reshape(-1),
        mask=mask.reshape(-1),
        seq_index=seq,
        ref_logp=ref.reshape(-1) if ref is not None else None,
    )
    if packed:  # only the tokens that enter the loss, as a trainer passes them
        keep = flat["mask"]
        flat = {k: (v[keep] if v is not None else None) for k, v in flat.items()}
    loss, metrics = fused_policy_loss(
        flat["hidden"],
        W,
        flat["token_ids"],
        flat["old_logp"],
        flat["advantages"],
        flat["weights"],
        flat["mask"],
        flat["seq_index"],
        B,
        cfg,
        head_bias=b,
        ref_logp=flat["ref_logp"],
        temperature=temperature,
        chunk_size=chunk,
        with_entropy=True,
    )
    grads = torch.autograd.grad(loss, [h, W] + ([b] if b is not None else []))
    return loss.detach(), metrics, grads


def _compare(case, cfg, temperature, chunk, dtype, packed=False):
    hidden, weight, bias, ids, mask, adv, w, noise_old, noise_ref = case
    # Build old/ref from the true log-probs of the (possibly bf16-rounded) inputs.
    with torch.no_grad():
        logits = hidden.float() @ weight.float().t() + (bias.float() if bias is not None else 0.0)
        true_logp = torch.log_softmax(logits / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = true_logp + noise_old
    ref = true_logp + noise_ref if noise_ref is not None else None
    # In bf16 the fused kernel's logits matmul rounds its output to bf16 once (|dz| <= 2^-8 |z|),
    # which moves log-probs by up to 2^-7 max|z| / T (~1e-3 relative in the loss here, measured);
    # that is the precision of a bf16 model's own head, so the reference rounds the same way.
    rounding = dtype if dtype != torch.float32 else None
    r_loss, r_metrics, r_grads, _, dlogits_max = _reference(
        hidden, weight, bias, ids, mask, adv, w, old, ref, cfg, temperature, round_logits=rounding
    )
    f_loss, f_metrics, f_grads = _fused(
        hidden, weight, bias, ids, mask, adv, w, old, ref, cfg, temperature, chunk, packed
    )
    if dtype == torch.float32:  # chunked sums reorder fp32 additions: ~1e-5 relative seen
        tol = dict(rtol=1e-4, atol=1e-5)
    else:
        # bf16 matmuls: dlogits is rounded to bf16 (2^-8 relative) before the two gradient
        # matmuls, and the weight's gradient is one bf16 buffer, rounded (2^-8 relative) after
        # each chunk's addition; with k chunks the rounding errors add up to about sqrt(k) * 2^-9
        # of the gradient's scale (k = 64 at chunk 1: ~1.6e-2), so rtol 2e-2 / atol 2e-2 of scale.
        # Measured: at most 9e-3 against this reference, 1.2e-2 against the unrounded float32 one
        # (whose loss differs by 3.7e-4 relative, the logits' bf16 rounding).
        tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(f_loss, r_loss, rtol=1e-5, atol=1e-6)
    for fg, rg in zip(f_grads, r_grads):
        assert fg.dtype == dtype
        # Gradients are sums of per-token terms of size ~|d loss / d logits|; where those cancel
        # (e.g. the bias gradient at V = 2) the result is small but its rounding error is not, so
        # the error is measured against the larger of the result and the terms.
        scale = torch.maximum(rg.abs().max(), dlogits_max).clamp(min=1e-6)
        torch.testing.assert_close(fg.float() / scale, rg / scale, **tol)
    for key, value in r_metrics.items():
        assert f_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    B=st.integers(1, 4),
    T=st.integers(1, 9),
    H=st.integers(1, 12),
    V=st.integers(2, 40),
    chunk=st.integers(1, 20),
    temperature=st.sampled_from([0.5, 0.8, 1.0, 1.7]),
    with_bias=st.booleans(),
    with_ref=st.booleans(),
    aggregation=st.sampled_from(list(Aggregation)),
    dual_clip=st.sampled_from([None, 1.1, 3.0]),
    kl_clamp=st.sampled_from([None, 0.05, 10.0]),
)
def test_fused_matches_reference_fp32(
    seed, B, T, H, V, chunk, temperature, with_bias, with_ref, aggregation, dual_clip, kl_clamp
):
    cfg = PolicyLossConfig(
        beta=0.02 if with_ref else 0.0,
        aggregation=aggregation,
        norm_length=7,
        dual_clip=dual_clip,
        kl_clamp=kl_clamp,
    )
    case = _make_case(seed, B, T, H, V, with_bias, with_ref)
    _compare(case, cfg, temperature, chunk, torch.float32)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_matches_reference_bf16(chunk, with_bias):
    case = _make_case(7, 4, 16, 32, 300, with_bias, True, dtype=torch.bfloat16)
    _compare(case, PolicyLossConfig(beta=0.02), 0.8, chunk, torch.bfloat16)


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_packed_tokens_match_padded_layout(aggregation):
    # Passing only the unmasked tokens (as a trainer does) gives the reference loss too.
    cfg = PolicyLossConfig(beta=0.02, aggregation=aggregation, norm_length=10)
    case = _make_case(3, 3, 10, 8, 50, True, True)
    _compare(case, cfg, 1.0, 4, torch.float32, packed=True)


def test_zero_advantage_without_kl_gives_zero_gradient():
    hidden, weight, bias, ids, mask, adv, w, noise_old, _ = _make_case(5, 3, 6, 8, 30, True, False)
    old = torch.full((3, 6), -3.0) + noise_old
    _, _, grads = _fused(hidden, weight, bias, ids, mask, torch.zeros(3), w, old, None, PolicyLossConfig(), 1.0, 4)
    for g in grads:
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("alpha", [4.0, 2.5])
def test_weight_alpha_scales_that_sample_gradient(alpha):
    # Gradients are linear in each sample's weight: the contribution of sample 0 (its gradient
    # with weights (w0, 0) applied to the shared head) scales by alpha exactly, and so do the
    # hidden-state rows of its tokens, while sample 1's rows do not move.
    hidden, weight, bias, ids, _, adv, _, noise_old, _ = _make_case(11, 2, 5, 8, 30, True, False)
    mask = torch.ones(2, 5, dtype=torch.bool)
    old = torch.full((2, 5), -3.4) + noise_old
    cfg = PolicyLossConfig()

    def grads(w0, w1):
        return _fused(hidden, weight, bias, ids, mask, adv, torch.tensor([w0, w1]), old, None, cfg, 1.0, 3)[2]

    g1, ga, g0 = grads(1.0, 1.0), grads(alpha, 1.0), grads(0.0, 1.0)
    h1, ha = g1[0].view(2, 5, 8), ga[0].view(2, 5, 8)
    assert torch.count_nonzero(h1[0]) > 0
    if alpha == 4.0:  # a power of two: the scaling is exact in floating point
        assert torch.equal(ha[0], 4.0 * h1[0])
    torch.testing.assert_close(ha[0], alpha * h1[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(ha[1], h1[1])
    for i in (1, 2):  # head weight and bias: only sample 0's share changes
        torch.testing.assert_close(ga[i] - g0[i], alpha * (g1[i] - g0[i]), rtol=1e-5, atol=1e-6)


def test_no_grad_gives_the_same_loss():
    hidden, weight, bias, ids, mask, adv, w, noise_old, _ = _make_case(2, 2, 6, 8, 30, False, False)
    B, T, H = hidden.shape
    args = (
        hidden.reshape(-1, H),
        weight,
        ids.reshape(-1),
        (noise_old - 3.0).reshape(-1),
        adv[:, None].expand(B, T).reshape(-1),
        w[:, None].expand(B, T).reshape(-1),
        mask.reshape(-1),
        torch.arange(B).repeat_interleave(T),
        B,
        PolicyLossConfig(),
    )
    with torch.no_grad():
        loss_ng, _ = fused_policy_loss(*args, chunk_size=5)
    loss, _ = fused_policy_loss(*args, chunk_size=5)
    assert not loss_ng.requires_grad
    assert loss_ng.item() == loss.item()


def test_tied_embeddings_model_gradients_match_full_logits():
    # End to end on the tiny Qwen3 (tied embeddings): every parameter's gradient through the fused
    # loss equals the one through model(...).logits + log_softmax + the reference loss.
    model, _ = build_tiny_policy(seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (3, 14), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # a left-padded row
    cm = torch.zeros_like(ids, dtype=torch.bool)
    cm[:, 6:] = True
    adv = torch.tensor([1.0, -0.5, 2.0])
    w = torch.tensor([4.0, 1.0, 1.0])
    temperature = 0.8
    cfg = PolicyLossConfig(beta=0.02)
    old_full = torch.full(ids.shape, -6.5)
    ref_full = torch.full(ids.shape, -7.0)

    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_loss, _ = policy_loss(logp, old_full[:, 1:], adv, w, cm[:, 1:], cfg, ref_logp=ref_full[:, 1:])
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    hidden = policy_hidden_states(model, ids, attn)
    packed = pack_completions(hidden, ids, cm)
    head_weight, head_bias = lm_head_params(model)
    assert head_bias is None
    loss, _ = fused_policy_loss(
        packed.hidden,
        head_weight,
        packed.token_ids,
        old_full[cm],
        adv[packed.seq_index],
        w[packed.seq_index],
        torch.ones_like(packed.token_ids, dtype=torch.bool),
        packed.seq_index,
        packed.num_seqs,
        cfg,
        ref_logp=ref_full[cm],
        temperature=temperature,
        chunk_size=7,
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        scale = ref_grads[name].abs().max().clamp(min=1e-8)
        torch.testing.assert_close(p.grad / scale, ref_grads[name] / scale, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_inputs_raise_clear_errors():
    h = torch.randn(4, 8)
    W = torch.randn(10, 8)
    ids = torch.tensor([1, 2, 3, 4])
    v = torch.zeros(4)
    m = torch.ones(4, dtype=torch.bool)
    seq = torch.zeros(4, dtype=torch.long)
    cfg = PolicyLossConfig()
    with pytest.raises(ValueError, match="weight must be"):
        fused_policy_loss(h, torch.randn(10, 7), ids, v, v, v, m, seq, 1, cfg)
    with pytest.raises(ValueError, match="token_ids must lie"):
        fused_policy_loss(h, W, torch.tensor([1, 2, 3, 10]), v, v, v, m, seq, 1, cfg)
    with pytest.raises(ValueError, match="advantages"):
        fused_policy_loss(h, W, ids, v, torch.zeros(2), v, m, seq, 1, cfg)
    with pytest.raises(ValueError, match="seq_index"):
        fused_policy_loss(h, W, ids, v, v, v, m, seq + 1, 1, cfg)
    with pytest.raises(ValueError, match="ref_logp"):
        fused_policy_loss(h, W, ids, v, v, v, m, seq, 1, PolicyLossConfig(beta=0.02))
    with pytest.raises(ValueError, match="temperature"):
        fused_policy_loss(h, W, ids, v, v, v, m, seq, 1, cfg, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_policy_loss(h, W, ids, v, v, v, m, seq, 1, cfg, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_hidden_states_at_masked_rows_do_not_reach_the_head(dtype):
    # Padded layout: masked rows (padding) hold NaN, as a kernel that leaves padded rows undefined
    # would. They must not reach the matmuls: loss, metrics and gradients equal those of the same
    # batch with finite values there, and the hidden gradient of a masked row is exactly 0.
    hidden, weight, bias, ids, mask, adv, w, noise_old, noise_ref = _make_case(4, 3, 8, 8, 40, True, True, dtype)
    assert bool((~mask).any())
    old, ref = noise_old - 3.0, noise_ref - 3.0
    cfg = PolicyLossConfig(beta=0.02)
    clean = _fused(hidden, weight, bias, ids, mask, adv, w, old, ref, cfg, 1.0, 5)
    poisoned = hidden.masked_fill(~mask[..., None], float("nan"))
    loss, metrics, grads = _fused(poisoned, weight, bias, ids, mask, adv, w, old, ref, cfg, 1.0, 5)
    assert loss.item() == clean[0].item()
    assert metrics == clean[1]
    for g, c in zip(grads, clean[2]):
        assert torch.isfinite(g).all()
        assert torch.equal(g, c)
    assert torch.count_nonzero(grads[0].view(3, 8, 8)[~mask]) == 0
