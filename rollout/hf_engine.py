"""transformers backend: batched `generate` with left padding; the reference for the other backends.

Each prompt is repeated `n` times and the rows are generated in micro-batches of at most
`max_batch_size` sequences, sorted by prompt length so that little padding is wasted. The
log-prob of each sampled token is read from the raw logits (a `LogitsProcessor` placed ahead of
generate's temperature / top-p warpers sees the unmodified float32 logits), one step behind, so
only one `[B, V]` log-softmax is held at a time instead of `[B, T, V]`.

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
)

from rollout.chat import check_length, eos_token_ids, finish_completion, render_prompt
from rollout.types import Completion, GenerationCancelled, Prompt, SamplingParams, per_prompt_params
from rollout.weight_sync import WeightSpec, full_tensor, tensor_metas


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


class _Cancelled(StoppingCriteria):
    """Ends every row at the next step once the engine's `cancel()` was called."""

    def __init__(self, engine: HFEngine) -> None:
        self._engine = engine

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        return torch.full((input_ids.shape[0],), self._engine._cancelled, dtype=torch.bool, device=input_ids.device)


class HFEngine:
    """Rollout engine on a transformers causal LM (CPU or GPU)."""

    # One seed drives the whole batch, so a seeded prompt's samples depend on its batch-mates.
    seed_per_prompt = False

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
        `SamplingParams` per prompt. Prompts with equal parameters are generated together, each
        such group from one generator seeded with its seed. Not reentrant (one call at a time);
        `cancel()` may be called from any thread."""
        if self._asleep:
            raise RuntimeError("the engine is asleep: call wake_up() before generate()")
        if not prompts:
            return []
        per_prompt = per_prompt_params(params, len(prompts))
        prompt_ids = []
        for prompt, p in zip(prompts, per_prompt, strict=True):
            ids = render_prompt(
                self.tokenizer, prompt, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                chat_template_kwargs=self.chat_template_kwargs,
            )
            check_length(ids, p.max_tokens, self.max_model_len)
            prompt_ids.append(ids)
        groups: dict[SamplingParams, list[int]] = {}
        for i, p in enumerate(per_prompt):
            groups.setdefault(p, []).append(i)
        version = self.weight_version
        results: list[list[Completion]] = [[] for _ in prompts]
        with self._state_lock:
            self._running, self._cancelled = True, False
        try:
            for p, indices in groups.items():
                for i, samples in zip(indices, self._generate_group([prompt_ids[i] for i in indices], p), strict=True):
                    results[i] = [dataclasses.replace(c, weight_version=version) for c in samples]
        finally:
            with self._state_lock:
                self._running = False
        return results

    def _generate_group(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        rows = sorted(
            ((i, j) for i in range(len(prompt_ids)) for j in range(params.n)), key=lambda r: len(prompt_ids[r[0]])
        )
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompt_ids]
        devices = [self.device] if self.device.type == "cuda" else []
        chunks = [rows[k : k + self.max_batch_size] for k in range(0, len(rows), self.max_batch_size)]
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for chunk in tqdm(chunks, desc="generate (transformers)", disable=not self.show_progress):
                batch = [prompt_ids[i] for i, _ in chunk]
                completions = self._generate_batch(batch, params)
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

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams) -> list[Completion]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, ids in enumerate(batch):
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            attention_mask[b, width - len(ids) :] = 1
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=not params.greedy,
            eos_token_id=None if params.ignore_eos else sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            stop_strings=list(params.stop) or None,
            **(
                {}
                if params.greedy
                else {"temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": 0}
            ),
        )
        recorder = _SampledLogprobs(self)
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
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
        completions report `version` from now on (default: the previous version + 1)."""
        named = list(named_tensors)
        self.weight_spec.check(tensor_metas(named))
        params = dict(self.model.named_parameters())
        for name, t in self.weight_spec.canonical(named):
            params[name].copy_(full_tensor(t))
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
