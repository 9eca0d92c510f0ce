"""Weight sync: name/shape validation, bucketing, and the torch.distributed transport.

A push is the complete set of policy weights under their Hugging Face names (tied aliases such as
`lm_head.weight` may be included or left out). It is validated as a whole before anything is
loaded, so a refused push leaves the engine unchanged.

On the wire, weights travel in buckets: consecutive tensors packed byte-wise (each aligned to
`ALIGN` bytes) into one flat uint8 buffer of at most `bucket_bytes` (a larger tensor gets a bucket
of its own), broadcast from the trainer, rank 0, over a process group of its own (gloo on CPU,
NCCL on GPU) built from a TCP store, so it never touches the trainer's default process group.
Both sides derive the same bucket plan from the tensor list and the bucket size, which travel
over HTTP beforehand (see `rollout.server`).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from rollout.types import WeightSyncError

ALIGN = 64
DEFAULT_BUCKET_BYTES = 256 * 2**20

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_json(cls, obj: Mapping) -> TensorMeta:
        name, shape, dtype = obj.get("name"), obj.get("shape"), obj.get("dtype")
        if (
            not isinstance(name, str)
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise WeightSyncError(f"a tensor entry needs 'name' (str) and 'shape' (list of ints >= 0): {obj!r:.200}")
        if dtype not in _DTYPES:
            raise WeightSyncError(f"weight {name!r}: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        return cls(name, tuple(shape), _DTYPES[dtype])


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: FSDP2 shards (DTensor) are all-gathered, a collective every rank must join."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def tensor_metas(named: Sequence[tuple[str, Tensor]]) -> list[TensorMeta]:
    """Name, global shape and dtype of each tensor (reads DTensor metadata without gathering)."""
    return [TensorMeta(name, tuple(t.shape), t.dtype) for name, t in named]


class WeightSpec:
    """The weights an engine accepts: parameter names and shapes, plus tied aliases."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str]):
        self.shapes = dict(shapes)
        self.aliases = dict(aliases)  # alias name -> name of the parameter it is tied to

    @classmethod
    def from_model(cls, model: nn.Module) -> WeightSpec:
        params = dict(model.named_parameters())
        by_id = {id(p): name for name, p in params.items()}
        aliases = {
            name: by_id[id(t)]
            for name, t in model.state_dict(keep_vars=True).items()
            if name not in params and id(t) in by_id
        }
        return cls({name: tuple(p.shape) for name, p in params.items()}, aliases)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> WeightSpec:
        """Spec of a Hugging Face checkpoint, from its config alone (the model is built on `meta`)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model)

    def check(self, metas: Sequence[TensorMeta]) -> None:
        """Raise `WeightSyncError` naming every problem of a push; return if it can be loaded."""
        errors: list[str] = []
        seen: set[str] = set()
        covered: set[str] = set()
        for m in metas:
            if m.name in seen:
                errors.append(f"weight {m.name!r} is given twice")
            seen.add(m.name)
            target = self.aliases.get(m.name, m.name)
            if target not in self.shapes:
                errors.append(f"unknown weight name {m.name!r}")
                continue
            if m.shape != self.shapes[target]:
                errors.append(f"weight {m.name!r} has shape {m.shape}, the model expects {self.shapes[target]}")
            if not m.dtype.is_floating_point:
                errors.append(f"weight {m.name!r} has dtype {m.dtype}, expected a floating-point dtype")
            covered.add(target)
        missing = sorted(set(self.shapes) - covered)
        if missing:
            errors.append(f"{len(missing)} weight(s) missing from the push, e.g. {missing[:3]}")
        if errors:
            raise WeightSyncError("weight update refused: " + "; ".join(errors[:10]))

    def canonical(self, named: Iterable[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
        """Drop tied aliases whose target is also present, keeping one tensor per parameter."""
        named = list(named)
        present = {name for name, _ in named}
        out = []
        for name, t in named:
            target = self.aliases.get(name)
            if target is not None and target in present:
                continue
            out.append((target or name, t))
        return out

    def with_aliases(self, named: Iterable[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
        """Add each missing tied alias with its target's tensor (every tied module gets loaded)."""
        named = list(named)
        by_name = dict(named)
        extra = [(alias, by_name[t]) for alias, t in self.aliases.items() if alias not in by_name and t in by_name]
        return named + extra


@dataclass(frozen=True)
class Bucket:
    entries: tuple[tuple[TensorMeta, int], ...]  # (tensor, byte offset in the bucket)
    nbytes: int


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Split tensors, in order, into buckets of at most `bucket_bytes` (ALIGN-aligned offsets)."""
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be >= {ALIGN}, got {bucket_bytes}")
    buckets: list[Bucket] = []
    entries: list[tuple[TensorMeta, int]] = []
    size = 0
    for m in metas:
        offset = -(-size // ALIGN) * ALIGN
        if entries and offset + m.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(entries), size))
            entries, offset = [], 0
        entries.append((m, offset))
        size = offset + m.nbytes
    if entries:
        buckets.append(Bucket(tuple(entries), size))
    return buckets


def pack_bucket(bucket: Bucket, tensors: Sequence[Tensor], out: Tensor) -> Tensor:
    """Copy `tensors` (one per bucket entry) byte-wise into the uint8 buffer `out[:bucket.nbytes]`."""
    buf = out[: bucket.nbytes]
    for (meta, offset), t in zip(bucket.entries, tensors, strict=True):
        src = t.detach().to(device=buf.device, dtype=meta.dtype).contiguous().reshape(-1).view(torch.uint8)
        buf[offset : offset + meta.nbytes].copy_(src)
    return buf


def unpack_bucket(bucket: Bucket, buf: Tensor) -> list[tuple[str, Tensor]]:
    """Views of each tensor inside a received bucket buffer."""
    return [
        (meta.name, buf[offset : offset + meta.nbytes].view(meta.dtype).view(meta.shape))
        for meta, offset in bucket.entries
    ]


class WeightTransport:
    """One member of a weight-sync process group; rank 0 (the trainer) sends, the others receive.

    Rank 0 hosts the TCP store at `host:port`; every member must construct its transport at about
    the same time (construction waits for all of them, up to `timeout_s`). `op_timeout_s` (default
    `timeout_s`) bounds each collective: a broadcast or status exchange whose peer never shows up
    raises after that long, and the group is unusable afterwards (build a new one).
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        device: str | torch.device = "cpu",
        timeout_s: float = 600.0,
        op_timeout_s: float | None = None,
    ):
        if world_size < 2 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 2 and 0 <= rank < world_size, got rank {rank} of {world_size}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = torch.device(device)
        if backend == "gloo":
            if self.device.type != "cpu":
                raise ValueError(f"the gloo transport carries CPU tensors, got device {self.device}")
        elif backend == "nccl":
            if not (dist.is_nccl_available() and torch.cuda.is_available()) or self.device.type != "cuda":
                raise ValueError("the nccl transport needs a CUDA build of torch, a GPU and a cuda device")
            torch.cuda.set_device(self.device)
        else:
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self._store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)
        op_timeout = datetime.timedelta(seconds=timeout_s if op_timeout_s is None else op_timeout_s)
        if backend == "gloo":
            self._pg = dist.ProcessGroupGloo(self._store, rank, world_size, op_timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = op_timeout
            self._pg = dist.ProcessGroupNCCL(self._store, rank, world_size, options)

    def _broadcast(self, t: Tensor, root: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        self._pg.broadcast([t], opts).wait()

    def send(self, named: Sequence[tuple[str, Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        """Broadcast all tensors, bucket by bucket (rank 0 only)."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends weights")
        plan = plan_buckets(tensor_metas(named), bucket_bytes)
        if not plan:
            return
        buf = torch.empty(max(b.nbytes for b in plan), dtype=torch.uint8, device=self.device)
        it = iter(named)
        for bucket in plan:
            tensors = [full_tensor(next(it)[1]) for _ in bucket.entries]
            self._broadcast(pack_bucket(bucket, tensors, buf), root=0)

    def receive(
        self, metas: Sequence[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES
    ) -> list[tuple[str, Tensor]]:
        """Receive what rank 0 sends for `metas`; each bucket gets a fresh buffer that the views keep alive."""
        out: list[tuple[str, Tensor]] = []
        for bucket in plan_buckets(metas, bucket_bytes):
            buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
            self._broadcast(buf, root=0)
            out.extend(unpack_bucket(bucket, buf))
        return out

    def reduce_status(self, code: int) -> int:
        """Largest of the codes all members pass (0: push loaded everywhere); every member calls it."""
        t = torch.tensor([code], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self._pg.allreduce([t], opts).wait()
        return int(t.item())

    def close(self) -> None:
        self._pg = None
        self._store = None
