"""Per-token log-probabilities from final hidden states, chunk by chunk over tokens.

logits = (hidden @ weight.T + bias) / temperature, computed in float32 for `chunk_size` tokens at
a time, so at most `[chunk_size, V]` logits exist at once (the full `[N, V]` never does). This is
what generation-time and reference-model log-probs use; the fused policy loss
(`trainers.fused_loss`) is built on the same chunk primitive.

For a Hugging Face causal LM, `policy_hidden_states` runs the model's own forward (so FSDP2's
hooks gather and later reduce the parameters as usual) with `logits_to_keep` set to no position,
and captures the decoder body's output with a forward hook; `lm_head_params` returns the head
weight and bias as plain tensors, unsharding an FSDP2-owned head explicitly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

# Tokens per chunk when the caller gives none. Besides its [chunk, V] logits, each chunk of the
# fused loss reads and writes the whole [V, H] gradient accumulator, an overhead that shrinks with
# more tokens per chunk whatever V is; so the default is a token count, not a logits budget.
# benchmarks/results/loss_kernel.md measured the trade-off (chunk sweep) on CPU.
DEFAULT_CHUNK_SIZE = 512


def check_head_inputs(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, bias: Tensor | None, temperature: float
) -> None:
    """Raise a clear error when the shapes of a head computation do not fit together."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H] with H={hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if token_ids.shape != (hidden.shape[0],):
        raise ValueError(f"token_ids must be [N]=[{hidden.shape[0]}], got shape {tuple(token_ids.shape)}")
    if token_ids.dtype not in (torch.long, torch.int32):
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= weight.shape[0]):
        raise ValueError(
            f"token_ids must lie in [0, V={weight.shape[0]}), got [{int(token_ids.min())}, {int(token_ids.max())}]"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V]=[{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class ChunkStats(NamedTuple):
    logp: Tensor  # [C] log-prob of the chosen token
    entropy: Tensor | None  # [C] entropy of the tempered distribution
    exp_shifted: Tensor  # [C, V] exp(logit - row max); the logits buffer, overwritten
    sum_exp: Tensor  # [C, 1] row sums of exp_shifted (softmax = exp_shifted / sum_exp)


def chunk_logits(
    hidden: Tensor,  # [C, H] float32
    weight: Tensor,  # [V, H] float32
    bias: Tensor | None,  # [V] float32
    temperature: float,
) -> Tensor:  # [C, V] float32
    """Tempered logits of one chunk of tokens."""
    logits = torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def chunk_stats(logits: Tensor, token_ids: Tensor, with_entropy: bool) -> ChunkStats:
    """Log-prob of `token_ids` (and entropy) from a `[C, V]` float32 logits buffer it overwrites.

    Works in place: with entropy off, the exponentials reuse the logits' memory, so one chunk
    costs a single `[C, V]` buffer.
    """
    target = logits.gather(1, token_ids.long()[:, None])
    row_max = logits.amax(dim=1, keepdim=True)
    logits.sub_(row_max)
    target = target - row_max
    entropy = None
    if with_entropy:
        exp_shifted = torch.exp(logits)
        sum_exp = exp_shifted.sum(dim=1, keepdim=True)
        # H = log(sum e^z') - sum(e^z' z') / sum e^z', with z' = z - max; the row dot products go
        # through bmm so no second [C, V] temporary appears.
        dots = torch.bmm(exp_shifted.unsqueeze(1), logits.unsqueeze(2)).view(-1, 1)
        entropy = (torch.log(sum_exp) - dots / sum_exp).squeeze(1)
    else:
        exp_shifted = logits.exp_()
        sum_exp = exp_shifted.sum(dim=1, keepdim=True)
    logp = (target - torch.log(sum_exp)).squeeze(1)
    return ChunkStats(logp=logp, entropy=entropy, exp_shifted=exp_shifted, sum_exp=sum_exp)


@torch.no_grad()
def token_logprobs(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    token_ids: Tensor,  # [N]
    bias: Tensor | None = None,  # [V]
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:  # logp [N] float32, entropy [N] float32 or None
    """log_softmax((hidden @ weight.T + bias) / T)[token_ids] without the full `[N, V]` logits.

    No gradient (this is for sampling-time and reference log-probs; the trainable path is
    `trainers.fused_loss`). Accumulates in float32 whatever the input dtype.
    """
    check_head_inputs(hidden, weight, token_ids, bias, temperature)
    n = hidden.shape[0]
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    w32 = weight.float()
    b32 = bias.float() if bias is not None else None
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if with_entropy else None
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        logits = chunk_logits(hidden[start:stop].float(), w32, b32, temperature)
        stats = chunk_stats(logits, token_ids[start:stop], with_entropy)
        logp[start:stop] = stats.logp
        if entropy is not None:
            entropy[start:stop] = stats.entropy
    return logp, entropy


class PackedTokens(NamedTuple):
    """Completion tokens of a padded batch, packed in row-major order of the `[B, L]` mask."""

    hidden: Tensor  # [N, H] hidden state at the position before each token (its predictor)
    token_ids: Tensor  # [N]
    seq_index: Tensor  # [N] row of each token in the batch
    num_seqs: int  # B


def pack_completions(
    hidden: Tensor,  # [B, L, H] final hidden states
    input_ids: Tensor,  # [B, L]
    completion_mask: Tensor,  # [B, L] bool: tokens to score
) -> PackedTokens:
    """Pick the tokens to score and the hidden states that predict them.

    Token `input_ids[b, t]` is predicted from `hidden[b, t - 1]`, so `completion_mask[:, 0]` must
    be False. Any `[B, L]` tensor aligned with `input_ids` packs the same way: `x[completion_mask]`.
    """
    if hidden.dim() != 3 or hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden must be [B, L, H] with [B, L]={tuple(input_ids.shape)}, got {tuple(hidden.shape)}")
    if completion_mask.shape != input_ids.shape or completion_mask.dtype != torch.bool:
        raise ValueError(
            f"completion_mask must be a bool [B, L]={tuple(input_ids.shape)}, "
            f"got {completion_mask.dtype} {tuple(completion_mask.shape)}"
        )
    if bool(completion_mask[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be False: the first token has no preceding position")
    rows, cols = completion_mask.nonzero(as_tuple=True)
    return PackedTokens(
        hidden=hidden[rows, cols - 1],
        token_ids=input_ids[rows, cols],
        seq_index=rows,
        num_seqs=input_ids.shape[0],
    )


def _fsdp_owner(model: nn.Module, head: nn.Module) -> FSDPModule | None:
    """The innermost FSDP2 module whose subtree holds `head` (FSDP2 groups a module's own params)."""
    owner = None
    for module in model.modules():
        if isinstance(module, FSDPModule) and any(sub is head for sub in module.modules()):
            owner = module  # modules() is pre-order, so later hits are deeper
    return owner


def lm_head_params(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output head's weight `[V, H]` and bias `[V]` (or None) as plain, unsharded tensors.

    Call it after `policy_hidden_states(model, ...)` in the same step. Under FSDP2, the root
    module keeps its parameters unsharded after forward (the head and the tied embedding usually
    belong to it), so this returns them directly; if they were resharded (e.g.
    `reshard_after_forward=True` set on the root), it calls `unshard()` on the FSDP module that
    owns the head. Either way the gradient lands in FSDP's unsharded parameter and is
    reduce-scattered in its post-backward, like any other parameter's. A `DTensor` that no FSDP2
    module owns (e.g. tensor parallelism) is refused rather than guessed at.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    if isinstance(head.weight, DTensor):
        owner = _fsdp_owner(model, head)
        if owner is None:
            raise ValueError("the LM head weight is a DTensor but no FSDP2 module owns it; cannot unshard it")
        owner.unshard()
        if isinstance(head.weight, DTensor):
            raise RuntimeError("FSDP2 unshard() left the LM head weight sharded")
    bias = head.bias if isinstance(getattr(head, "bias", None), Tensor) else None
    return head.weight, bias


def policy_hidden_states(
    model: nn.Module,
    input_ids: Tensor,  # [B, L]
    attention_mask: Tensor | None = None,  # [B, L]
) -> Tensor:  # [B, L, H]
    """Final (post-norm) hidden states of a HF causal LM, from its own forward, without logits.

    Position ids follow the attention mask (as `generate` does), so a left-padded row gets the
    same numbers as the unpadded sequence.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("models with final_logit_softcapping are not supported: logits are not hidden @ W.T")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return decoder_hidden_states(model, input_ids, attention_mask, position_ids)


def decoder_hidden_states(
    model: nn.Module,
    input_ids: Tensor,  # [B, L]
    attention_mask: Tensor,  # [B, L], or a 4-D mask the model's attention takes as it is
    position_ids: Tensor,  # [B, L]
    **attention_kwargs,  # passed by transformers down to the attention function
) -> Tensor:  # [B, L, H]
    """Final hidden states from the model's own forward (FSDP hooks run as usual), no logits."""
    captured: list[Tensor] = []

    def keep_last_hidden(module: nn.Module, args: tuple, output) -> None:
        captured.append(output[0])  # last_hidden_state of the decoder's ModelOutput

    handle = model.get_decoder().register_forward_hook(keep_last_hidden)
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            # An empty index tensor: the head runs on no position, so no logits are materialised.
            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
            **attention_kwargs,
        )
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder forward, captured {len(captured)}")
    return captured[0]


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,  # [B, L]
    attention_mask: Tensor | None,  # [B, L]
    completion_mask: Tensor,  # [B, L] bool: tokens to score
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:  # logp [B, L], entropy [B, L] or None; 0 off the mask
    """log p(input_ids[b, t] | input_ids[b, :t]) at tempered logits, for the masked positions.

    Equal to `log_softmax(model(...).logits / T)` gathered at the next tokens, without the full
    logits. The result is aligned with `input_ids`, zero where `completion_mask` is False.
    """
    hidden = policy_hidden_states(model, input_ids, attention_mask)
    packed = pack_completions(hidden, input_ids, completion_mask)
    weight, bias = lm_head_params(model)
    logp, entropy = token_logprobs(
        packed.hidden, weight, packed.token_ids, bias, temperature, chunk_size, with_entropy
    )
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[completion_mask] = logp
    ent_out = None
    if entropy is not None:
        ent_out = torch.zeros_like(out)
        ent_out[completion_mask] = entropy
    return out, ent_out
