"""Types shared by every rollout backend: sampling parameters, completions, the engine protocol.

A prompt is one of three things, told apart by type:
- `str`: raw text, tokenized as is (the tokenizer's special tokens, e.g. BOS, added as for any text);
- a sequence of `{"role": ..., "content": ...}` mappings: chat messages, rendered with the
  tokenizer's chat template and a generation prompt (see `rollout.chat`);
- a sequence of `int`: token ids, used unchanged.

Every backend returns, per prompt, `n` `Completion`s whose `logprobs` are the log-probabilities of
the sampled tokens under the model's unmodified next-token distribution (log-softmax of the raw
logits: temperature 1, no top-p), the quantity `trainers.logprobs` computes with temperature 1. They are not the log-probs of the
distribution that was sampled from when `temperature != 1` or `top_p < 1`: a trainer that needs
those (e.g. as "old" log-probs of an importance ratio at T = 0.8) must recompute them.

Seeds (the same on every backend): `seed=None` draws fresh randomness on every call. With
`seed=s` a call is reproducible: the same prompts with the same parameters and the same weights
give the same samples again, on every call (so a trainer that wants new samples each step must
pass a new seed each step, e.g. derived from the step number). Each prompt samples with a seed of
its own, derived from s, its tokens and how many identical prompts came before it in the call
(`prompt_seeds`); sample j uses that seed + j. So identical prompts in one call get different
samples, the n samples of one prompt differ, and a seeded prompt's samples do not depend on the
other prompts of the call or their order (up to the float rounding of batched matrix products).
The same seed gives different samples on different backends. Seeds lie in [0, 2**63 - 1]
(`MAX_SEED`): a 64-bit hash must be reduced first, e.g. `h % (MAX_SEED + 1)`.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

Message = Mapping[str, str]
Prompt = str | Sequence[Message] | Sequence[int]
FinishReason = Literal["stop", "length"]
MAX_SEED = 2**63 - 1  # vLLM's samplers keep seeds in int64: a larger one fails inside its scheduler


class RolloutError(Exception):
    """Base class of the errors raised by the rollout package."""


class InvalidRequestError(RolloutError, ValueError):
    """A generation request that cannot be served as asked (too long, malformed prompt, ...)."""


class WeightSyncError(RolloutError, ValueError):
    """A weight update that was refused (unknown name, wrong shape, missing tensors, ...) or failed."""


class GenerationCancelled(RolloutError):
    """A `generate` call stopped by the engine's `cancel()` (e.g. a server shutting down)."""


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
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequestError(
                f"seed must lie in [0, 2**63 - 1], got {self.seed}; reduce a 64-bit hash with "
                f"h % 2**63 first"
            )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def per_prompt_params(params: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    """One `SamplingParams` per prompt: `params` repeated, or a list of `count` of them checked."""
    if isinstance(params, SamplingParams):
        return [params] * count
    if isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
        raise InvalidRequestError(f"params must be SamplingParams or a list of them, got {type(params).__name__}")
    params = list(params)
    if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
        raise InvalidRequestError(f"a list of params needs one SamplingParams per prompt: {len(params)} for {count}")
    return params


def prompt_seeds(params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]]) -> list[int | None]:
    """The seed each prompt samples with (module docstring): derived from the call's seed, the
    prompt's tokens and how many identical prompts with the same seed came before it in the call,
    so identical prompts get different randomness and a prompt's seed does not depend on its
    batch-mates. Each derived seed leaves room for the `n - 1` consecutive seeds vLLM gives a
    prompt's samples (seed + j for sample j)."""
    seen: dict[tuple[int, tuple[int, ...]], int] = {}
    out: list[int | None] = []
    for p, ids in zip(params, prompt_ids, strict=True):
        if p.seed is None:
            out.append(None)
            continue
        key = (p.seed, tuple(ids))
        occurrence = seen.get(key, 0)
        seen[key] = occurrence + 1
        h = hashlib.blake2b(f"{p.seed}:{occurrence}:".encode(), digest_size=8)
        h.update(array("q", ids).tobytes())
        out.append(int.from_bytes(h.digest(), "little") % (MAX_SEED + 2 - p.n))
    return out


@dataclass(frozen=True)
class Completion:
    """One sampled completion of one prompt."""

    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # [len(token_ids)] log p(token_t | prompt, tokens_<t)
    text: str
    finish_reason: FinishReason
    # The engine's weight version when this sample was generated (0: the weights it started
    # with; each push sets a new one), None where the backend does not say.
    weight_version: int | None = None

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
        """Load the complete set of policy weights (Hugging Face names); refuse, unchanged, on error.

        Every engine also takes `version=` (int): the weight version later completions report;
        without it the version goes up by one."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory while the trainer runs (1: offload weights, 2: drop them, a push
        must follow); `generate` is refused until `wake_up`. A no-op where there is nothing to free."""
        ...

    def wake_up(self) -> None:
        """Undo `sleep` (after a level-2 sleep, only once weights were pushed)."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...
