"""`push_weights_all_ranks` with two FSDP2 ranks over gloo on CPU: the gathers line up on both
ranks, the pushed weights arrive exactly, and a refused push raises on every rank."""

from __future__ import annotations

import json
import socket

import pytest
import torch.multiprocessing as mp

from tests.rollout.conftest import load_model
from tests.rollout.fsdp_peer import run_rank

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_push_to_a_server_and_to_local_engines(tiny_dir, tmp_path):
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_rank, args=(r, port, str(tiny_dir), str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r.get("error") for r in results] == [None, None], results
    assert all(r["sharded"] and r["alias_is_same_object"] for r in results)
    # The tied alias is gathered and pushed once: the bytes are those of named_parameters()
    # (float32: 4 bytes per element), not one embedding more.
    expected = sum(4 * p.numel() for p in load_model(tiny_dir).parameters())
    assert results[0]["pushed_bytes"] == results[1]["pushed_bytes"] == expected
    assert results[0]["remote_exact"] and results[0]["remote_version"] == 5
    for r in results:
        assert "unknown weight name 'model.layers.9.mlp.up_proj.weight'" in r["refused"]
        assert r["refused"].startswith("weight push refused: rank 0:")
        assert r["local_exact"] and r["local_version"] == 1
    assert results[0]["version_after_refusal"] == 5
    assert [p.exitcode for p in procs] == [0, 0]
