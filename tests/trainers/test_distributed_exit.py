"""`exit_launched_process`: how a launched worker ends (trainers.distributed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Output written without a flush, an atexit hook, then the exit; `group` decides whether a
# (one-member, gloo) process group is up at that point.
SCRIPT = textwrap.dedent(
    """
    import atexit, sys, tempfile
    import torch.distributed as dist
    from trainers.distributed import exit_launched_process

    if sys.argv[1] == "group":
        store = dist.FileStore(tempfile.mktemp(), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        dist.all_reduce(__import__("torch").ones(3))
    atexit.register(lambda: print("atexit ran"))
    print("work done", end="")
    sys.stderr.write("to stderr")
    exit_launched_process(3)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_with_a_process_group_it_flushes_and_leaves_without_finalization():
    proc = _run("group")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "work done"  # flushed, and no atexit hook: finalization was skipped
    assert "to stderr" in proc.stderr


@pytest.mark.slow
def test_without_a_process_group_it_is_a_normal_exit():
    proc = _run("plain")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "work doneatexit ran\n"
    assert "to stderr" in proc.stderr
