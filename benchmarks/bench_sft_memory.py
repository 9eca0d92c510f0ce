"""SFT head memory: one forward+backward with the full `[B, T, V]` logits (before) against the head
applied only at target positions, chunked (after, what `trainers/sft.py` does), on CPU.

    python -m benchmarks.bench_sft_memory [--hidden 512] [--repeats 2] [--max-gib 9.5] [--threads 1]
        [--out benchmarks/results/sft_memory.md]
    python -m benchmarks.bench_sft_memory --from-table   # rewrite the section from the numbers in it

Writes only its own section ("## SFT head memory") of the results file, so other sections of the
same file (FSDP2 gradient accumulation) stay as they are.

Model: a Qwen3 built from a config (no download) with Qwen3's vocabulary V = 151,936, hidden
size H (512 by default; Qwen3-4B has 2,560), 2 decoder layers, 4 heads of 128 with 2 KV heads,
tied embeddings (as Qwen3-4B). The head dominates: at H = 512 the embedding is 78M of the
model's 84M parameters. Rows: a prompt of P tokens then a target of 150 tokens, the agent pairs'
ratio (about 97 % of positions are prompt); B = 1 at P = 1,000, 2,000 and 4,000, and B = 2 at
P = 1,000. Both methods get the same weights and tokens:

- full (before): `model(...).logits`, then `trainers.sft.target_nll_sum` (a float32 copy of the
  logits, cross-entropy at every position, prompt positions ignored): the code SFT ran before;
- head (after): `trainers.sft.head_target_nll_sum` (decoder body, then
  `trainers.fused_loss.fused_token_nll` on the target rows, 512 rows at a time).

Memory: the resident set's high-water mark (Linux VmHWM, reset through /proc/self/clear_refs just
before the step) minus the resident set once the model and inputs exist, in a fresh process per
run. It counts every byte the step touches (activations, logits, parameter gradients). Not
tracemalloc: it sees only allocations made through Python's allocator, and torch's CPU tensors
come from malloc/mmap directly, so it would report almost nothing. Not torch.profiler's memory
profile: it records allocations per operator, the peak has to be reconstructed from the events,
and profiling slows the ops being timed. The parameter gradients (the 311 MB embedding gradient
at H = 512 in float32) are in both methods' peaks.

Time: forward+backward of the step (no optimizer step: both methods would pay the same), median
over `--repeats` runs, each in a fresh process after a small warm-up step; runs are interleaved
across methods so that load on the shared machine hits both alike.

A full-logits case whose estimated peak is over `--max-gib` is not started (the machine is
shared); its peak and time are extrapolated linearly in T from the two shorter prompts measured at
the same batch size and dtype, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.procmem import reset_peak, rss_kib
from benchmarks.report import replace_section

HEADING = "## SFT head memory"
VOCAB = 151_936
TARGET = 150
LAYERS = 2
PROMPTS = (1_000, 2_000, 4_000)
CASES = [(1, 1_000), (1, 2_000), (1, 4_000), (2, 1_000)]  # (B, P); B = 2 shows the batch scaling
DTYPES = ("fp32", "bf16")
METHODS = ("full", "head")
GIB = 2**30
# Qwen3-4B (its config.json): hidden 2,560, vocabulary 151,936.
QWEN3_4B_HIDDEN = 2_560
# A real agent pair: 4,650 prompt + 147 target tokens (issue 12).
PAIR_PROMPT, PAIR_TARGET = 4_650, 147


def logits_bytes(method: str, batch: int, seq: int, targets: int, vocab: int, dtype: str, chunk: int = 512) -> int:
    """Bytes of the logits-related buffers one forward+backward holds at once (formula).

    full: what the forward leaves alive: the head output [B, T, V] in the model dtype, its
    float32 copy (`.float()`; none in float32) and the float32 log-softmax that cross-entropy
    saves for backward: 2 + 4 + 4 = 10 bytes per entry in bf16 (25 GB for Qwen3 at B = 4,
    T = 4,096, the issue's figure), 8 in float32. A lower bound on the peak: the backward then
    allocates float32 gradients of the same shape next to the saved log-softmax.
    head: per chunk of `chunk` target rows, the float32 logits and their softmax/gradient buffer
    ([chunk, V] each) plus, in bf16, a bf16 copy of the chunk for the matmuls; independent of T.
    What both share (weights, their gradients, the decoder body's activations) is left out.
    """
    el = {"fp32": 4, "bf16": 2}[dtype]
    if method == "full":
        n = batch * seq * vocab
        return n * el + (n * 4 if dtype == "bf16" else 0) + n * 4
    rows = min(chunk, targets)
    return 2 * rows * vocab * 4 + (rows * vocab * 2 if dtype == "bf16" else 0)


def estimate_bytes(method: str, batch: int, prompt: int, hidden: int, dtype: str) -> int:
    """Rough peak of one measured run, only to refuse oversized full-logits runs: the forward's
    logits buffers plus, for the backward, 4 bytes per entry more (calibrated on a float32 run at
    B = 1, P = 1,000: 2.24 GB measured, 2.9 GB estimated)."""
    seq = prompt + TARGET
    el = {"fp32": 4, "bf16": 2}[dtype]
    params = VOCAB * hidden * el * 2  # the embedding gradient and its temporaries
    body = batch * seq * hidden * 4 * 40 * LAYERS  # activations saved for backward, generous
    extra = batch * seq * VOCAB * 4 if method == "full" else 0
    return logits_bytes(method, batch, seq, batch * TARGET, VOCAB, dtype) + extra + params + body


# ----------------------------------------------------------------------------- worker side


def _build_model(hidden: int, dtype: str, seed: int = 0):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, intermediate_size=int(3.75 * hidden),
        max_position_embeddings=8192, tie_word_embeddings=True,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.config.use_cache = False
    return model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).train()


def _inputs(batch: int, prompt: int, seed: int = 1):
    import torch

    from trainers.sft_data import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, prompt + TARGET), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX
    return ids, torch.ones_like(ids), labels


def _loss(method: str, model, ids, mask, labels):
    from trainers.sft import head_target_nll_sum, target_nll_sum

    if method == "full":
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return target_nll_sum(logits, labels)
    return head_target_nll_sum(model, ids, mask, labels)


def worker(method: str, batch: int, prompt: int, hidden: int, dtype: str, threads: int) -> dict:
    """One forward+backward in this (fresh) process: peak extra resident memory, seconds, loss."""
    import torch

    torch.set_num_threads(threads)
    model = _build_model(hidden, dtype)
    # Warm-up on a short row so the timed step pays no one-time set-up; its gradients are dropped
    # (set_to_none, as the trainer does every step), so the timed step allocates them again.
    _loss(method, model, *_inputs(1, 16)).backward()
    model.zero_grad(set_to_none=True)
    ids, mask, labels = _inputs(batch, prompt)
    base_kib = rss_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    loss = _loss(method, model, ids, mask, labels)
    loss.backward()
    elapsed = time.perf_counter() - start
    peak_kib = rss_kib("VmHWM")
    return {"peak_bytes": (peak_kib - base_kib) * 1024, "time": elapsed, "loss": loss.item()}


# ----------------------------------------------------------------------------- parent side


def _spawn(**spec) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_sft_memory", "--worker", json.dumps(spec)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cases(hidden: int, repeats: int, limit: float, threads: int, bar) -> dict:
    """{(method, dtype, batch, prompt): {"peak", "time", "loss", "note"}} for every case."""
    jobs, refused = [], {}
    for dtype in DTYPES:
        for batch, prompt in CASES:
            for method in METHODS:
                est = estimate_bytes(method, batch, prompt, hidden, dtype)
                key = (method, dtype, batch, prompt)
                if est <= limit:
                    jobs.append(key)
                else:
                    refused[key] = f"not run: needs ~{est / GIB:.1f} GiB (estimated)"
    bar.reset(total=len(jobs) * repeats)
    runs: dict = {key: [] for key in jobs}
    for _ in range(repeats):  # rounds over all jobs, so load changes hit every method alike
        for method, dtype, batch, prompt in jobs:
            runs[(method, dtype, batch, prompt)].append(
                _spawn(method=method, batch=batch, prompt=prompt, hidden=hidden, dtype=dtype, threads=threads)
            )
            bar.update(1)
    results = {
        key: {"peak": max(r["peak_bytes"] for r in rs), "time": statistics.median(r["time"] for r in rs),
              "loss": rs[-1]["loss"], "note": "measured"}
        for key, rs in runs.items()
    }  # fmt: skip
    for (method, dtype, batch, prompt), why in refused.items():
        shorter = [p for p in PROMPTS if (method, dtype, batch, p) in results][:2]
        if len(shorter) < 2:
            results[(method, dtype, batch, prompt)] = {"peak": None, "time": None, "loss": None, "note": why}
            continue
        (p1, p2), r = shorter, results
        t1, t2, t = p1 + TARGET, p2 + TARGET, prompt + TARGET
        a, b = r[(method, dtype, batch, p1)], r[(method, dtype, batch, p2)]
        results[(method, dtype, batch, prompt)] = {
            "peak": a["peak"] + (b["peak"] - a["peak"]) / (t2 - t1) * (t - t1),
            "time": a["time"] + (b["time"] - a["time"]) / (t2 - t1) * (t - t1),
            "loss": None,
            "note": f"{why}; extrapolated linearly in T from P = {p1:,} and {p2:,}",
        }
    return results


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def _machine(threads: int) -> str:
    import torch

    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_kib / 2**20:.1f} GiB RAM, Linux {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {threads} thread(s) per run; the machine was "
        "shared with other jobs, so times carry noise"
    )


def section(results: dict, hidden: int, repeats: int, limit: float, threads: int, command: str) -> list[str]:
    """The Markdown of this benchmark's section."""
    params = VOCAB * hidden
    lines = [
        HEADING,
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_machine(threads)}.",
        "",
        f"Config-built Qwen3: V = {VOCAB:,}, H = {hidden}, {LAYERS} layers, tied embeddings "
        f"({params / 1e6:.0f}M embedding parameters). Rows of P prompt + {TARGET} target tokens; one forward+backward "
        "(no optimizer step). **full** = the logits `[B, T, V]` and `target_nll_sum` (the code before), **head** = "
        "`head_target_nll_sum` (the head at target rows only, 512 rows per chunk). Peak = resident-set high-water "
        "mark during the step minus the resident set before it (parameter gradients included; tracemalloc would "
        "not see torch's allocations), fresh process per run, "
        f"{repeats} runs per case interleaved across methods: peak is their maximum, time their median. "
        f"Full-logits runs estimated above {limit / GIB:g} GiB were not started (shared machine).",
        "",
        "| dtype | B | P | T | method | peak MiB | head / full peak | s per step | head / full time | loss | note |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for dtype in DTYPES:
        for batch, prompt in CASES:
            full = results[("full", dtype, batch, prompt)]
            for method in METHODS:
                r = results[(method, dtype, batch, prompt)]
                cells = [dtype, str(batch), f"{prompt:,}", f"{prompt + TARGET:,}", method]
                if r["peak"] is None:
                    lines.append("| " + " | ".join(cells + ["-"] * 5 + [r["note"]]) + " |")
                    continue
                ratio_p = f"{r['peak'] / full['peak']:.3f}" if method == "head" and full["peak"] else ""
                ratio_t = f"{r['time'] / full['time']:.2f}" if method == "head" and full["time"] else ""
                loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
                lines.append("| " + " | ".join(
                    cells + [_mib(r["peak"]), ratio_p, f"{r['time']:.2f}", ratio_t, loss, r["note"]]) + " |")
    lines += ["", *_summary_lines(results), "", *_growth_lines(results), "", *_formula_lines(), ""]
    return lines


def _summary_lines(results: dict) -> list[str]:
    """The longest B = 1 case in both dtypes, in one sentence each."""
    prompt = PROMPTS[-1]
    out = []
    for dtype in DTYPES:
        full, head = results[("full", dtype, 1, prompt)], results[("head", dtype, 1, prompt)]
        if full["peak"] is None or head["peak"] is None:
            continue
        kind = "measured" if full["note"] == "measured" else "extrapolated"
        out.append(
            f"- {dtype}, B = 1, T = {prompt + TARGET:,}: head {_mib(head['peak'])} MiB against full "
            f"{_mib(full['peak'])} MiB ({kind}), {head['peak'] / full['peak']:.3f}x the peak and "
            f"{head['time'] / full['time']:.2f}x the step time."
        )
    return ["Summary:", "", *out] if out else []


def _growth_lines(results: dict) -> list[str]:
    """Peak growth per 1,000 extra prompt tokens, measured between the two shortest prompts."""
    p1, p2 = PROMPTS[0], PROMPTS[1]
    out = [
        f"Peak growth per 1,000 more prompt tokens (between P = {p1:,} and {p2:,}, measured). The head path's is "
        "the decoder body's activations, H wide, which both paths hold; its logits buffers are sized by the "
        f"{TARGET} target rows, whatever T is:",
        "",
    ]
    for dtype in DTYPES:
        parts = []
        for method in METHODS:
            a, b = results.get((method, dtype, 1, p1)), results.get((method, dtype, 1, p2))
            if a and b and a["note"] == b["note"] == "measured":
                per_k = (b["peak"] - a["peak"]) / (p2 - p1) * 1000
                parts.append(f"{method} {_mib(per_k)} MiB")
        if parts:
            one = 1000 * VOCAB * {"fp32": 4, "bf16": 2}[dtype]
            out.append(f"- {dtype}, B = 1: " + ", ".join(parts)
                       + f" (one [1, 1,000, V] tensor in {dtype} is {_mib(one)} MiB)")
    return out


def _formula_lines() -> list[str]:
    b, t = 4, 4_096
    targets = round(b * t * PAIR_TARGET / (PAIR_PROMPT + PAIR_TARGET))
    full = logits_bytes("full", b, t, targets, VOCAB, "bf16")
    head = logits_bytes("head", b, t, targets, VOCAB, "bf16")
    return [
        f"Qwen3-4B by formula (`logits_bytes`; H = {QWEN3_4B_HIDDEN:,} does not enter it), bf16 weights, B = {b}, "
        f"T = {t:,}, {targets} target tokens in all (the pairs' {PAIR_TARGET} of {PAIR_PROMPT + PAIR_TARGET:,} "
        "positions):",
        "",
        f"- full logits: {full / 1e9:.1f} GB after the forward (bf16 logits 2 + float32 copy 4 + saved float32 "
        "log-softmax 4 bytes per B·T·V entry; the backward's float32 gradients come on top);",
        f"- head at target rows: {head / 1e6:.0f} MB ({min(512, targets)} rows x V: float32 logits, their gradient "
        "buffer, a bf16 copy for the matmuls), whatever T is: "
        f"{full / head:.0f}x less.",
        "",
        "Both leave out what the methods share (weights, their gradients, the decoder body's activations).",
    ]


def parse_section(md: str) -> dict:
    """The results of an earlier run, read back from its table (for `--from-table`)."""
    results, inside = {}, False
    for line in md.splitlines():
        if line.startswith("## "):
            inside = line == HEADING
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not inside or len(cells) != 11 or cells[0] not in DTYPES:
            continue
        dtype, batch, prompt, _, method, peak, _, secs, _, loss, note = cells
        measured = peak != "-"
        results[(method, dtype, int(batch), int(prompt.replace(",", "")))] = {
            "peak": float(peak.replace(",", "")) * 2**20 if measured else None,
            "time": float(secs) if measured else None,
            "loss": float(loss) if measured and loss != "-" else None,
            "note": note,
        }
    return results


def _header_values(md: str) -> tuple[str, int, int, float, int]:
    """(command, hidden, repeats, limit, threads) as the section's text states them."""
    import re

    body = md[md.index(HEADING):]
    command = re.search(r"Command: `([^`]*)`", body).group(1)
    hidden = int(re.search(r"H = (\d+)", body).group(1))
    repeats = int(re.search(r"(\d+) runs per case", body).group(1))
    limit = float(re.search(r"estimated above ([\d.]+) GiB", body).group(1)) * GIB
    threads = int(re.search(r"(\d+) thread\(s\) per run", body).group(1))
    return command, hidden, repeats, limit, threads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H of the config-built model")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case, each in a fresh process")
    parser.add_argument("--max-gib", type=float, default=9.5, help="never start a case estimated above this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="benchmarks/results/sft_memory.md")
    parser.add_argument("--from-table", action="store_true",
                        help="run nothing: rewrite the section of --out from the numbers already in its table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    out = Path(args.out)
    if args.from_table:
        md = out.read_text() if out.exists() else ""
        if HEADING not in md:
            parser.error(f"{out} has no section '{HEADING}' to rewrite: run the benchmark first")
        command, hidden, repeats, limit, threads = _header_values(md)
        lines = section(parse_section(md), hidden, repeats, limit, threads, command)
        out.write_text(replace_section(out.read_text(), HEADING, lines))
        print(f"bench_sft_memory: section '{HEADING}' of {out} rewritten from its table")
        return

    from tqdm import tqdm

    command = "python -m benchmarks.bench_sft_memory" + "".join(" " + a for a in (argv or sys.argv[1:]))
    with tqdm(total=0, desc="sft-memory runs", disable=args.no_progress) as bar:
        results = run_cases(args.hidden, args.repeats, args.max_gib * GIB, args.threads, bar)
    lines = section(results, args.hidden, args.repeats, args.max_gib * GIB, args.threads, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Read just before writing: another benchmark writes its own section of the same file.
    before = out.read_text() if out.exists() else "# SFT memory at real-model scale (issue 12)\n"
    out.write_text(replace_section(before, HEADING, lines))
    print("\n".join(lines))
    print(f"bench_sft_memory: section '{HEADING}' written to {out}")


if __name__ == "__main__":
    main()
