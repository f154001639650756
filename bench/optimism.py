"""How optimistic each arm's synthetic data is, read from the TensorBoard logs of a results file's runs.

    python bench/optimism.py bench/results/ablation_halfcheetah-medium_td3bc.json

Per arm (plain, ensemble-only, DyDiff) and seed, over the same runs the results file scores:
  synthetic reward/step  the learned reward per transition of a round's rollouts (all B of them: the kept and the
                         rejected trajectories' mean returns weighted by the kept share, over T - 1 transitions),
                         averaged over the second half of the run's rounds, and the same for the kept ones alone;
  real reward/step       the final policy's evaluation return per step (the mean of the last 3 evaluations), on
                         halfcheetah only: its episodes never end early, so a return is 1,000 steps' worth of reward
                         (hopper's and walker2d's end at a fall, and their lengths are not logged);
  Q                      the learner's mean Q over a batch at the last 3 evaluations (TensorBoard losses/q_mean),
                         and its ratio to the plain run of the same seed.
A model whose rollouts promise more reward than its policy earns feeds the critic values it cannot reach.
The synthetic rollouts start from dataset states, already moving, so they need not equal a whole episode's
reward per step: read the arms against each other. Writes bench/results/optimism_<dataset>_<algo>.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("plain", "ensemble", "dydiff")
HALFCHEETAH_STEPS = 1000  # gymnasium's HalfCheetah-v5 time limit; it has no terminal state


@dataclass
class Args:
    results: tyro.conf.Positional[str]
    """a three-arm results file of bench/compare.py (its runs' folders must still exist)"""
    run_dir: str = "runs/compare"
    """where the runs' folders are"""


def scalars(folder: Path) -> dict[str, np.ndarray]:
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: np.array([e.value for e in ea.Scalars(tag)]) for tag in ea.Tags()["scalars"]}


def run_optimism(log: dict[str, np.ndarray], env: str, rollout_length: int) -> dict:
    """One run's figures from its TensorBoard scalars (see the module docstring)."""
    out = {"q": float(log["losses/q_mean"][-3:].mean()), "real_per_step": None,
           "synthetic_per_step": None, "synthetic_kept_per_step": None}
    if env.startswith("halfcheetah"):
        out["real_per_step"] = float(log["charts/return"][-3:].mean()) / HALFCHEETAH_STEPS
    if "dydiff/return_kept_mean" in log:
        half = slice(len(log["dydiff/return_kept_mean"]) // 2, None)
        kept, rejected = log["dydiff/return_kept_mean"][half], log["dydiff/return_rejected_mean"][half]
        share = log["dydiff/kept_share"][half]
        rejected = np.where(share < 1, rejected, 0.0)  # a round that kept every rollout logs no rejected mean
        out["synthetic_kept_per_step"] = float(kept.mean()) / (rollout_length - 1)
        out["synthetic_per_step"] = float((share * kept + (1 - share) * rejected).mean()) / (rollout_length - 1)
    return out


def optimism(results: dict, run_dir: Path, read=scalars) -> dict:
    rows = {}
    for r in results["runs"]:
        if r["arm"] in ARMS:
            # T from the run's own config.json (results files made before 7478053 hold no settings)
            T = json.loads((run_dir / r["run"] / "config.json").read_text())["rollout_length"]
            rows[(r["arm"], r["seed"])] = {"arm": r["arm"], "seed": r["seed"], "final": r["final"], "run": r["run"],
                                           **run_optimism(read(run_dir / r["run"]), results["env"], T)}
    for (arm, seed), row in rows.items():
        plain = rows.get(("plain", seed))
        row["q_over_plain"] = row["q"] / plain["q"] if plain else None
    arms = {}
    for arm in ARMS:
        rs = [row for (a, _), row in sorted(rows.items()) if a == arm]
        if rs:
            arms[arm] = {k: (float(np.mean([x[k] for x in rs])) if rs[0][k] is not None else None)
                         for k in ("final", "real_per_step", "synthetic_per_step", "synthetic_kept_per_step", "q",
                                   "q_over_plain")} | {"seeds": [x["seed"] for x in rs]}
    return {"env": results["env"], "arms": arms, "runs": list(rows.values())}


def markdown(out: dict) -> str:
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| arm | final score | real reward/step | synthetic reward/step (kept) | Q | Q / plain's |",
             "|---|---|---|---|---|---|"]
    for arm, a in out["arms"].items():
        lines.append(f"| {arm} | {a['final']:.1f} | {f(a['real_per_step'])} | {f(a['synthetic_per_step'])} "
                     f"({f(a['synthetic_kept_per_step'])}) | {a['q']:.0f} | {f(a['q_over_plain'])} |")
    return "\n".join(lines)


def main(args: Args) -> None:
    path = Path(args.results)
    if not path.exists():
        raise SystemExit(f"error: {path}: no such results file (give bench/compare.py's JSON)")
    results = json.loads(path.read_text())
    run_dir = Path(args.run_dir) if Path(args.run_dir).is_absolute() else ROOT / args.run_dir
    missing = [r["run"] for r in results["runs"] if not (run_dir / r["run"]).is_dir()]
    if missing:
        raise SystemExit(f"error: {len(missing)} runs of {path.name} are not in {run_dir} (e.g. {missing[0]}): "
                         f"give --run-dir, or rerun the compare.py command, which remakes them")
    out = optimism(results, run_dir)
    name = path.stem.replace("ablation_", "optimism_")
    (RESULTS / f"{name}.json").write_text(json.dumps({"source": path.name, **out}, indent=2))
    print(markdown(out))
    print(f"wrote {RESULTS / name}.json")


if __name__ == "__main__":
    main(tyro.cli(Args))
