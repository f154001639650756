"""How long a new user's first run takes: README's main command from a fresh clone, with an empty Minari root.

    python bench/first_run.py --label after                     # this checkout's commit
    python bench/first_run.py --commit 4fa05dd --label before   # any earlier commit, the same way

Clones the commit into runs/_first_run/<label>/ and runs `python train.py --env maze2d-umaze` there, with the
clone's own code and MINARI_DATASETS_PATH pointing at an empty folder inside it: the dataset is built and every
model trained, as on a fresh machine (the install is not timed). Run it on a quiet machine: the phases' times are
the point. The phases are cut at the lines every version of train.py prints when one ends (the dataset's line,
the ensemble's, the DM's, "done:"); at each line the run's CPU time is read from /proc, so each phase has its
wall and CPU seconds. The ensemble/reward split and the rollouts' share of the learning loop are wall times the
run records itself (the model cache's info, summary.json). The 1-thread matmul rate of the machine is measured
before the run. Writes bench/results/<name>.json: one entry per label, kept across calls (README quotes it).

    python bench/first_run.py floor                             # the least time its torch work can take here

floor: the main command's torch work counted in FLOPs (torch's FlopCounterMode: matrix products and
convolutions, the operations that a large matmul bounds) for the phases whose size the command fixes: the DM's
training steps, the DyDiff rounds, the learner's updates. Each unit is timed here at all cores, so each phase gets
its minutes at the machine's matmul rate (no implementation can be faster) and at the rate the code reaches. The
dataset build (simulator steps), the ensemble and reward model (early stopping decides their steps) and the
evaluations are not counted: the floor is a lower bound. Writes bench/results/first_run_floor.json.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from speed import ACT_DIM, OBS_DIM, matmul_flops, phase_work  # noqa: E402  (bench/ is on the path when a script of it runs)
from runs import git, write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (the start of the line that ends a phase, the phase); the learning loop ends with "done:", then the run's
# last plot is drawn ("finish")
PHASE_ENDS = [("dataset ", "dataset"), ("ensemble and reward model:", "ensemble and reward model"),
              ("diffusion model:", "DM"), ("done:", "learning")]


@dataclass
class Args:
    label: str = "after"
    """name of this measurement in the results file (e.g. before, after)"""
    commit: str = "HEAD"
    """the commit whose clone runs"""
    train_flags: str = ""
    """extra flags of train.py (none: README's command as written)"""
    name: str = "first_run"
    """results file: bench/results/<name>.json"""
    keep: bool = False
    """keep the clone and its datasets afterwards (default: deleted once measured; the log stays, runs/_first_run/<label>.log)"""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (and of its finished children), from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime


def run_timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[list[tuple[float, float | None, str]], int]:
    """Runs cmd; returns each printed line with the wall seconds since the start and the CPU seconds so far."""
    lines, t0 = [], time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for raw in proc.stdout:  # progress bars redraw with \r: each redraw is its own line in the log
            cpu = cpu_seconds(proc.pid)
            for line in raw.replace("\r", "\n").splitlines():
                if line.strip():
                    lines.append((time.time() - t0, cpu, line))
                    out.write(f"{time.time() - t0:8.1f} {line}\n")
        rc = proc.wait()
    lines.append((time.time() - t0, None, "<exit>"))
    return lines, rc


def phases(lines: list[tuple[float, float | None, str]], total_cpu: float) -> dict:
    """Wall and CPU seconds of each phase, cut at the first line that ends it."""
    out, t_prev, c_prev = {}, 0.0, 0.0
    for prefix, phase in PHASE_ENDS:
        hit = next(((t, c) for t, c, line in lines if line.startswith(prefix)), None)
        if hit is None:
            raise SystemExit(f"error: the run printed no line starting with {prefix!r}: see its log")
        out[phase] = {"wall_s": hit[0] - t_prev, "cpu_s": None if hit[1] is None else hit[1] - c_prev}
        t_prev, c_prev = hit[0], hit[1] if hit[1] is not None else c_prev
    out["finish"] = {"wall_s": lines[-1][0] - t_prev, "cpu_s": total_cpu - c_prev}
    return out


def main(args: Args) -> None:
    base = ROOT / "runs" / "_first_run" / args.label
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    clone = base / "clone"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(clone)], check=True)
    commit = (git("rev-parse", args.commit) or "").strip()
    if not commit:
        raise SystemExit(f"error: --commit {args.commit}: not a commit of this repository")
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    torch.set_num_threads(1)
    gflops = matmul_flops("cpu", 5.0) / 1e9
    print(f"1-thread matmul {gflops:.1f} GFLOP/s; running the main command at {commit[:12]} in {clone}", flush=True)

    env = {**os.environ, "MINARI_DATASETS_PATH": str(base / "minari"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "train.py", "--env", "maze2d-umaze", "--run-dir", str(base / "runs"),
           "--run-name", "main", *args.train_flags.split()]
    lines, rc = run_timed(cmd, clone, env, base / "log.txt")
    cpu_total = os.times().children_user + os.times().children_system
    if rc != 0:
        raise SystemExit(f"error: the run failed (exit {rc}): see {base / 'log.txt'}")
    summary = json.loads((base / "runs" / "main" / "summary.json").read_text())
    per_phase = phases(lines, cpu_total)
    # the run's own records split two phases further (wall seconds)
    cache = next((base / "minari").rglob("dydiff_cache"))
    fit = torch.load(next(cache.glob("dynamics_*.pt")), weights_only=True)["info"]
    per_phase["ensemble and reward model"].update(ensemble_wall_s=fit["ensemble_time_s"], reward_wall_s=fit["reward_time_s"])
    per_phase["learning"].update(rollouts_wall_s=summary["rollout_time_s"])
    dm = torch.load(next(cache.glob("diffusion_*.pt")), weights_only=True)["info"]

    entry = {"commit": commit, "command": "python train.py --env maze2d-umaze" + (f" {args.train_flags}" * bool(args.train_flags)),
             "machine": {"matmul_1thread_gflop_per_s": gflops, "cpus": os.cpu_count(), "platform": platform.platform(),
                         "torch": str(torch.__version__)},
             "threads": summary.get("threads"), "wall_min": lines[-1][0] / 60, "cpu_min": cpu_total / 60,
             "phases_min": {k: {kk.replace("_s", "_min"): None if v is None else v / 60 for kk, v in d.items()}
                            for k, d in per_phase.items()},
             "dm_val_loss": dm["val_loss"], "dm_train_steps": dm["train_steps"], "final_score": summary["final_score"],
             "updates_per_s": summary["updates_per_s"], "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    path = RESULTS / f"{args.name}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.label] = entry
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    print("\n| phase | wall min | CPU min |\n|---|---|---|")
    for k, d in entry["phases_min"].items():
        print(f"| {k} | {d['wall_min']:.1f} | {'-' if d['cpu_min'] is None else format(d['cpu_min'], '.1f')} |")
    print(f"| all | {entry['wall_min']:.1f} | {entry['cpu_min']:.1f} |\n"
          f"final score {entry['final_score']:.1f}, DM validation loss {entry['dm_val_loss']:.4f} -> {path}")
    if not args.keep:  # the log stays beside it
        shutil.copyfile(base / "log.txt", base.with_suffix(".log"))
        shutil.rmtree(base)


# -- The floor: the least time the main command's torch work can take on this machine (subcommand floor) ---------
@dataclass
class FloorArgs:
    seconds: float = 5.0
    """target duration of each timed loop"""
    rates: tuple[float, ...] = (66.0, 85.0)
    """other machines' 1-thread matmul GFLOP/s: the floor there, where the cores compute at most cores x that rate"""
    name: str = "first_run_floor"
    """results file: bench/results/<name>.json"""


def floor_units() -> dict:
    """{phase: (units in the main command, FLOPs of one unit, a function that does one unit and returns its seconds)}
    at the main command's settings (maze2d-umaze's shapes, fresh models and random data: the cost does not depend
    on the values)."""
    import copy
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    import diffusion
    from dm_recipes import step_flops
    from train import dm_config, parse_args

    p, work = parse_args([]), phase_work()
    cfg, obs_dim, act_dim = dm_config(p), OBS_DIM, ACT_DIM  # maze2d's, as speed.phase_work's units
    dm = diffusion.DynamicsDiffusion(obs_dim, act_dim, cfg.horizon, cfg.dim, cfg.dim_mults, act=cfg.act, blocks=cfg.blocks)
    X = torch.rand(20_000, obs_dim + act_dim) * 2 - 1
    starts, lengths = torch.arange(0, len(X) - cfg.horizon), torch.full((len(X) - cfg.horizon,), cfg.horizon)
    ten = replace(cfg, train_steps=10, warmup_steps=1)
    dm_step = lambda: diffusion.train(copy.deepcopy(dm), X, starts, lengths, ten, progress=False,  # noqa: E731
                                      val_every=10**9)["train_seconds"] / ten.train_steps  # without its validation

    def counted(fn, calls: int = 1) -> float:
        with FlopCounterMode(display=False) as counter:
            for _ in range(calls):
                fn()
        return counter.get_total_flops() / calls

    def timed(fn):  # seconds per call
        def once() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return once

    update = work["TD3+BC update"]  # the actor learns every second update: count two
    return {"DM training step": (cfg.train_steps, step_flops(dm, X, starts, lengths, cfg.batch_size), dm_step),
            "DyDiff round": (-(-p.total_steps // p.rollout_interval), counted(work["DyDiff round"]),
                             timed(work["DyDiff round"])),
            "TD3+BC update": (p.total_steps, counted(update, 2), timed(update))}


def floor_main(args: FloorArgs) -> None:
    from train import cores

    threads = cores()
    torch.set_num_threads(1)
    one = matmul_flops("cpu", args.seconds)
    torch.set_num_threads(threads)
    peak = matmul_flops("cpu", args.seconds)
    rows, total = {}, 0.0
    for phase, (units, flops, once) in floor_units().items():
        once()  # warm-up
        t0, seconds = time.perf_counter(), []
        while time.perf_counter() - t0 < args.seconds or len(seconds) < 3:
            seconds.append(once())
        s = float(sorted(seconds)[len(seconds) // 2])
        rows[phase] = {"units": units, "gflop_per_unit": flops / 1e9, "tflop": units * flops / 1e12,
                       "seconds_per_unit": s, "gflop_per_s": flops / s / 1e9, "share_of_matmul": flops / s / peak,
                       "min_at_matmul_rate": units * flops / peak / 60, "min_at_measured_rate": units * s / 60}
        total += units * flops
    out = {"threads": threads, "cpus": os.cpu_count(), "platform": platform.platform(), "torch": str(torch.__version__),
           "matmul_1thread_gflop_per_s": one / 1e9, f"matmul_{threads}threads_gflop_per_s": peak / 1e9,
           "phases": rows, "tflop": total / 1e12, "floor_min": total / peak / 60,
           "measured_min": sum(r["min_at_measured_rate"] for r in rows.values()),
           "floor_min_at": {f"{r:g}": total / (threads * r * 1e9) / 60 for r in args.rates},
           "commit": (git("rev-parse", "HEAD") or "").strip(),
           "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_atomic(RESULTS / f"{args.name}.json", lambda tmp: tmp.write_text(json.dumps(out, indent=1)))
    print(f"\n| phase (the main command, {threads} threads) | units | GFLOP per unit | TFLOP | GFLOP/s reached "
          f"(share of matmul) | min at the matmul rate | min at the rate reached |\n|---|---|---|---|---|---|---|")
    for phase, r in rows.items():
        print(f"| {phase} | {r['units']:,} | {r['gflop_per_unit']:.3f} | {r['tflop']:.1f} | {r['gflop_per_s']:.0f} "
              f"({r['share_of_matmul']:.0%}) | {r['min_at_matmul_rate']:.1f} | {r['min_at_measured_rate']:.1f} |")
    print(f"| all | | | {out['tflop']:.1f} | | {out['floor_min']:.1f} | {out['measured_min']:.1f} |\n"
          f"matmul {one / 1e9:.1f} GFLOP/s at 1 thread, {peak / 1e9:.1f} at {threads}; at {threads} x a 1-thread rate of "
          + ", ".join(f"{r} GFLOP/s: {m:.1f} min" for r, m in out["floor_min_at"].items())
          + f" (dataset, ensemble, reward model and evaluations not counted) -> {RESULTS / args.name}.json")


if __name__ == "__main__":
    if sys.argv[1:2] == ["floor"]:
        floor_main(tyro.cli(FloorArgs, args=sys.argv[2:], prog="first_run.py floor"))
    else:
        main(tyro.cli(Args))
