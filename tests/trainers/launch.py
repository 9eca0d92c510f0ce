"""Launch a test file's `--worker` mode as 2 processes with `accelerate launch` (FSDP2 over gloo on CPU).

One implementation for every two-process test: its own session so a timeout kills the launcher
and both workers together, and on failure the workers' tracebacks rather than a tail of config
dumps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def errors_of(log: str, tail_chars: int = 3000) -> str:
    """The first tracebacks of a two-process log, then its last lines."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    blocks = ["\n".join(lines[i : i + 80]) for i in starts[:4]]
    return "\n...\n".join([*blocks, "--- last lines ---", log[-tail_chars:]])


def launch_two_processes(script: str | Path, args: list[str], *, timeout_s: float, what: str) -> str:
    """Run `script --worker ARGS...` in 2 processes; fail the test with the workers' errors. Returns the log."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(script), "--worker", *map(str, args),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"2-process {what} timed out after {timeout_s}s:\n{log[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"2-process {what} failed ({proc.returncode}):\n{errors_of(log)}"
    return log
