"""Worker of the two-rank FSDP2 push test (tests/rollout/test_fsdp_push.py), importable by a
spawned child: each rank shards the same perturbed tiny policy over gloo and pushes it."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _report(out: Path, rank: int, result: dict) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def run_rank(rank: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from rollout.hf_engine import HFEngine
    from rollout.types import WeightSyncError
    from rollout.weight_sync import push_weights_all_ranks
    from tests.rollout.gloo_peer import perturbed_model

    out_dir = Path(out)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result: dict = {}
    server = remote = None
    try:
        model = perturbed_model(model_dir, seed=7)  # the same bits on both ranks
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        result["sharded"] = isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor)
        # The push lists the tied LM head under its own name too (as state_dict() does): the
        # transformers engine drops that alias, vLLM adds it; either way, inside an engine, the
        # sender would gather once more or once less than the other rank.
        named = list(model.named_parameters()) + [("lm_head.weight", model.lm_head.weight)]
        result["alias_is_same_object"] = named[-1][1] is dict(named)["model.embed_tokens.weight"]
        full = {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in model.named_parameters()}

        # (1) A rollout server fed by rank 0, buckets of 64 KiB (many buckets, many gathers).
        if rank == 0:
            from rollout.client import RemoteEngine
            from rollout.server import RolloutServer

            server = RolloutServer(HFEngine(model_dir), model_name="tiny", backend="hf", port=0).start()
            remote = RemoteEngine(server.url)
            remote.connect_weights(timeout_s=60)
        pushed = push_weights_all_ranks(remote, named, is_sender=rank == 0, bucket_bytes=2**16, version=5)
        result["pushed_bytes"] = pushed
        if rank == 0:
            served = dict(server.engine.model.named_parameters())
            result["remote_exact"] = all(torch.equal(served[n], t) for n, t in full.items())
            result["remote_version"] = remote.weight_version

        # (2) A refused push raises on both ranks (nothing gathered, nobody left waiting).
        bad = named + [("model.layers.9.mlp.up_proj.weight", torch.zeros(1))]
        try:
            push_weights_all_ranks(remote, bad, is_sender=rank == 0, bucket_bytes=2**16)
            result["refused"] = None
        except WeightSyncError as e:
            result["refused"] = str(e)
        if rank == 0:
            result["version_after_refusal"] = remote.weight_version

        # (3) A transformers engine on each rank, both loading.
        local = HFEngine(model_dir)
        push_weights_all_ranks(local, named, bucket_bytes=2**16)
        loaded = dict(local.model.named_parameters())
        result["local_exact"] = all(torch.equal(loaded[n], t) for n, t in full.items())
        result["local_version"] = local.weight_version
    except BaseException as e:  # reported to the test, which shows it
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        _report(out_dir, rank, result)
        if remote is not None:
            remote.close()
        if server is not None:
            server.shutdown(grace_s=5)
        dist.destroy_process_group()
