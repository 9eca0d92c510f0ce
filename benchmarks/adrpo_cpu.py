"""The whole user path on CPU: world data -> untrained policy -> SFT -> ADRPO, measured at each stage.

On the bundled world data, with a tiny Qwen3 (`trainers.tiny`, ~0.9M parameters, a BPE trained
locally) so that 2 shared CPU cores finish in minutes:

1. prepare the world data with the policy's tokenizer (`trainers.prepare_data.prepare_world`);
2. measure the untrained policy on the HELD-OUT world sessions: G sampled outputs per (session,
   agent) prompt, scored by the real reward (`trainers.engines.build_reward`: the reward library
   with the offline extractive answerer and rule judge); validity rate, mean task reward, mean reward;
3. SFT on the prepared pairs (`trainers.sft.SFTTrainer`), leaving out the pairs of held-out
   sessions (prepare_world writes SFT pairs for every conversation, the held-out ones included);
4. measure the SFT checkpoint;
5. ADRPO from the SFT checkpoint (`trainers.adrpo.ADRPOTrainer`, transformers engine, in-process
   reward, attribution alpha = 4 by default), measure;
6. the same ADRPO run with attribution off (alpha = 1), measure;
7. (`--add-sparse`, from the SFT checkpoint of an earlier run) the sparse-reward ablation:
   `reward.dense=false`, whole conversations rolled out on policy, one task reward per trajectory
   from its final memory, as many steps as see the dense run's number of sessions; measure.

Every measurement uses the same sampling (temperature, top-p, max tokens, G, seed) as the ADRPO
rollouts. Writes `<out>/results.json`, `<out>/reward_curves.png` and, with --results-md, the
Markdown report.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.adrpo_cpu --out runs/adrpo_cpu \
        --results-md benchmarks/results/adrpo_cpu.md
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.adrpo_cpu --out runs/adrpo_cpu --memory-only

`--dataset locomo` runs the same path on LoCoMo read from the data folder (never shipped): the
annotation expert's operations as SFT targets and expert lengths, QA from the dataset's evidence.

`--memory-only` evaluates, with `benchmarks.eval_memory`, the memory that RAG and each stage's
checkpoint build on the first N world conversations (each checkpoint served by `rollout.server`,
the runner's `--builder MODEL --base-url` pointed at it), reporting the held-out conversations
apart. The sizes committed in benchmarks/results/adrpo_cpu.md are the command given there.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reward.types import AGENTS
from rollout.session import rollout_sessions
from rollout.types import SamplingParams
from trainers.adrpo_config import ADRPOConfig, RewardConfig
from trainers.config import SFTConfig, load_config
from trainers.data.rl_rows import RLRow, read_rl_rows
from trainers.engines import build_reward
from trainers.metrics import read_metrics
from trainers.rl_batch import (
    agent_prompts,
    assign_advantages,
    batch_counts,
    build_requests,
    check_rewards,
    collect_samples,
    counts_to_metrics,
    group_sessions,
)

logger = logging.getLogger(__name__)

STAGE_KEYS = ("reward/valid_rate", "reward/task_mean", "reward/mean", "reward/length_penalty_mean",
              "rollout/answer_tokens_mean", "rollout/truncated_frac", "batch/samples", "batch/masked_reward_masked",
              "batch/masked_no_qa")


@dataclass
class Sizes:
    conversations: int
    sessions: int
    heldout_fraction: float
    group_size: int
    max_tokens: int
    temperature: float
    top_p: float
    sft_steps: int
    sft_batch: int
    sft_lr: float
    sft_max_length: int
    adrpo_steps: int
    sessions_per_step: int
    adrpo_lr: float
    beta: float
    seed: int


def measure(model_dir: Path, rows: list[RLRow], snapshots_dir: Path, sizes: Sizes) -> dict[str, float]:
    """Sample G outputs per held-out (session, agent) prompt and score them with the real reward."""
    from rollout.hf_engine import HFEngine
    from transformers import AutoTokenizer

    sessions = group_sessions(rows, AGENTS, split="heldout")
    if not sessions:
        raise ValueError("the prepared RL set has no held-out sessions: raise --heldout-fraction or --conversations")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reward_fn = build_reward(RewardConfig(), snapshots_dir=snapshots_dir, tokenizer=tokenizer)
    engine = HFEngine(model_dir, dtype=torch.float32, device="cpu")
    started = time.perf_counter()
    try:
        params = SamplingParams(n=sizes.group_size, temperature=sizes.temperature, top_p=sizes.top_p,
                                max_tokens=sizes.max_tokens, seed=sizes.seed)
        rollout = rollout_sessions(engine, agent_prompts(sessions), params)
    finally:
        engine.close()
    generated = time.perf_counter()
    requests = build_requests(sessions, rollout)
    scored = [i for i, r in enumerate(requests) if r.qa]
    rewards: list = [None] * len(requests)
    if scored:
        answers = reward_fn([requests[i] for i in scored])
        check_rewards([requests[i] for i in scored], answers)
        for i, answer in zip(scored, answers, strict=True):
            rewards[i] = answer
    samples = collect_samples(sessions, rollout, requests, rewards)
    groups = assign_advantages(samples, sizes.group_size)
    metrics = counts_to_metrics(batch_counts(samples, groups).values)
    out = {k: metrics[k] for k in STAGE_KEYS if k in metrics}
    for a in AGENTS:
        if f"reward/{a}/valid_rate" in metrics:
            out[f"reward/{a}/valid_rate"] = metrics[f"reward/{a}/valid_rate"]
    out["sessions"] = len(sessions)
    out["time/rollout_s"] = generated - started
    out["time/reward_s"] = time.perf_counter() - generated
    # One example output per agent, to show what the policy writes (the first sample of the first session).
    out["examples"] = {a: rollout.groups[(sessions[0].key, a)][0].text[:200] for a in AGENTS
                       if (sessions[0].key, a) in rollout.groups}
    return out


def heldout_free_pairs(sft_path: Path, rows: list[RLRow], out_path: Path) -> tuple[int, int]:
    """Copy the SFT pairs whose prompt is not a held-out session's prompt; returns (kept, dropped)."""
    heldout = {json.dumps(list(r.prompt), sort_keys=True) for r in rows if r.split == "heldout"}
    kept = dropped = 0
    with open(sft_path) as src, open(out_path, "w") as dst:
        for line in src:
            pair = json.loads(line)
            if json.dumps(pair["messages"], sort_keys=True) in heldout:
                dropped += 1
                continue
            dst.write(line)
            kept += 1
    return kept, dropped


def run_sft(base: Path, pairs: Path, out: Path, sizes: Sizes) -> tuple[Path, list[float], float]:
    from trainers.sft import SFTTrainer

    cfg = load_config(SFTConfig, overrides=[
        f"model.path={base}", f"data.path={pairs}", f"data.max_length={sizes.sft_max_length}",
        f"checkpoint.output_dir={out}", f"train.max_steps={sizes.sft_steps}", f"train.batch_size={sizes.sft_batch}",
        f"optim.lr={sizes.sft_lr}", "optim.warmup_steps=0", f"train.seed={sizes.seed}",
        "logging.tensorboard=false", "checkpoint.keep_last=1",
    ])
    started = time.perf_counter()
    trainer = SFTTrainer(cfg)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return result.checkpoint / "model", result.losses, time.perf_counter() - started


def run_adrpo(start: Path, data: Path, out: Path, sizes: Sizes, alpha: float, *, sparse: bool = False
              ) -> tuple[Path, list[dict], float]:
    """ADRPO from `start`. `sparse`: the paper's sparse ablation (`reward.dense=false`): a step takes
    whole conversations rolled out on policy, as many steps as see the dense run's number of sessions."""
    from trainers.adrpo import ADRPOTrainer

    steps, per_step = sizes.adrpo_steps, sizes.sessions_per_step
    if sparse:
        per_step = max(1, per_step // sizes.sessions)
        steps = math.ceil(sizes.adrpo_steps * sizes.sessions_per_step / (per_step * sizes.sessions))
    cfg = load_config(ADRPOConfig, overrides=[f"reward.dense={str(not sparse).lower()}",
        f"model.path={start}", f"data.path={data}", f"checkpoint.output_dir={out}",
        "rollout.engine=transformers", f"rollout.group_size={sizes.group_size}",
        f"rollout.max_tokens={sizes.max_tokens}", f"rollout.temperature={sizes.temperature}",
        f"rollout.top_p={sizes.top_p}", f"data.sessions_per_step={per_step}",
        f"train.max_steps={steps}", f"optim.lr={sizes.adrpo_lr}", f"loss.beta={sizes.beta}",
        f"reward.alpha={alpha}", f"train.seed={sizes.seed}", "train.gradient_checkpointing=false",
        "checkpoint.every_steps=0", "checkpoint.keep_last=1", "logging.tensorboard=false",
    ])
    started = time.perf_counter()
    trainer = ADRPOTrainer(cfg)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return result.checkpoint / "model", result.metrics, time.perf_counter() - started


def serve(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start the rollout server (transformers backend) on `model_dir`; returns (process, /v1 URL)."""
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout.server", "--model", str(model_dir), "--port", "0",
         "--served-model-name", "policy", "--max-batch-size", "8"],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )
    line = proc.stdout.readline()  # the server prints its URL once the engine is loaded
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the rollout server on {model_dir} did not start: {line!r}; see {log_path}")
    return proc, line.rsplit(" ", 1)[-1].strip() + "/v1"


def eval_memory(builder: str, out: Path, sizes: Sizes, conversations: int, heldout: set[str],
                model_dir: Path | None = None) -> dict:
    """`benchmarks.eval_memory` on the first `conversations` world conversations with `builder`
    (rag, or a checkpoint served by the rollout server); accuracy overall and on held-out ones."""
    from benchmarks import eval_memory as em

    argv = ["--dataset", "world", "--world-seed", str(sizes.seed), "--world-sessions", str(sizes.sessions),
            "--conversations", str(conversations), "--answerer", "extractive", "--judge", "rule",
            "--embedder", "hashing", "--no-progress", "--no-llm-cache", "--out", str(out)]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    if model_dir is None:
        rc = em.main([*argv, "--builder", builder])
    else:
        proc, url = serve(model_dir, out.parent / f"{out.name}.server.log")
        try:
            rc = em.main([*argv, "--builder", "policy", "--base-url", url,
                          "--builder-max-tokens", str(sizes.max_tokens)])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    if rc:
        raise RuntimeError(f"benchmarks.eval_memory --builder {builder} exited with {rc}; see {out}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    main_held = [r for r in rows if r["apart"] is None and r["conversation_id"] in heldout]
    judged = [r for r in main_held if r["correct"] is not None]
    return {
        "overall": summary["overall"],
        "heldout_accuracy": sum(bool(r["correct"]) for r in judged) / len(judged) if judged else None,
        "heldout_judged": len(judged),
        "wall_s": time.perf_counter() - started,
    }


def plot(curves: dict[str, Path], sft_losses: list[float], png: Path) -> Path:
    """SFT loss and, per ADRPO run, reward / task reward / validity rate per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("reward/mean", "reward"), ("reward/task_mean", "task reward"), ("reward/valid_rate", "validity rate"))
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.6), dpi=100)
    axes[0].plot(range(1, len(sft_losses) + 1), sft_losses)
    axes[0].set_title("SFT target-token loss")
    axes[0].set_xlabel("optimizer step")
    for ax, (key, label) in zip(axes[1:], keys, strict=True):
        for name, metrics_path in curves.items():
            rows = [r for r in read_metrics(metrics_path)
                    if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=name)
        ax.set_title(f"ADRPO {label} (training batches)")
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def memory_main(args: argparse.Namespace, out: Path) -> dict:
    """Evaluate the memory that RAG and each stage's checkpoint build; update results.json (and the report)."""
    results = json.loads((out / "results.json").read_text())
    sizes = Sizes(**results["sizes"])
    rows = read_rl_rows(out / "data" / "rl.parquet").rows
    heldout = {r.conversation_id for r in rows if r.split == "heldout"}
    memory = {"rag": eval_memory("rag", out / "memory" / "rag", sizes, args.memory_conversations, heldout)}
    for i, (stage, model_dir) in enumerate(results["checkpoints"].items()):
        memory[stage] = eval_memory(stage, out / "memory" / f"stage{i}", sizes, args.memory_conversations, heldout,
                                    model_dir=Path(model_dir))
    results["memory"] = {"conversations": args.memory_conversations, "heldout": sorted(heldout), "builders": memory}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = ["| builder | accuracy (answerable, all convs) | judged | held-out convs accuracy | judged | wall s |",
             "|---|---|---|---|---|---|"]
    for name, m in memory.items():
        acc, held = m["overall"]["accuracy"], m["heldout_accuracy"]
        lines.append(f"| {name} | {acc if acc is None else f'{acc:.3f}'} | {m['overall']['judged']} "
                     f"| {held if held is None else f'{held:.3f}'} | {m['heldout_judged']} | {m['wall_s']:.0f} |")
    print("\n".join(lines))
    return results


def sparse_main(args: argparse.Namespace, out: Path) -> dict:
    """The sparse-reward ablation from an earlier run's SFT checkpoint (same sizes); adds it to the results."""
    from trainers.prepare_data import prepare_world

    results = json.loads((out / "results.json").read_text())
    sizes = Sizes(**results["sizes"])
    # The data folder is re-prepared when it predates conversations.jsonl (same seed: same data).
    prepared = prepare_world(out / "data", seed=sizes.seed, conversations=sizes.conversations,
                             sessions=sizes.sessions, tokenizer=str(out / "base_model"),
                             heldout_fraction=sizes.heldout_fraction)
    rl_set = read_rl_rows(prepared.out / "rl.parquet")
    shutil.rmtree(out / "adrpo_sparse", ignore_errors=True)
    model, metrics, wall = run_adrpo(Path(results["checkpoints"]["sft"]), prepared.out / "rl.parquet",
                                     out / "adrpo_sparse", sizes, alpha=4.0, sparse=True)
    name = "sft+adrpo sparse (alpha 4)"
    results["checkpoints"][name] = str(model)
    results["stages"][name] = measure(model, list(rl_set.rows), rl_set.snapshots_dir, sizes)
    results["walls_s"]["adrpo_sparse"] = wall
    results["adrpo_metrics"]["sparse"] = metrics
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(stage_table(results["stages"]))
    return results


def stage_table(stages: dict[str, dict]) -> str:
    """The Markdown table: policy stage x validity rate, mean task reward, mean reward."""
    lines = ["| policy | validity rate | mean task reward | mean reward "
             "| valid core / episodic / semantic / procedural "
             "| answer tokens (mean) | truncated | samples |", "|---|---|---|---|---|---|---|---|"]
    for name, m in stages.items():
        per_agent = " / ".join(f"{m.get(f'reward/{a}/valid_rate', float('nan')):.2f}" for a in AGENTS)
        lines.append(
            f"| {name} | {m['reward/valid_rate']:.3f} | {m['reward/task_mean']:.3f} | {m['reward/mean']:.3f} "
            f"| {per_agent} | {m['rollout/answer_tokens_mean']:.1f} | {m['rollout/truncated_frac']:.2f} "
            f"| {int(m['batch/samples'])} |"
        )
    return "\n".join(lines)


def report(results: dict) -> str:
    """A plain summary of `results` (the hand-written discussion is added to the committed report)."""
    return "\n\n".join([
        "# ADRPO on CPU: the user path on the world data (tiny Qwen3)",
        f"```\n{results['command']}\n```",
        stage_table(results["stages"]),
        "Wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["walls_s"].items()),
        f"![reward curves]({Path(results['png']).name})",
    ]) + "\n"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Sizes]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/adrpo_cpu", help="working folder (reused data; runs are redone)")
    p.add_argument("--results-md", help="write the Markdown report here (PNG beside it)")
    p.add_argument("--dataset", choices=["world", "locomo"], default="world",
                   help="world: the bundled generator; locomo: LoCoMo from the data folder (annotation expert)")
    p.add_argument("--conversations", type=int, default=10)
    p.add_argument("--sessions", type=int, default=4, help="sessions per world conversation")
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--sft-batch", type=int, default=4)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--sft-max-length", type=int, default=4096)
    p.add_argument("--adrpo-steps", type=int, default=10)
    p.add_argument("--sessions-per-step", type=int, default=2)
    p.add_argument("--adrpo-lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-only", action="store_true",
                   help="evaluate, with benchmarks.eval_memory, the memory built by RAG and by each checkpoint of an "
                        "earlier run in --out (its results.json), and add it to the results")
    p.add_argument("--memory-conversations", type=int, default=5,
                   help="--memory-only: the first N world conversations (held-out ones are reported apart)")
    p.add_argument("--no-alpha1", action="store_true", help="skip the attribution-off (alpha = 1) run")
    p.add_argument("--add-sparse", action="store_true",
                   help="run the sparse-reward ablation (reward.dense=false) from the SFT checkpoint of an earlier "
                        "run in --out and add it to its results.json")
    a = p.parse_args(argv)
    sizes = Sizes(a.conversations, a.sessions, a.heldout_fraction, a.group_size, a.max_tokens, a.temperature,
                  a.top_p, a.sft_steps, a.sft_batch, a.sft_lr, a.sft_max_length, a.adrpo_steps,
                  a.sessions_per_step, a.adrpo_lr, a.beta, a.seed)
    return a, sizes


def main(argv: list[str] | None = None) -> dict:
    from trainers.prepare_data import prepare_world
    from trainers.tiny import save_tiny_policy

    args, sizes = parse_args(argv)
    torch.set_num_threads(1)  # a shared 2-core machine: a second intra-op thread only spins
    out = Path(args.out)
    if args.memory_only:
        return memory_main(args, out)
    if args.add_sparse:
        return sparse_main(args, out)
    for stale in ("sft", "adrpo", "adrpo_alpha1", "adrpo_sparse"):
        shutil.rmtree(out / stale, ignore_errors=True)
    total = time.perf_counter()
    walls: dict[str, float] = {}
    stages: dict[str, dict] = {}

    t = time.perf_counter()
    # LoCoMo sessions with their agent prompts run to ~5-9k tokens in the tiny tokenizer.
    context = {"max_position_embeddings": 16384} if args.dataset == "locomo" else {}
    base = save_tiny_policy(out / "base_model", seed=sizes.seed, **context)
    if args.dataset == "world":
        prepared = prepare_world(out / "data", seed=sizes.seed, conversations=sizes.conversations,
                                 sessions=sizes.sessions, tokenizer=str(base), heldout_fraction=sizes.heldout_fraction)
    else:  # LoCoMo from the data folder, the annotation expert, QA from the dataset's evidence
        from trainers.prepare_data import PrepareSettings, prepare

        prepared = prepare(PrepareSettings(
            dataset="locomo", expert="annotation", out=str(out / "data"), conversations=sizes.conversations,
            sessions=sizes.sessions, tokenizer=str(base), max_length=None, heldout_fraction=sizes.heldout_fraction,
            seed=sizes.seed, resume=True, progress=False))  # fmt: skip
    rl_set = read_rl_rows(prepared.out / "rl.parquet")
    rows = list(rl_set.rows)
    kept, dropped = heldout_free_pairs(prepared.out / "sft.jsonl", rows, out / "sft_train.jsonl")
    walls["prepare"] = time.perf_counter() - t

    checkpoints = {"untrained": base}
    stages["untrained"] = measure(base, rows, rl_set.snapshots_dir, sizes)
    sft_model, sft_losses, walls["sft"] = run_sft(base, out / "sft_train.jsonl", out / "sft", sizes)
    checkpoints["sft"] = sft_model
    stages["sft"] = measure(sft_model, rows, rl_set.snapshots_dir, sizes)
    adrpo_model, adrpo_metrics, walls["adrpo"] = run_adrpo(sft_model, prepared.out / "rl.parquet", out / "adrpo",
                                                           sizes, alpha=4.0)
    checkpoints["sft+adrpo (alpha 4)"] = adrpo_model
    stages["sft+adrpo (alpha 4)"] = measure(adrpo_model, rows, rl_set.snapshots_dir, sizes)
    curves = {"alpha 4": out / "adrpo" / "metrics.jsonl"}
    if not args.no_alpha1:
        a1_model, _, walls["adrpo_alpha1"] = run_adrpo(sft_model, prepared.out / "rl.parquet", out / "adrpo_alpha1",
                                                       sizes, alpha=1.0)
        checkpoints["sft+adrpo (alpha 1)"] = a1_model
        stages["sft+adrpo (alpha 1)"] = measure(a1_model, rows, rl_set.snapshots_dir, sizes)
        curves["alpha 1 (attribution off)"] = out / "adrpo_alpha1" / "metrics.jsonl"
    walls["total"] = time.perf_counter() - total

    png = Path(args.results_md).with_suffix(".png") if args.results_md else out / "reward_curves.png"
    plot(curves, sft_losses, png)
    heldout_sessions = len(group_sessions(rows, AGENTS, split="heldout"))
    train_sessions = len(group_sessions(rows, AGENTS, split="train"))
    results = {
        "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.adrpo_cpu "
        + " ".join(argv or sys.argv[1:]),
        "sizes": asdict(sizes),
        "data": {"train_sessions": train_sessions, "heldout_sessions": heldout_sessions, "sft_pairs": kept,
                 "sft_pairs_dropped_heldout": dropped, "manifest_counts": prepared.manifest.get("counts")},
        "model": json.loads((base / "config.json").read_text()),
        "walls_s": walls,
        "stages": stages,
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "sft_losses": sft_losses,
        "adrpo_metrics": {name: read_metrics(p) for name, p in curves.items()},
        "machine": f"{platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} thread",
        "png": str(png),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if args.results_md:
        Path(args.results_md).write_text(report(results))
    print(stage_table(stages))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
