"""transformers backend: batched `generate` with left padding; the reference for the other backends.

Each prompt is repeated `n` times and the rows are generated in micro-batches of at most
`max_batch_size` sequences, sorted by prompt length so that little padding is wasted. The
log-prob of each sampled token is read from the raw logits (a `LogitsProcessor` placed ahead of
generate's temperature / top-p warpers sees the unmodified float32 logits), one step behind, so
only one `[B, V]` log-softmax is held at a time instead of `[B, T, V]`.

Sampling: every sequence (prompt i, sample j) draws its tokens from a generator of its own, seeded
with the prompt's derived seed + j (`rollout.types.prompt_seeds`, the seeds vLLM uses), so a seeded
prompt's samples do not depend on the other prompts of the call, their order or the micro-batch
(up to the float rounding of batched matrix products). transformers' `generate` runs greedy; a
`LogitsProcessor` applies temperature and transformers' `TopPLogitsWarper`, samples each row by
inverse CDF with one uniform draw from its generator per step, and leaves only the sampled token
for the argmax. Unseeded prompts get a fresh base
seed from torch's global generator on every call (so `torch.manual_seed` makes them repeatable).

The engine owns its model: its `generation_config` is replaced with a neutral one at construction
so that only `SamplingParams` shape the distribution (a checkpoint's repetition penalty or top-k
would otherwise leak in).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dataclasses
import threading

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TopPLogitsWarper,
)

from rollout.chat import encode_prompts, eos_token_ids, finish_completion
from rollout.types import (
    MAX_SEED,
    Completion,
    GenerationCancelled,
    Prompt,
    SamplingParams,
    per_prompt_params,
    prompt_seeds,
)
from rollout.weight_sync import WeightSpec, full_tensor, push_source


class _SampledLogprobs(LogitsProcessor):
    """Records log p(sampled token) from the raw logits, one generation step behind."""

    def __init__(self, engine: HFEngine) -> None:
        self._engine = engine
        self._pending: Tensor | None = None  # [B, V] log-softmax of the previous step
        self.steps: list[Tensor] = []  # each [B]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._engine.progress += 1
        self._take(input_ids[:, -1])
        self._pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, last_tokens: Tensor) -> None:
        if self._pending is not None:
            self.steps.append(self._pending.gather(-1, last_tokens[:, None])[:, 0])
            self._pending = None

    def finish(self, sequences: Tensor, num_new: int) -> Tensor:
        """[B, num_new] log-probs of the generated tokens in `sequences` ([B, P + num_new])."""
        self._take(sequences[:, -1])
        if len(self.steps) != num_new:
            raise RuntimeError(f"recorded {len(self.steps)} log-prob steps for {num_new} generated tokens")
        if num_new == 0:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
        return torch.stack(self.steps, dim=1)


class _RowSampler(LogitsProcessor):
    """Samples each row's next token with the row's own generator; returns scores whose argmax is it.

    Placed after `_SampledLogprobs`, which has already read the raw logits. The distribution is
    transformers' own: logits / temperature, then `TopPLogitsWarper` (which keeps at least one
    token), then a softmax; the token is the first whose cumulative probability exceeds
    u * total, u ~ U[0, 1) drawn from the row's generator."""

    def __init__(self, generators: list[torch.Generator], params: SamplingParams) -> None:
        self.generators = generators
        self.temperature = float(params.temperature)
        self.top_p = TopPLogitsWarper(float(params.top_p)) if params.top_p < 1 else None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logits = scores.float() / self.temperature
        if self.top_p is not None:
            logits = self.top_p(input_ids, logits)
        probs = torch.softmax(logits, dim=-1)
        # Inverse-CDF sampling, batched: one uniform per row from the row's generator, then the
        # first token whose cumulative probability exceeds it (zero-probability tokens, cut by
        # top-p, have empty intervals and are never picked).
        u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in self.generators])
        cdf = probs.cumsum(dim=-1)
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        tokens.clamp_(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tokens[:, None], 0.0)
        return out


class _Cancelled(StoppingCriteria):
    """Ends every row at the next step once the engine's `cancel()` was called."""

    def __init__(self, engine: HFEngine) -> None:
        self._engine = engine

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        return torch.full((input_ids.shape[0],), self._engine._cancelled, dtype=torch.bool, device=input_ids.device)


class HFEngine:
    """Rollout engine on a transformers causal LM (CPU or GPU)."""

    # Every sequence has its own generator (module docstring): a seeded prompt's samples do not
    # depend on its batch-mates, so the rollout server may merge seeded requests.
    seed_per_prompt = True

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_batch_size: int = 64,
        max_model_len: int | None = None,
        gguf_file: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        show_progress: bool = False,
    ):
        if isinstance(model, (str, Path)):
            extra = {"gguf_file": gguf_file} if gguf_file else {}
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model), **extra)
            model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, **extra)
        elif tokenizer is None:
            raise ValueError("a tokenizer is needed when the engine is given a model object")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.show_progress = show_progress
        self.eos_ids = eos_token_ids(tokenizer, model.generation_config.eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        # No EOS here: each call passes its own (none for `ignore_eos`), and a None in the call's
        # config would otherwise be filled in from this one.
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id)
        self.max_model_len = max_model_len or int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.weight_spec = WeightSpec.from_model(self.model)
        self.weight_version = 0
        self.progress = 0  # decode steps taken so far: the rollout server's sign of life
        self._state_lock = threading.Lock()
        self._running = self._cancelled = False
        self._asleep = False

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        """`n` completions per prompt (see `rollout.types.RolloutEngine`); `params` may be one
        `SamplingParams` per prompt. Prompts whose parameters differ only in the seed are generated
        together; every sequence samples with its own generator (module docstring). Not reentrant (one call at a time);
        `cancel()` may be called from any thread."""
        if self._asleep:
            raise RuntimeError("the engine is asleep: call wake_up() before generate()")
        if not prompts:
            return []
        per_prompt = per_prompt_params(params, len(prompts))
        prompt_ids = encode_prompts(
            self.tokenizer, prompts, [p.max_tokens for p in per_prompt], vocab_size=self.vocab_size,
            max_model_len=self.max_model_len, chat_template_kwargs=self.chat_template_kwargs,
        )
        seeds = [
            int(torch.randint(0, MAX_SEED + 1 - p.n, ())) if s is None else s
            for s, p in zip(prompt_seeds(per_prompt, prompt_ids), per_prompt, strict=True)
        ]
        groups: dict[SamplingParams, list[int]] = {}
        for i, p in enumerate(per_prompt):
            groups.setdefault(dataclasses.replace(p, seed=None), []).append(i)
        version = self.weight_version
        results: list[list[Completion]] = [[] for _ in prompts]
        with self._state_lock:
            self._running, self._cancelled = True, False
        try:
            for p, indices in groups.items():
                group = self._generate_group([prompt_ids[i] for i in indices], [seeds[i] for i in indices], p)
                for i, samples in zip(indices, group, strict=True):
                    results[i] = [dataclasses.replace(c, weight_version=version) for c in samples]
        finally:
            with self._state_lock:
                self._running = False
        return results

    def _generate_group(
        self, prompt_ids: list[list[int]], seeds: list[int], params: SamplingParams
    ) -> list[list[Completion]]:
        rows = sorted(
            ((i, j) for i in range(len(prompt_ids)) for j in range(params.n)), key=lambda r: len(prompt_ids[r[0]])
        )
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompt_ids]
        chunks = [rows[k : k + self.max_batch_size] for k in range(0, len(rows), self.max_batch_size)]
        with torch.inference_mode():
            for chunk in tqdm(chunks, desc="generate (transformers)", disable=not self.show_progress):
                batch = [prompt_ids[i] for i, _ in chunk]
                generators = [] if params.greedy else [
                    torch.Generator(self.device).manual_seed(seeds[i] + j) for i, j in chunk
                ]
                completions = self._generate_batch(batch, params, generators)
                if self._cancelled:
                    raise GenerationCancelled("generation cancelled (the server is shutting down?)")
                for (i, j), completion in zip(chunk, completions, strict=True):
                    results[i][j] = completion
        return [[c for c in per_prompt if c is not None] for per_prompt in results]

    def cancel(self) -> None:
        """Make the `generate` call in progress (if any) stop at its next decode step and raise
        `GenerationCancelled`; safe to call from any thread."""
        with self._state_lock:
            if self._running:
                self._cancelled = True

    def _generate_batch(
        self, batch: list[list[int]], params: SamplingParams, generators: list[torch.Generator]
    ) -> list[Completion]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, ids in enumerate(batch):
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            attention_mask[b, width - len(ids) :] = 1
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=False,  # sampling, if any, is _RowSampler's
            eos_token_id=None if params.ignore_eos else sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            stop_strings=list(params.stop) or None,
        )
        recorder = _SampledLogprobs(self)
        processors = [recorder] if params.greedy else [recorder, _RowSampler(generators, params)]
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([_Cancelled(self)]),
            **({"tokenizer": self.tokenizer} if params.stop else {}),
        )
        new = sequences[:, width:]
        logprobs = recorder.finish(sequences, new.shape[1]).cpu()
        new = new.cpu()
        return [
            finish_completion(self.tokenizer, ids, new[b].tolist(), logprobs[b].tolist(), params, self.eos_ids)
            for b, ids in enumerate(batch)
        ]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], *, version: int | None = None) -> None:
        """Copy a complete, validated set of weights into the model (refused as a whole on error);
        completions report `version` from now on (default: the previous version + 1). A
        `LazyWeights` (e.g. `policy_weights` of a LoRA policy) is validated from its metadata, then
        merged and copied one tensor at a time."""
        metas, named = push_source(named_tensors)
        self.weight_spec.check(metas)
        params = dict(self.model.named_parameters())
        present = {m.name for m in metas}
        for name, t in named:
            target = self.weight_spec.aliases.get(name)
            if target is not None and target in present:  # the tied parameter comes under its own name
                continue
            params[target or name].copy_(full_tensor(t))
            del t  # the next tensor is made while the loop variable still holds this one
        self.weight_version = self.weight_version + 1 if version is None else int(version)

    def sleep(self, level: int = 1) -> None:
        """Refuse `generate` until `wake_up()`; on a GPU the model also moves to the CPU meanwhile
        (either level: a transformers model is cheap to keep), on the CPU nothing is freed."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (offload weights) or 2 (drop weights), got {level}")
        if self._asleep:
            return
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def wake_up(self) -> None:
        if not self._asleep:
            return
        if self.device.type == "cuda":
            self.model.to(self.device)
        self._asleep = False

    def close(self) -> None:
        self.model = None
