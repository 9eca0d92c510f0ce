"""Tiny policy models built from a config, with a tokenizer trained locally.

Tests, the CPU default configs and the benchmarks use these: nothing is downloaded. The model is a
2-layer Qwen3 (about 0.9M parameters at the default sizes) and the tokenizer a byte-level BPE
trained in about a second with `tokenizers`, wrapped as a `PreTrainedTokenizerFast` that carries a
ChatML chat template (the format Qwen3 uses), so chat prompts render the same way as for real
models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A small, varied corpus so the BPE learns merges for JSON, dates and dialogue words.
_BASE_CORPUS = [
    '{"operations": [{"action": "ADD", "memory": "Caroline went to a support group on 7 May 2023."}]}',
    '{"operations": [{"action": "UPDATE", "id": "S3", "new_memory": "Melanie paints landscapes."}]}',
    '{"operations": [{"action": "MERGE", "ids": ["E1", "E2"], "new_memory": "Trip to Paris."}]}',
    '{"operations": [{"action": "SKIP", "reason": "nothing new"}]}',
    '{"action": "APPEND", "content": "Name: Caroline. Likes hiking and painting."}',
    '{"action": "REPLACE", "old_text": "lives in Boston", "new_text": "lives in Denver"}',
    "Caroline: Hey Mel! Good to see you! How have you been?",
    "Melanie: I just signed up for a pottery class. It is my kind of therapy.",
    "Session date: 1:56 pm on 8 May, 2023. Speakers: Caroline and Melanie.",
    "You are the episodic memory agent. Record each event with its absolute date.",
    "Question: When did Caroline go to the LGBTQ support group? Answer: 7 May 2023",
    "the quick brown fox jumps over the lazy dog 0123456789 , . : ; ! ? ( ) [ ] { } \" '",
]


def train_tokenizer(texts: list[str] | None = None, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (plus a built-in corpus) and wrap it for transformers."""
    corpus = list(_BASE_CORPUS) * 4 + list(texts or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def tiny_qwen3_config(vocab_size: int, **overrides) -> Qwen3Config:
    """The 2-layer Qwen3 configuration used across tests (tied embeddings by default)."""
    cfg = dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    return Qwen3Config(**cfg)


def build_tiny_policy(
    seed: int = 0, vocab_size: int = 1024, texts: list[str] | None = None, **config_overrides
) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised tiny Qwen3 and its locally trained tokenizer."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = tiny_qwen3_config(
        vocab_size=max(len(tokenizer), vocab_size),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_tiny_policy(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny policy and save it as a normal HF folder (loadable by vLLM too)."""
    path = Path(path)
    model, tokenizer = build_tiny_policy(seed=seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
