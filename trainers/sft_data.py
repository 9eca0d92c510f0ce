"""SFT data: chat-format (prompt messages, target) pairs to token ids with loss on the target only.

Rendering: the prompt is the chat template of the prompt messages with the generation prompt
(`<|im_start|>assistant\\n` for ChatML); the target is what the template adds when the assistant
turn is appended, up to and including the end-of-turn token. The end-of-turn token is read off
the template (`end_of_turn_token`), not assumed to be eos: a base model's tokenizer often has
eos `<|endoftext|>` while its ChatML template ends turns with `<|im_end|>`, and the target must
end where generation should stop, not run on into `<|im_end|>\\n<|endoftext|>`. Only a template
that ends the turn without any special token gets eos appended. Template options (Qwen3's
`enable_thinking=False`, `data.chat_template_kwargs` in the config) are passed to every render;
the rollout renders RL prompts with the same options (`rollout.chat.render_prompt`) so the policy
sees one prompt format. Prompt and target text are tokenized separately, as at generation time,
where the prompt is tokenized and the model emits the target tokens. Labels are -100 on every
prompt token.

Batching: length-grouped, not packed. Each epoch shuffles the examples with a generator seeded
by (seed, epoch), sorts chunks of `group_size` global batches by length and shuffles the batch
order, so padding stays small and a position in the data (epoch, batch index) is reproducible
for exact resumes. Packing was not chosen because it needs per-example position-id resets or
variable-length attention to keep examples from attending to each other.

Rows in a JSONL file: `{"messages": [{"role": ..., "content": ...}, ...], "target": "..."}` or
`{"prompt": "..." | [messages], "completion": "..."}`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class SFTDataError(ValueError):
    """A malformed SFT row or a chat template that cannot separate prompt from target."""


@dataclass(frozen=True)
class SFTPair:
    messages: tuple[dict[str, str], ...]  # prompt messages, in order
    target: str  # the assistant reply to learn


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]  # prompt then target tokens
    labels: list[int]  # IGNORE_INDEX on prompt tokens, the token id on target tokens

    def __len__(self) -> int:
        return len(self.input_ids)


# A few memory-agent style pairs so the default config trains without any data file.
_SYSTEM = "You are the episodic memory agent. Record each event with its absolute date."
BUILTIN_PAIRS: tuple[SFTPair, ...] = tuple(
    SFTPair(({"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}), target)
    for user, target in [
        (
            "Session date: 8 May, 2023. Caroline: I went to a support group yesterday.",
            '{"operations": [{"action": "ADD", "memory": "Caroline went to a support group on 7 May 2023."}]}',
        ),
        (
            "Session date: 8 May, 2023. Melanie: I just signed up for a pottery class.",
            '{"operations": [{"action": "ADD", "memory": "Melanie signed up for a pottery class on 8 May 2023."}]}',
        ),
        (
            "Session date: 8 May, 2023. Caroline: Hey Mel! How have you been?",
            '{"operations": [{"action": "SKIP", "reason": "nothing new"}]}',
        ),
        (
            "Session date: 9 May, 2023. Melanie: We took a trip to Paris last week.",
            '{"operations": [{"action": "ADD", "memory": "Melanie took a trip to Paris in early May 2023."}]}',
        ),
        (
            "Session date: 9 May, 2023. Caroline: Good to see you!",
            '{"operations": [{"action": "SKIP", "reason": "nothing new"}]}',
        ),
        (
            "Session date: 1 June, 2023. Melanie: I moved from Boston to Denver.",
            '{"operations": [{"action": "UPDATE", "id": "S3", "new_memory": "Melanie lives in Denver."}]}',
        ),
    ]
)


def _check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: must be a non-empty list of {{'role', 'content'}} messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise SFTDataError(f"{where}[{i}]: must be an object with string 'role' and 'content', got {msg!r}")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def pair_from_row(row: Any, where: str = "row") -> SFTPair:
    """An `SFTPair` from one JSONL row; `where` prefixes the error message (e.g. "data.jsonl line 3")."""
    if not isinstance(row, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _check_messages(row["messages"], f"{where}: field 'messages'")
        if not isinstance(row.get("target"), str):
            raise SFTDataError(f"{where}: field 'target' must be a string, got {row.get('target')!r}")
        return SFTPair(messages, row["target"])
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            messages = ({"role": "user", "content": prompt},)
        else:
            messages = _check_messages(prompt, f"{where}: field 'prompt'")
        if not isinstance(row.get("completion"), str):
            raise SFTDataError(f"{where}: field 'completion' must be a string, got {row.get('completion')!r}")
        return SFTPair(messages, row["completion"])
    raise SFTDataError(f"{where}: needs 'messages' and 'target', or 'prompt' and 'completion' (got keys {sorted(row)})")


def read_pairs(path: str | Path) -> list[SFTPair]:
    """All pairs of a JSONL file (blank lines skipped); errors name the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"SFT data file not found: {path}")
    pairs = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SFTDataError(f"{where}: not valid JSON ({exc.msg})") from exc
            pairs.append(pair_from_row(row, where))
    if not pairs:
        raise SFTDataError(f"SFT data file {path} holds no rows")
    return pairs


def _apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool,
                    kwargs: Mapping[str, Any]) -> str:
    if tokenizer.chat_template is None:
        raise SFTDataError("the tokenizer has no chat template to render the SFT pairs with")
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False, **dict(kwargs)
    )


def _split_reply(prompt_text: str, full_text: str) -> str:
    """What the template adds for the assistant turn, or an error if the prompt is not a prefix."""
    if not full_text.startswith(prompt_text):
        raise SFTDataError(
            "the chat template renders the prompt differently once the assistant turn is appended, so "
            f"prompt and target cannot be separated; prompt ends {prompt_text[-60:]!r}, "
            f"full text has {full_text[max(0, len(prompt_text) - 60) : len(prompt_text)]!r} there"
        )
    return full_text[len(prompt_text) :]


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    # all_special_tokens holds only the named roles (eos, pad, ...): ChatML's <|im_start|> and
    # <|im_end|> are often plain added tokens flagged special.
    found = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return found | set(tokenizer.all_special_tokens)


_PROBE = ([{"role": "user", "content": "Say pong."}], "pong")


def end_of_turn_token(
    tokenizer: PreTrainedTokenizerBase, chat_template_kwargs: Mapping[str, Any] | None = None
) -> str | None:
    """The special token the chat template closes an assistant turn with, or None if it uses none.

    Read off the template itself: a probe conversation is rendered with and without an assistant
    reply, and the first special token after the reply text is the end of the turn (`<|im_end|>`
    for ChatML whatever the tokenizer's eos is, `<|eot_id|>` for Llama 3). The answer is cached on
    the tokenizer per template and options (safe to call concurrently: a race computes it twice).
    """
    kwargs = dict(chat_template_kwargs or {})
    key = (
        repr(tokenizer.chat_template),
        json.dumps(kwargs, sort_keys=True, default=repr),
        len(tokenizer.added_tokens_decoder),  # special tokens added later change the answer
    )
    cache = tokenizer.__dict__.setdefault("_sft_end_of_turn", {})
    if key in cache:
        return cache[key]
    messages, reply = _PROBE
    prompt_text = _apply_template(tokenizer, messages, True, kwargs)
    full_text = _apply_template(tokenizer, messages + [{"role": "assistant", "content": reply}], False, kwargs)
    added = _split_reply(prompt_text, full_text)
    at = added.find(reply)
    if at < 0:
        raise SFTDataError(f"the chat template does not render an assistant reply as written: {added!r:.120}")
    after = added[at + len(reply) :]
    hits = [(after.find(tok), -len(tok), tok) for tok in _special_tokens(tokenizer) if tok in after]
    eot = min(hits)[2] if hits else None  # the earliest; the longest of those starting together
    cache[key] = eot
    return eot


def stop_at_end_of_turn(model, tokenizer: PreTrainedTokenizerBase,
                        chat_template_kwargs: Mapping[str, Any] | None = None) -> None:
    """Add the template's end-of-turn token to the model's generation-config eos ids.

    SFT teaches the model to end its reply with the end-of-turn token (`render_pair`); when that
    is not the tokenizer's eos (a base model's `<|endoftext|>` with ChatML turns), generation must
    stop there too, or every rollout runs to max_tokens. The checkpoint's generation_config.json
    then carries it to `from_pretrained`, vLLM and the rollout engines, as instruct models ship it.
    """
    eot = end_of_turn_token(tokenizer, chat_template_kwargs)
    config = getattr(model, "generation_config", None)
    if eot is None or config is None:
        return
    before = config.eos_token_id
    ids = [] if before is None else [before] if isinstance(before, int) else list(before)
    for extra in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(eot)):
        if extra is not None and extra not in ids:
            ids.append(extra)
    config.eos_token_id = ids[0] if len(ids) == 1 else ids


def render_pair(
    tokenizer: PreTrainedTokenizerBase, pair: SFTPair, chat_template_kwargs: Mapping[str, Any] | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of a pair; the target ends with the end-of-turn token.

    `chat_template_kwargs` are extra template variables (e.g. {"enable_thinking": False}); the
    rollout must render prompts with the same ones. The end-of-turn token is the template's
    (`end_of_turn_token`); eos is appended only when the template ends turns without one.
    """
    kwargs = dict(chat_template_kwargs or {})
    messages = list(pair.messages)
    prompt_text = _apply_template(tokenizer, messages, True, kwargs)
    full_text = _apply_template(tokenizer, messages + [{"role": "assistant", "content": pair.target}], False, kwargs)
    target_text = _split_reply(prompt_text, full_text)
    eot = end_of_turn_token(tokenizer, kwargs)
    if eot is not None:
        end = target_text.rfind(eot)
        if end < 0:
            raise SFTDataError(
                f"the chat template closed the probe turn with {eot!r} but not this pair's turn: {target_text[-80:]!r}"
            )
        # What the template puts after the end-of-turn token (a newline in ChatML, or eos) is not
        # part of the reply: generation stops at the end of the turn.
        target_text = target_text[: end + len(eot)]
        end_id = tokenizer.convert_tokens_to_ids(eot)
    else:
        if tokenizer.eos_token_id is None:
            raise SFTDataError("the chat template ends turns without a special token and the tokenizer has no eos")
        end_id = tokenizer.eos_token_id
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target_text, add_special_tokens=False)["input_ids"]
    if eot is None and (not target_ids or target_ids[-1] != end_id):
        target_ids = target_ids + [end_id]
    if target_ids[-1] != end_id:
        raise SFTDataError(f"the end-of-turn token {eot!r} does not tokenize to its own id {end_id}")
    return prompt_ids, target_ids


Truncation = Literal["truncate", "drop"]


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    pair: SFTPair,
    max_length: int,
    truncation: Truncation = "truncate",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[TokenizedExample | None, str]:
    """Tokenize one pair; returns (example or None when dropped, "ok" | "prompt_cut" | "dropped").

    Over `max_length`: "truncate" keeps the whole target and the last prompt tokens that fit;
    an example whose target alone does not fit (at least one prompt token must precede it) is
    dropped under either policy.
    """
    prompt_ids, target_ids = render_pair(tokenizer, pair, chat_template_kwargs)
    status = "ok"
    if len(prompt_ids) + len(target_ids) > max_length:
        if truncation == "drop" or len(target_ids) >= max_length:
            return None, "dropped"
        prompt_ids = prompt_ids[len(prompt_ids) + len(target_ids) - max_length :]
        status = "prompt_cut"
    example = TokenizedExample(
        input_ids=prompt_ids + target_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + target_ids,
    )
    return example, status


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[SFTPair],
    max_length: int,
    truncation: Truncation = "truncate",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[TokenizedExample]:
    """Tokenize all pairs, warning once with the counts of cut and dropped examples."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    examples, cut, dropped = [], 0, 0
    for pair in pairs:
        example, status = tokenize_pair(tokenizer, pair, max_length, truncation, chat_template_kwargs)
        cut += status == "prompt_cut"
        dropped += status == "dropped"
        if example is not None:
            examples.append(example)
    if cut or dropped:
        warnings.warn(
            f"SFT data: {cut + dropped} of {len(pairs)} examples exceed max_length={max_length} tokens: "
            f"{cut} had their prompt cut from the left, {dropped} were dropped "
            f"(truncation={truncation!r}; a target that alone does not fit is always dropped)",
            stacklevel=2,
        )
    if not examples:
        raise SFTDataError(f"no SFT example fits in max_length={max_length}")
    return examples


def epoch_batches(
    lengths: list[int],
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = True,
    group_size: int = 8,
) -> list[list[int]]:
    """The global batches (lists of example indices) of one epoch, a pure function of its inputs.

    The order is padded to a multiple of `batch_size` by repeating its first indices, so every
    process always gets a full micro-batch.
    """
    n = len(lengths)
    if n == 0 or batch_size < 1:
        raise ValueError(f"need examples and batch_size >= 1 (got {n} examples, batch_size {batch_size})")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n).tolist() if shuffle else list(range(n))
    pad = -n % batch_size
    order += [order[i % n] for i in range(pad)]
    if group_by_length:
        chunk = batch_size * group_size
        order = [
            i
            for start in range(0, len(order), chunk)
            for i in sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def micro_batches(
    global_batch: list[int], num_processes: int, process_index: int, grad_accum_steps: int
) -> list[list[int]]:
    """This process's `grad_accum_steps` micro-batches of a global batch.

    Micro-step a of process r takes slice a * num_processes + r, so with length grouping the
    processes work on similar lengths at the same time.
    """
    parts = num_processes * grad_accum_steps
    if len(global_batch) % parts:
        raise ValueError(f"global batch of {len(global_batch)} does not split into {parts} micro-batches")
    size = len(global_batch) // parts
    return [
        global_batch[(a * num_processes + process_index) * size : (a * num_processes + process_index + 1) * size]
        for a in range(grad_accum_steps)
    ]


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels, each [B, T] with T the longest."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        attention_mask[row, : len(e)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
