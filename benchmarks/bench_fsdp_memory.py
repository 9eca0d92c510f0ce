"""FSDP2 on CPU (2 gloo processes): gradient-accumulation memory and time, and what resume reads.

    python -m benchmarks.bench_fsdp_memory [--steps 4] [--accum 4] [--out benchmarks/results/sft_memory.md]

A 2-process launch (`accelerate launch --multi_gpu --num_processes 2`, one intra-op thread
per process) trains SFT on a config-built Qwen3 (MODEL_CONFIG, 29.4M parameters) with 1 example
per micro-batch and `--accum` micro-batches per step, on the same global batch every step. It
runs one warm-up step per `distributed.grad_accum_sync` mode, then `--steps` rounds of one step
in each mode (the order rotating, so that load changes on a shared machine hit both alike), and
records for each step on each rank:
  - gradient bytes held, from `trainers.distributed.gradient_bytes` before every micro-batch's
    forward and before the optimizer step (sharded `.grad` versus FSDP2's unsharded no_sync
    buffers), the maximum over the step;
  - the step's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs before
    the step) minus the resident set before it, and VmHWM itself;
  - wall time per step (median over the rounds).
It runs twice: the "memory" launch with a fixed glibc mmap threshold (see `_launch`), the
"timing" launch with the default allocator, for the times.

The memory launch then writes a checkpoint (sharded torch.distributed.checkpoint)
and a copy in the previous format (full optimizer state in `optimizer.pt`), and loads each with
`load_checkpoint`, recording the bytes of tensor data this rank had to read (worked out from the
tensor sizes), the bytes it read (`rchar` of /proc/self/io, read() calls; torch.load inside DCP
re-reads about 39 KB of zip directory per stored tensor) and its resident-set peak during the load.
The results page gets two sections (other sections of the file are kept), with the arithmetic
extrapolated to Qwen3-4B on 8 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.procmem import reset_peak, rss_kib

REPO = Path(__file__).resolve().parents[1]
MODES = ("every_micro_batch", "last_micro_batch")
GRAD_HEADING = "## Gradient accumulation under FSDP2"
RESUME_HEADING = "## Sharded checkpoints: what each rank reads at resume"
# A Qwen3 big enough that gradients are a visible part of a process's memory on CPU:
# per layer 786,432 attention + 2,359,296 MLP + 1,152 norm weights = 3,146,880; x 8 layers
# = 25,175,040; + tied embedding 8192 x 512 = 4,194,304; + final norm 512 -> 29,369,856.
MODEL_CONFIG = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=8192,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
# Qwen3-4B (its config.json): hidden 2560, 36 layers, 32 query / 8 KV heads of 128, MLP 9728,
# vocabulary 151,936, tied embedding.
QWEN3_4B = dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=9728, vocab=151_936)
MIB = 2**20


def qwen3_params(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, mlp: int, vocab: int) -> dict:
    """Parameter counts of a tied-embedding Qwen3: total, per decoder layer, embedding."""
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    per_layer = attention + 3 * hidden * mlp + 2 * head_dim + 2 * hidden  # + q/k norms, 2 layer norms
    embedding = vocab * hidden
    return {"total": layers * per_layer + embedding + hidden, "per_layer": per_layer, "embedding": embedding}


# ----------------------------------------------------------------------------- worker side


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _timed_step(trainer, global_batch: list[int]) -> dict:
    """One train_step; the most gradient bytes held at any micro-batch boundary, time, RSS peak."""
    from trainers.distributed import gradient_bytes

    model = trainer.unwrapped_model
    held: list[dict] = []
    hook = model.register_forward_pre_hook(lambda *_: held.append(gradient_bytes(model)))
    optimizer_step = trainer.optimizer.step

    def step(*args, **kwargs):
        held.append(gradient_bytes(model))
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = step
    reset_peak()
    rss_before = rss_kib("VmRSS")
    started = time.perf_counter()
    try:
        trainer.train_step(global_batch)
    finally:
        hook.remove()
        trainer.optimizer.step = optimizer_step
    elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "grad_bytes_max": max(h["sharded"] + h["unsharded"] for h in held),
        "unsharded_max": max(h["unsharded"] for h in held),
        "step_peak_kib": rss_kib("VmHWM") - rss_before,
        "hwm_kib": rss_kib("VmHWM"),
    }


def _n_params(trainer) -> int:
    return sum(p.numel() for p in trainer.unwrapped_model.parameters())


def _reduce_scatter_seconds(numel: int, repeats: int) -> list[float]:
    """Wall times of reduce-scattering `numel` float32 values (one full gradient) between the ranks."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    numel -= numel % world
    full = torch.ones(numel)
    shard = torch.empty(numel // world)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        started = time.perf_counter()
        dist.reduce_scatter_tensor(shard, full)
        times.append(time.perf_counter() - started)
    return times[1:]


def _legacy_copy(trainer, checkpoint: Path, legacy: Path) -> None:
    """`checkpoint` as the previous format wrote it (rank 0 gathers and saves the full optimizer state)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(
        trainer.unwrapped_model,
        trainer.torch_optimizer,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )
    if dist.get_rank() == 0:
        shutil.copytree(checkpoint, legacy, ignore=shutil.ignore_patterns("dcp"))
        torch.save(full, legacy / "optimizer.pt")
    dist.barrier()


def _measure_load(trainer, checkpoint: Path) -> dict:
    from trainers.checkpoint import load_checkpoint

    reset_peak()
    rss_before, rchar_before = rss_kib("VmRSS"), _rchar()
    load_checkpoint(
        checkpoint, model=trainer.unwrapped_model, optimizer=trainer.torch_optimizer, scheduler=trainer.scheduler
    )
    return {"rchar": _rchar() - rchar_before, "peak_kib": rss_kib("VmHWM") - rss_before}


def _tensor_bytes(trainer) -> dict:
    """Bytes of model and optimizer tensors, full and this rank's local shard."""
    from torch.distributed.tensor import DTensor

    def sizes(t) -> tuple[int, int]:
        local = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size(), local.numel() * local.element_size()

    params = list(trainer.unwrapped_model.parameters())  # each tied parameter once
    model = [sizes(p) for p in params]
    optim = [sizes(v) for p in params for v in trainer.torch_optimizer.state[p].values()]
    return {
        "model_full": sum(f for f, _ in model),
        "model_local": sum(lo for _, lo in model),
        "optim_full": sum(f for f, _ in optim),
        "optim_local": sum(lo for _, lo in optim),
        "params": sum(p.numel() for p in params),
    }


def worker(out: Path, model_path: Path, steps: int, accum: int, kind: str) -> None:
    """`kind` "memory": steps, then the checkpoint loads; "timing": steps only."""
    from dataclasses import replace

    import torch.distributed as dist

    from trainers.config import SFTConfig, load_config
    from trainers.distributed import exit_launched_process, shutdown
    from trainers.sft import SFTTrainer

    try:
        cfg = load_config(
            SFTConfig,
            overrides=[
                f"model.path={model_path}",
                f"checkpoint.output_dir={out / kind}",
                "train.batch_size=1",
                f"train.grad_accum_steps={accum}",
                "distributed.fsdp=true",
                "logging.progress_bar=false",
                "logging.tensorboard=false",
            ],
        )
        trainer = SFTTrainer(cfg)
        rank = dist.get_rank()
        n = len(trainer.examples)
        global_batch = [i % n for i in range(trainer.global_batch_size)]

        def step_in(mode: str) -> dict:
            # train_step reads the mode from the trainer's config at every micro-batch.
            trainer.cfg = replace(cfg, distributed=replace(cfg.distributed, grad_accum_sync=mode))
            return _timed_step(trainer, global_batch)

        for mode in MODES:
            step_in(mode)  # warm-up
        measured: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for round_ in range(steps):
            # Alternate the modes (rotating order) so load changes on the machine hit both alike.
            for mode in MODES[round_ % 2 :] + MODES[: round_ % 2]:
                measured[mode].append(step_in(mode))
        result: dict = {"steps": measured}
        if kind == "timing":
            result["reduce_scatter_s"] = _reduce_scatter_seconds(_n_params(trainer), repeats=5)
            trainer.close()
            (out / f"{kind}-rank{rank}.json").write_text(json.dumps(result))
            exit_launched_process(0)

        trainer.state.step = 2 * steps + 2
        checkpoint = trainer.save()
        legacy = out / "legacy" / checkpoint.name
        _legacy_copy(trainer, checkpoint, legacy)
        result["tensors"] = _tensor_bytes(trainer)
        result["load_sharded"] = _measure_load(trainer, checkpoint)
        result["load_legacy"] = _measure_load(trainer, legacy)
        result["files"] = {
            "dcp_own": (checkpoint / "dcp" / f"__{rank}_0.distcp").stat().st_size,
            "optimizer_pt": (legacy / "optimizer.pt").stat().st_size,
        }
        trainer.close()
        (out / f"{kind}-rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        shutdown()
        raise
    exit_launched_process(0)


# ----------------------------------------------------------------------------- driver side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, model_path: Path, steps: int, accum: int, kind: str) -> None:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "benchmarks.bench_fsdp_memory", "--worker", str(out), str(model_path), str(steps), str(accum), kind,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    if kind == "memory":
        # A fixed glibc mmap threshold: every allocation of 64 KiB or more is its own mapping,
        # returned to the system when freed, so the resident set follows the live tensors instead
        # of what the heap kept from earlier steps (with the default, adaptive threshold, peaks over
        # the start of a step or a load mostly measured how much freed memory the heap had kept).
        # It makes every large allocation a system call, so the timing launch runs without it.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise RuntimeError(f"2-process run failed ({proc.returncode}):\n{log[-6000:]}")


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def render(ranks: list[dict], timing: list[dict], accum: int, command: str) -> tuple[list[str], list[str]]:
    """The two Markdown sections (gradient accumulation; resume reads)."""
    tiny = qwen3_params(512, 8, 8, 4, 64, 1536, 8192)
    big = qwen3_params(**QWEN3_4B)
    rs = [t for r in timing for t in r["reduce_scatter_s"]]
    # Per round: the every_micro_batch step minus the last_micro_batch step (rank 0; the ranks run in step).
    diffs = [a["seconds"] - b["seconds"] for a, b in zip(*(timing[0]["steps"][m] for m in MODES))]
    rounds = len(ranks[0]["steps"][MODES[0]])
    machine = f"{platform.machine()}, {os.cpu_count()} cores shared with other work, torch gloo, 1 thread per process"
    rows = []
    for mode in MODES:
        steps = [s for r in ranks for s in r["steps"][mode]]
        timed = [s["seconds"] for r in timing for s in r["steps"][mode]]
        rows.append(
            f"| `{mode}` | {_mib(max(s['grad_bytes_max'] for s in steps))} "
            f"| {_mib(max(s['unsharded_max'] for s in steps))} "
            f"| {max(s['step_peak_kib'] for s in steps) / 1024:,.1f} | {max(s['hwm_kib'] for s in steps) / 1024:,.0f} "
            f"| {statistics.median(timed):.2f} | {statistics.median(s['seconds'] for s in steps):.2f} |"
        )
    p, n = big["total"], 8
    grad = [
        GRAD_HEADING,
        "",
        f"Command: `{command}` ({machine}). Model: config-built Qwen3, hidden 512, 8 layers, MLP 1536, "
        f"vocabulary 8,192, tied head: {tiny['total']:,} parameters, float32 (full gradient "
        f"{_mib(4 * tiny['total'])} MiB). SFT on the built-in pairs, 2 processes x {accum} micro-batches of "
        f"1 example per step; one warm-up step per mode, then {rounds} rounds of one step in each mode "
        f"(alternating, in one launch), twice: a memory launch with MALLOC_MMAP_THRESHOLD_=65536, so freed "
        f"tensors leave the resident set and RSS peaks follow live memory, and a timing launch with the default "
        f"allocator (the time column; the fixed threshold makes large allocations system calls).",
        "",
        "| `distributed.grad_accum_sync` | gradient held, max (MiB) | of which unsharded (MiB) "
        "| step RSS peak over start (MiB) "
        "| VmHWM (MiB) | time / step (s, median) | same, memory launch (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Gradient held: `trainers.distributed.gradient_bytes` at each micro-batch boundary and before the optimizer "
        "step, maximum over steps and ranks. `every_micro_batch` (the default) reduce-scatters after every "
        "micro-batch, so between micro-batches a rank holds only its half of the gradient (the sharded `.grad`); "
        "`last_micro_batch` (`no_sync`) keeps FSDP2's unsharded gradient of every parameter, the full "
        "model-size gradient, until the last backward. The gradients of the two modes are equal up to float "
        "summation order (`tests/trainers/test_fsdp_grad_sync.py`, also against one process).",
        "",
        "Trade-off. `every_micro_batch` costs one reduce-scatter of the gradient per micro-batch instead of one "
        "per step: (N-1)/N x gradient bytes per rank each time. On CPU/gloo that communication is not hidden "
        "and shows in the step time (below); on GPUs FSDP2 overlaps each layer's reduce-scatter with the "
        "backward of the next layer, and a micro-batch's compute is far longer than its reduce-scatter at "
        "the paper's scale (an estimate, not measured here: Qwen3-4B, 4k-20k-token sequences: ~6 x 4e9 x 4096 "
        "= 1e14 FLOP per sequence, ~0.2 s at 500 TFLOP/s, against 8 GB x 7/8 of bf16 gradient over NVLink at "
        "~300 GB/s, ~25 ms). "
        "`last_micro_batch` saves that communication but holds the whole unsharded gradient on every rank. "
        "Under bf16 mixed precision `every_micro_batch` is also the more precise: FSDP2 adds each micro-batch's "
        "reduced gradient into the float32 shard, while with `no_sync` the unsharded gradients accumulate in the "
        "reduce dtype, bf16 in Accelerate's policy.",
        "",
        f"Time on this machine: one reduce-scatter of the whole gradient ({_mib(4 * tiny['total'])} MiB) between the "
        f"two gloo processes takes {statistics.median(rs):.2f} s (median of {len(rs)}, both ranks), so the "
        f"{accum - 1} extra ones should cost `every_micro_batch` about "
        f"{(accum - 1) * statistics.median(rs):.2f} s per step. Measured, step against step in the same "
        f"round of the timing launch: {statistics.median(diffs):+.2f} s (median; range {min(diffs):+.2f} to "
        f"{max(diffs):+.2f} s over {len(diffs)} rounds). The absolute step times move with the load of this "
        f"shared machine (compare the two launches), the paired difference much less.",
        "",
        f"Qwen3-4B on {n} ranks ({p:,} parameters, by the formula in the script): `last_micro_batch` holds "
        f"{_gb(4 * p)} GB of float32 unsharded gradient per rank ({_gb(2 * p)} GB in bf16: Accelerate's bf16 policy "
        f"reduces in bf16 and FSDP2 then accumulates unsharded gradients in bf16), plus the {_gb(4 * p / n)} GB "
        f"float32 shard at the step; `every_micro_batch` holds the {_gb(4 * p / n)} GB shard plus one FSDP unit's "
        f"transient unsharded gradient: {_gb(4 * big['per_layer'])} GB for a decoder layer, "
        f"{_gb(4 * big['embedding'])} GB for the unit with the tied embedding/head (float32). Saved per rank: "
        f"about {_gb(4 * p - 4 * p / n - 4 * big['embedding'])} GB in float32 "
        f"({_gb(2 * p - 2 * big['embedding'])} GB in bf16).",
        "",
    ]

    t = ranks[0]["tensors"]
    resume_rows = []
    for r, rec in enumerate(ranks):
        tr = rec["tensors"]
        resume_rows.append(
            f"| {r} | previous (`optimizer.pt`) | {_mib(tr['optim_full'])} | {_mib(rec['files']['optimizer_pt'])} "
            f"| {_mib(rec['load_legacy']['rchar'])} | {rec['load_legacy']['peak_kib'] / 1024:,.1f} |"
        )
        resume_rows.append(
            f"| {r} | sharded (`dcp/`) | {_mib(tr['model_local'] + tr['optim_local'])} "
            f"| {_mib(rec['files']['dcp_own'])} "
            f"| {_mib(rec['load_sharded']['rchar'])} | {rec['load_sharded']['peak_kib'] / 1024:,.1f} |"
        )
    resume = [
        RESUME_HEADING,
        "",
        f"Same command and model; after the measured steps the run saves a checkpoint, "
        f"copies it into the previous format (rank 0 gathers the full optimizer state into `optimizer.pt`), "
        f"and calls `load_checkpoint` on each. AdamW state: 2 float32 moments per parameter "
        f"({_mib(t['optim_full'])} MiB full here, with the 4-byte `step` counters); model {_mib(t['model_full'])} MiB.",
        "",
        "| rank | format | tensor data it must read (MiB) | file(s) (MiB) | read() bytes, rchar (MiB) "
        "| RSS peak over start (MiB) |",
        "|---|---|---:|---:|---:|---:|",
        *resume_rows,
        "",
        "Tensor data: the previous format has every rank read the full optimizer state (8 bytes per parameter) "
        "and keep its shard; the sharded format has each rank read its own shard of the trainable weights and "
        "of the optimizer state: (4 + 8) / N bytes per parameter. The weights are also read (in full) by "
        "`from_pretrained` from `model/` when the model is built, in both formats, as at any start. rchar exceeds "
        "the DCP file by torch.load's zip-directory reads (about 39 KB per stored tensor read, whatever its size), "
        "a few MiB here and negligible at real tensor sizes. RSS peak: the previous format "
        "materialises the whole optimizer state in host memory on every rank; DCP reads one stored tensor at a "
        "time into the already allocated shards.",
        "",
        f"Qwen3-4B on {n} ranks ({p:,} parameters, float32 master weights and moments): previous format: each "
        f"rank reads and holds {_gb(8 * p)} GB of optimizer state ({_gb(8 * 8 * p)} GB of host memory on an "
        f"8-rank node at once); sharded: each rank reads {_gb(12 * p / n)} GB ({_gb(4 * p / n)} GB weights + "
        f"{_gb(8 * p / n)} GB moments), {_gb(12 * p)} GB for the node, one tensor at a time. Saving changes "
        f"likewise: rank 0 no longer gathers the {_gb(8 * p)} GB optimizer state; each rank writes "
        f"{_gb(12 * p / n)} GB. The HF `model/` ({_gb(4 * p)} GB float32) is still gathered and written by rank 0.",
        "",
    ]
    return grad, resume


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="measured rounds (one step per mode each)")
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sft_memory.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite the page from fsdp_memory.json")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        out, model_path, steps, accum, kind = args.worker
        worker(Path(out), Path(model_path), int(steps), int(accum), kind)
        return

    from benchmarks.report import replace_section
    from trainers.tiny import build_tiny_policy

    saved = args.out.parent / "fsdp_memory.json"
    command = "python -m benchmarks.bench_fsdp_memory" + (f" --steps {args.steps}" if args.steps != 4 else "") + (
        f" --accum {args.accum}" if args.accum != 4 else ""
    )
    if args.render_only:
        data = json.loads(saved.read_text())
        ranks, timing, command, accum = data["memory"], data["timing"], data["command"], data["accum"]
    else:
        with tempfile.TemporaryDirectory(prefix="bench_fsdp_memory_") as tmp:
            root = Path(tmp)
            model, tokenizer = build_tiny_policy(seed=0, **MODEL_CONFIG)
            model.save_pretrained(root / "model")
            tokenizer.save_pretrained(root / "model")
            n_params = sum(p.numel() for p in model.parameters())
            expected = qwen3_params(512, 8, 8, 4, 64, 1536, 8192)["total"]
            if n_params != expected:
                raise RuntimeError(f"model has {n_params:,} parameters, the formula says {expected:,}")
            del model
            for kind in ("memory", "timing"):
                _launch(root, root / "model", args.steps, args.accum, kind)
            ranks = [json.loads((root / f"memory-rank{r}.json").read_text()) for r in (0, 1)]
            timing = [json.loads((root / f"timing-rank{r}.json").read_text()) for r in (0, 1)]
        accum = args.accum
        saved.write_text(
            json.dumps({"command": command, "accum": accum, "memory": ranks, "timing": timing}, indent=1) + "\n"
        )
    grad, resume = render(ranks, timing, accum, command)
    md = args.out.read_text() if args.out.is_file() else "# SFT memory\n"
    md = replace_section(md, GRAD_HEADING, grad)
    md = replace_section(md, RESUME_HEADING, resume)
    args.out.write_text(md)
    print("\n".join(grad + [""] + resume))


if __name__ == "__main__":
    main()
