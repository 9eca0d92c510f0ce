"""SFT's loss with the LM head on target positions only, against the full-logits formula."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.fused_loss import fused_token_nll
from trainers.sft import head_target_nll_sum, target_nll_sum
from trainers.sft_data import IGNORE_INDEX, SFTPair, collate, tokenize_pairs
from trainers.tiny import build_tiny_policy


@pytest.fixture(scope="module")
def policy():
    return build_tiny_policy(seed=0)


def _batch(tokenizer):
    # Three pairs of different lengths: collate pads the shorter rows on the right.
    pairs = [
        SFTPair(({"role": "user", "content": "Caroline: I went to a support group."},), '{"action": "ADD"}'),
        SFTPair(({"role": "user", "content": "hi"},), "ok"),
        SFTPair(({"role": "user", "content": "Melanie: pottery?"},), '{"action": "SKIP", "reason": "none"}'),
    ]
    examples = tokenize_pairs(tokenizer, pairs, max_length=200)
    batch = collate(examples, tokenizer.pad_token_id)
    assert bool((batch["attention_mask"] == 0).any()), "the batch must contain padding"
    return batch


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _full_logits_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return target_nll_sum(logits, batch["labels"])


@pytest.mark.parametrize("chunk_size", [1, 7, 512])
def test_head_loss_and_every_gradient_equal_the_full_logits_formula(policy, chunk_size):
    # The old formula (full [B, T, V] logits, cross_entropy with ignore_index) is the reference:
    # same value and same gradient for every parameter (the tiny Qwen3 ties head and embedding,
    # so the head gradient also meets the embedding-lookup gradient).
    model, tokenizer = policy
    batch = _batch(tokenizer)
    ref_loss = _full_logits_loss(model, batch)
    ref = _grads(model, ref_loss)
    loss = head_target_nll_sum(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=chunk_size
    )
    got = _grads(model, loss)
    # Chunked float32 sums reorder additions: ~1e-6 relative.
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-5)
    for name, g in ref.items():
        scale = g.abs().max().clamp(min=1e-8)
        torch.testing.assert_close(got[name] / scale, g / scale, rtol=1e-4, atol=1e-5, msg=name)


def test_nan_hidden_states_at_padding_do_not_reach_the_head(policy):
    # Padding rows of the decoder output are set to NaN (as a kernel that leaves padded rows
    # undefined would). The head loss never multiplies those rows, so its gradients are finite and
    # equal to the clean run's; the full-logits formula multiplies them (0 * NaN = NaN in W's
    # gradient), which shows the test can fail.
    model, tokenizer = policy
    batch = _batch(tokenizer)
    pad = batch["attention_mask"] == 0

    clean_loss = head_target_nll_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=5)
    clean = _grads(model, clean_loss)

    def poison(module, args, output):
        hidden = torch.where(pad[..., None], torch.full_like(output[0], float("nan")), output[0])
        return (hidden, *output[1:]) if isinstance(output, tuple) else type(output)(last_hidden_state=hidden)

    handle = model.get_decoder().register_forward_hook(poison)
    try:
        loss = head_target_nll_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=5)
        got = _grads(model, loss)
        old = _grads(model, _full_logits_loss(model, batch))
    finally:
        handle.remove()
    assert torch.isfinite(loss)
    assert loss.item() == clean_loss.item()
    for name, g in clean.items():
        assert torch.isfinite(got[name]).all(), name
        assert torch.equal(got[name], g), name
    head = next(n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    assert not torch.isfinite(old[head]).all()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 12),
    hdim=st.integers(1, 10),
    vocab=st.integers(2, 30),
    chunk=st.integers(1, 15),
    with_bias=st.booleans(),
)
def test_fused_token_nll_matches_cross_entropy(seed, n, hdim, vocab, chunk, with_bias):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = torch.randn(vocab, hdim, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True) if with_bias else None
    ids = torch.randint(0, vocab, (n,), generator=g)
    params = [h, w] + ([b] if b is not None else [])
    ref = F.cross_entropy(F.linear(h, w, b), ids, reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    loss = fused_token_nll(h, w, ids, head_bias=b, chunk_size=chunk)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_token_nll_by_hand_and_bad_inputs():
    # Zero hidden states give uniform logits over V = 4: each token costs ln 4, so 3 tokens 3 ln 4.
    # d loss / d logits = softmax - onehot = 1/4 - [token]; W's gradient is that times h = 0.
    h = torch.zeros(3, 2, requires_grad=True)
    w = torch.randn(4, 2, requires_grad=True)
    loss = fused_token_nll(h, w, torch.tensor([0, 1, 1]), chunk_size=2)
    assert loss.item() == pytest.approx(3 * torch.log(torch.tensor(4.0)).item(), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(w.grad) == 0
    # h's gradient row t = (softmax - onehot) @ W = mean(W rows) - W[token_t].
    torch.testing.assert_close(h.grad[1], w.detach().mean(0) - w.detach()[1])
    with pytest.raises(ValueError, match="token_ids must lie"):
        fused_token_nll(h, w, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_token_nll(h, w, torch.tensor([0, 1, 1]), chunk_size=0)


def test_labels_all_ignored_give_zero_loss_and_gradient(policy):
    model, tokenizer = policy
    batch = _batch(tokenizer)
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    loss = head_target_nll_sum(model, batch["input_ids"], batch["attention_mask"], labels)
    assert loss.item() == 0.0
    grads = _grads(model, loss)
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_fused_token_nll_bf16_within_bf16_rounding_of_float32():
    # bf16 head: the logits matmul rounds its output to bf16 once (|dz| <= 2^-8 |z|), as a bf16
    # model's own lm_head does. Against the float32 formula on the same bf16-valued inputs with that
    # one rounding applied (straight through), the loss agrees to float32 summation error; the
    # gradients carry the bf16 rounding of dlogits and of the per-chunk accumulation into the one
    # bf16 weight-gradient buffer: 4 chunks here, ~sqrt(4) * 2^-9 ~ 4e-3 of scale, plus 2^-8 for
    # dlogits; measured 3e-3 (hidden) and 7e-3 (weight), so 2e-2.
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g).bfloat16()
    w = (torch.randn(200, 16, generator=g) / 4).bfloat16()
    ids = torch.randint(0, 200, (40,), generator=g)
    h32, w32 = h.float().requires_grad_(True), w.float().requires_grad_(True)
    z = h32 @ w32.t()
    z = z + (z.detach().bfloat16().float() - z.detach())
    ref = F.cross_entropy(z, ids, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [h32, w32])
    hb, wb = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fused_token_nll(hb, wb, ids, chunk_size=10)
    grads = torch.autograd.grad(loss, [hb, wb])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16  # one bf16 buffer, handed over as the gradient
        scale = want.abs().max()
        torch.testing.assert_close(got.float() / scale, want / scale, rtol=2e-2, atol=2e-2)
