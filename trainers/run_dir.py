"""One run per output folder: the start-up checks `trainers/sft.py` and `trainers/adrpo.py` share.

A run folder (`checkpoint.output_dir`) holds one run: `trainer_config.json`, `metrics.jsonl`,
`tensorboard/`, `checkpoints/step-NNNNNN/`, the curve PNGs, and what the run built for itself
(`base_model/`, the tiny policy; `data/`, the prepared world set). The rules, as Hugging Face
Trainer users know them from `overwrite_output_dir`:

- a new run refuses a folder that already holds a run: resume it (`--resume latest`,
  `checkpoint.resume`), replace it (`--overwrite`, `checkpoint.overwrite=true`: the old run's
  files are deleted first, nothing else in the folder), or pick another `checkpoint.output_dir`;
- resuming checks that the saved config (the checkpoint's, else the folder's) matches the current
  one on every field that changes what is trained (model, data, loss, optimizer, rollout and
  reward settings); how long to train, how often to log and save, the split over processes and
  where services live may change;
- `--resume latest` in a folder without a checkpoint starts the run again from step 0 there, and
  first drops the metrics of the attempt that never reached a checkpoint.

The checks only read, on every process, before any process writes (`check_run_dir`), so every
process stops with the same error; `start_run` then lets process 0 clear what is to be replaced
and write the config. `user_error_exit` is how the command lines print such errors: one line and
its cause, no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.config import ConfigError, config_to_dict, save_config, summarize_config

CONFIG_FILE = "trainer_config.json"
# Everything a run writes into its folder; `overwrite` deletes exactly these.
RUN_OUTPUTS = (
    CONFIG_FILE, "metrics.jsonl", "tensorboard", "checkpoints", "reward_curve.png", "training_curves.png",
    "base_model", "data",
)
# What shows that a folder holds a run (base_model/ or data/ alone do not: nothing was trained).
RUN_MARKERS = (CONFIG_FILE, "metrics.jsonl", "checkpoints")

# Config keys (a whole section, or section.key) a resumed run may change: they do not change what
# is trained. The per-process batch and accumulation may change because the trainers check the
# global batch (examples or sessions per step) themselves, which is what the data position needs.
MAY_CHANGE = frozenset({
    "logging", "checkpoint", "distributed",
    "train.max_steps", "train.epochs", "train.gradient_checkpointing", "train.batch_size", "train.grad_accum_steps",
    "data.sessions_per_step", "model.attn_implementation",
    "loss.micro_batch_tokens", "loss.chunk_size",
    "rollout.url", "rollout.timeout_s", "rollout.weight_sync_host", "rollout.max_batch_size",
    "rollout.vllm_gpu_memory_utilization",
    "reward.url", "reward.token_env", "reward.timeout_s", "reward.base_url", "reward.call_timeout_s",
})  # fmt: skip

# Errors of the user's making that a command line prints as one line plus cause.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


class RunDirError(ConfigError):
    """The output folder cannot take this run as configured (it holds another run, or the resumed
    run was configured differently)."""


@dataclass(frozen=True)
class RunStart:
    output_dir: Path
    resume: Path | None  # the checkpoint folder to resume from; None: start at step 0
    resume_step: int | None  # that checkpoint's step
    fresh_after_resume: bool = False  # resume asked for, but no checkpoint: start over in the folder


def holds_run(folder: Path) -> list[str]:
    """The run files already in `folder` (empty when it holds no run)."""
    found = []
    for name in RUN_MARKERS:
        path = folder / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _may_change(key: str) -> bool:
    section = key.split(".", 1)[0]
    return section in MAY_CHANGE or key in MAY_CHANGE


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key both configs have that a resumed run must keep.

    Keys only one side has (a field added or removed since the run was saved) are not compared.
    """
    a, b = _flatten(saved), _flatten(current)
    return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if not _may_change(k) and a[k] != b[k]]


def _read_saved_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"cannot read the saved config {path}") from exc
    if not isinstance(data, dict):
        raise RunDirError(f"the saved config {path} is not a table of sections")
    return data


def _checkpoint_step(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"cannot read the step of checkpoint {checkpoint}") from exc


def resolve_resume(resume: str | None, checkpoints_dir: Path) -> Path | None:
    """`checkpoint.resume` ("latest", a checkpoint folder, or None) as a checkpoint folder, or None."""
    from trainers.checkpoint import latest_checkpoint

    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(checkpoints_dir)
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise RunDirError(f"checkpoint.resume={resume!r} is not a checkpoint folder (no trainer_state.json in it)")
    return path


def check_run_dir(cfg: Any) -> RunStart:
    """Decide how `cfg`'s run uses its output folder, or raise `RunDirError` saying why it cannot.

    Reads only; safe to call on every process before any of them writes.
    """
    ck = cfg.checkpoint
    out = Path(ck.output_dir)
    overwrite = ck.overwrite
    if ck.resume is not None and overwrite:
        raise RunDirError(
            "checkpoint.resume and checkpoint.overwrite exclude each other: continue the run, or replace it"
        )
    if out.exists() and not out.is_dir():
        raise RunDirError(f"checkpoint.output_dir={out} is a file, not a folder")
    if ck.resume is None:
        found = holds_run(out)
        if found and not overwrite:
            raise RunDirError(
                f"{out} already holds a run ({', '.join(found)}): continue it with --resume latest, "
                f"replace it with --overwrite, or give this run its own checkpoint.output_dir"
            )
        return RunStart(out, None, None)

    checkpoint = resolve_resume(ck.resume, out / "checkpoints")
    # The checkpoint's own config is the one its weights were trained under; the folder's is the
    # last run started there (it may have died before its first checkpoint).
    candidates = (checkpoint / CONFIG_FILE if checkpoint else None, out / CONFIG_FILE)
    saved_paths = [p for p in candidates if p is not None and p.is_file()]
    current = config_to_dict(cfg)
    for path in saved_paths:
        diffs = config_differences(_read_saved_config(path), current)
        if diffs:
            listed = "; ".join(f"{k}: {json.dumps(a)} then, {json.dumps(b)} now" for k, a, b in diffs)
            raise RunDirError(
                f"cannot resume {checkpoint or out}: the run was configured differently ({listed}); "
                f"set these back, or start a new run in another checkpoint.output_dir"
            )
    if checkpoint is None:
        return RunStart(out, None, None, fresh_after_resume=True)
    return RunStart(out, checkpoint, _checkpoint_step(checkpoint))


def start_run(cfg: Any, *, main_process: bool, show_config: bool = True) -> RunStart:
    """`check_run_dir`, then (on process 0) clear what this run replaces, print the config's
    summary and save the whole config. Every process must call it (it holds them at a barrier)."""
    from trainers.distributed import barrier

    start = check_run_dir(cfg)
    barrier()  # every process has checked before process 0 changes anything
    if main_process:
        out = start.output_dir
        if cfg.checkpoint.overwrite:
            remove_run(out)
        elif start.fresh_after_resume:
            # The rows of an attempt that never reached a checkpoint would mix with this one's.
            for name in ("metrics.jsonl", "tensorboard"):
                _remove(out / name)
            print(f"{out}: no checkpoint to resume, starting at step 0", flush=True)
        saved = save_config(cfg, out / CONFIG_FILE)
        if show_config:
            print(summarize_config(cfg, saved_to=saved), flush=True)
    barrier()
    return start


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_run(folder: Path) -> list[str]:
    """Delete the files a run wrote into `folder` (`RUN_OUTPUTS`, nothing else); returns their names."""
    removed = []
    for name in RUN_OUTPUTS:
        path = folder / name
        if path.exists() or path.is_symlink():
            _remove(path)
            removed.append(name)
    return removed


def finished_message(output_dir: Path, step: int, total: int) -> str:
    return f"{output_dir}: the run is already finished (step {step} of {total}); nothing to train"


def finished_before_start(cfg: Any) -> bool:
    """For a resumed run whose checkpoint already reached `train.max_steps`: say so, print where
    its results are, and return True, before anything is loaded. Otherwise False (runs counted
    in epochs are checked by the trainers once they know the data's size). Raises the run
    folder's errors (`check_run_dir`) early."""
    if cfg.checkpoint.resume is None or not cfg.train.max_steps:
        return False
    start = check_run_dir(cfg)
    if start.resume_step is None or start.resume_step < cfg.train.max_steps:
        return False
    # Before the process group exists; accelerate sets RANK in every process it starts.
    if os.environ.get("RANK", "0") == "0":
        print(finished_message(start.output_dir, start.resume_step, cfg.train.max_steps), flush=True)
        report_results(cfg)
    return True


def report_results(cfg: Any, *, draw: bool = True, extra: dict[str, Path | None] | None = None) -> None:
    """Print where a run's results are (metrics, curves, `extra` lines, the newest checkpoint),
    the checkpoint last; `draw` first redraws `training_curves.png` from metrics.jsonl."""
    from trainers.checkpoint import latest_checkpoint
    from trainers.plots import PlotError, plot_training_curves

    out = Path(cfg.checkpoint.output_dir)
    metrics = out / "metrics.jsonl"
    tensorboard = f" (TensorBoard: {out / 'tensorboard'})" if (out / "tensorboard").is_dir() else ""
    lines = [f"metrics: {metrics}{tensorboard}" if metrics.is_file() else "metrics: none written"]
    curves = out / "training_curves.png"
    curves_line = f"training curves: {curves}" if curves.is_file() else "training curves: none (no metrics)"
    if draw:
        try:
            curves_line = f"training curves: {plot_training_curves(out)}"
        except PlotError as exc:
            # No step logged, or a damaged metrics file: the run's result stands, the line says why.
            curves_line = f"training curves: none ({exc})"
    lines.append(curves_line)
    lines += [f"{name}: {path if path is not None else 'none'}" for name, path in (extra or {}).items()]
    checkpoint = latest_checkpoint(out / "checkpoints")
    lines.append(
        f"checkpoint: {checkpoint} (model: {checkpoint / 'model'})" if checkpoint else "checkpoint: none written"
    )
    print("\n".join(lines), flush=True)


def quiet_library_bars() -> None:
    """Turn off transformers' per-file bars ("Loading weights", "Writing model shards"): under the
    command lines the trainer's own step bar is the one to read, and theirs would break it up."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def describe_error(exc: BaseException) -> str:
    """One line for the error, and one for its cause when it has one."""
    lines = [str(exc) or type(exc).__name__]
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        lines.append(f"  cause: {type(cause).__name__}: {cause}")
    return "\n".join(lines)


def user_error_exit(prog: str, exc: BaseException) -> int:
    """Print a user error as `prog: error: ...` (plus its cause) on stderr; returns exit status 2."""
    print(f"{prog}: error: {describe_error(exc)}", file=sys.stderr, flush=True)
    return 2


# --- the command line both trainers share -----------------------------------------------------------------


def add_run_flags(parser) -> None:
    """The flags every trainer's command line has: --resume, --overwrite, --no-progress, and
    `section.key=value` overrides (before or after the flags, with `parse_intermixed_args`)."""
    parser.add_argument("--resume", metavar="DIR|latest", help="checkpoint folder, or 'latest' under the output dir")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run already in the output dir (checkpoint.overwrite=true)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logging.progress_bar=false); the summary stays"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=1e-6")


def run_overrides(args) -> list[str]:
    """The overrides the shared flags stand for, after the positional ones."""
    overrides = list(args.overrides)
    overrides += [f"checkpoint.resume={args.resume}"] if args.resume else []
    overrides += ["checkpoint.overwrite=true"] if args.overwrite else []
    overrides += ["logging.progress_bar=false"] if args.no_progress else []
    return overrides


def run_command(prog: str, cfg: Any, train, *, exit_process: bool = False) -> None:
    """Run `train(cfg)` as a trainer's command line does.

    A resumed run that is already finished says so and returns. A user error (a bad config, an
    output dir that holds another run) prints one line and its cause and exits with status 2.
    Any other error tears the process group down without a barrier (the other processes may be
    inside a collective) and propagates. `exit_process` (the scripts) ends the process after a
    successful run with `exit_launched_process`, which avoids an abort in gloo's teardown.
    """
    from trainers.distributed import exit_launched_process, shutdown

    quiet_library_bars()
    try:
        if not finished_before_start(cfg):
            train(cfg)
    except USER_ERRORS as exc:
        shutdown()
        code = user_error_exit(prog, exc)
        if exit_process:
            exit_launched_process(code)
        raise SystemExit(code) from None
    except BaseException:
        shutdown(failed=True)
        raise
    if exit_process:
        exit_launched_process(0)
    shutdown()
