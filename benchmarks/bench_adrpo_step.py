"""Time per ADRPO training step, by part, on CPU.

    python -m benchmarks.bench_adrpo_step [--sections shared-prompt phases] [--repeats 5] [--threads 1]
        [--cases 1500:150 4000:300] [--out benchmarks/results/adrpo_step.md]

Each section measures one thing and owns one block of the results file (between
`<!-- section:NAME -->` markers; a rerun replaces only its own block). Sections:

- `phases`: the embedded default config (`python trainers/adrpo.py`) run once with the
  transformers engine and once with vLLM; seconds per step by phase (rollout, reward, old / ref
  log-probs, forward + backward, clip + optimizer, weight push) and the peak resident set of the
  process tree.
- `shared-prompt`: the trainer's forward+backward (final hidden states -> `fused_policy_loss` ->
  backward) on G = 8 samples sharing a prompt, prompt:answer lengths 1,500:150 and 4,000:300,
  three ways: `packed` (each prompt once, `enable_shared_prompt_attention`), `packed-mask` (the
  same packed row through plain sdpa with the dense 4-D mask) and `plain` (the G sequences
  prompt + answer as one [G, P + A] batch, what a trainer does without packing). All answers of
  a case have the same length, so the plain batch has no padding and keeps sdpa's causal fast
  path: the comparison is the best case for plain. Gradients of every parameter are compared
  with the plain ones in the same run.

Timing: one subprocess per case builds the model and inputs, computes the old / reference
log-probs (not timed), runs one warm-up step per mode, then `--repeats` rounds that each run every
mode once (order rotating), so that load changes on the shared machine hit all modes alike; the
speed-up is the median over rounds of plain time / mode time. Memory: a fresh subprocess per
(case, mode), one warm-up step, then the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) of one step minus the resident set before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.procmem import reset_peak, rss_kib

G = 8
DEFAULT_CASES = [(1500, 150), (4000, 300)]  # prompt length : answer length
MODES = ["packed", "packed-mask", "plain"]
SPEEDUP_GOAL = 3.0
TEMPERATURE = 0.8
# A small Qwen3 that fits a CPU (5.3M parameters, 2.1M of them the tied embedding).
MODEL_CONFIG = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=768,
    vocab_size=8192,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
MIB = 2**20


# ----------------------------------------------------------------------------- worker side


class _SharedPromptStep:
    """One case's model, group and loss inputs; `run(mode)` is one timed-able training step."""

    def __init__(self, prompt_len: int, answer_len: int) -> None:
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from trainers.losses import Aggregation, PolicyLossConfig
        from trainers.packing import PromptGroup, completion_logprobs, enable_shared_prompt_attention

        torch.manual_seed(0)
        self.model = Qwen3ForCausalLM(Qwen3Config(**MODEL_CONFIG, attn_implementation="sdpa"))
        self.model.train()  # dropout is 0 in this config; train mode as in the trainer
        # Registers the row-by-row attention; ordinary calls stay sdpa. `run` switches per mode.
        enable_shared_prompt_attention(self.model)
        self.model.set_attn_implementation("sdpa")
        g = torch.Generator().manual_seed(1)
        vocab = MODEL_CONFIG["vocab_size"]
        self.group = PromptGroup(
            torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
            [torch.randint(0, vocab, (answer_len,), generator=g).tolist() for _ in range(G)],
        )
        # The trainer's defaults: token-mean, k3 KL 0.02 against a reference; old and reference
        # log-probs recomputed at the sampling temperature (the same weights here, so ratio 1),
        # the same values for every mode (plain layout) so that the gradients can be compared.
        self.loss_config = PolicyLossConfig(beta=0.02, aggregation=Aggregation.TOKEN_MEAN)
        self.old_logp, _ = completion_logprobs(self.model, [self.group], temperature=TEMPERATURE, layout="plain")
        # Ratio 1, KL 0 and equal answer lengths: the token-mean loss is -mean(A) = -0.5.
        self.advantages = torch.linspace(-1.0, 2.0, G)

    def positions(self, mode: str) -> int:
        return self.group.packed_length if mode != "plain" else G * max(self.group.plain_lengths)

    def run(self, mode: str) -> float:
        """zero_grad, hidden states, fused loss, backward; returns the loss."""
        import torch

        from trainers.fused_loss import fused_policy_loss
        from trainers.logprobs import lm_head_params
        from trainers.packing import SHARED_PROMPT_ATTENTION, completion_hidden_states

        model = self.model
        model.set_attn_implementation(SHARED_PROMPT_ATTENTION if mode == "packed" else "sdpa")
        model.zero_grad(set_to_none=True)
        states = completion_hidden_states(model, [self.group], layout="plain" if mode == "plain" else "packed")
        weight, bias = lm_head_params(model)
        n = states.hidden.shape[0]
        loss, _ = fused_policy_loss(
            states.hidden, weight, states.token_ids, self.old_logp, self.advantages[states.seq_index],
            torch.ones(n), torch.ones(n, dtype=torch.bool), states.seq_index, states.num_seqs, self.loss_config,
            head_bias=bias, ref_logp=self.old_logp, temperature=TEMPERATURE,
        )  # fmt: skip
        loss.backward()
        return loss.item()


def shared_prompt_timing_worker(prompt_len: int, answer_len: int, repeats: int, grads_dir: str) -> dict:
    """All modes in one process, in rounds (each round runs every mode once, order rotating), so
    that the shared machine's load changes hit every mode alike."""
    import torch

    case = _SharedPromptStep(prompt_len, answer_len)
    for mode in MODES:
        case.run(mode)  # warm-up: thread pools, kernels, first allocations
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    losses: dict[str, float] = {}
    for r in range(repeats):
        for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
            start = time.perf_counter()
            losses[mode] = case.run(mode)
            times[mode].append(time.perf_counter() - start)
            if r == repeats - 1:
                grads = {name: p.grad.clone() for name, p in case.model.named_parameters()}
                torch.save(grads, str(Path(grads_dir) / f"{mode}.pt"))
    return {"times": times, "losses": losses, "positions": {m: case.positions(m) for m in MODES}}


def shared_prompt_memory_worker(mode: str, prompt_len: int, answer_len: int) -> dict:
    """Peak extra resident memory of one step of `mode`, alone in this (fresh) process."""
    case = _SharedPromptStep(prompt_len, answer_len)
    case.run(mode)  # warm-up, as in the timing runs
    case.model.zero_grad(set_to_none=True)
    base_kib = rss_kib("VmRSS")
    reset_peak()
    case.run(mode)
    return {"peak_bytes": (rss_kib("VmHWM") - base_kib) * 1024}


# ----------------------------------------------------------------------------- parent side


def _spawn(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_adrpo_step", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_relative_difference(grads_a: dict, grads_b: dict) -> tuple[float, str]:
    """max over parameters of max|a - b| / max|b|, and the parameter where it is reached."""
    worst, where = 0.0, ""
    for name, b in grads_b.items():
        a = grads_a[name]
        rel = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        if rel >= worst:
            worst, where = rel, name
    return worst, where


def run_shared_prompt_section(repeats: int, threads: int, cases: list[tuple[int, int]]) -> str:
    """Measure the `shared-prompt` section; returns its markdown (after its title)."""
    import torch
    from tqdm import tqdm

    timing: dict[tuple[int, int], dict] = {}
    peaks: dict[tuple[int, int, str], int] = {}
    grad_checks: dict[tuple[int, int, str], tuple[float, str]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(cases) * (1 + len(MODES)), desc="shared-prompt") as bar:
        for prompt_len, answer_len in cases:
            bar.set_postfix_str(f"{prompt_len}:{answer_len} timing")
            grads_dir = Path(tmp) / f"{prompt_len}-{answer_len}"
            grads_dir.mkdir()
            timing[prompt_len, answer_len] = _spawn(
                dict(section="shared-prompt-timing", prompt_len=prompt_len, answer_len=answer_len,
                     repeats=repeats, grads_dir=str(grads_dir), threads=threads)
            )  # fmt: skip
            bar.update(1)
            plain = torch.load(grads_dir / "plain.pt", weights_only=True)
            for mode in MODES[:-1]:
                grad_checks[prompt_len, answer_len, mode] = _max_relative_difference(
                    torch.load(grads_dir / f"{mode}.pt", weights_only=True), plain
                )
            for mode in MODES:
                bar.set_postfix_str(f"{prompt_len}:{answer_len} memory {mode}")
                spec = dict(section="shared-prompt-memory", mode=mode, prompt_len=prompt_len, answer_len=answer_len,
                            threads=threads)  # fmt: skip
                peaks[prompt_len, answer_len, mode] = _spawn(spec)["peak_bytes"]
                bar.update(1)
    load_after = os.getloadavg()

    lines = [
        f"Model: Qwen3 built from a config, {_config_text()}; fp32, sdpa attention, train mode.",
        f"Step: G = {G} answers of one prompt -> final hidden states (`trainers.packing.completion_hidden_states`) "
        f"-> `fused_policy_loss` (token-mean, k3 KL beta 0.02, T = {TEMPERATURE}, ratio 1) -> backward; "
        "nothing else (no optimizer).",
        f"Timing: one process per case, torch.set_num_threads({threads}), one warm-up step per mode, then "
        f"{repeats} rounds, each running every mode once (order rotating), so that the shared machine's load "
        "changes hit all modes alike; median and min over the rounds, and the median over rounds of each "
        f"round's plain / mode time ratio. Load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        "(other jobs share the 2 cores, so single times carry noise; the per-round ratio is the steadier number).",
        "Peak memory: a fresh process per (case, mode), one warm-up step, then the resident-set high-water mark "
        "(VmHWM, reset just before) of one step minus the resident set before it; it counts activations, "
        "gradients and the 4-D mask.",
        "",
        "Modes: `packed` = one row per group, each prompt computed once, row-by-row attention "
        "(`enable_shared_prompt_attention`); `packed-mask` = the same row through plain sdpa with the dense 4-D "
        "block mask; `plain` = the G sequences prompt + answer as one [G, P + A] batch (equal answer lengths, so "
        "no padding and sdpa's causal fast path: the best case for plain).",
        "",
        "| prompt:answer | mode | positions / step | median s | min s | speed-up vs plain (median of rounds) | "
        "peak MiB | grad max rel. diff vs plain | loss (expected -0.5) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    goals = []
    for prompt_len, answer_len in cases:
        t = timing[prompt_len, answer_len]
        speedups = {
            mode: statistics.median(p / m for p, m in zip(t["times"]["plain"], t["times"][mode])) for mode in MODES
        }
        for mode in MODES:
            times = t["times"][mode]
            check = grad_checks.get((prompt_len, answer_len, mode))
            check_text = f"{check[0]:.1e}" if check else "(reference)"
            lines.append(
                f"| {prompt_len:,}:{answer_len} | {mode} | {t['positions'][mode]:,} | {statistics.median(times):.2f} "
                f"| {min(times):.2f} | {speedups[mode]:.2f}x | {peaks[prompt_len, answer_len, mode] / MIB:,.0f} "
                f"| {check_text} | {t['losses'][mode]:.6f} |"
            )
        rel, where = grad_checks[prompt_len, answer_len, "packed"]
        verdict = "met" if speedups["packed"] >= SPEEDUP_GOAL else "NOT met"
        memory = peaks[prompt_len, answer_len, "plain"] / max(peaks[prompt_len, answer_len, "packed"], 1)
        goals.append(
            f"- {prompt_len:,}:{answer_len}: packed is {speedups['packed']:.2f}x faster than plain (goal >= "
            f"{SPEEDUP_GOAL:.0f}x: {verdict}), with {memory:.1f}x less peak memory; gradients equal to {rel:.1e} "
            f"relative (largest at `{where}`)."
        )
    lines += ["", f"Goal (>= {SPEEDUP_GOAL:.0f}x at G = {G}, equal gradients):", "", *goals, ""]
    lines.append(
        "Grad max rel. diff = max over parameters of max|g - g_plain| / max|g_plain|, gradients of the last round. "
        "The layouts add the same terms in different orders (the prompt's gradient arrives summed over the G "
        "answers instead of once per copy) and the model's RMSNorms round to float32 inside, hence differences "
        "around 1e-6, not 0."
    )
    return "\n".join(lines) + "\n"


def _config_text() -> str:
    c = MODEL_CONFIG
    return (
        f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads "
        f"({c['num_key_value_heads']} KV) of {c['head_dim']}, MLP {c['intermediate_size']}, vocab "
        f"{c['vocab_size']:,}, tied embeddings (5.3M parameters)"
    )


# ----------------------------------------------------------------------------- phases section

PHASES = [  # (metric, label)
    ("time/rollout_s", "rollout"),
    ("time/reward_s", "reward"),
    ("time/logprobs_s", "old / ref log-probs"),
    ("fwd_bwd", "forward + backward"),
    ("time/optimizer_s", "clip + optimizer"),
    ("time/weight_push_s", "weight push"),
]
ENGINES = ["transformers", "vllm"]


def _tree_rss(proc) -> int:
    """Resident bytes of a process and all its descendants (the vLLM engine runs in a child)."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _run_default(engine: str, out: Path, threads: int, extra: list[str]) -> dict:
    """`python trainers/adrpo.py` (the embedded default config) with one engine; per-step metrics,
    wall time and the peak resident set of its process tree, sampled every 0.2 s."""
    import psutil

    cmd = [sys.executable, "trainers/adrpo.py", f"rollout.engine={engine}", f"checkpoint.output_dir={out}",
           "logging.progress_bar=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(watched))
        time.sleep(0.2)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"adrpo.py with rollout.engine={engine} failed ({proc.returncode}):\n{log[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"rows": rows, "wall_s": time.perf_counter() - started, "peak_rss": peak, "command": " ".join(cmd[1:])}


def run_phases_section(repeats: int, threads: int, cases: list[tuple[int, int]], extra: list[str] | None = None) -> str:
    """Time per step of the embedded default config by phase, transformers vs vLLM rollout."""
    from tqdm import tqdm

    extra = extra or []
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in tqdm(ENGINES, desc="default config runs"):
            runs[engine] = _run_default(engine, Path(tmp) / engine, threads, extra)
    lines = [
        "The embedded default (`trainers/configs/adrpo_cpu.yaml`: SmolLM2-135M-Instruct, G = 4, answers up "
        "to 64 tokens, 1 session x 4 agents per step, 2 steps, offline reward) run as "
        "`python trainers/adrpo.py rollout.engine=ENGINE` (commands below), once per engine, one after the "
        "other. Seconds per step from each run's `metrics.jsonl`; forward + backward is the update "
        "phase minus clip + optimizer. Step 1 includes first-call warm-up. Peak memory: the highest "
        "resident set of the whole process tree (trainer, and vLLM's engine process), sampled every 0.2 s.",
        "",
        "| engine | step | " + " | ".join(label for _, label in PHASES) + " | step total |",
        "|---|---|" + "---|" * (len(PHASES) + 1),
    ]
    for engine, run in runs.items():
        for row in run["rows"]:
            vals = []
            for key, _ in PHASES:
                if key == "fwd_bwd":
                    vals.append(row.get("time/update_s", float("nan")) - row.get("time/optimizer_s", 0.0))
                else:
                    vals.append(row.get(key, float("nan")))
            total = sum(row.get(k, 0.0) for k in ("time/episodes_s", "time/logprobs_s", "time/update_s", "time/weight_push_s"))
            lines.append(f"| {engine} | {row['step']} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {total:.1f} |")
    lines += ["", "| engine | wall time of the whole command (s) | peak resident set (GiB) | rollout tokens/s (last step) |",
              "|---|---|---|---|"]
    for engine, run in runs.items():
        last = run["rows"][-1]
        lines.append(f"| {engine} | {run['wall_s']:.0f} | {run['peak_rss'] / 2**30:.2f} | {last.get('rollout/tokens_per_s', float('nan')):.1f} |")
    t, v = runs["transformers"]["rows"][-1], runs["vllm"]["rows"][-1]
    lines += ["", f"Rollout, last step: vLLM {v['time/rollout_s']:.1f} s against transformers {t['time/rollout_s']:.1f} s "
              f"({t['time/rollout_s'] / max(v['time/rollout_s'], 1e-9):.2f}x).", "", "Commands:", ""]
    lines += [f"    python {run['command']}" for run in runs.values()]
    return "\n".join(lines)


# The sections this benchmark knows: title and the function measuring it (repeats, threads,
# cases) -> markdown; and the worker function each runs in its subprocesses.
SECTIONS: dict[str, tuple[str, Callable[[int, int, list[tuple[int, int]]], str]]] = {
    "shared-prompt": (
        "Shared-prompt groups against plain per-sample batches (forward + backward)",
        run_shared_prompt_section,
    ),
    "phases": ("Time per step of the default config, by phase, transformers and vLLM rollout", run_phases_section),
}
WORKERS: dict[str, Callable[..., dict]] = {
    "shared-prompt-timing": shared_prompt_timing_worker,
    "shared-prompt-memory": shared_prompt_memory_worker,
}


def write_section(path: Path, name: str, body: str, header: str) -> None:
    """Put `body` between this section's markers in `path`, keeping every other section."""
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else header
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + block + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def _machine_text(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"Machine: {cpu}, {os.cpu_count()} cores, {mem_gib:.1f} GiB RAM, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({threads} thread(s) per run)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cases", nargs="+", default=[f"{p}:{a}" for p, a in DEFAULT_CASES], help="prompt:answer lengths"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adrpo_step.md"))
    parser.add_argument("--phase-overrides", nargs="*", default=[], metavar="key=value",
                        help="phases section: config overrides for both default-config runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        import torch

        torch.set_num_threads(spec.pop("threads"))
        print(json.dumps(WORKERS[spec.pop("section")](**spec)))
        return
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        cases = [(int(c.split(":")[0]), int(c.split(":")[1])) for c in args.cases]
    except (IndexError, ValueError):
        parser.error(f"--cases takes prompt:answer pairs of ints, got {args.cases}")
    if any(p < 1 or a < 1 for p, a in cases):
        parser.error(f"--cases lengths must be >= 1, got {args.cases}")
    header = "# ADRPO step benchmark (CPU)\n\nSections are written by `python -m benchmarks.bench_adrpo_step`.\n"
    for name in args.sections:
        title, run = SECTIONS[name]
        body = run(args.repeats, args.threads, cases, args.phase_overrides) if name == "phases" else run(args.repeats, args.threads, cases)
        command = (
            f"python -m benchmarks.bench_adrpo_step --sections {name} --repeats {args.repeats} "
            f"--threads {args.threads} --cases {' '.join(args.cases)}"
        )
        text = f"## {title}\n\nCommand: `{command}`\n\n{_machine_text(args.threads)}\n\n{body}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_section(args.out, name, text, header)
        print(f"wrote section {name!r} of {args.out}")


if __name__ == "__main__":
    main()
