"""Shared-prompt groups: each prompt computed once, the G completions on top of it.

The G samples of a group share one prompt (thousands of tokens) and differ in their completions
(hundreds). Run as G separate sequences, the prompt is computed G times. Here each group becomes
ONE packed row

    [prompt | c_1[:-1] | c_2[:-1] | ... | c_G[:-1]]

with position ids restarted at len(prompt) for every completion, and a block attention mask: a
prompt token attends causally to the prompt; a token of completion g attends to the whole prompt
and causally to completion g's earlier tokens, never to another completion. Every token then sees
exactly the keys, at exactly the positions, it would see in its own sequence `prompt + c_g`, so the
hidden states, and through autograd the gradients, equal those of the G separate sequences (the
prompt's gradient is the sum of what the G completions send back, as with G copies). A
completion's last token only serves as a target (nothing is predicted from it), so it is not fed.

How transformers 5.x takes the mask (read in `masking_utils` / `integrations/sdpa_attention.py`,
5.19): a 4-D `attention_mask` `[B, 1, L, L]` is "already prepared" and reaches every layer as is
(`_preprocess_mask_arguments` returns early), so
- `sdpa`: it becomes `F.scaled_dot_product_attention`'s `attn_mask`; a bool mask (True = attend)
  works and costs 1 byte per entry;
- `eager`: it is ADDED to the scores, so it must be a float mask (0 to attend, dtype min
  elsewhere); a bool mask would be silently wrong;
- position ids alone cannot express it: with no 2-D mask, transformers reads restarting position
  ids as separate packed sequences and makes them block-diagonal (each completion would lose the
  prompt), and flash-attention's varlen path (`cu_seqlens`) has the same limitation; so
  `flash_attention_*` (which ignores a 4-D mask) is refused, as are models with sliding-window
  layers (the one 4-D mask would replace their window mask too).
Rows of a micro-batch are right-padded; a pad position attends to the prompt and to earlier pads
(never an empty row, which gives NaN in sdpa), and no real token attends to a pad.

A dense mask makes sdpa compute all L x L scores, the blocks between completions included, and it
loses sdpa's causal fast path. `enable_shared_prompt_attention(model)` registers, through
transformers' public `AttentionInterface` / `AttentionMaskInterface`, an attention function
(`SHARED_PROMPT_ATTENTION`) that is plain `sdpa` for every ordinary call (generation, padded
batches) and, for a packed forward from this module, computes per row the prompt with
`is_causal=True` and then each completion against [prompt keys, its own keys]: about
P^2 / 2 + sum_g |c_g| (P + |c_g|) scores instead of L^2. The same 4-D mask is passed along (so the
arguments stay truthful; it costs B * L^2 bytes), and the values are those of the mask path.

The KV-cache alternative (a prompt forward whose cache feeds G completion forwards) was not
taken: transformers drops the cache in checkpointed layers (`GradientCheckpointingLayer`), and the
trainer runs with gradient checkpointing.

`benchmarks/bench_adrpo_step.py` measures packed against plain. Use in a trainer:

    enable_shared_prompt_attention(model)                               # once, after loading
    for mb in split_by_token_budget(groups, max_tokens=16_384):
        states = completion_hidden_states(model, mb.groups)             # [N, H], with grad
        weight, bias = lm_head_params(model)
        sample = torch.tensor(mb.sample_ids)[states.seq_index]          # flat sample of each token
        loss, metrics = fused_policy_loss(states.hidden, weight, states.token_ids,
                                          old_logp_tok, advantages[sample], weights[sample], mask,
                                          states.seq_index, states.num_seqs, config,
                                          head_bias=bias, temperature=T)
        loss.backward()

`completion_logprobs` gives the old / reference log-probs of the same tokens in the same order.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from trainers.logprobs import (
    DEFAULT_CHUNK_SIZE,
    decoder_hidden_states,
    lm_head_params,
    policy_hidden_states,
    token_logprobs,
)

# The attention implementation registered by `enable_shared_prompt_attention`.
SHARED_PROMPT_ATTENTION = "membuilder_shared_prompt_sdpa"

# Attention implementations that take a 4-D mask as given, and the mask type each needs.
_MASK_KIND_BY_ATTENTION = {"sdpa": "bool", SHARED_PROMPT_ATTENTION: "bool", "eager": "additive"}


class Layout(enum.Enum):
    """How a group's G sequences are laid out for the forward."""

    PACKED = "packed"  # one row per group: prompt once, completions on top (block mask)
    PLAIN = "plain"  # one row per completion: prompt + completion, right-padded (the reference)


def _token_list(ids: Sequence[int], name: str) -> list[int]:
    try:
        out = [operator.index(t) for t in ids]
    except TypeError as exc:
        raise TypeError(f"PromptGroup.{name} must hold int token ids: {exc}") from None
    negative = [t for t in out if t < 0]
    if negative:
        raise ValueError(f"PromptGroup.{name} holds negative token ids {negative[:3]}")
    return out


@dataclass(frozen=True)
class PromptGroup:
    """One prompt and the G completions sampled from it (token ids)."""

    prompt_ids: list[int]
    completions: list[list[int]]

    def __post_init__(self) -> None:
        # Normalised to lists of Python ints (tuples, numpy or tensor scalars are accepted).
        object.__setattr__(self, "prompt_ids", _token_list(self.prompt_ids, "prompt_ids"))
        completions = [_token_list(c, f"completions[{i}]") for i, c in enumerate(self.completions)]
        object.__setattr__(self, "completions", completions)
        # The first completion token is predicted from the prompt's last position.
        if len(self.prompt_ids) == 0:
            raise ValueError("PromptGroup.prompt_ids is empty: the first completion token needs a prompt to predict it")
        if len(self.completions) == 0:
            raise ValueError("PromptGroup.completions is empty: a group needs at least one completion")

    @property
    def packed_length(self) -> int:
        """Positions of this group's packed row: the prompt plus each completion but its last token."""
        return len(self.prompt_ids) + sum(max(len(c) - 1, 0) for c in self.completions)

    @property
    def plain_lengths(self) -> list[int]:
        """Lengths of the G plain rows, prompt + completion."""
        return [len(self.prompt_ids) + len(c) for c in self.completions]


class CompletionStates(NamedTuple):
    """Per completion token, in order group -> completion -> token (all `[N]` but `hidden`)."""

    hidden: Tensor  # [N, H] final-norm hidden state at the position that predicts the token
    token_ids: Tensor  # [N] long, the completion token
    seq_index: Tensor  # [N] long, flat index of the token's completion over the groups passed
    group_index: Tensor  # [N] long, index of the token's group in the groups passed
    completion_index: Tensor  # [N] long, index of the completion within its group
    num_seqs: int  # completions in all groups passed, empty ones included


# ---------------------------------------------------------------------------------------------
# Packed rows and their mask
# ---------------------------------------------------------------------------------------------


class RowLayout(NamedTuple):
    """Where things sit in one packed row (all python ints, read by the attention function)."""

    prompt_length: int
    spans: tuple[tuple[int, int], ...]  # (start, length) of each completion's fed tokens


class PackedRows(NamedTuple):
    """The packed rows of some groups, right-padded to the longest."""

    layouts: tuple[RowLayout, ...]
    input_ids: Tensor  # [B, L] long
    position_ids: Tensor  # [B, L] long
    segments: Tensor  # [B, L] long: 0 prompt, g + 1 completion g, -1 padding
    predictor_row: Tensor  # [N] long: row of the position predicting each completion token
    predictor_col: Tensor  # [N] long: its column


def pack_groups(groups: Sequence[PromptGroup], pad_id: int = 0) -> PackedRows:
    """Lay out each group as one row `[prompt | c_1[:-1] | ... | c_G[:-1]]` (see the module doc)."""
    if len(groups) == 0:
        raise ValueError("pack_groups needs at least one group")
    lengths = [g.packed_length for g in groups]
    width = max(lengths)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    seg = torch.full((len(groups), width), -1, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    layouts: list[RowLayout] = []
    for r, group in enumerate(groups):
        p = len(group.prompt_ids)
        ids[r, :p] = torch.tensor(group.prompt_ids, dtype=torch.long)
        pos[r, :p] = torch.arange(p)
        seg[r, :p] = 0
        start = p
        spans: list[tuple[int, int]] = []
        for g, comp in enumerate(group.completions):
            fed = max(len(comp) - 1, 0)
            spans.append((start, fed))
            ids[r, start : start + fed] = torch.tensor(comp[:fed], dtype=torch.long)
            pos[r, start : start + fed] = torch.arange(p, p + fed)
            seg[r, start : start + fed] = g + 1
            # Token 0 is predicted by the prompt's last position, token j > 0 by fed token j - 1.
            cols.extend([p - 1] + list(range(start, start + len(comp) - 1)) if comp else [])
            rows.extend([r] * len(comp))
            start += fed
        layouts.append(RowLayout(p, tuple(spans)))
    as_long = dict(dtype=torch.long)
    return PackedRows(tuple(layouts), ids, pos, seg, torch.tensor(rows, **as_long), torch.tensor(cols, **as_long))


def shared_prompt_mask(segments: Tensor) -> Tensor:  # [B, 1, L, L] bool, True = may attend
    """Query q may attend to key k iff k <= q and k is a prompt token or in q's own segment.

    Pads (segment -1) come last in a row, so they see the prompt and earlier pads (no empty row)
    and no real token sees them.
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril_()
    key_seg = segments[:, None, :]
    allowed = causal & ((key_seg == 0) | (key_seg == segments[:, :, None]))
    return allowed[:, None]


def _attention_mask_for(model: nn.Module, segments: Tensor, dtype: torch.dtype) -> Tensor:
    impl = getattr(model.config, "_attn_implementation", None)
    kind = _MASK_KIND_BY_ATTENTION.get(impl)
    if kind is None:
        raise ValueError(
            f"shared-prompt packing needs attn_implementation 'sdpa', 'eager' or {SHARED_PROMPT_ATTENTION!r} "
            f"(it passes a 4-D mask), the model uses {impl!r}"
        )
    allowed = shared_prompt_mask(segments)
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _row_attention(
    query: Tensor,  # [1, Hq, L, D]
    key: Tensor,  # [1, Hkv, L, D]
    value: Tensor,  # [1, Hkv, L, D]
    layout: RowLayout,
    scaling: float | None,
    dropout: float,
) -> Tensor:  # [1, Hq, L, D]
    """One packed row: the prompt causally, then each completion on [prompt keys, its own keys]."""
    p = layout.prompt_length
    gqa = query.shape[1] != key.shape[1]
    k_prompt, v_prompt = key[:, :, :p], value[:, :, :p]
    sdpa = dict(scale=scaling, dropout_p=dropout, enable_gqa=gqa)
    pieces = [F.scaled_dot_product_attention(query[:, :, :p], k_prompt, v_prompt, is_causal=True, **sdpa)]
    end = p
    for start, n in layout.spans:
        if n == 0:
            continue
        # [n, p + n]: every prompt key, then causal over the completion's own keys.
        mask = torch.ones(n, p + n, dtype=torch.bool, device=query.device)
        mask[:, p:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril_()
        keys = torch.cat([k_prompt, key[:, :, start : start + n]], dim=2)
        values = torch.cat([v_prompt, value[:, :, start : start + n]], dim=2)
        q = query[:, :, start : start + n]
        pieces.append(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, **sdpa))
        end = start + n
    length = query.shape[2]
    if end < length:  # right padding: its output is never read, zeros keep it finite
        pieces.append(query.new_zeros(1, query.shape[1], length - end, query.shape[3]))
    return torch.cat(pieces, dim=2)


def _shared_prompt_attention(
    module: nn.Module,
    query: Tensor,  # [B, Hq, L, D]
    key: Tensor,  # [B, Hkv, L, D]
    value: Tensor,  # [B, Hkv, L, D]
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prompt_rows: tuple[RowLayout, ...] | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """`sdpa` for ordinary calls; for a packed forward (`shared_prompt_rows` given), row by row.

    The packed path gives the values of the 4-D mask in `attention_mask` without computing the
    scores that mask removes.
    """
    if shared_prompt_rows is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if len(shared_prompt_rows) != query.shape[0]:
        raise ValueError(f"shared_prompt_rows describes {len(shared_prompt_rows)} rows, the batch has {query.shape[0]}")
    rows = [
        _row_attention(query[b : b + 1], key[b : b + 1], value[b : b + 1], layout, scaling, dropout)
        for b, layout in enumerate(shared_prompt_rows)
    ]
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def enable_shared_prompt_attention(model: nn.Module) -> None:
    """Switch an `sdpa` model to `SHARED_PROMPT_ATTENTION` (registered here, idempotent).

    Every ordinary forward stays exactly `sdpa` (same function, same mask construction); only
    `completion_hidden_states(..., layout="packed")` takes the row-by-row path. The setting is
    not saved with the model (`_attn_implementation` is left out of `config.json`). Call it before
    wrapping the model (FSDP, peft), like any attention setting, and on the reference model too.
    Not to be called while another thread runs a forward of the same model (it changes the
    model's attention setting); registering in transformers' global registries is idempotent.
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == SHARED_PROMPT_ATTENTION:
        return
    if impl != "sdpa":
        raise ValueError(f"enable_shared_prompt_attention builds on 'sdpa'; the model uses {impl!r}")
    AttentionInterface.register(SHARED_PROMPT_ATTENTION, _shared_prompt_attention)
    AttentionMaskInterface.register(SHARED_PROMPT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SHARED_PROMPT_ATTENTION)


def _check_packable(model: nn.Module) -> None:
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = any(t != "full_attention" for t in layer_types)
    else:
        sliding = getattr(config, "sliding_window", None) is not None
    if sliding:
        raise ValueError(
            f"{type(model).__name__} has sliding-window (or other non-full) attention layers; the shared-prompt "
            "4-D mask would replace their window mask, so packing is refused (use layout='plain')"
        )
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError("models with final_logit_softcapping are not supported: logits are not hidden @ W.T")


def _hidden_with_mask(
    model: nn.Module,
    input_ids: Tensor,  # [B, L]
    attention_mask: Tensor,  # [B, 1, L, L]
    position_ids: Tensor,  # [B, L]
    **attention_kwargs,  # passed by transformers down to the attention function
) -> Tensor:  # [B, L, H]
    """Final hidden states with the packed rows' own mask and restarted positions, no logits."""
    return decoder_hidden_states(model, input_ids, attention_mask, position_ids, **attention_kwargs)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = model.get_input_embeddings().weight
    return weight.device, weight.dtype


def _packed_hidden(model: nn.Module, groups: Sequence[PromptGroup]) -> tuple[Tensor, Tensor]:
    _check_packable(model)
    device, dtype = _model_device_dtype(model)
    rows = pack_groups(groups)
    mask = _attention_mask_for(model, rows.segments.to(device), dtype)
    extra = {"shared_prompt_rows": rows.layouts} if model.config._attn_implementation == SHARED_PROMPT_ATTENTION else {}
    hidden = _hidden_with_mask(model, rows.input_ids.to(device), mask, rows.position_ids.to(device), **extra)
    return hidden, hidden[rows.predictor_row.to(device), rows.predictor_col.to(device)]


def _plain_hidden(model: nn.Module, groups: Sequence[PromptGroup]) -> tuple[Tensor, Tensor]:
    device, _ = _model_device_dtype(model)
    seqs = [g.prompt_ids + c for g in groups for c in g.completions]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    r = 0
    for group in groups:
        p = len(group.prompt_ids)
        for comp in group.completions:
            ids[r, : p + len(comp)] = torch.tensor(group.prompt_ids + comp, dtype=torch.long)
            attn[r, : p + len(comp)] = 1
            rows.extend([r] * len(comp))
            cols.extend(range(p - 1, p - 1 + len(comp)))
            r += 1
    hidden = policy_hidden_states(model, ids.to(device), attn.to(device))
    index_r = torch.tensor(rows, dtype=torch.long, device=device)
    index_c = torch.tensor(cols, dtype=torch.long, device=device)
    return hidden, hidden[index_r, index_c]


_LAYOUTS: dict[Layout, Callable[[nn.Module, Sequence[PromptGroup]], tuple[Tensor, Tensor]]] = {
    Layout.PACKED: _packed_hidden,
    Layout.PLAIN: _plain_hidden,
}


def _token_indices(groups: Sequence[PromptGroup], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    tokens: list[int] = []
    seq: list[int] = []
    grp: list[int] = []
    comp_idx: list[int] = []
    s = 0
    for gi, group in enumerate(groups):
        for ci, comp in enumerate(group.completions):
            tokens.extend(comp)
            seq.extend([s] * len(comp))
            grp.extend([gi] * len(comp))
            comp_idx.extend([ci] * len(comp))
            s += 1

    def as_long(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return as_long(tokens), as_long(seq), as_long(grp), as_long(comp_idx), s


def completion_hidden_states(
    model: nn.Module, groups: Sequence[PromptGroup], *, layout: Layout | str = Layout.PACKED
) -> CompletionStates:
    """Final hidden states predicting every completion token of `groups`, in one forward.

    `layout="packed"` computes each prompt once (one row per group, block mask); `"plain"` runs
    one right-padded row per completion. Both give the same values and gradients (to float
    round-off). The caller applies the head (`fused_policy_loss`, `token_logprobs`) to `hidden`.
    Every call runs a forward, even when no completion has a token (N = 0), so that all ranks
    under FSDP run the same collectives.
    """
    layout = Layout(layout)
    if len(groups) == 0:
        raise ValueError("completion_hidden_states needs at least one group")
    for i, g in enumerate(groups):
        if not isinstance(g, PromptGroup):
            raise TypeError(f"groups[{i}] must be a PromptGroup, got {type(g).__name__}")
    _, hidden = _LAYOUTS[layout](model, groups)
    token_ids, seq, grp, comp, num_seqs = _token_indices(groups, hidden.device)
    return CompletionStates(hidden, token_ids, seq, grp, comp, num_seqs)


@torch.no_grad()
def completion_logprobs(
    model: nn.Module,
    groups: Sequence[PromptGroup],
    *,
    temperature: float = 1.0,
    layout: Layout | str = Layout.PACKED,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:  # logp [N] float32, entropy [N] or None
    """log p(token | prompt, earlier completion tokens) at logits / T, per completion token.

    Same token order as `completion_hidden_states` (group -> completion -> token); no gradient.
    For the old-policy and reference log-probs of the loss.
    """
    states = completion_hidden_states(model, groups, layout=layout)
    weight, bias = lm_head_params(model)
    return token_logprobs(states.hidden, weight, states.token_ids, bias, temperature, chunk_size, with_entropy)


# ---------------------------------------------------------------------------------------------
# Micro-batches by token budget
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatch:
    """Groups (or parts of one group) computed in one forward.

    `sample_ids[s]` is the flat index, over all groups given to `split_by_token_budget` in
    order group -> completion, of this micro-batch's completion s (its `seq_index` s).
    """

    groups: tuple[PromptGroup, ...]
    sample_ids: tuple[int, ...]
    cost: int  # positions the forward computes: rows x longest row, padding included
    over_budget: bool  # one prompt + one completion alone exceeds the budget


def _rows_and_width(group: PromptGroup, layout: Layout) -> tuple[int, int]:
    if layout is Layout.PACKED:
        return 1, group.packed_length
    return len(group.completions), max(group.plain_lengths)


def _split_group(group: PromptGroup, first_id: int, max_tokens: int, layout: Layout) -> list[MicroBatch]:
    """Cut a group that exceeds the budget into consecutive runs of completions that fit.

    Each part repeats the prompt, so its prompt is computed once per part; the gradient is still
    that of the G separate sequences (each part is a valid group of its own).
    """
    parts: list[MicroBatch] = []
    chosen: list[int] = []

    def cost_of(indices: list[int]) -> int:
        sub = PromptGroup(group.prompt_ids, [group.completions[i] for i in indices])
        rows, width = _rows_and_width(sub, layout)
        return rows * width

    def close(indices: list[int]) -> None:
        sub = PromptGroup(group.prompt_ids, [group.completions[i] for i in indices])
        cost = cost_of(indices)
        parts.append(MicroBatch((sub,), tuple(first_id + i for i in indices), cost, cost > max_tokens))

    for i in range(len(group.completions)):
        if chosen and cost_of(chosen + [i]) > max_tokens:
            close(chosen)
            chosen = []
        chosen.append(i)
    close(chosen)
    return parts


def split_by_token_budget(
    groups: Sequence[PromptGroup], max_tokens: int, *, layout: Layout | str = Layout.PACKED
) -> list[MicroBatch]:
    """Consecutive groups into micro-batches whose forward computes at most `max_tokens` positions.

    Cost of a micro-batch = rows x longest row (the padded `[B, L]` the forward runs): one row
    per group when packed, one per completion when plain. Greedy, in the given order. A group is
    never split across micro-batches unless it alone exceeds the budget; then its completions are
    cut into consecutive runs that fit, each run with its own copy of the prompt (computed once per
    run). If the prompt plus a single completion exceeds the budget, that completion goes alone in
    a micro-batch marked `over_budget` (sequences are never cut; the caller may refuse it).
    """
    layout = Layout(layout)
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    batches: list[MicroBatch] = []
    current: list[PromptGroup] = []
    current_ids: list[int] = []
    rows = width = 0
    next_id = 0

    def flush() -> None:
        nonlocal current, current_ids, rows, width
        if current:
            batches.append(MicroBatch(tuple(current), tuple(current_ids), rows * width, False))
        current, current_ids, rows, width = [], [], 0, 0

    for group in groups:
        g_rows, g_width = _rows_and_width(group, layout)
        ids = list(range(next_id, next_id + len(group.completions)))
        next_id += len(group.completions)
        if g_rows * g_width > max_tokens:
            flush()
            batches.extend(_split_group(group, ids[0], max_tokens, layout))
            continue
        if current and (rows + g_rows) * max(width, g_width) > max_tokens:
            flush()
        current.append(group)
        current_ids.extend(ids)
        rows, width = rows + g_rows, max(width, g_width)
    flush()
    return batches
