"""The A/B behind every DyDiff claim: td3bc, td3bc+dydiff, iql, iql+dydiff over N seeds on one env.

    python bench/compare.py --env maze2d-umaze --seeds 0 1 2            # CPU preset, 50k steps per run
    python bench/compare.py --env maze2d-umaze --preset paper --jobs 4  # GPU machine, official budget

Each run is a plain `train.py` subprocess in runs/compare/<env>_<algo>[+dydiff]_s<seed>/ with its log
beside it. A run that already finished (summary.json) is reused, an interrupted one is resumed, so the
command can be repeated after a crash or extended with more seeds. Writes, all from the run summaries:
  bench/results/compare_<env>.json  {"env", "steps", "runs": [{"algo", "dydiff", "seed", "last", "best",
                                     "wall_s", ...}], "groups": [mean/std per arm], "machine", "command"}
  bench/results/compare_<env>.md    the markdown table (mean +- std of last and best, wall time)
  bench/results/compare_<env>.png   learning curves, mean and min-max band over seeds

--jobs runs that many at once. Where the vCPUs share one core's compute (bench/README.md, The machine),
keep 1: two runs side by side would each go half as fast and their wall times would mislead.
"""
from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from summarize import RESULTS, aggregate, load_runs, markdown, plot

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    env: str = "maze2d-umaze"
    """D4RL-style env name passed to train.py"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """learner seeds of every arm"""
    algos: tuple[Literal["td3bc", "iql"], ...] = ("td3bc", "iql")
    """offline learners to compare"""
    arms: tuple[Literal["base", "dydiff"], ...] = ("base", "dydiff")
    """base = the plain learner (--no-dydiff); dydiff = the learner with DyDiff augmentation"""
    preset: Literal["cpu", "paper"] = "cpu"
    """train.py preset (sets the budget and every DyDiff size)"""
    steps: int | None = None
    """gradient steps per run (default: the preset's)"""
    dydiff_flags: str = ""
    """extra train.py flags for the DyDiff arm only, e.g. "--reward env --iterations 0" """
    jobs: int = 1
    """runs at once (keep 1 on a 2-vCPU machine whose vCPUs share a core)"""
    run_dir: str = "runs/compare"
    """parent folder of the runs"""
    name: str | None = None
    """base name of the results files (default compare_<env>)"""
    dry_run: bool = False
    """print the train.py commands and stop"""


def run_name(env: str, algo: str, arm: str, seed: int) -> str:
    return f"{env}_{algo}{'+dydiff' if arm == 'dydiff' else ''}_s{seed}"


def command(args: Args, algo: str, arm: str, seed: int) -> list[str]:
    folder = Path(args.run_dir) / run_name(args.env, algo, arm, seed)
    cmd = [sys.executable, str(ROOT / "train.py"), "--env", args.env, "--algo", algo, "--seed", str(seed),
           "--preset", args.preset, "--run-dir", args.run_dir, "--run-name", folder.name]
    if args.steps is not None:
        cmd += ["--total-steps", str(args.steps)]
    cmd += shlex.split(args.dydiff_flags) if arm == "dydiff" else ["--no-dydiff"]
    if (folder / "checkpoint.pt").exists():
        cmd.append("--resume")
    return cmd


def launch(args: Args, algo: str, arm: str, seed: int) -> str:
    folder = Path(args.run_dir) / run_name(args.env, algo, arm, seed)
    if (folder / "summary.json").exists():
        return f"{folder.name}: finished earlier, reused"
    cmd = command(args, algo, arm, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(folder.parent / f"{folder.name}.log", "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"error: {folder.name} exited with {rc}; see {folder.parent / (folder.name + '.log')}")
    return f"{folder.name}: done in {(time.time() - t0) / 60:.1f} min"


def main(args: Args) -> None:
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1 (got {args.jobs})")
    grid = [(algo, arm, seed) for algo in args.algos for arm in args.arms for seed in args.seeds]
    if args.dry_run:
        for job in grid:
            done = (Path(args.run_dir) / run_name(args.env, *job) / "summary.json").exists()
            print(f"# {run_name(args.env, *job)}: finished, reused" if done else shlex.join(command(args, *job)))
        return
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the subprocesses
        for message in pool.map(lambda job: launch(args, *job), grid):
            print(message, flush=True)

    runs = load_runs([Path(args.run_dir) / run_name(args.env, *job) for job in grid])
    rows = aggregate(runs)
    name = args.name or f"compare_{args.env}"
    out = {"env": args.env, "steps": sorted({r["steps"] for r in runs}), "preset": args.preset,
           "dydiff_flags": args.dydiff_flags, "command": shlex.join(["python", "bench/compare.py", *sys.argv[1:]]),
           "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
           "runs": [{"algo": r["algo"], "dydiff": bool(r.get("dydiff")),  # runs older than DyDiff lack the key
                     "seed": r["seed"], "last": r["last_score"],
                     "best": r["best_score"], "best_step": r["best_step"], "wall_s": r["wall_time_s"],
                     "rollout_s": r.get("rollout_time_s", 0.0), "pretrain_s": r.get("pretrain_time_s"),
                     "updates_per_s": r["updates_per_s"], "run": r["run"]} for r in runs],
           "groups": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    table = markdown(rows)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    plot(runs, RESULTS / f"{name}.png")
    print(table)
    print(f"wrote {RESULTS / name}.json, .md and .png")


if __name__ == "__main__":
    main(tyro.cli(Args))
