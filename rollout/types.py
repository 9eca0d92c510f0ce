"""Types shared by every rollout backend: sampling parameters, completions, the engine protocol.

A prompt is one of three things, told apart by type:
- `str`: raw text, tokenized as is (the tokenizer's special tokens, e.g. BOS, added as for any text);
- a sequence of `{"role": ..., "content": ...}` mappings: chat messages, rendered with the
  tokenizer's chat template and a generation prompt (see `rollout.chat`);
- a sequence of `int`: token ids, used unchanged.

Every backend returns, per prompt, `n` `Completion`s whose `logprobs` are the log-probabilities of
the sampled tokens under the model's unmodified next-token distribution (log-softmax of the raw
logits: temperature 1, no top-p), the quantity `trainers.logprobs` computes with temperature 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

Message = Mapping[str, str]
Prompt = str | Sequence[Message] | Sequence[int]
FinishReason = Literal["stop", "length"]


class RolloutError(Exception):
    """Base class of the errors raised by the rollout package."""


class InvalidRequestError(RolloutError, ValueError):
    """A generation request that cannot be served as asked (too long, malformed prompt, ...)."""


class WeightSyncError(RolloutError, ValueError):
    """A weight update that was refused (unknown name, wrong shape, missing tensors, ...)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature == 0` means greedy decoding.

    `stop` strings end a completion once its decoded text contains one of them; the token that
    completes the stop string is kept (with its log-prob), the text is cut before the stop string.
    `ignore_eos` keeps generating past end-of-sequence tokens (for throughput benchmarks).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise InvalidRequestError(f"n must be an integer >= 1, got {self.n!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One sampled completion of one prompt."""

    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # [len(token_ids)] log p(token_t | prompt, tokens_<t)
    text: str
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"a completion needs one log-prob per token: {len(self.token_ids)} tokens, "
                f"{len(self.logprobs)} log-probs"
            )


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer, the rollout server and session rollout need from a generator."""

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order and sample order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load the complete set of policy weights (Hugging Face names); refuse, unchanged, on error."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...
