"""The A/B behind every DyDiff claim, and the results files it writes. Three subcommands:

    python bench/compare.py --env maze2d-medium --algos td3bc --arms plain ensemble dydiff --seeds 5 6 7 8 9
    python bench/compare.py pool A.json B.json:plain --name ablation_maze2d-umaze_td3bc   # pool results files
    python bench/compare.py table                  # README's results table, from the today's-default files

Run (no subcommand): each learner (td3bc, iql) in named arms over N seeds on one env: plain (the learner
alone), ensemble (DyDiff's rounds with --iterations 0: ensemble-only rollouts, no DM) and dydiff (the full
method). More examples:

    python bench/compare.py --env maze2d-umaze --algos td3bc --dydiff-flags="--rollout-length 96" --tag t96
    python bench/compare.py --env maze2d-umaze --preset paper --jobs 4     # GPU machine, official budget
    python bench/compare.py --env maze2d-umaze --preset paper --launcher slurm --slurm-partition gpu  # cluster

Each run is a plain `train.py` subprocess in runs/compare/<env>_<algo>[+<arm>][_<tag>]_s<seed>/ with its
log beside it. A finished run (summary.json) is reused, and an interrupted one resumed, only when it was made
with the same resolved settings, on the same dataset files (their fingerprint: a rebuilt dataset has another),
by the same code (the digests of every project file, comments and docstrings aside) and with the same library
versions as this command would run now; otherwise the run is made again in a new
folder (<name>_2, _3, ...) and the command says why. So the command can be repeated after a crash or an edit,
or extended with more seeds, and a number never comes from code that no longer exists (with --launcher
slurm the jobs resume by folder name: that check is the local launcher's). The arms of one seed
share the learner's seed and the evaluation episodes, so they are compared pair by pair. --against COMMIT
runs every arm a second time with that commit's code (arm@commit), paired with this tree's: the A/B of an
uncommitted edit against the code before it.

The score of a run is its final score, the mean of its last 3 evaluations (each of --eval-episodes
episodes, 100 by default); last and best are reported too. Per arm: mean and std over seeds. Per
learner: the paired differences dydiff - plain and dydiff - ensemble (for the arms run; --pairs adds others,
e.g. ensemble-plain) with 95% bootstrap confidence intervals over seeds (scipy.stats.bootstrap, BCa, 10,000
resamples), for the final, last and best scores. Writes, all from the run summaries:
  bench/results/<name>.json  {"env", "steps", "runs": [...], "groups": [per arm], "paired": [per learner], ...}
  bench/results/<name>.md    the two markdown tables
  bench/results/<name>.png   learning curves, mean and min-max band over seeds
(<name> defaults to compare_<env>[_<tag>], or ablation_<env>_<algos>[_<tag>] when the ensemble arm runs.)
--jobs runs that many at once, each with cores / jobs torch threads (keep 1 where the vCPUs share one
core's compute: bench/README.md).
--launcher slurm submits every run as a Slurm job and returns; the same command again gathers the
results once the jobs are done (bench/cluster.py).

pool and table are bench/summarize.py's (this file runs them): the runs of several results files in
one table, and README's results table.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import runs as run_plumbing  # noqa: E402  (the project's runs.py: provenance and code digests)
import train  # noqa: E402
from data import stored_dataset  # noqa: E402
from summarize import (RESULTS, PoolArgs, all_paired, paired_markdown, parse_pairs, pool_main,  # noqa: E402
                       results_table)
CHECKOUTS = ROOT / "runs" / "_code"  # --against: one detached worktree per commit
FAILED = threading.Event()  # set by the first run that fails: the queued runs are then not started


@dataclass
class Args:
    env: str = "maze2d-umaze"
    """D4RL-style env name passed to train.py"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """learner seeds of every arm (5 or more for a claim)"""
    algos: tuple[Literal["td3bc", "iql"], ...] = ("td3bc", "iql")
    """offline learners to compare"""
    arms: tuple[Literal["plain", "ensemble", "dydiff"], ...] = ("plain", "dydiff")
    """plain = the learner alone (--no-dydiff); ensemble = DyDiff's rounds with --iterations 0 (no DM);
    dydiff = the learner with DyDiff augmentation"""
    preset: Literal["cpu", "paper"] = "cpu"
    """train.py preset (sets the budget and every DyDiff size)"""
    steps: int | None = None
    """gradient steps per run (default: the preset's)"""
    flags: str = ""
    """extra train.py flags for every run, e.g. "--eval-interval 2500" """
    dydiff_flags: str = ""
    """extra train.py flags for the DyDiff arm only, e.g. "--reward model --iterations 0" """
    tag: str = ""
    """suffix of the DyDiff runs' folder names, to keep variants (ablations) apart; the plain runs are shared"""
    share_ensemble: bool = False
    """the ensemble arm reuses the untagged runs: for a tag that only changes the DM's refinement (e.g.
    --sdedit-sigma), which ensemble-only rounds never use"""
    against: str | None = None
    """a git commit (e.g. HEAD): also run every arm with that commit's code (checked out under runs/_code/),
    as arm@<commit>, and pair each arm with it: the A/B of your uncommitted edit against the code before it"""
    pairs: tuple[str, ...] = ()
    """more differences to pair by seed, as first-second arm names, e.g. ensemble-plain (dydiff-plain and
    dydiff-ensemble are paired wherever those arms run)"""
    jobs: int = 1
    """runs at once, each with cores / jobs torch threads (1: one run with all of them; keep 1 where the vCPUs
    share a core)"""
    run_dir: str = "runs/compare"
    """parent folder of the runs"""
    name: str | None = None
    """base name of the results files (default compare_<env>[_<tag>])"""
    results: str = str(RESULTS)
    """folder of the results files"""
    dry_run: bool = False
    """print the train.py commands and stop"""
    launcher: Literal["local", "slurm", "submitit-local"] = "local"
    """local: subprocesses here; slurm: one Slurm job per run (submit, return; run again to gather);
    submitit-local: the slurm path with local processes (tests, trying it without a cluster)"""
    slurm_partition: str | None = None
    """Slurm partition of the jobs"""
    slurm_time_min: int = 24 * 60
    """time limit of each job in minutes; a job that reaches it is checkpointed and requeued"""
    slurm_gpus: int = 1
    """GPUs per job"""
    slurm_cpus: int = 4
    """CPUs per job"""
    slurm_flags: str = ""
    """more sbatch options as key=value pairs, e.g. "account=myproj qos=normal" """


def code_of(arm: str) -> tuple[str, str | None]:
    """'dydiff@1a2b3c4d5e6f' -> ('dydiff', '1a2b3c4d5e6f'): the arm and the commit whose code runs it (None: this tree)."""
    base, _, commit = arm.partition("@")
    return base, commit or None


def code_root(commit: str | None) -> Path:
    """The checkout a run's code comes from: this one, or a detached worktree of `commit` made once (git keeps it)."""
    if commit is None:
        return ROOT
    tree = CHECKOUTS / commit
    if not (tree / "train.py").exists():
        out = subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise SystemExit(f"error: cannot check out {commit} for --against: {out.stderr.strip().splitlines()[-1]}")
    return tree


def run_name(args: Args, algo: str, arm: str, seed: int) -> str:
    arm, commit = code_of(arm)
    if commit is not None:  # another commit's code: its own folders, never mixed with this tree's
        return run_name(args, algo, arm, seed).replace(f"_s{seed}", f"@{commit}_s{seed}")
    if arm == "plain":  # shared by every tag
        return f"{args.env}_{algo}_s{seed}"
    tag = args.tag if args.tag and not (arm == "ensemble" and args.share_ensemble) else ""
    return f"{args.env}_{algo}+{arm}{f'_{tag}' if tag else ''}_s{seed}"


def train_flags(args: Args, algo: str, arm: str, seed: int) -> list[str]:
    """train.py's flags for one run, the same on every launcher (without --resume, decided where it runs)."""
    name, (arm, _) = run_name(args, algo, arm, seed), code_of(arm)
    flags = ["--env", args.env, "--algo", algo, "--seed", str(seed), "--preset", args.preset, "--run-dir", args.run_dir,
             "--run-name", name, *shlex.split(args.flags)]
    if args.steps is not None:
        flags += ["--total-steps", str(args.steps)]
    if arm == "plain":
        return flags + ["--no-dydiff"]
    return flags + shlex.split(args.dydiff_flags) + (["--iterations", "0"] if arm == "ensemble" else [])


def expected(args: Args, algo: str, arm: str, seed: int) -> dict:
    """What a run of this job made now would record: its resolved settings (train.py's, without the flags that
    only say where and how fast it runs), the fingerprint of the dataset it would load (None: not here yet), the
    code digests of the project's files and the library versions."""
    commit, flags = code_of(arm)[1], train_flags(args, algo, arm, seed)
    if commit is None:
        settings = json.loads(json.dumps(dataclasses.asdict(train.resolve(train.parse_args(flags)))))
    else:  # that commit's train.py resolves its own flags
        ask = "import dataclasses, json, sys, train; print(json.dumps(dataclasses.asdict(train.resolve(train.parse_args(sys.argv[1:])))))"
        out = subprocess.run([sys.executable, "-c", ask, *flags], cwd=code_root(commit), capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"error: the train.py of {commit} does not take these flags: {out.stderr.strip()[-300:]}")
        settings = json.loads(out.stdout.strip().splitlines()[-1])
    prov, data = here(commit), stored_dataset(settings["env"], settings["dataset_id"], settings["dataset_steps"])
    return {"settings": comparable(settings), "fingerprint": data and data[1], "code": prov["code"],
            "versions": prov["versions"]}


@functools.cache
def here(commit: str | None = None) -> dict:  # the provenance of a checkout, asked once per command
    return run_plumbing.provenance(code_root(commit))


def comparable(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in run_plumbing.FREE_FLAGS}


def differs(made: dict | None, want: dict) -> str | None:
    """Why a run made with `made` (its summary.json or config.json) is not the run `want` describes; None if it is."""
    if made is None or "provenance" not in made:
        return "no record of its settings and code"
    settings = comparable({k: v for k, v in made.get("settings", made).items() if k in train.Args.__dataclass_fields__})
    if want["settings"].get("dataset_id") is None:  # --env names the data (config.json holds the id it resolved
        settings["dataset_id"] = None  # to): which files it was is the fingerprint's to say, below
    keys = sorted(k for k in settings | want["settings"] if settings.get(k) != want["settings"].get(k))
    if keys:
        return "other settings (" + ", ".join(f"{k} {settings.get(k)} -> {want['settings'].get(k)}" for k in keys[:4]) + ")"
    if made.get("fingerprint") != want["fingerprint"]:
        if made.get("fingerprint") is None:  # a run made before summaries held it
            return "no record of its dataset files (no fingerprint)"
        return (f"other dataset files (fingerprint {made['fingerprint']} -> {want['fingerprint']}: the dataset was "
                f"rebuilt or replaced since)")
    code = made["provenance"]["code"]
    files = sorted(f for f in code | want["code"] if code.get(f) != want["code"].get(f))
    if files:
        return f"other code ({', '.join(files)} changed)"
    if made["provenance"]["versions"] != want["versions"]:
        return f"other library versions ({made['provenance']['versions']} -> {want['versions']})"
    return None


def find_run(args: Args, algo: str, arm: str, seed: int, want: dict | None = None) -> tuple[Path, str]:
    """The folder of this job: a finished run that matches (reused), an interrupted one that matches (resumed), or
    the first free <name>[_k] (started; with the reason the runs before it did not match). Returns (folder, what)."""
    want = want or expected(args, algo, arm, seed)
    base, why = Path(args.run_dir) / run_name(args, algo, arm, seed), None
    for k in range(1, 1000):
        folder = base if k == 1 else base.with_name(f"{base.name}_{k}")
        summary, config = folder / "summary.json", folder / "config.json"
        if summary.exists():
            reason = differs(json.loads(summary.read_text()), want)
            if reason is None:
                return folder, "finished earlier, reused"
        elif (folder / "checkpoint.pt").exists():
            reason = differs(json.loads(config.read_text()) if config.exists() else None, want)
            if reason is None:
                return folder, "interrupted earlier, resumed"
        else:
            return folder, "started" if why is None else f"started anew: {base.name} was made with {why}"
        why = why or reason
    raise SystemExit(f"error: {base} and 998 more variants hold other runs: clean up {args.run_dir}")


def command(args: Args, algo: str, arm: str, seed: int, folder: Path | None = None) -> list[str]:
    folder = folder or Path(args.run_dir) / run_name(args, algo, arm, seed)
    flags = train_flags(args, algo, arm, seed)
    flags[flags.index("--run-name") + 1] = folder.name
    resume = (folder / "checkpoint.pt").exists()
    if args.jobs > 1 and "--threads" not in flags:  # runs side by side share the cores: torch threads must not compete
        flags += ["--threads", str(max(1, train.cores() // args.jobs))]
    return [sys.executable, str(code_root(code_of(arm)[1]) / "train.py"), *flags, *(["--resume"] * resume)]


def launch(args: Args, algo: str, arm: str, seed: int, folder: Path | None = None, what: str | None = None) -> str:
    if folder is None:
        folder, what = find_run(args, algo, arm, seed)
    if what == "finished earlier, reused":
        return f"{folder.name}: finished earlier, reused"
    if FAILED.is_set():
        return f"{folder.name}: not started, an earlier run failed"
    cmd = command(args, algo, arm, seed, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"{folder.name}: {what}", flush=True)
    t0 = time.time()
    with open(folder.parent / f"{folder.name}.log", "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=code_root(code_of(arm)[1])).returncode
    if rc != 0:
        FAILED.set()
        raise SystemExit(f"error: {folder.name} exited with {rc}; see {folder.parent / (folder.name + '.log')}")
    return f"{folder.name}: done in {(time.time() - t0) / 60:.1f} min"


# ----------------------------------------------------------------- run summaries -> groups, tables, curves
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
        summary.setdefault("final_score", float(np.mean([e["score"] for e in summary["evaluations"][-3:]])))
        summary.setdefault("cpu_time_s", float("nan"))
        runs.append({**summary, **settings, "run": Path(folder).name})
    if not runs:
        raise SystemExit("error: none of the given folders holds a finished run (summary.json)")
    return runs


def label(r: dict) -> str:
    """The learner and, with DyDiff, the settings that tell runs apart; an arm run with a commit's code
    (--against) keeps its @commit, so the two codes are two rows."""
    commit = code_of(r.get("arm", ""))[1]
    at = f" @{commit}" if commit else ""
    if not r.get("dydiff"):
        return r["algo"] + at
    return (f"{r['algo']} + DyDiff (M={r['iterations']}, real_ratio={r['real_ratio']}, reward={r.get('reward') or 'model'}, "
            f"T={r.get('rollout_length') or 32}){at}")


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



def main(args: Args) -> None:
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1 (got {args.jobs})")
    extra = parse_pairs(args.pairs, args.arms)  # checked before any run starts
    # absolute: --against's runs start in the commit's checkout and cluster jobs in another folder, and each must
    # write where this command looks for its summary
    args = replace(args, run_dir=str(Path(args.run_dir).resolve()))
    arms = tuple(args.arms)
    if args.against is not None and args.launcher != "local":
        raise SystemExit("error: --against runs locally only (the cluster jobs run this checkout's code)")
    if args.against is not None:  # each arm twice: this tree's code and the commit's, paired seed by seed
        commit = (run_plumbing.git("rev-parse", "--short=12", args.against) or "").strip()
        if not commit:
            raise SystemExit(f"error: --against {args.against}: not a commit of this repository")
        arms += tuple(f"{arm}@{commit}" for arm in args.arms)
        extra += tuple((arm, f"{arm}@{commit}") for arm in args.arms)
    grid = [(algo, arm, seed) for algo in args.algos for arm in arms for seed in args.seeds]
    if args.launcher == "local":  # each job's folder: reused, resumed or started (and why)
        plan = {job: find_run(args, *job) for job in grid}
    else:  # a cluster job resumes in the folder run_name gives (bench/cluster.py), without the provenance check
        plan = {job: (Path(args.run_dir) / run_name(args, *job), "started") for job in grid}
    if args.dry_run:
        for job, (folder, what) in plan.items():
            print(f"# {folder.name}: {what}" if what.endswith("reused") else shlex.join(command(args, *job, folder)))
        return
    name = args.name or (f"ablation_{args.env}_{'_'.join(args.algos)}" if "ensemble" in args.arms else
                         f"compare_{args.env}") + (f"_{args.tag}" if args.tag else "")
    if args.launcher == "local":
        with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the subprocesses
            for message in pool.map(lambda job: launch(args, *job, *plan[job]), grid):
                print(message, flush=True)
    else:
        import cluster

        dydiff = "dydiff" in args.arms
        prepare = cluster.PrepareJob(["--env", args.env, "--preset", args.preset, *shlex.split(args.flags),
                                      *shlex.split(args.dydiff_flags if dydiff else "")], models=dydiff)
        jobs = [(run_name(args, *job), Path(args.run_dir) / run_name(args, *job), train_flags(args, *job))
                for job in grid]
        waiting = cluster.launch(args, jobs, prepare, Path(args.run_dir) / f"{name}_jobs.json")
        if waiting:
            print(f"{len(waiting)} of {len(grid)} runs not finished yet ({', '.join(waiting)}); run the same command "
                  f"again to gather the results once they are")
            return

    arm_of = {plan[job][0].name: job[1] for job in grid}
    runs = [{**r, "arm": arm_of[r["run"]]} for r in load_runs([plan[job][0] for job in grid])]
    rows = aggregate(runs)
    pairs = all_paired(runs, args.algos, arms, extra)
    out = {"env": args.env, "steps": sorted({r["steps"] for r in runs}), "preset": args.preset, "flags": args.flags,
           "dydiff_flags": args.dydiff_flags, "command": shlex.join(["python", "bench/compare.py", *sys.argv[1:]]),
           "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
           "jobs": args.jobs,
           "runs": [{"algo": r["algo"], "arm": r["arm"], "dydiff": bool(r.get("dydiff")), "seed": r["seed"],
                     "final": r["final_score"],
                     "last": r["last_score"], "best": r["best_score"], "best_step": r["best_step"],
                     "wall_s": r["wall_time_s"], "cpu_s": r.get("cpu_time_s"), "rollout_s": r.get("rollout_time_s", 0.0),
                     "pretrain_s": r.get("pretrain_time_s"), "updates_per_s": r["updates_per_s"], "run": r["run"],
                     # what made this number: the commit, uncommitted changes, the code's digests, the settings
                     "provenance": r.get("provenance"), "settings": r.get("settings"), "pretrained": r.get("pretrained"),
                     "dataset_id": r.get("dataset_id"), "fingerprint": r.get("fingerprint")}
                    for r in runs],
           "groups": rows, "paired": pairs}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(out, indent=2))
    tables = markdown(rows) + "\n\n" + paired_markdown(pairs)
    (results / f"{name}.md").write_text(tables + "\n")
    plot(runs, results / f"{name}.png")
    print(tables)
    print(f"wrote {results / name}.json, .md and .png")


if __name__ == "__main__":
    sub = sys.argv[1] if len(sys.argv) > 1 else ""
    if sub == "pool":
        pool_main(tyro.cli(PoolArgs, args=sys.argv[2:], prog="compare.py pool"))
    elif sub == "table":
        print(results_table())
    else:
        main(tyro.cli(Args))
