"""Prompt rendering and completion finishing, done the same way for every backend.

Backends differ in how they sample, never in what the prompt tokens are or where a completion
ends: both sides of that go through this module. Chat messages are rendered with the tokenizer's
own chat template to text (with the generation prompt) and then tokenized without adding special
tokens, since the template already holds them; this is also what vLLM and `vllm serve` do.

A completion ends at the first end-of-sequence token (kept, with its log-prob) or at the first
token whose decoded prefix contains a stop string (kept; the text is cut before the stop string),
whichever comes first; otherwise at `max_tokens` with finish reason "length".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from rollout.types import Completion, FinishReason, InvalidRequestError, Prompt, SamplingParams


def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the characters one token stands for: the longest vocabulary entry.

    Byte-level BPE entries hold one character per byte and SentencePiece entries one per
    character (byte-fallback entries such as `<0x0A>` are longer than the byte they stand for),
    so no token decodes to more characters than its entry has. Cached on the tokenizer."""
    cached = getattr(tokenizer, "_rollout_max_token_chars", None)
    if cached is None:
        cached = max(len(t) for t in tokenizer.get_vocab())
        tokenizer._rollout_max_token_chars = cached
    return cached


def check_text_length(tokenizer: PreTrainedTokenizerBase, text: str, max_model_len: int) -> None:
    """Refuse, before tokenizing it, a text too long to fit the context whatever its tokens are:
    tokenizing a 20 MB text costs seconds of CPU only to be refused afterwards."""
    limit = max_model_len * max_token_chars(tokenizer)
    if len(text) > limit:
        raise InvalidRequestError(
            f"the prompt has {len(text)} characters: more than the model's context of {max_model_len} "
            f"tokens can hold (at most {max_token_chars(tokenizer)} characters per token)"
        )


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    *,
    vocab_size: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    max_model_len: int | None = None,
) -> list[int]:
    """Token ids of a text, chat or token-id prompt (see `rollout.types` for the three forms).

    With `max_model_len`, a text (or chat) far too long for the context is refused before it is
    tokenized (`check_text_length`); the exact check against the token count is `check_length`."""
    if isinstance(prompt, str):
        if max_model_len is not None:
            check_text_length(tokenizer, prompt, max_model_len)
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    elif isinstance(prompt, Sequence) and prompt and all(_is_token_id(x) for x in prompt):
        ids = [int(x) for x in prompt]
        limit = vocab_size if vocab_size is not None else len(tokenizer)
        bad = [x for x in ids if not 0 <= x < limit]
        if bad:
            raise InvalidRequestError(f"token ids must lie in [0, {limit}), got {bad[:5]}")
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        messages = [_check_message(i, m) for i, m in enumerate(prompt)]
        if tokenizer.chat_template is None:
            raise InvalidRequestError("chat messages given but the tokenizer has no chat template")
        if max_model_len is not None:  # the template only adds text: the contents alone must fit
            check_text_length(tokenizer, "".join(m["content"] for m in messages), max_model_len)
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **dict(chat_template_kwargs or {})
        )
        if max_model_len is not None:
            check_text_length(tokenizer, text, max_model_len)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        raise InvalidRequestError(
            "a prompt must be a string, a non-empty list of chat messages {'role', 'content'} or a "
            f"non-empty list of token ids, got {type(prompt).__name__}: {str(prompt)[:80]!r}"
        )
    if not ids:
        raise InvalidRequestError("the prompt is empty after tokenization")
    return ids


def _is_token_id(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_message(index: int, message: Mapping[str, Any]) -> dict[str, str]:
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
        raise InvalidRequestError(
            f"message {index} needs a string 'role' and a string 'content', got {dict(message)!r:.120}"
        )
    return {"role": role, "content": content}


def eos_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_eos: int | Iterable[int] | None = None
) -> frozenset[int]:
    """The tokenizer's EOS id together with the model's generation-config EOS id(s)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos is not None:
        ids.update(int(i) for i in generation_eos)
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config names an EOS token")
    return frozenset(ids)


def check_length(prompt_ids: Sequence[int], max_tokens: int, max_model_len: int) -> None:
    """Refuse a prompt that cannot be completed within the model's context."""
    if len(prompt_ids) + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_ids)} tokens; with max_tokens={max_tokens} that exceeds the "
            f"model's context of {max_model_len} tokens"
        )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_tokens: int | Sequence[int],
    *,
    vocab_size: int,
    max_model_len: int,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Token ids of every prompt, rendered the same way for all backends, each checked to leave
    room for its `max_tokens` (one for all, or one per prompt) new tokens inside `max_model_len`."""
    budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} max_tokens values for {len(prompts)} prompts")
    out = []
    for prompt, budget in zip(prompts, budgets, strict=True):
        ids = render_prompt(
            tokenizer, prompt, vocab_size=vocab_size, max_model_len=max_model_len,
            chat_template_kwargs=chat_template_kwargs,
        )
        check_length(ids, budget, max_model_len)
        out.append(ids)
    return out


def finish_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[int],
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    params: SamplingParams,
    eos_ids: frozenset[int],
) -> Completion:
    """Cut raw sampled tokens where the completion ends and decode its text (module docstring)."""
    token_ids = [int(t) for t in token_ids[: params.max_tokens]]
    end, reason = len(token_ids), "length"
    if not params.ignore_eos:
        for i, t in enumerate(token_ids):
            if t in eos_ids:
                end, reason = i + 1, "stop"
                break
    text = _decode(tokenizer, token_ids[:end])
    if params.stop and _find_stop(text, params.stop) is not None:
        # The decoded prefix grows with the number of tokens, so the first token whose prefix
        # holds a stop string can be found by bisection.
        lo, hi = 1, end
        while lo < hi:
            mid = (lo + hi) // 2
            if _find_stop(_decode(tokenizer, token_ids[:mid]), params.stop) is None:
                lo = mid + 1
            else:
                hi = mid
        end, reason = lo, "stop"
        prefix = _decode(tokenizer, token_ids[:end])
        text = prefix[: _find_stop(prefix, params.stop)]
    finish: FinishReason = "stop" if reason == "stop" else "length"
    return Completion(
        prompt_token_ids=tuple(int(t) for t in prompt_ids),
        token_ids=tuple(token_ids[:end]),
        logprobs=tuple(float(x) for x in logprobs[:end]),
        text=text,
        finish_reason=finish,
    )


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
