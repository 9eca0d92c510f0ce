"""Memory-store benchmark: a bank of 100,000 entries; insert throughput, hybrid search latency,
snapshot/restore time, and `rank_bm25.BM25Okapi` over the same corpus in the same run.

    python -m benchmarks.bench_store [--entries 100000] [--queries 300] [--out benchmarks/results/store.md]
    python -m benchmarks.bench_store --scaling-only    # only the latency-against-size section and plot
    python -m benchmarks.bench_store --plot-only       # only redraw store.png from store.json

Entries are synthetic memory sentences (templates over names, places, activities and dates, seeded)
so the corpus has realistic length and vocabulary skew. The bank uses the hashing embedder at
dim 384 for the 100k inserts: search cost depends on the vector size, not on where the vectors
came from, and embedding 100k texts with MiniLM would take minutes of pure model time. The MiniLM
cost of embedding a query and of embedding entries is measured separately on a sample.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.report import replace_section
from membuilder.bank import MemoryBank
from membuilder.embedders import HashingEmbedder, SentenceTransformerEmbedder
from membuilder.operations import Add
from membuilder.retrieval import BM25Index, tokenize
from membuilder.store import InMemoryStore, SQLiteStore
from membuilder.types import MemoryKind

NAMES = ["Caroline", "Melanie", "Jon", "Gina", "Tim", "John", "Maria", "Joanna", "Nate", "Audrey",
         "Andrew", "James", "Deborah", "Jolene", "Evan", "Sam", "Calvin", "Dave", "Priya", "Kenji"]
PLACES = ["Paris", "Boston", "the beach", "a pottery studio", "the museum", "Denver", "the park",
          "a support group", "the library", "Tokyo", "the gym", "a bakery", "the lake", "Rome",
          "a camping site", "the conference", "Lisbon", "the hospital", "a concert hall", "Seattle"]
ACTIVITIES = ["painting", "running a charity race", "adopting a puppy", "baking sourdough",
              "learning the violin", "hiking", "volunteering", "a job interview", "a road trip",
              "reading fantasy novels", "yoga", "a family dinner", "gardening", "photography",
              "a dance class", "writing poems", "fixing a bike", "a camping trip", "chess", "surfing"]
FEELINGS = ["happy", "nervous", "proud", "tired", "excited", "calm", "grateful", "stressed"]
TEMPLATES = {
    MemoryKind.EPISODIC: [
        "{n} went to {p} for {a} and felt {f}.",
        "{n} and {m} talked about {a} at {p}.",
        "{n} started {a} after a visit to {p}.",
    ],
    MemoryKind.SEMANTIC: [
        "{n} enjoys {a} and often goes to {p}.",
        "{n}'s friend {m} lives near {p}.",
        "{n} is {f} about {a}.",
    ],
    MemoryKind.PROCEDURAL: [
        "{n}'s routine for {a}: go to {p}, warm up, practise for an hour, then rest.",
        "To prepare for {a}, {n} packs a bag, checks the weather and leaves for {p} early.",
    ],
}
KINDS = list(TEMPLATES)


def make_corpus(n: int, seed: int = 0) -> list[tuple[MemoryKind, str, str | None]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[rng.choices(range(3), weights=[5, 4, 1])[0]]
        text = rng.choice(TEMPLATES[kind]).format(
            n=rng.choice(NAMES), m=rng.choice(NAMES), p=rng.choice(PLACES), a=rng.choice(ACTIVITIES),
            f=rng.choice(FEELINGS),
        ) + f" (note {i})"
        when = f"2023-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}" if kind is MemoryKind.EPISODIC else None
        out.append((kind, text, when))
    return out


def make_queries(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    forms = ["When did {n} go to {p}?", "What does {n} enjoy doing at {p}?",
             "How does {n} prepare for {a}?", "Who talked with {n} about {a}?", "Is {n} {f} about {a}?"]
    return [rng.choice(forms).format(n=rng.choice(NAMES), p=rng.choice(PLACES), a=rng.choice(ACTIVITIES),
                                     f=rng.choice(FEELINGS)) for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def ms(x: float) -> str:
    return f"{x * 1e3:.2f} ms"


def time_calls(fn, items, desc: str, progress: bool = True) -> list[float]:
    fn(items[0])  # warm caches / lazy views
    out = []
    for it in tqdm(items, desc=desc, leave=False, disable=not progress):
        t = time.perf_counter()
        fn(it)
        out.append(time.perf_counter() - t)
    return out


def insert_all(bank: MemoryBank, corpus, batch: int, desc: str) -> float:
    bank.search("warm up", k=1)  # build the (empty) index so inserts pay the incremental path
    t = time.perf_counter()
    for start in tqdm(range(0, len(corpus), batch), desc=desc, leave=False):
        ops = [Add(k, text, when) for k, text, when in corpus[start:start + batch]]
        bank.apply(ops, session_id=f"s{start // batch}")
    return time.perf_counter() - t


SCALING_HEADING = "## Search latency against bank size"


def scaling(args, corpus, queries, emb, progress: bool = True) -> list[dict]:
    """Search latency at growing bank sizes: one SQLite bank filled in steps, measured at each size."""
    sizes = sorted({s for s in args.sizes if s <= len(corpus)})
    bank = MemoryBank(SQLiteStore(Path(tempfile.mkdtemp()) / "scaling.sqlite"), "owner", embedder=emb)
    bank.search("warm up", k=1)
    pairs = list(zip(queries, emb.embed(queries)))[: args.scaling_queries]
    bm25_only = MemoryBank(bank.store, "owner", embedder=None)
    rows, filled = [], 0
    for size in tqdm(sizes, desc="latency by bank size", disable=not progress):
        for start in range(filled, size, args.batch):
            bank.apply([Add(k, text, when) for k, text, when in corpus[start:min(start + args.batch, size)]],
                       session_id=f"s{start // args.batch}")
        filled = size
        hybrid = time_calls(lambda p: bank.search(p[0], k=10, query_embedding=p[1]), pairs, f"hybrid @ {size:,}", progress)
        bm25 = time_calls(lambda p: bm25_only.search(p[0], k=10), pairs, f"BM25 @ {size:,}", progress)
        rows.append({"entries": len(bank), "queries": len(pairs),
                     "hybrid_p50_ms": pct(hybrid, 50) * 1e3, "hybrid_p95_ms": pct(hybrid, 95) * 1e3,
                     "bm25_p50_ms": pct(bm25, 50) * 1e3, "bm25_p95_ms": pct(bm25, 95) * 1e3})
    return rows


def scaling_section(rows: list[dict]) -> list[str]:
    return [
        SCALING_HEADING,
        "",
        f"One SQLite bank filled in steps with the corpus above (batches of 100 ADDs), {rows[0]['queries']} "
        "queries at each size, query embedding excluded; the plot `store.png` shows the same numbers. "
        "`python -m benchmarks.bench_store --scaling-only` reruns only this section (about a minute).",
        "",
        "| entries | hybrid p50 ms | hybrid p95 ms | BM25 alone p50 ms | BM25 alone p95 ms |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {r['entries']:,} | {r['hybrid_p50_ms']:.2f} | {r['hybrid_p95_ms']:.2f} | {r['bm25_p50_ms']:.2f} "
          f"| {r['bm25_p95_ms']:.2f} |" for r in rows],
        "",
    ]


def plot_scaling(rows: list[dict], path: Path) -> Path:
    """Search latency (p50 and p95, hybrid and BM25 alone) against the number of entries, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    sizes = [r["entries"] for r in rows]
    for key, label, colour in (("hybrid", "hybrid (BM25 + 384-d dense, RRF)", "tab:blue"),
                               ("bm25", "BM25 alone", "tab:orange")):
        ax.plot(sizes, [r[f"{key}_p50_ms"] for r in rows], "-o", color=colour, label=f"{label}, p50")
        ax.plot(sizes, [r[f"{key}_p95_ms"] for r in rows], ":", marker="^", color=colour, label=f"{label}, p95")
    ax.axhline(10, color="grey", lw=0.8, ls="--")
    ax.text(sizes[0], 10.5, "10 ms", color="grey", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="entries in the bank (one owner)", ylabel="latency per search, ms",
           title="Search latency against bank size (top-10, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> str:
    load_start = os.getloadavg()[0]
    corpus = make_corpus(args.entries)
    queries = make_queries(args.queries)
    emb = HashingEmbedder(dim=384)
    rows: list[tuple[str, str]] = []
    tmp = Path(tempfile.mkdtemp())

    # inserts: one "session" of `batch` ADD operations per transaction, index kept live
    sqlite_bank = MemoryBank(SQLiteStore(tmp / "bank.sqlite"), "owner", embedder=emb)
    t_sqlite = insert_all(sqlite_bank, corpus, args.batch, "insert (SQLite)")
    mem_bank = MemoryBank(InMemoryStore(), "owner", embedder=emb)
    t_mem = insert_all(mem_bank, corpus, args.batch, "insert (in-memory)")
    n = len(corpus)
    rows += [
        ("insert throughput, SQLite store (batches of %d, incl. hashing embedding + index)" % args.batch,
         f"{n / t_sqlite:,.0f} entries/s ({t_sqlite:.1f} s total)"),
        ("insert throughput, in-memory store", f"{n / t_mem:,.0f} entries/s ({t_mem:.1f} s total)"),
    ]

    # search latency, query embedding excluded (precomputed); then the same with filters
    bank = sqlite_bank
    qvecs = emb.embed(queries)
    pairs = list(zip(queries, qvecs))
    hybrid = time_calls(lambda p: bank.search(p[0], k=10, query_embedding=p[1]), pairs, "hybrid search")
    by_kind = time_calls(lambda p: bank.search(p[0], k=10, kinds="semantic", query_embedding=p[1]), pairs,
                         "hybrid + kind filter")
    by_time = time_calls(
        lambda p: bank.search(p[0], k=10, kinds="episodic", time_range=("2023-03-01", "2023-05-31"),
                              query_embedding=p[1]), pairs, "hybrid + kind + time filter")
    bm25_only = MemoryBank(bank.store, "owner", embedder=None)
    bm25_lat = time_calls(lambda q: bm25_only.search(q, k=10), queries, "our BM25 only")

    # rank_bm25 over the same corpus and tokenisation, same process, a subset of queries
    from rank_bm25 import BM25Okapi

    t = time.perf_counter()
    okapi = BM25Okapi([tokenize(text) for _, text, _ in corpus])
    t_okapi_index = time.perf_counter() - t
    sub = queries[: args.okapi_queries]
    okapi_lat = time_calls(lambda q: np.argpartition(okapi.get_scores(tokenize(q)), -10)[-10:], sub,
                           "rank_bm25 BM25Okapi")
    # agreement on the benchmark corpus itself: our BM25 scores vs BM25Okapi's, every document
    ours = BM25Index()
    ours.add_many([str(i) for i in range(n)], [tokenize(text) for _, text, _ in corpus])
    max_diff = 0.0
    for q in sub[:5]:
        keys, scores = ours.get_scores(tokenize(q))
        ref = okapi.get_scores(tokenize(q))[[int(k) for k in keys]]
        max_diff = max(max_diff, float(np.max(np.abs(scores - ref))))

    p50 = pct(hybrid, 50)
    rows += [
        ("hybrid search p50 / p95 (BM25 + dense 384-d, RRF, k=10, no filter)", f"{ms(p50)} / {ms(pct(hybrid, 95))}"),
        ("hybrid search p50 / p95, kind filter (semantic)", f"{ms(pct(by_kind, 50))} / {ms(pct(by_kind, 95))}"),
        ("hybrid search p50 / p95, kind + 3-month time range", f"{ms(pct(by_time, 50))} / {ms(pct(by_time, 95))}"),
        ("our BM25 alone p50 / p95 (bank search, no embedder)", f"{ms(pct(bm25_lat, 50))} / {ms(pct(bm25_lat, 95))}"),
        (f"rank_bm25 BM25Okapi get_scores + top-10 p50 / p95 ({len(sub)} queries)",
         f"{ms(pct(okapi_lat, 50))} / {ms(pct(okapi_lat, 95))}"),
        ("rank_bm25 BM25Okapi index build", f"{t_okapi_index:.2f} s"),
        ("speed-up of our BM25 over BM25Okapi (p50 ratio)", f"{pct(okapi_lat, 50) / pct(bm25_lat, 50):.0f}x"),
        ("hybrid search p50 vs BM25Okapi alone p50 (ratio)", f"{p50 / pct(okapi_lat, 50):.3f}"),
        ("max |our BM25 - BM25Okapi| over all 100k document scores of 5 queries", f"{max_diff:.2e}"),
    ]

    # snapshot / restore / index rebuild
    t = time.perf_counter()
    state = bank.snapshot()
    t_snap = time.perf_counter() - t
    target = MemoryBank(InMemoryStore(), "copy", embedder=emb)
    t = time.perf_counter()
    target.restore(state)
    t_restore_mem = time.perf_counter() - t
    t = time.perf_counter()
    target.search("warm", k=1)
    t_rebuild = time.perf_counter() - t
    sqlite_target = MemoryBank(SQLiteStore(tmp / "restored.sqlite"), "copy", embedder=emb)
    t = time.perf_counter()
    sqlite_target.restore(state)
    t_restore_sqlite = time.perf_counter() - t
    ok = sqlite_target.snapshot().entries == tuple(
        type(e)(**{**e.__dict__, "owner": "copy"}) for e in state.entries)
    rows += [
        (f"snapshot of {n:,} entries (SQLite, with embeddings and history)", f"{t_snap:.2f} s"),
        ("restore into an in-memory store", f"{t_restore_mem:.2f} s"),
        ("restore into a SQLite store", f"{t_restore_sqlite:.2f} s (restored entries equal: {ok})"),
        ("index rebuild after restore (first search)", f"{t_rebuild:.2f} s"),
    ]

    # MiniLM costs, measured apart
    st = SentenceTransformerEmbedder()
    sample = [text for _, text, _ in corpus[:args.minilm_sample]]
    st.embed(sample[:8])
    t = time.perf_counter()
    st.embed(sample)
    t_st = time.perf_counter() - t
    q_lat = time_calls(lambda q: st.embed([q]), queries[:100], "MiniLM query embedding")
    rows += [
        ("MiniLM query embedding p50 / p95 (excluded from search latency above)",
         f"{ms(pct(q_lat, 50))} / {ms(pct(q_lat, 95))}"),
        (f"MiniLM entry embedding throughput ({len(sample)} entries, batch 64)", f"{len(sample) / t_st:,.0f} entries/s"),
    ]
    goal = "met" if p50 < 0.010 else "NOT met"
    rows.append(("1-minute load average at start / end of the run (2 cores)",
                 f"{load_start:.2f} / {os.getloadavg()[0]:.2f}"))
    args.scaling_rows = scaling(args, corpus, queries, emb, not args.no_progress)
    return render(args, rows, goal, p50) + "\n" + "\n".join(scaling_section(args.scaling_rows))


def render(args, rows, goal, p50) -> str:
    lines = [
        "# Memory store benchmark",
        "",
        f"Command: `python -m benchmarks.bench_store --entries {args.entries} --queries {args.queries}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}; one run, all rows side by side.",
        f"Corpus: {args.entries:,} synthetic memory sentences (seeded templates, ~15 words each, "
        "episodic 50% with dates, semantic 40%, procedural 10%), one owner; dense vectors are 384-d "
        "(hashing embedder; MiniLM measured separately). Latencies exclude query embedding.",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        f"Target: hybrid search p50 under 10 ms at 100k entries on 2 cores: **{goal}** "
        f"({p50 * 1e3:.2f} ms).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--okapi-queries", type=int, default=30)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--minilm-sample", type=int, default=2000)
    p.add_argument("--out", default="benchmarks/results/store.md")
    p.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")],
                   default=[1_000, 3_000, 10_000, 30_000, 100_000],
                   help="bank sizes of the latency-against-size section (comma-separated)")
    p.add_argument("--scaling-queries", type=int, default=100, help="queries per size in that section")
    p.add_argument("--scaling-only", action="store_true",
                   help="only rerun the latency-against-size section; update --out, its .json and .png")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plot from the .json next to --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.sizes) or args.scaling_queries < 1:
        p.error("--sizes and --scaling-queries must be >= 1")
    out = Path(args.out)
    raw, png = out.with_suffix(".json"), out.with_suffix(".png")
    if args.plot_only:
        if not raw.exists():
            p.error(f"{raw} does not exist: run the benchmark (or --scaling-only) first")
        plot_scaling(json.loads(raw.read_text())["scaling"], png)
        print(f"bench_store: plot in {png}")
        return
    if args.scaling_only:
        corpus = make_corpus(max(args.sizes))
        args.scaling_rows = scaling(args, corpus, make_queries(args.queries), HashingEmbedder(dim=384),
                                    not args.no_progress)
        report = replace_section(out.read_text() if out.exists() else "", SCALING_HEADING,
                                 scaling_section(args.scaling_rows))
    else:
        report = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    raw.write_text(json.dumps({"scaling": args.scaling_rows}, indent=1) + "\n")
    plot_scaling(args.scaling_rows, png)
    print(report)
    print(f"bench_store: report in {out}, raw numbers in {raw}, plot in {png}")


if __name__ == "__main__":
    main()
