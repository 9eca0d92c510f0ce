"""The benchmark scripts' plots: the numbers they draw (worked out by hand from the inputs), and
that each writes a PNG; the loss-kernel and store plots redraw from saved numbers without rerunning."""

import json

import pytest

from benchmarks import bench_loss_kernel, bench_store
from benchmarks.plot_accuracy import PlotError, accuracy_table, main as plot_main
from benchmarks.report import replace_section

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stats(correct, judged):
    return {"questions": judged, "judged": judged, "correct": correct,
            "accuracy": correct / judged if judged else None}


def summary(builder, overall, categories, apart=None, dataset="locomo"):
    return {"dataset": dataset, "builder": builder, "embedder": "hashing", "answerer": "extractive",
            "judge": "rule", "overall_covers": "categories 1-4", "overall": stats(*overall),
            "categories": {c: stats(*v) for c, v in categories.items()},
            "apart": {a: stats(*v) for a, v in (apart or {}).items()}}


def test_accuracy_table_groups_and_runs():
    rag = summary("rag", (4, 35), {"multi-hop": (0, 5), "single-hop": (4, 19)}, {"adversarial": (0, 15)})
    ann = summary("annotation", (6, 35), {"single-hop": (6, 19), "temporal": (0, 0)})
    labels, table = accuracy_table([rag, ann])
    assert labels == ["overall\n(categories 1-4)", "multi-hop", "single-hop", "adversarial\n(apart)", "temporal"]
    # 4/35 = 11.43 %, 4/19 = 21.05 %, 6/35 = 17.14 %, 6/19 = 31.58 %; nothing judged -> no bar
    assert table["rag, hashing"] == [(pytest.approx(400 / 35), 35), (0.0, 5), (pytest.approx(400 / 19), 19),
                                     (0.0, 15), None]
    assert table["annotation, hashing"] == [(pytest.approx(600 / 35), 35), None, (pytest.approx(600 / 19), 19),
                                            None, None]
    # runs on two datasets are named by dataset too; identical settings stay two bars
    _, table = accuracy_table([rag, summary("rag", (1, 2), {}, dataset="world"), rag])
    assert list(table) == ["locomo: rag, hashing", "world: rag, hashing", "locomo: rag, hashing'"]


def test_plot_accuracy_command(tmp_path, capsys):
    for name, overall in (("a", (4, 35)), ("b", (6, 35))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary(name, overall, {"single-hop": (4, 19)})))
    out = tmp_path / "cmp.png"
    assert plot_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert capsys.readouterr().out.strip() == f"plot_accuracy: 2 run(s) plotted in {out}"
    assert plot_main([str(tmp_path / "missing")]) == 2
    assert "missing: no summary.json" in capsys.readouterr().err
    with pytest.raises(PlotError, match="no runs"):
        from benchmarks.plot_accuracy import plot_accuracy
        plot_accuracy([], out)


REPORT = """# Policy-loss kernel

## Peak memory and time, side by side

| N | V | method | peak MiB | peak / naive | median s | time / naive | note |
|---:|---:|---|---:|---:|---:|---:|---|
| 4,096 | 49,152 | naive | 2,314 | 1.000 | 8.89 | 1.00 | measured |
| 4,096 | 49,152 | fused | 215 | 0.093 | 8.70 | 0.98 | measured |
| 4,096 | 151,936 | naive | 7,132 | 1.000 | 34.78 | 1.00 | not run; extrapolated |
| 4,096 | 151,936 | liger | - | - | - | - | not run: needs ~9 GiB |

## Chunk size (fused), chosen by measurement

| N | V | tokens per chunk | peak MiB | median s |
|---:|---:|---:|---:|---:|
| 4,096 | 49,152 | 128 | 162 | 21.92 |
"""


def test_loss_kernel_plot_only_reads_the_report(tmp_path, capsys):
    out = tmp_path / "loss_kernel.md"
    out.write_text(REPORT)
    rows = bench_loss_kernel._parse_main_table(REPORT)
    # the chunk-size table and the row that did not run are not cases
    assert [(r["n"], r["vocab"], r["method"], r["peak_bytes"] / 2**20) for r in rows] == [
        (4096, 49152, "naive", 2314.0), (4096, 49152, "fused", 215.0), (4096, 151936, "naive", 7132.0)]
    assert rows[2]["note"] == "not run; extrapolated" and rows[0]["time_s"] == 8.89
    bench_loss_kernel.main(["--plot-only", "--out", str(out)])
    assert (tmp_path / "loss_kernel.png").read_bytes()[:8] == PNG_MAGIC
    assert capsys.readouterr().out.strip() == f"bench_loss_kernel: plot in {tmp_path / 'loss_kernel.png'}"
    assert out.read_text() == REPORT  # plotting changes no report


def test_loss_kernel_dtype_section_replaces_its_own_only():
    dtype_rows = [{"method": m, "dtype": d, "n": 1024, "vocab": v, "peak_bytes": mib * 2**20, "time_s": 1.0}
                  for m, d, v, mib in (("naive", "fp32", 16_384, 200), ("naive", "bf16", 16_384, 110))]
    section = bench_loss_kernel._dtype_section(dtype_rows)
    assert section[0] == bench_loss_kernel.DTYPE_HEADING
    assert "| 16,384 | 200 | 110 |" in section and "| 49,152 | - | - |" in section
    once = replace_section(REPORT, bench_loss_kernel.DTYPE_HEADING, section)
    assert once.startswith(REPORT.rstrip("\n")) and once.count(bench_loss_kernel.DTYPE_HEADING) == 1
    # a second sweep replaces the section in place; a section in the middle keeps what follows
    again = replace_section(once, bench_loss_kernel.DTYPE_HEADING, ["## Peak memory against "
                                               "vocabulary size and dtype", "", "new", ""])
    assert again.count("new") == 1 and "| 16,384 | 200" not in again
    middle = replace_section(REPORT, "## Peak memory and time, side by side", ["## Peak memory "
                                                "and time, side by side", "", "x", ""])
    assert "| 4,096 | 49,152 | naive" not in middle and "## Chunk size (fused)" in middle


def test_store_scaling_measures_at_each_size_and_plots(tmp_path, capsys):
    out = tmp_path / "store.md"
    out.write_text("# Memory store benchmark\n\nearlier rows\n")
    bench_store.main(["--scaling-only", "--sizes", "120,40", "--scaling-queries", "3", "--queries", "5",
                      "--out", str(out), "--no-progress"])
    raw = json.loads((tmp_path / "store.json").read_text())["scaling"]
    assert [(r["entries"], r["queries"]) for r in raw] == [(40, 3), (120, 3)]  # sorted; counted in the bank
    assert all(0 < r["hybrid_p50_ms"] <= r["hybrid_p95_ms"] and 0 < r["bm25_p50_ms"] <= r["bm25_p95_ms"]
               for r in raw)
    report = out.read_text()
    assert report.startswith("# Memory store benchmark\n\nearlier rows\n")
    assert f"| 120 | {raw[1]['hybrid_p50_ms']:.2f} |" in report
    assert (tmp_path / "store.png").read_bytes()[:8] == PNG_MAGIC
    assert capsys.readouterr().out.strip().endswith(f"plot in {tmp_path / 'store.png'}")
    (tmp_path / "store.png").unlink()
    bench_store.main(["--plot-only", "--out", str(out)])
    assert (tmp_path / "store.png").read_bytes()[:8] == PNG_MAGIC
