"""Bucketing, packing, validation and the gloo transport (rollout.weight_sync)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from rollout.types import WeightSyncError
from rollout.weight_sync import (
    ALIGN,
    TensorMeta,
    WeightSpec,
    WeightTransport,
    pack_bucket,
    plan_buckets,
    tensor_metas,
    unpack_bucket,
)
from tests.rollout.gloo_peer import payload, receive_and_compare
from trainers.tiny import build_tiny_policy


def test_plan_buckets_by_hand():
    metas = [
        TensorMeta("a", (3,), torch.float32),  # 12 bytes
        TensorMeta("b", (5,), torch.bfloat16),  # 10 bytes
        TensorMeta("c", (40,), torch.float32),  # 160 bytes, more than a whole bucket
        TensorMeta("d", (2,), torch.float16),  # 4 bytes
    ]
    plan = plan_buckets(metas, bucket_bytes=128)
    # a at 0; b at the next 64-byte boundary, 64, ending at 74; c would start at 128 and end at
    # 288 > 128, so it opens a bucket of its own (160 bytes: a tensor is never split); d would
    # start at 192 in that bucket, past 128, so it opens a third one.
    assert [[(m.name, off) for m, off in b.entries] for b in plan] == [[("a", 0), ("b", 64)], [("c", 0)], [("d", 0)]]
    assert [b.nbytes for b in plan] == [74, 160, 4]
    assert ALIGN == 64


def test_pack_unpack_round_trip_is_bit_exact():
    named = payload(0)
    metas = tensor_metas(named)
    out = []
    for bucket in plan_buckets(metas, bucket_bytes=256):
        tensors = [dict(named)[m.name] for m, _ in bucket.entries]
        buf = pack_bucket(bucket, tensors, torch.empty(bucket.nbytes, dtype=torch.uint8)).clone()
        out.extend(unpack_bucket(bucket, buf))
    assert [n for n, _ in out] == ["a", "b", "c", "d"]
    for (_, want), (_, got) in zip(named, out, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_tensor_meta_json_round_trip_and_bad_dtype():
    m = TensorMeta("model.norm.weight", (128,), torch.bfloat16)
    assert TensorMeta.from_json(m.to_json()) == m
    assert m.nbytes == 256
    with pytest.raises(WeightSyncError, match="dtype 'int8'"):
        TensorMeta.from_json({"name": "x", "shape": [2], "dtype": "int8"})
    with pytest.raises(WeightSyncError, match="needs 'name'"):
        TensorMeta.from_json({"name": "x", "shape": [-1], "dtype": "float32"})


@pytest.fixture(scope="module")
def tiny():
    model, _ = build_tiny_policy(seed=0)
    return model


def test_spec_of_tied_model(tiny, tiny_dir):
    spec = WeightSpec.from_model(tiny)
    assert spec.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert spec.shapes["model.layers.0.self_attn.k_proj.weight"] == (64, 128)  # 2 kv heads x 32
    pretrained = WeightSpec.from_pretrained(tiny_dir)
    assert pretrained.shapes == spec.shapes and pretrained.aliases == spec.aliases
    spec.check(tensor_metas(list(tiny.named_parameters())))  # without the alias
    spec.check(tensor_metas(list(tiny.state_dict().items())))  # with it


def test_spec_names_every_problem(tiny):
    spec = WeightSpec.from_model(tiny)
    named = list(tiny.named_parameters())
    bad = [(n, t) for n, t in named if n != "model.norm.weight"]  # missing
    bad[0] = ("model.embed_tokens.weight", torch.zeros(10, 128))  # wrong shape
    bad.append(("model.layers.9.mlp.up_proj.weight", torch.zeros(1)))  # unknown
    bad.append(bad[1])  # duplicate
    bad.append(("lm_head.weight", torch.zeros(1024, 128, dtype=torch.int32)))  # not floating
    with pytest.raises(WeightSyncError) as err:
        spec.check(tensor_metas(bad))
    msg = str(err.value)
    assert "weight 'model.embed_tokens.weight' has shape (10, 128), the model expects (1024, 128)" in msg
    assert "unknown weight name 'model.layers.9.mlp.up_proj.weight'" in msg
    assert f"weight {bad[1][0]!r} is given twice" in msg
    assert "'lm_head.weight' has dtype torch.int32" in msg
    assert "1 weight(s) missing from the push, e.g. ['model.norm.weight']" in msg


def test_spec_canonical_and_with_aliases(tiny):
    spec = WeightSpec.from_model(tiny)
    sd = list(tiny.state_dict().items())
    assert "lm_head.weight" not in dict(spec.canonical(sd))
    only_alias = [(n, t) for n, t in sd if n != "model.embed_tokens.weight"]
    renamed = dict(spec.canonical(only_alias))["model.embed_tokens.weight"]  # the alias, renamed to its target
    assert renamed.data_ptr() == tiny.lm_head.weight.data_ptr()
    full = dict(spec.with_aliases(list(tiny.named_parameters())))
    assert full["lm_head.weight"] is full["model.embed_tokens.weight"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gloo_transport_across_processes():
    port = _free_port()
    child = mp.get_context("spawn").Process(target=receive_and_compare, args=(port, 2))
    child.start()
    try:
        sender = WeightTransport("127.0.0.1", port, rank=0, world_size=2, backend="gloo", timeout_s=60)
        sender.send(payload(0), bucket_bytes=256)
        assert sender.reduce_status(0) == 0  # the receiver found every tensor bit-exact
        corrupted = payload(0)
        corrupted[2] = ("c", corrupted[2][1].clone())
        corrupted[2][1][17] += 1
        sender.send(corrupted, bucket_bytes=256)
        assert sender.reduce_status(0) == 1  # ... and notices a single changed element
        sender.close()
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0


def test_transport_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        WeightTransport("127.0.0.1", 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="backend"):
        WeightTransport("127.0.0.1", 1, rank=0, world_size=2, backend="mpi")
    with pytest.raises(ValueError, match="nccl transport needs"):
        WeightTransport("127.0.0.1", 1, rank=0, world_size=2, backend="nccl", device="cpu")
