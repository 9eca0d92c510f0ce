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
)

from rollout.chat import encode_prompts, eos_token_ids, finish_completion
from rollout.types import Completion, Prompt, SamplingParams
from rollout.weight_sync import WeightSpec, full_tensor, tensor_metas


class _SampledLogprobs(LogitsProcessor):
    """Records log p(sampled token) from the raw logits, one generation step behind."""

    def __init__(self) -> None:
        self._pending: Tensor | None = None  # [B, V] log-softmax of the previous step
        self.steps: list[Tensor] = []  # each [B]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
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

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions per prompt (see `rollout.types.RolloutEngine`)."""
        if not prompts:
            return []
        prompt_ids = encode_prompts(
            self.tokenizer, prompts, params.max_tokens, vocab_size=self.vocab_size,
            max_model_len=self.max_model_len, chat_template_kwargs=self.chat_template_kwargs,
        )
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
                for (i, j), completion in zip(chunk, self._generate_batch(batch, params), strict=True):
                    results[i][j] = completion
        return [[c for c in per_prompt if c is not None] for per_prompt in results]

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
        recorder = _SampledLogprobs()
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
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
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy a complete, validated set of weights into the model (refused as a whole on error)."""
        named = list(named_tensors)
        self.weight_spec.check(tensor_metas(named))
        params = dict(self.model.named_parameters())
        for name, t in self.weight_spec.canonical(named):
            params[name].copy_(full_tensor(t))

    def close(self) -> None:
        self.model = None
