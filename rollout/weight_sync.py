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

A push may be a `LazyWeights` (names, shapes and dtypes up front, tensors made as they are
consumed: merged LoRA weights), which every engine validates first and then streams. Under FSDP2,
`push_weights_all_ranks` is the push every rank calls: it gathers the shards in one fixed order
on all ranks, whatever the engine does with tied aliases.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


class LazyWeights:
    """A push whose tensors are made one at a time, as it is consumed (e.g. merged LoRA weights).

    Names, shapes and dtypes are known up front (`metas()`), so an engine validates the whole push
    before any tensor is computed, then streams: with `rollout.lora.policy_weights` no more than
    about one bucket of merged weights exists at a time, instead of a second copy of the model.
    Iterating yields `(name, tensor)` pairs in order, like a list of them; each tensor is checked
    against its announced shape and dtype. It may be iterated more than once (each time computes
    the tensors again).
    """

    def __init__(self, entries: Sequence[tuple[TensorMeta, Callable[[], Tensor]]]):
        self._entries = list(entries)

    def metas(self) -> list[TensorMeta]:
        return [meta for meta, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for meta, make in self._entries:
            t = make()
            if tuple(t.shape) != meta.shape or t.dtype != meta.dtype:
                raise WeightSyncError(
                    f"weight {meta.name!r} came out as {tuple(t.shape)} {t.dtype}, announced as "
                    f"{meta.shape} {meta.dtype}"
                )
            yield meta.name, t


def push_source(named_tensors: Iterable[tuple[str, Tensor]]) -> tuple[list[TensorMeta], Iterable[tuple[str, Tensor]]]:
    """(metas, tensors) of a push: a `LazyWeights` stays lazy, anything else becomes a list."""
    if isinstance(named_tensors, LazyWeights):
        return named_tensors.metas(), named_tensors
    named = list(named_tensors)
    return tensor_metas(named), named


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

    def stream_with_aliases(
        self, metas: Sequence[TensorMeta], named: Iterable[tuple[str, Tensor]]
    ) -> Iterator[tuple[str, Tensor]]:
        """`named` as it comes, each tensor followed at once by its tied aliases that the push
        (`metas`) leaves out: `with_aliases` for a stream, holding no tensor for later."""
        present = {m.name for m in metas}
        by_target: dict[str, list[str]] = {}
        for alias, target in self.aliases.items():
            if alias not in present:
                by_target.setdefault(target, []).append(alias)
        for name, t in named:
            yield name, t
            for alias in by_target.get(name, ()):
                yield alias, t

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

    def send(
        self,
        named: Iterable[tuple[str, Tensor]],
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        *,
        metas: Sequence[TensorMeta] | None = None,
    ) -> None:
        """Broadcast all tensors, bucket by bucket (rank 0 only). `named` is consumed in order,
        one bucket at a time (FSDP shards gathered then); with `metas` it may be any iterable
        (a `LazyWeights`), otherwise it must be a sequence."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends weights")
        plan = plan_buckets(tensor_metas(named) if metas is None else metas, bucket_bytes)
        if not plan:
            return
        buf = self.bucket_buffer(plan)
        it = iter(named)
        for bucket in plan:
            self.send_bucket(bucket, [full_tensor(next(it)[1]) for _ in bucket.entries], buf)

    def bucket_buffer(self, plan: Sequence[Bucket]) -> Tensor:
        """A send buffer large enough for every bucket of `plan`."""
        return torch.empty(max(b.nbytes for b in plan), dtype=torch.uint8, device=self.device)

    def send_bucket(self, bucket: Bucket, tensors: Sequence[Tensor], buf: Tensor) -> None:
        """Pack `tensors` (whole, one per entry) into `buf` and broadcast them (rank 0 only)."""
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


def distinct_weights(named: Iterable[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """`named` without later entries that repeat a tensor object already listed (a tied weight
    given under both names, as `state_dict()` lists it): each tensor is gathered once."""
    seen: set[int] = set()
    out = []
    for name, t in named:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def push_weights_all_ranks(
    engine,
    named_tensors: Iterable[tuple[str, Tensor]],
    *,
    is_sender: bool | None = None,
    group: dist.ProcessGroup | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    version: int | None = None,
) -> int:
    """Push FSDP2-sharded policy weights; every rank of the trainer's `group` calls it with the same
    list (its own shards). Returns the bytes pushed.

    Gathering a shard (`DTensor.full_tensor()`) is a collective, so every rank must gather the same
    tensors in the same order. An engine's own alias handling would break that: the colocated vLLM
    engine appends tied aliases (a second gather of the embedding, on the sender only), the
    transformers engine drops them (one gather fewer). Here the order is fixed outside the engines:
    tensors that repeat an earlier one are dropped (`distinct_weights`), then all ranks gather in
    list order, one bucket of `bucket_bytes` at a time.

    `is_sender` (default: `engine is not None`): this rank loads what it gathers into `engine`.
    A `RemoteEngine` (one sender, rank 0 of the weight-sync group) receives each bucket as soon as
    it is gathered, so the sender holds one bucket of full tensors at a time; a local engine (one
    per rank) gets the full tensors once all are gathered. The ranks agree twice over `group`
    (before gathering: did every sender's validation or announcement pass; after: did every load
    succeed), so a refused or failed push raises `WeightSyncError` on every rank instead of
    leaving some of them waiting in a gather. Without an initialised process group it is a plain
    push. Not safe to call concurrently with other collectives on `group`.
    """
    if is_sender is None:
        is_sender = engine is not None
    distributed = dist.is_available() and dist.is_initialized()
    metas, source = push_source(named_tensors)
    if isinstance(source, list):
        source = distinct_weights(source)
        metas = tensor_metas(source)
    remote = is_sender and callable(getattr(engine, "_announce", None))

    push_id = None
    error = None
    if is_sender:
        try:
            if remote:
                push_id = engine._announce(metas, bucket_bytes, version)
            else:
                engine.weight_spec.check(metas)
        except Exception as e:  # shared with every rank below, then raised everywhere
            error = f"{type(e).__name__}: {e}"
    _agree(error, distributed, group, "refused")

    plan = plan_buckets(metas, bucket_bytes)
    it = iter(source)
    collected: list[tuple[str, Tensor]] = []
    transport = engine._require_transport() if remote else None
    buf = transport.bucket_buffer(plan) if transport is not None and plan else None
    send_error: str | None = None
    for bucket in plan:
        tensors = [full_tensor(next(it)[1]) for _ in bucket.entries]  # the collectives, in list order
        if not is_sender:
            continue
        if transport is not None:
            if send_error is None:
                try:
                    transport.send_bucket(bucket, tensors, buf)
                except Exception as e:  # keep gathering: the other ranks are in the gathers too
                    send_error = f"sending the weights failed: {type(e).__name__}: {e}"
        else:
            collected.extend((meta.name, t) for (meta, _), t in zip(bucket.entries, tensors, strict=True))
        del tensors

    error = None
    if is_sender:
        try:
            if remote:
                if send_error is not None:
                    engine._rebuild_group(send_error)  # always raises
                engine._finish_push(push_id)
            else:
                engine.update_weights(collected, version=version)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        collected.clear()
    _agree(error, distributed, group, "failed")
    return sum(m.nbytes for m in metas)


def _agree(error: str | None, distributed: bool, group: dist.ProcessGroup | None, what: str) -> None:
    """Raise `WeightSyncError` on every rank if any rank reports an error."""
    errors = [error]
    if distributed:
        errors = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
    bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if bad:
        raise WeightSyncError(f"weight push {what}: " + "; ".join(bad))
