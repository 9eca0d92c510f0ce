"""Peak memory and time of the policy loss's forward+backward: naive vs fused vs Liger, on CPU.

    python -m benchmarks.bench_loss_kernel [--max-gib 6] [--repeats 3] [--out benchmarks/results/loss_kernel.md]
    python -m benchmarks.bench_loss_kernel --dtype-sweep   # only the fp32 / bf16 section (about 2 minutes)
    python -m benchmarks.bench_loss_kernel --plot-only     # only redraw loss_kernel.png from the saved numbers
    python -m benchmarks.bench_loss_kernel --dtype-timing  # only the fp32 / bf16 timing section (about 15 minutes)

A full run writes the report (--out), the raw numbers next to it (.json) and the plot (.png).

Hidden size H = 576 (SmolLM2-135M); N completion tokens in sequences of 512; V = 49,152
(SmolLM2) or 151,936 (Qwen3). All three paths compute the same loss (ADRPO / GRPO with
per-sequence token mean, clip 0.2, beta 0.02 with precomputed reference log-probs, fp32):

- naive: logits = h @ W.T in full, log_softmax, gather, `trainers.losses.policy_loss`, backward;
- fused: `trainers.fused_loss.fused_policy_loss` (chunked over tokens, default chunk size);
- liger: `liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss` (compiled=False, chunks of one
  sequence), if the package is installed.

The timing section (`--dtype-timing`) runs every method in fp32 and in bf16 (h and W in that
dtype) at N = 2,048 and both V, `--repeats` runs each interleaved, against issue 12 item 2's goal:
fused time within 1.1x of naive and fused peak at most Liger's, in both dtypes.

Every run is one forward+backward in a fresh subprocess. Memory is the process's peak resident
set (VmHWM) during the run minus its resident set once the inputs exist, so it counts
everything the loss allocates, gradients of h and W included. A case whose estimated peak is over
`--max-gib` is not started (other people share the machine); for the naive path such a case is
extrapolated linearly in N from runs at N = 1,024 and 2,048 with the same V, and says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
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

H = 576
SEQ_LEN = 512
CASES = [(4096, 49_152), (4096, 151_936), (16_384, 49_152), (16_384, 151_936)]
SUBSET_NS = (1024, 2048)
SWEEP_CASES = [(4096, 49_152), (2048, 151_936)]
SWEEP_CHUNKS = [128, 256, 512, 1024, 2048]
GRAD_N = 1024
DTYPE_N = 1024
DTYPE_VOCABS = (16_384, 49_152, 98_304, 151_936)
DTYPES = ("fp32", "bf16")
DTYPE_HEADING = "## Peak memory against vocabulary size and dtype"
TIMING_N = 2048
TIMING_VOCABS = (49_152, 151_936)
TIMING_HEADING = "## Time and peak in fp32 and bf16, against the goal"
GIB = 2**30


def _liger_available() -> bool:
    try:
        importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def estimate_bytes(method: str, n: int, vocab: int, chunk: int, dtype: str = "fp32") -> int:
    """Rough peak of what the loss allocates, used only to refuse oversized runs (an upper bound:
    the measured peaks are 0.4-1x of it, since zero-filled pages that are never written do not
    count in the resident set).

    float32 (e = 4 bytes per element):
    naive: three [N, V] buffers live at once (logits, log_softmax output kept for backward, and
    the gradient flowing back through them) plus grad W [V, H]: 3·N·V·4 + V·H·4 + N·H·4;
    fused: at most two [chunk, V] buffers, grad W twice (the kernel's accumulator and the
    returned gradient) and grad h: 2·chunk·V·4 + 3·V·H·4 + 2·N·H·4;
    liger: a handful of [512, V] buffers per sequence chunk plus its grad accumulators.
    bf16 (h and W in bf16, e = 2):
    naive: the same three [N, V] buffers in bf16 (the loss's log_softmax runs in bf16 too):
    3·N·V·2 + V·H·2 + N·H·2, about two thirds of float32 measured (1,191 vs 1,780 MiB at
    N = 1,024, V = 151,936: the gather and the fp32 loss add a little);
    fused: the chunk's logits and softmax stay float32 (2·chunk·V·4) plus a bf16 copy of the chunk
    for the matmuls (chunk·V·2), and one bf16 grad W buffer (V·H·2): at V = 151,936 that is
    0.6 GiB of chunk buffers whatever the dtype, so the bf16 peak is close to the float32 one
    (616 vs 633 MiB measured at N = 1,024);
    liger: as float32 with bf16 weight-sized buffers.
    """
    if dtype == "bf16":
        if method == "naive":
            return 3 * n * vocab * 2 + vocab * H * 2 + n * H * 2
        if method == "fused":
            return 2 * chunk * vocab * 4 + chunk * vocab * 2 + vocab * H * 2 + 2 * n * H * 2
        return 6 * SEQ_LEN * vocab * 4 + 3 * vocab * H * 2 + 2 * n * H * 2
    if method == "naive":
        return 3 * n * vocab * 4 + vocab * H * 4 + n * H * 4
    if method == "fused":
        return 2 * chunk * vocab * 4 + 3 * vocab * H * 4 + 2 * n * H * 4
    return 6 * SEQ_LEN * vocab * 4 + 3 * vocab * H * 4 + 2 * n * H * 4


# ----------------------------------------------------------------------------- worker side


def _make_inputs(n: int, vocab: int, seed: int = 0):
    import torch

    from trainers.logprobs import token_logprobs

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, H, generator=g) / H**0.5).requires_grad_(True)
    ids = torch.randint(0, vocab, (n,), generator=g)
    true_logp, _ = token_logprobs(hidden.detach(), weight.detach(), ids)
    old = true_logp + 0.1 * torch.randn(n, generator=g)
    ref = true_logp + 0.1 * torch.randn(n, generator=g)
    adv = torch.randn(n // SEQ_LEN, generator=g)
    return hidden, weight, ids, old, ref, adv


def _loss_fn(method: str, chunk: int | None):
    import torch

    from trainers.fused_loss import fused_policy_loss
    from trainers.logprobs import DEFAULT_CHUNK_SIZE
    from trainers.losses import PolicyLossConfig, policy_loss

    cfg = PolicyLossConfig(beta=0.02)

    if method == "naive":

        def run(hidden, weight, ids, old, ref, adv):
            b = adv.shape[0]
            logits = hidden @ weight.t()
            logp = torch.log_softmax(logits, dim=-1).gather(1, ids[:, None]).view(b, -1)
            mask = torch.ones_like(logp, dtype=torch.bool)
            return policy_loss(logp, old.view(b, -1), adv, torch.ones(b), mask, cfg, ref.view(b, -1))[0]

        return run
    if method == "fused":

        def run(hidden, weight, ids, old, ref, adv):
            n, b = ids.shape[0], adv.shape[0]
            seq = torch.arange(b).repeat_interleave(n // b)
            ones = torch.ones(n)
            mask = torch.ones(n, dtype=torch.bool)
            return fused_policy_loss(
                hidden, weight, ids, old, adv[seq], ones, mask, seq, b, cfg,
                ref_logp=ref, chunk_size=chunk or DEFAULT_CHUNK_SIZE,
            )[0]  # fmt: skip

        return run

    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    liger = LigerFusedLinearGRPOLoss(
        beta=0.02, compiled=False, use_ref_model=True, chunk_size=1,
        epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
    )

    def run(hidden, weight, ids, old, ref, adv):
        b = adv.shape[0]
        out = liger(
            hidden.view(b, -1, H),
            weight,
            ids.view(b, -1),
            torch.ones(b, ids.shape[0] // b),
            adv,
            ref_per_token_logps=ref.view(b, -1),
            old_per_token_logps=old.view(b, -1),
        )
        return out[0]

    return run


def worker(method: str, n: int, vocab: int, chunk: int | None, grads_to: str | None, dtype: str = "fp32") -> dict:
    """One forward+backward in this (fresh) process; returns its peak extra memory and time.

    `dtype` is that of h and W (the logits follow them); the loss itself is always reduced in fp32.
    """
    import torch

    run = _loss_fn(method, chunk)
    cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    # Start the thread pools and kernels on a small problem, so the timed run pays no one-time
    # library set-up. Large buffers are returned to the OS when freed (mmap), so every step of a
    # CPU training loop pays its page faults, as the timed run does.
    small = _make_inputs(SEQ_LEN, 1024)
    run(*small).backward()
    del small
    inputs = list(_make_inputs(n, vocab))
    for i in (0, 1):  # h and W in the asked dtype, still leaves of the graph
        inputs[i] = inputs[i].detach().to(cast).requires_grad_(True)
    hidden, weight = inputs[0], inputs[1]
    base_kib = rss_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    loss = run(*inputs)
    loss.backward()
    elapsed = time.perf_counter() - start
    peak_kib = rss_kib("VmHWM")
    if grads_to:
        torch.save({"hidden": hidden.grad, "weight": weight.grad, "loss": loss.item()}, grads_to)
    return {"peak_bytes": (peak_kib - base_kib) * 1024, "time": elapsed, "loss": loss.item()}


# ----------------------------------------------------------------------------- parent side


def _spawn(method: str, n: int, vocab: int, chunk: int | None, grads_to: str | None = None,
           dtype: str = "fp32") -> dict:
    spec = json.dumps(dict(method=method, n=n, vocab=vocab, chunk=chunk, grads_to=grads_to, dtype=dtype))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_loss_kernel", "--worker", spec],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _timing_rows(methods: list[str], repeats: int, bar) -> list[dict]:
    """Every (V, dtype, method) at N = TIMING_N, `repeats` runs each in rounds over all of them
    (load changes on the shared machine hit every method alike): max peak, median time."""
    keys = [(v, d, m) for v in TIMING_VOCABS for d in DTYPES for m in methods]
    runs: dict = {k: [] for k in keys}
    for _ in range(repeats):
        for v, d, m in keys:
            runs[(v, d, m)].append(_spawn(m, TIMING_N, v, None, dtype=d))
            bar.update(1)
    return [
        {"method": m, "dtype": d, "n": TIMING_N, "vocab": v, "peak_bytes": max(r["peak_bytes"] for r in rs),
         "time_s": statistics.median(r["time"] for r in rs), "times_s": [r["time"] for r in rs]}
        for (v, d, m), rs in runs.items()
    ]  # fmt: skip


def _timing_section(rows: list[dict], repeats: int, liger: bool) -> list[str]:
    by = {(r["vocab"], r["dtype"], r["method"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        TIMING_HEADING,
        "",
        f"N = {TIMING_N:,} tokens (sequences of {SEQ_LEN}), h and W in the given dtype, {repeats} runs per row in "
        "rounds across methods and dtypes, one fresh process each, `OMP_NUM_THREADS=1`; peak is the maximum, time "
        "the median. Goal (issue 12 item 2): fused time <= 1.1x naive and fused peak <= Liger's, in both dtypes. "
        "The load of the shared machine changed between rounds (every method ran faster in the third), so the "
        "verdict takes the paired ratio: fused time / naive time within each round, median over rounds; the ratio "
        "of the medians is shown too. `python -m benchmarks.bench_loss_kernel --dtype-timing` reruns only this "
        "section.",
        "",
        "| V | dtype | method | peak MiB | peak / naive | median s | time / naive (medians) | per round / naive | runs s |",
        "|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    verdicts = []
    for v in TIMING_VOCABS:
        for d in DTYPES:
            base = by[(v, d, "naive")]
            for m in methods:
                r = by[(v, d, m)]
                runs = ", ".join(f"{t:.2f}" for t in r["times_s"])
                paired = ", ".join(f"{t / b:.2f}" for t, b in zip(r["times_s"], base["times_s"]))
                lines.append(f"| {v:,} | {d} | {m} | {_mib(r['peak_bytes'])} | {r['peak_bytes'] / base['peak_bytes']:.3f} | "
                             f"{r['time_s']:.2f} | {r['time_s'] / base['time_s']:.2f} | {paired} | {runs} |")
            f = by[(v, d, "fused")]
            ratio = statistics.median(t / b for t, b in zip(f["times_s"], base["times_s"]))
            part = (f"V = {v:,}, {d}: fused time {ratio:.2f}x naive, paired median "
                    f"({f['time_s'] / base['time_s']:.2f}x by medians): {'met' if ratio <= 1.1 else 'missed'}")
            lg = by.get((v, d, "liger"))
            if lg:
                pr = f["peak_bytes"] / lg["peak_bytes"]
                part += f"; fused peak {pr:.2f}x Liger's ({'met' if pr <= 1.0 else 'missed'})"
            verdicts.append("- " + part + ".")
    lines += ["", *verdicts, ""]
    if not liger:
        lines += [
            "liger-kernel is not installed in this environment (`pip install liger-kernel` adds its rows), so the "
            "peak-versus-Liger half of the goal is not measured in this section. For fp32 the runs in the first table "
            "(liger-kernel 0.8.5, N = 4,096) stand: Liger peaked at 312 MiB (V = 49,152) and 780 MiB (V = 151,936), "
            "above the fused peaks here; Liger in bf16 was not measured on this machine.",
            "",
        ]
    return lines


def _run_interleaved(jobs: list[tuple], repeats: int, bar) -> dict:
    """Run each job (key, method, n, vocab, chunk) `repeats` times, in rounds over all jobs.

    Rounds rather than job after job, so that a change in the machine's load (it is shared)
    hits every method alike. Returns per key: max peak, median time, last loss.
    """
    runs: dict = {key: [] for key, *_ in jobs}
    for _ in range(repeats):
        for key, method, n, vocab, chunk in jobs:
            runs[key].append(_spawn(method, n, vocab, chunk))
            bar.update(1)
    return {
        key: {
            "peak": max(r["peak_bytes"] for r in rs),
            "time": statistics.median(r["time"] for r in rs),
            "loss": rs[-1]["loss"],
        }
        for key, rs in runs.items()
    }


def _extrapolate(r1: dict, r2: dict, n1: int, n2: int, n: int) -> tuple[float, float]:
    """Linear in N through the two subset runs: (peak bytes, seconds) at N = n."""
    peak = r1["peak"] + (r2["peak"] - r1["peak"]) / (n2 - n1) * (n - n1)
    secs = r1["time"] + (r2["time"] - r1["time"]) / (n2 - n1) * (n - n1)
    return peak, secs


def _machine() -> str:
    import torch

    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    liger = importlib.metadata.version("liger-kernel") if _liger_available() else "not installed"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_kib / 2**20:.1f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"liger-kernel {liger}; the machine was shared with other jobs, so times carry noise"
    )


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def _sweep_section(repeats: int, bar) -> list[str]:
    from trainers.logprobs import DEFAULT_CHUNK_SIZE

    lines = [
        "## Chunk size (fused), chosen by measurement",
        "",
        "| N | V | tokens per chunk | peak MiB | median s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, v in SWEEP_CASES:
        res = _run_interleaved([(c, "fused", n, v, c) for c in SWEEP_CHUNKS], repeats, bar)
        for c in SWEEP_CHUNKS:
            mark = " (default)" if c == DEFAULT_CHUNK_SIZE else ""
            lines.append(f"| {n:,} | {v:,} | {c}{mark} | {_mib(res[c]['peak'])} | {res[c]['time']:.2f} |")
    return lines + [""]


def _main_section(methods: list[str], limit: float, repeats: int, bar) -> tuple[list[str], dict]:
    from trainers.logprobs import DEFAULT_CHUNK_SIZE

    results: dict = {}
    extrapolation_check = None
    for n, v in CASES:
        jobs, skipped = [], {}
        for m in methods:
            est = estimate_bytes(m, n, v, DEFAULT_CHUNK_SIZE)
            if est <= limit:
                jobs.append(((m, n), m, n, v, None))
            else:
                skipped[m] = f"not run: needs ~{est / GIB:.1f} GiB (estimated)"
        # Naive subsets: for extrapolating a refused naive run, and to check the method on the
        # first case, where the real naive run exists.
        if "naive" in skipped or (n, v) == CASES[0]:
            jobs += [(("naive", s), "naive", s, v, None) for s in SUBSET_NS]
        res = _run_interleaved(jobs, repeats, bar)
        for m in methods:
            if (m, n) in res:
                results[(m, n, v)] = {**res[(m, n)], "note": "measured"}
            elif m == "naive":
                peak, secs = _extrapolate(res[("naive", SUBSET_NS[0])], res[("naive", SUBSET_NS[1])], *SUBSET_NS, n)
                n1, n2 = SUBSET_NS
                note = f"{skipped[m]}; extrapolated linearly in N from runs at N = {n1:,} and {n2:,}"
                results[(m, n, v)] = {"peak": peak, "time": secs, "note": note}
            else:
                results[(m, n, v)] = {"peak": None, "time": None, "note": skipped[m]}
        if (n, v) == CASES[0] and "naive" not in skipped:
            extrapolation_check = (
                _extrapolate(res[("naive", SUBSET_NS[0])], res[("naive", SUBSET_NS[1])], *SUBSET_NS, n),
                results[("naive", n, v)],
            )

    lines = [
        "## Peak memory and time, side by side",
        "",
        "| N | V | method | peak MiB | peak / naive | median s | time / naive | note |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for n, v in CASES:
        base = results[("naive", n, v)]
        for m in methods:
            r = results[(m, n, v)]
            if r["peak"] is None:
                lines.append(f"| {n:,} | {v:,} | {m} | - | - | - | - | {r['note']} |")
                continue
            lines.append(
                f"| {n:,} | {v:,} | {m} | {_mib(r['peak'])} | {r['peak'] / base['peak']:.3f} | "
                f"{r['time']:.2f} | {r['time'] / base['time']:.2f} | {r['note']} |"
            )
    lines.append("")
    if extrapolation_check:
        (p_ex, t_ex), real = extrapolation_check
        n, v = CASES[0]
        lines += [
            f"Extrapolation check at N = {n:,}, V = {v:,}, where the naive run fits: extrapolated "
            f"{_mib(p_ex)} MiB and {t_ex:.2f} s, measured {_mib(real['peak'])} MiB and {real['time']:.2f} s.",
            "",
        ]
    lines += [
        "Estimates that decide whether a run starts (bytes, fp32): naive 3·N·V·4 + V·H·4 + N·H·4; "
        f"fused 2·chunk·V·4 + 3·V·H·4 + 2·N·H·4; liger 6·{SEQ_LEN}·V·4 + 3·V·H·4 + 2·N·H·4; "
        f"limit {limit / GIB:g} GiB.",
        "",
    ]
    return lines, results


def _grad_section(methods: list[str], bar) -> list[str]:
    import tempfile

    import torch

    lines = [
        f"## Gradient agreement (same inputs, N = {GRAD_N:,}, fp32)",
        "",
        "| V | compared | loss abs diff | grad h max-abs diff | grad W max-abs diff "
        "| max-abs grad h | max-abs grad W |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for v in (49_152, 151_936):
            grads = {}
            for m in methods:
                path = Path(tmp) / f"{m}.pt"
                _spawn(m, GRAD_N, v, None, str(path))
                grads[m] = torch.load(path)
                bar.update(1)
            ref = grads["naive"]
            for m in methods[1:]:
                dh = (grads[m]["hidden"] - ref["hidden"]).abs().max().item()
                dw = (grads[m]["weight"] - ref["weight"]).abs().max().item()
                dl = abs(grads[m]["loss"] - ref["loss"])
                sh, sw = ref["hidden"].abs().max().item(), ref["weight"].abs().max().item()
                lines.append(f"| {v:,} | {m} vs naive | {dl:.1e} | {dh:.1e} | {dw:.1e} | {sh:.1e} | {sw:.1e} |")
    return lines + [""]


def _goal_section(methods: list[str], results: dict) -> list[str]:
    lines = ["## Targets: fused peak <= 0.25x naive and <= Liger's; time <= 1.1x naive", ""]
    for n, v in CASES:
        f, nv = results[("fused", n, v)], results[("naive", n, v)]
        kind = "naive measured" if nv["note"] == "measured" else "naive extrapolated"
        parts = [
            f"N = {n:,}, V = {v:,} ({kind}): peak {f['peak'] / nv['peak']:.3f}x naive, "
            f"time {f['time'] / nv['time']:.2f}x naive"
        ]
        lg = results.get(("liger", n, v))
        if lg and lg["peak"] is not None:
            parts.append(f"peak {f['peak'] / lg['peak']:.2f}x Liger's, time {f['time'] / lg['time']:.2f}x Liger's")
        lines.append("- " + "; ".join(parts) + ".")
    return lines + [""]


def _dtype_rows(methods: list[str], bar) -> list[dict]:
    """One run per (method, dtype, V) at N = DTYPE_N: peak memory is what this sweep is for."""
    rows = []
    for v in DTYPE_VOCABS:
        for dtype in DTYPES:
            for m in methods:
                r = _spawn(m, DTYPE_N, v, None, dtype=dtype)
                rows.append({"method": m, "dtype": dtype, "n": DTYPE_N, "vocab": v, "peak_bytes": r["peak_bytes"],
                             "time_s": r["time"]})
                bar.update(1)
    return rows


def _dtype_section(rows: list[dict]) -> list[str]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = [(m, d) for m in methods for d in DTYPES]
    peak = {(r["method"], r["dtype"], r["vocab"]): r["peak_bytes"] for r in rows}
    lines = [
        DTYPE_HEADING,
        "",
        f"N = {DTYPE_N:,} tokens, h and W in the given dtype (the loss is reduced in fp32), one run each; "
        "peak MiB (the plot `loss_kernel.png`, right, shows the same numbers). "
        "`python -m benchmarks.bench_loss_kernel --dtype-sweep` reruns only this section (about 2 minutes).",
        "",
        "| V | " + " | ".join(f"{m} {d}" for m, d in cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    for v in DTYPE_VOCABS:
        cells = [_mib(peak[(m, d, v)]) if (m, d, v) in peak else "-" for m, d in cols]
        lines.append(f"| {v:,} | " + " | ".join(cells) + " |")
    return lines + [""]


def _parse_main_table(md: str) -> list[dict]:
    """The side-by-side table of an earlier report, as rows (for plotting without rerunning)."""
    rows, inside = [], False
    for line in md.splitlines():
        if line.startswith("## "):
            inside = line.startswith("## Peak memory and time")
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not inside or len(cells) < 8 or not cells[0].replace(",", "").isdigit() or cells[3] == "-":
            continue
        rows.append({"n": int(cells[0].replace(",", "")), "vocab": int(cells[1].replace(",", "")),
                     "method": cells[2], "peak_bytes": float(cells[3].replace(",", "")) * 2**20,
                     "time_s": float(cells[5]), "note": cells[7]})
    return rows


def plot(cases: list[dict], dtype_rows: list[dict], path: Path) -> Path:
    """Peak memory against V: per method and N in fp32 (left), per method and dtype (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"naive": "tab:red", "fused": "tab:blue", "liger": "tab:green"}
    fig, axes = plt.subplots(1, 2 if dtype_rows else 1, figsize=(12 if dtype_rows else 6.5, 4.6), squeeze=False)
    ax = axes[0][0]
    for (m, n) in dict.fromkeys((r["method"], r["n"]) for r in cases):
        pts = sorted((r["vocab"], r["peak_bytes"] / 2**20, r["note"] != "measured") for r in cases
                     if r["method"] == m and r["n"] == n)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if n == max(r["n"] for r in cases) else "--",
                color=colours.get(m), label=f"{m}, N = {n:,}")
        for v, mib, extrapolated in pts:  # hollow: extrapolated from smaller runs, not measured
            ax.plot([v], [mib], "o", color=colours.get(m), mfc="white" if extrapolated else colours.get(m))
    ax.set(xlabel="vocabulary size V", ylabel="peak MiB (log)", yscale="log",
           title="fp32, forward+backward (hollow: extrapolated)")
    ax.legend(fontsize=8)
    if dtype_rows:
        ax = axes[0][1]
        for m in dict.fromkeys(r["method"] for r in dtype_rows):
            for d, style in zip(DTYPES, ("-", ":")):
                pts = sorted((r["vocab"], r["peak_bytes"] / 2**20) for r in dtype_rows
                             if r["method"] == m and r["dtype"] == d)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=colours.get(m),
                        label=f"{m}, {d}")
        ax.set(xlabel="vocabulary size V", ylabel="peak MiB (log)", yscale="log",
               title=f"by dtype of h and W, N = {dtype_rows[0]['n']:,}")
        ax.legend(fontsize=8)
    fig.suptitle("Policy-loss peak memory against vocabulary size (CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load_raw(out: Path) -> tuple[list[dict], list[dict]]:
    """The cases and dtype rows of earlier runs: the raw JSON, else the report's main table."""
    raw = out.with_suffix(".json")
    data = json.loads(raw.read_text()) if raw.exists() else {}
    cases = data.get("cases") or (_parse_main_table(out.read_text()) if out.exists() else [])
    return cases, data.get("dtype", [])


def _save_raw(out: Path, cases: list[dict], dtype_rows: list[dict], **more: list[dict]) -> None:
    """Write the raw numbers; keys not given (e.g. "timing") keep what the file held."""
    raw = out.with_suffix(".json")
    data = json.loads(raw.read_text()) if raw.exists() else {}
    data.update({"cases": cases, "dtype": dtype_rows}, **more)
    raw.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-gib", type=float, default=6.0, help="never start a case estimated above this")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (method, case), each in a fresh process")
    parser.add_argument("--sweep-repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/loss_kernel.md")
    parser.add_argument("--plot-only", action="store_true",
                        help="only redraw the plot (next to --out, .png) from the numbers already there")
    parser.add_argument("--dtype-sweep", action="store_true",
                        help="only rerun the dtype section (about 2 minutes) and update --out, its .json and the plot")
    parser.add_argument("--dtype-timing", action="store_true",
                        help="only rerun the fp32 / bf16 timing section (about 15 minutes) and update --out and its .json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return

    from tqdm import tqdm

    out = Path(args.out)
    png = out.with_suffix(".png")
    methods = ["naive", "fused"] + (["liger"] if _liger_available() else [])
    if args.dtype_timing:
        total = len(TIMING_VOCABS) * len(DTYPES) * len(methods) * args.repeats
        with tqdm(total=total, desc="loss-kernel timing runs", disable=args.no_progress) as bar:
            timing = _timing_rows(methods, args.repeats, bar)
        cases, dtype_rows = _load_raw(out)
        _save_raw(out, cases, dtype_rows, timing=timing)
        section = _timing_section(timing, args.repeats, "liger" in methods)
        out.write_text(replace_section(out.read_text() if out.exists() else "", TIMING_HEADING, section))
        print("\n".join(section))
        print(f"bench_loss_kernel: section '{TIMING_HEADING}' written to {out}")
        return
    if args.plot_only or args.dtype_sweep:
        cases, dtype_rows = _load_raw(out)
        if args.dtype_sweep:
            dtype_methods = [m for m in methods if m != "liger"]  # liger's kernel is fp32-tuned; kept out
            with tqdm(total=len(DTYPE_VOCABS) * len(DTYPES) * len(dtype_methods), desc="loss-kernel dtype runs",
                      disable=args.no_progress) as bar:
                dtype_rows = _dtype_rows(dtype_methods, bar)
            _save_raw(out, cases, dtype_rows)
            out.write_text(replace_section(out.read_text() if out.exists() else "", DTYPE_HEADING,
                                            _dtype_section(dtype_rows)))
        if not cases and not dtype_rows:
            parser.error(f"no numbers to plot in {out} or {out.with_suffix('.json')}: run the benchmark first")
        plot(cases, dtype_rows, png)
        print(f"bench_loss_kernel: plot in {png}" + (f", report in {out}" if args.dtype_sweep else ""))
        return
    header = [
        "# Policy-loss kernel: naive vs fused vs Liger (CPU)",
        "",
        "Command: `python -m benchmarks.bench_loss_kernel" + "".join(" " + a for a in (argv or sys.argv[1:])) + "`",
        "",
        f"Machine: {_machine()}.",
        "",
        f"H = {H}, sequences of {SEQ_LEN} tokens, fp32 forward+backward of the ADRPO loss (clip 0.2, beta 0.02 with "
        "precomputed reference log-probs, per-sequence token mean). Peak = resident-set high-water mark during the "
        "run minus the resident set once the inputs exist (the gradients of h and W count). Every run is one "
        f"forward+backward in a fresh process; {args.repeats} runs per (method, case), in rounds across methods; "
        "time is their median, peak their maximum. Liger runs with compiled=False: compiled=True gave no speed-up "
        "on this CPU in a check (about 14 s either way at N = 2,048, V = 49,152) and needs a compile warm-up.",
        "",
    ]
    if "liger" not in methods:
        header += ["liger-kernel is not installed here: `pip install liger-kernel` to add its column.", ""]
    total = (
        len(SWEEP_CASES) * len(SWEEP_CHUNKS) * args.sweep_repeats
        + len(CASES) * (len(methods) + len(SUBSET_NS)) * args.repeats
        + 2 * len(methods)
    )
    dtype_methods = [m for m in methods if m != "liger"]
    total += len(DTYPE_VOCABS) * len(DTYPES) * len(dtype_methods)
    total += len(TIMING_VOCABS) * len(DTYPES) * len(methods) * args.repeats
    with tqdm(total=total, desc="loss-kernel runs", disable=args.no_progress) as bar:
        sweep = _sweep_section(args.sweep_repeats, bar)
        main_lines, results = _main_section(methods, args.max_gib * GIB, args.repeats, bar)
        grads = _grad_section(methods, bar)
        dtype_rows = _dtype_rows(dtype_methods, bar)
        timing = _timing_rows(methods, args.repeats, bar)
    cases = [{"n": n, "vocab": v, "method": m, "peak_bytes": r["peak"], "time_s": r["time"], "note": r["note"]}
             for (m, n, v), r in results.items() if r["peak"] is not None]
    lines = header + main_lines + _goal_section(methods, results) + sweep + grads + _dtype_section(dtype_rows)
    lines += _timing_section(timing, args.repeats, "liger" in methods)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    _save_raw(out, cases, dtype_rows, timing=timing)
    plot(cases, dtype_rows, png)
    print("\n".join(lines))
    print(f"bench_loss_kernel: report in {out}, raw numbers in {out.with_suffix('.json')}, plot in {png}")


if __name__ == "__main__":
    main()
