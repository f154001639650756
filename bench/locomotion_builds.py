"""What the locomotion rebuilds hold beside D4RL's files: one table of every dataset built on this machine.

    python rebuild.py --env hopper-medium-replay     # build first (SAC to the medium policy, ~30 CPU min)
    python bench/locomotion_builds.py                # then gather every build.json into one results file

Reads the report each build leaves beside its SAC run (<Minari root>/dydiff/mujoco/<robot>/_sac/build.json,
written by rebuild.py) and the run's evaluations near the medium threshold, and writes
bench/results/<name>.json: per dataset its CPU time, transitions, episodes, mean episode return and
normalized score, the medium (and expert) policy's env step, return and score, the commit that built it,
and D4RL's figures beside them (rebuild.d4rl_figures). CPU times are the builds' own (one torch thread each); the 1-thread matmul
rate printed with them is this machine's, measured now (with the load average beside it). A dataset that is not built is left out.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from data import LOCOMOTION, LOCOMOTION_ENVS, locomotion_ids, normalized_score  # noqa: E402
from rebuild import d4rl_figures, read_sac_state, sac_dir  # noqa: E402
from runs import write_atomic  # noqa: E402
from speed import matmul_flops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Args:
    name: str = "locomotion_builds"
    """results file: bench/results/<name>.json"""


def near_threshold(state: dict, ref_min: float, ref_max: float, fraction: float = 1 / 3) -> list[list[float]]:
    """The evaluations around the medium point: the last coarse one below a third of expert, the kept
    policies evaluated after it and the point that crossed: [env step, return, score] each."""
    evals = sorted(state["evals"])
    first = next((i for i, (_, ret) in enumerate(evals) if ret >= fraction * ref_max), len(evals))
    return [[s, r, float(normalized_score(r, ref_min, ref_max))] for s, r in evals[max(first - 1, 0):first + 2]]


def gather() -> dict:
    """{dataset: its numbers} for every locomotion rebuild found under the Minari root."""
    out = {}
    for robot in sorted({robot for robot, _ in LOCOMOTION.values()}):
        report = sac_dir(robot) / "build.json"
        if not report.exists():
            continue
        built, state = json.loads(report.read_text()), read_sac_state(robot)
        _, ref_min, ref_max = LOCOMOTION_ENVS[robot]
        for env, (r, _) in LOCOMOTION.items():
            key = locomotion_ids(env)[1]
            if r == robot and key in built:  # D4RL's figures as rebuild.py has them now
                out[env] = {"dataset_id": key, **built[key], "d4rl": d4rl_figures(env), "sac_settings": state["settings"],
                            "sac_evals_near_medium": near_threshold(state, ref_min, ref_max)}
    return out


def table(builds: dict) -> str:
    rows = ["| dataset | CPU min: this build (the SAC run in all) | transitions (D4RL) | episodes (D4RL) | data score (D4RL) "
            "| medium policy: step, return, score | commit |", "|---|---|---|---|---|---|---|"]
    for env, b in builds.items():
        d, med = b["d4rl"], b["policies"]["medium"]
        fmt = lambda x, f="{:,}": "?" if x is None else f.format(x)  # noqa: E731
        rows.append(f"| {env} | {b['cpu_time_s'] / 60:.1f} ({b['sac_cpu_time_s'] / 60:.1f}) | {b['transitions']:,} "
                    f"({fmt(d.get('transitions'))}) | {b['episodes']:,} ({fmt(d.get('episodes'))}) | {b['data_score']:.1f} "
                    f"({fmt(d.get('score'), '{:.1f}')}) | {med['step']:,}, {med['return']:.0f}, {med['score']:.1f} "
                    f"| {(b.get('made_by') or {}).get('commit', '?')[:7]} |")
    return "\n".join(rows)


def main(args: Args) -> None:
    builds = gather()
    if not builds:
        raise SystemExit(f"error: no locomotion rebuild under {sac_dir('hopper').parent.parent}: build one first "
                         "(python rebuild.py --env hopper-medium-replay)")
    torch.set_num_threads(1)
    gflops = matmul_flops("cpu", 2.0) / 1e9
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "matmul_gflops_1thread": gflops, "load_average_1min": os.getloadavg()[0]},
              "builds": builds}
    write_atomic(RESULTS / f"{args.name}.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    print(table(builds))
    print(f"(this machine's 1-thread matmul: {gflops:.0f} GFLOP/s; wrote {RESULTS / args.name}.json)")


if __name__ == "__main__":
    main(tyro.cli(Args))
