"""Aggregate finished train.py runs into a results table, a JSON file and a learning-curve plot.

    python bench/summarize.py runs/base_* runs/dydiff_* --name maze2d-umaze_cpu

Groups runs by (env, algo, dydiff) and reports the mean +- std over seeds of the last and best
normalized score, wall time and updates/s. Writes bench/results/<name>.json (every run's summary
numbers and the aggregates), bench/results/<name>.png (mean learning curve with a min-max band over
seeds), and prints a markdown table for the README. Results files are only ever written by this script.
"""
from __future__ import annotations

import json
import platform
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """run folders holding summary.json (globs expanded by the shell)"""
    name: str = "summary"
    """base name of the output files under bench/results/"""


def load_runs(folders) -> list[dict]:
    runs = []
    for folder in folders:
        path = Path(folder) / "summary.json"
        if not path.exists():
            print(f"skipping {folder}: no summary.json (unfinished run?)")
            continue
        config = json.loads((Path(folder) / "config.json").read_text())
        settings = {k: config.get(k) for k in ("preset", "iterations", "real_ratio", "reward", "rollout_length",
                                               "rollout_interval", "rollout_batch", "synthetic_capacity")}
        summary = json.loads(path.read_text())
        # runs older than final_score: the same mean of the last 3 evaluations
        summary.setdefault("final_score", float(np.mean([e["score"] for e in summary["evaluations"][-3:]])))
        summary.setdefault("cpu_time_s", float("nan"))  # older runs did not record it
        runs.append({**summary, **settings, "run": Path(folder).name})
    if not runs:
        raise SystemExit("error: none of the given folders holds a finished run (summary.json)")
    return runs


def label(r: dict) -> str:
    """The learner and, with DyDiff, the settings that tell runs apart."""
    if not r.get("dydiff"):
        return r["algo"]
    reward = r.get("reward") or "model"  # runs made before --reward existed used the reward model
    return (f"{r['algo']} + DyDiff (M={r['iterations']}, real_ratio={r['real_ratio']}, reward={reward}, "
            f"T={r.get('rollout_length') or 32})")


def aggregate(runs: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in runs:
        groups[(r["env"], label(r))].append(r)
    rows = []
    for (env, name), rs in sorted(groups.items()):
        col = lambda k: np.array([r[k] for r in rs], dtype=float)  # noqa: E731
        rows.append({"env": env, "learner": name, "seeds": sorted(r["seed"] for r in rs),
                     "steps": sorted({r["steps"] for r in rs}),
                     **{f"{k}_{stat}": float(getattr(np, stat)(col(k)))
                        for k in ("final_score", "last_score", "best_score", "wall_time_s", "cpu_time_s", "updates_per_s")
                        for stat in ("mean", "std")}})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| env | learner | seeds | steps | final score | last score | best score | CPU time (min) | updates/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['env']} | {r['learner']} | {len(r['seeds'])} "
                     f"| {'/'.join(map(str, r['steps']))} | {r['final_score_mean']:.1f} +- {r['final_score_std']:.1f} "
                     f"| {r['last_score_mean']:.1f} +- {r['last_score_std']:.1f} "
                     f"| {r['best_score_mean']:.1f} +- {r['best_score_std']:.1f} "
                     f"| {r['cpu_time_s_mean'] / 60:.1f} +- {r['cpu_time_s_std'] / 60:.1f} "
                     f"| {r['updates_per_s_mean']:.0f} +- {r['updates_per_s_std']:.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in runs:
        groups[label(r)].append(r)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rs in sorted(groups.items()):
        n = min(len(r["evaluations"]) for r in rs)  # runs of one group share their eval steps
        steps = [e["step"] for e in rs[0]["evaluations"][:n]]
        scores = np.array([[e["score"] for e in r["evaluations"][:n]] for r in rs])
        ax.plot(steps, scores.mean(0), label=f"{name} ({len(rs)} seeds)")
        ax.fill_between(steps, scores.min(0), scores.max(0), alpha=0.2)
    ax.set(xlabel="gradient steps", ylabel="normalized score", title=f"{runs[0]['env']}: mean, min-max over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    runs = load_runs(args.runs)
    rows = aggregate(runs)
    RESULTS.mkdir(exist_ok=True)
    keep = ("run", "env", "dataset_id", "algo", "dydiff", "preset", "iterations", "real_ratio", "reward", "rollout_length",
            "seed", "steps", "final_score", "last_score", "best_score", "best_step",
            "wall_time_s", "cpu_time_s", "pretrain_time_s", "rollout_time_s", "updates_per_s", "ref_min", "ref_max", "threads")
    out = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
           "groups": rows, "runs": [{k: r.get(k) for k in keep} for r in runs]}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    plot(runs, RESULTS / f"{args.name}.png")
    print(markdown(rows))
    print(f"wrote {RESULTS / (args.name + '.json')} and {RESULTS / (args.name + '.png')}")
