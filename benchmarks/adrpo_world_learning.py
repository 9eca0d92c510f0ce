"""Does ADRPO learn the world task with the real reward? A task a tiny model can show it on.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.adrpo_world_learning \
        --out runs/adrpo_world_learning --results-md benchmarks/results/adrpo_cpu.md

The world data (2 conversations x 3 sessions, world expert, exact QA) and the reward are real
(`trainers.engines.build_reward`: reward library, extractive answerer, rule judge, validity gate,
expert-length penalty, attribution); the prompts are short keys and the starting policy a warm
start that samples its session's expert operations, another session's, or broken JSON
(`trainers.tiny_world`, which says why). Then three runs from the same start, same steps, seeds
and sampling: ADRPO with attribution (alpha 4), without (alpha 1), and ADRPO with a random
reward of the same scale (the control: what the loop does with no information). Each stage is
measured on every session with G = 8 fresh samples; the report is the section
"Learning the world task" of `--results-md`, with a PNG of the training curves.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import replace_section

AGENTS = ["episodic", "semantic"]
CONVERSATIONS, SESSIONS = 2, 3
KEYS = ("reward/valid_rate", "reward/task_mean", "reward/mean", "rollout/answer_tokens_mean")


class RandomReward:
    """The control: a reward of the same shape with uniform random values (seeded), no information."""

    def __init__(self, inner, seed: int = 0):
        self.inner, self.rng = inner, random.Random(seed)

    def __call__(self, requests):
        from dataclasses import replace as dc_replace

        out = []
        for reward in self.inner(requests):
            samples = tuple(s if s.masked else dc_replace(s, reward=self.rng.random() * 0.3, weight=1.0) for s in reward.samples)
            out.append(dc_replace(reward, samples=samples))
        return out


def measure(model_dir: Path, rows, snapshots: Path, group_size: int, max_tokens: int, seed: int) -> dict:
    """G samples per (session, agent) at the training sampling settings, scored by the real reward."""
    from transformers import AutoTokenizer

    from rollout.hf_engine import HFEngine
    from rollout.types import SamplingParams
    from trainers.adrpo_config import RewardConfig
    from trainers.engines import build_reward
    from trainers.episodes import SessionEpisodes
    from trainers.rl_batch import assign_advantages, batch_counts, counts_to_metrics, group_sessions

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sessions = group_sessions(rows, AGENTS, split=None)
    source = SessionEpisodes(sessions, build_reward(RewardConfig(), snapshots_dir=snapshots, tokenizer=tokenizer))
    engine = HFEngine(model_dir, dtype=torch.float32, device="cpu")
    try:
        params = SamplingParams(n=group_size, temperature=0.8, top_p=0.9, max_tokens=max_tokens, seed=seed + 12345)
        episodes = source.collect(list(range(len(sessions))), engine, params, step=0)
    finally:
        engine.close()
    groups = assign_advantages(episodes.samples, group_size)
    metrics = counts_to_metrics(batch_counts(episodes.samples, groups).values)
    return {k: metrics[k] for k in KEYS}


def train(start: Path, rows, snapshots: Path, out: Path, args, *, alpha: float, control: bool) -> list[dict]:
    from trainers.adrpo import ADRPOTrainer
    from trainers.adrpo_config import ADRPOConfig, RewardConfig
    from trainers.config import load_config
    from trainers.engines import build_reward

    shutil.rmtree(out, ignore_errors=True)
    sessions = len({(r.conversation_id, r.session_id) for r in rows})
    cfg = load_config(ADRPOConfig, overrides=[
        f"model.path={start}", f"checkpoint.output_dir={out}", f"data.snapshots={snapshots}",
        "data.agents=" + json.dumps(AGENTS), f"data.sessions_per_step={sessions}", f"train.max_steps={args.steps}",
        f"rollout.group_size={args.group_size}", f"rollout.max_tokens={args.max_tokens}", "rollout.engine=transformers",
        f"optim.lr={args.lr}", "loss.beta=0", f"reward.alpha={alpha}", f"train.seed={args.seed}",
        "train.gradient_checkpointing=false", "checkpoint.every_steps=0", "checkpoint.keep_last=1",
        "logging.tensorboard=false", "logging.progress_bar=false",
    ])  # fmt: skip
    reward = None
    if control:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(start)
        reward = RandomReward(build_reward(RewardConfig(alpha=alpha), snapshots_dir=snapshots, tokenizer=tokenizer), args.seed)
    trainer = ADRPOTrainer(cfg, rows=rows, reward_fn=reward)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return result.metrics


def plot(curves: dict[str, list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("reward/mean", "reward"), ("reward/task_mean", "task reward"), ("reward/valid_rate", "validity rate"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), dpi=100)
    for ax, (key, label) in zip(axes, keys, strict=True):
        for name, rows in curves.items():
            ax.plot(range(1, len(rows) + 1), [r[key] for r in rows], marker="o", ms=3, label=name)
        ax.set_title(f"{label} (training batches)")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm

    from trainers.data.rl_rows import read_rl_rows
    from trainers.prepare_data import prepare_world
    from trainers.tiny import save_tiny_policy
    from trainers.tiny_world import keyed_rows, warm_start

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/adrpo_world_learning")
    p.add_argument("--results-md", help="write the section 'Learning the world task' here (PNG beside it)")
    p.add_argument("--warm-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    walls: dict[str, float] = {}
    bar = tqdm(total=8, desc="world learning")

    t = time.perf_counter()
    base = save_tiny_policy(out / "base", seed=args.seed)
    prepare_world(out / "data", seed=args.seed, conversations=CONVERSATIONS, sessions=SESSIONS, tokenizer=str(base),
                  heldout_fraction=0.0)
    rl_set = read_rl_rows(out / "data" / "rl.parquet")
    rows, snapshots = keyed_rows(rl_set.rows, AGENTS), rl_set.snapshots_dir
    start = warm_start(base, rows, out / "start", steps=args.warm_steps, seed=args.seed)
    walls["warm start"] = time.perf_counter() - t
    bar.update(1)

    stages = {"warm start": measure(start, rows, snapshots, args.group_size, args.max_tokens, args.seed)}
    bar.update(1)
    curves = {}
    for name, alpha, control in (("ADRPO alpha 4", 4.0, False), ("ADRPO alpha 1 (attribution off)", 1.0, False),
                                 ("random reward (control)", 4.0, True)):
        t = time.perf_counter()
        folder = out / name.split(" (")[0].replace(" ", "_")
        curves[name] = train(start, rows, snapshots, folder, args, alpha=alpha, control=control)
        walls[name] = time.perf_counter() - t
        bar.update(1)
        final = next((folder / "checkpoints").iterdir()) / "model"
        stages[name] = measure(final, rows, snapshots, args.group_size, args.max_tokens, args.seed)
        bar.update(1)
    bar.close()

    results = {"command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.adrpo_world_learning "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               "stages": stages, "walls_s": walls, "curves": curves, "sessions": len({r.session_id for r in rows})}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| policy | validity rate | mean task reward | mean reward | answer tokens (mean) |", "|---|---|---|---|---|"]
    for name, m in stages.items():
        lines.append(f"| {name} | {m['reward/valid_rate']:.3f} | {m['reward/task_mean']:.3f} | {m['reward/mean']:.3f} "
                     f"| {m['rollout/answer_tokens_mean']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.results_md:
        md = Path(args.results_md)
        png = md.with_name(md.stem + "_world_learning.png")
        plot(curves, png)
        section = [
            "## Learning the world task (short keyed prompts, real reward)", "",
            f"Command: `{results['command']}`", "",
            "A task on which a 0.5M-parameter model can show whether the loop learns: the world data "
            f"({CONVERSATIONS} conversations x {SESSIONS} sessions, the episodic and semantic agents) and the real "
            "reward, with short keyed prompts and a warm start that samples its session's expert operations, "
            "another session's, or broken JSON (`trainers/tiny_world.py` says why). Every run starts from the same "
            f"warm start: {args.steps} steps of all {results['sessions']} sessions x 2 agents x G = {args.group_size}, "
            f"lr {args.lr}, beta 0. Each row: {args.group_size} fresh samples per (session, agent), temperature 0.8, "
            "scored by the real reward. The control gets a uniform random reward (same scale, no information).", "",
            table, "",
            "Wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()), "",
            f"![world learning curves]({png.name})",
        ]
        md.write_text(replace_section(md.read_text() if md.exists() else "", section[0], section))
        print(f"report: {md}\nplot: {png}")
    return results


if __name__ == "__main__":
    main()
