"""From bench/compare.py's results files to the numbers README quotes: the paired differences with their
bootstrap intervals, `pool` (the runs of several results files in one table) and `table` (README's results
table). compare.py writes the files and runs these two as its subcommands:

    python bench/compare.py pool A.json B.json:plain --name ablation_maze2d-umaze_td3bc
    python bench/compare.py table

pool: more seeds, or a new arm paired with runs measured earlier, without their run folders. Each source may
end in ":arm,arm" to take only those arms; "arm=new" renames one, so two variants of an arm pool side by side
(--pairs dydiff-dydiff1800). The sources must agree on env, preset, steps and learner flags, and no (learner,
arm, seed) may come from two. Writes bench/results/<name>.{json,md} (no curves: results files hold no
evaluations).

table: one row per file bench/results/ablation_<dataset>_<algo>.json (the name of today's default; a
variant's name has one more suffix). The test suite checks that README holds it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from scipy.stats import bootstrap

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- paired differences over seeds
def paired(runs: list[dict], algo: str, arm: str = "dydiff", other: str = "plain",
           metric: str = "final_score") -> dict | None:
    """arm - other per seed (e.g. dydiff - plain), their mean and its 95% bootstrap confidence interval."""
    a = {r["seed"]: r[metric] for r in runs if r["algo"] == algo and r["arm"] == arm}
    b = {r["seed"]: r[metric] for r in runs if r["algo"] == algo and r["arm"] == other}
    seeds = sorted(a.keys() & b.keys())
    if len(seeds) < 2:
        return None
    d = np.array([a[s] - b[s] for s in seeds])
    ci = bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=10_000, random_state=0).confidence_interval
    return {"name": f"{arm}-{other}", "algo": algo, "metric": metric, "seeds": seeds, "differences": d.tolist(),
            "mean": float(d.mean()), "ci_low": float(ci.low), "ci_high": float(ci.high),
            "dydiff_wins": int((d > 0).sum())}


def parse_pairs(specs: tuple[str, ...], arms) -> tuple[tuple[str, str], ...]:
    """--pairs: each "first-second" as (first, second), both among the arms; else a one-line error."""
    out = tuple(tuple(spec.partition("-")[::2]) for spec in specs)
    for spec, (a, b) in zip(specs, out):
        if a not in arms or b not in arms:
            raise SystemExit(f"error: --pairs {spec}: give first-second, two arm names of the runs (arms: "
                             f"{', '.join(sorted(arms))})")
    return out


def all_paired(runs: list[dict], algos, arms, extra: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """dydiff - plain and dydiff - ensemble (for the arms present), then each extra (arm, other) pair not among
    them, per learner, on the final, last and best score."""
    default = [("dydiff", other) for other in ("plain", "ensemble") if "dydiff" in arms and other in arms]
    pairs = default + [pair for pair in dict.fromkeys(extra) if pair not in default]
    return [p for algo in algos for arm, other in pairs for metric in ("final_score", "last_score", "best_score")
            if (p := paired(runs, algo, arm, other, metric)) is not None]


def paired_markdown(rows: list[dict]) -> str:
    lines = ["| learner | difference | score | seeds | mean | 95% CI | first arm ahead on |", "|---|---|---|---|---|---|---|"]
    for p in rows:
        lines.append(f"| {p['algo']} | {p['name']} | {p['metric'].replace('_score', '')} | {len(p['seeds'])} | "
                     f"{p['mean']:+.1f} | [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}] | {p['dydiff_wins']} of "
                     f"{len(p['seeds'])} seeds |")
    return "\n".join(lines)


# ------------------------------------------------------------------ pool: several results files in one
ARM_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass
class PoolArgs:
    sources: tyro.conf.Positional[tuple[str, ...]]
    """results files of bench/compare.py, each optionally suffixed with :arm[,arm] to take only those arms
    (arm=new renames one)"""
    name: str = "pooled"
    """base name of the output files"""
    results: str = str(RESULTS)
    """folder the pooled files are written to"""
    pairs: tuple[str, ...] = ()
    """more differences to pair by seed, as first-second arm names, e.g. dydiff-dydiff1800 ensemble-plain"""


def read_source(spec: str) -> tuple[dict, list[dict], str]:
    """(results, its runs: all, or those of the arms named after ':', renamed where 'arm=new', the file's name)."""
    path, _, arms = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if not Path(path).exists():
        raise SystemExit(f"error: {path}: no such results file (give bench/compare.py's JSON, optionally :arm,arm)")
    out = json.loads(Path(path).read_text())
    if "runs" not in out or "env" not in out:
        raise SystemExit(f"error: {path} is not a bench/compare.py results file (no 'env' or 'runs')")
    rename = {}  # arm in the file -> arm in the pool ("dydiff" alone keeps its name)
    for a in filter(None, arms.split(",")):
        name, _, new = a.partition("=")
        rename[name] = new or name
    for new in rename.values():
        if not ARM_NAME.fullmatch(new):
            raise SystemExit(f"error: {spec}: arm name {new!r} must be letters, digits and _ (a '-' separates "
                             f"the two arms of a --pairs difference)")
    runs = []
    for r in out["runs"]:
        if rename and r["arm"] not in rename:
            continue
        run = {**r, "arm": rename.get(r["arm"], r["arm"]), "source": Path(path).name,
               "dydiff_flags": out.get("dydiff_flags", "")}
        if run["arm"] != r["arm"]:
            run["source_arm"] = r["arm"]  # the arm's name in its own file
        runs.append(run)
    if rename and (missing := rename.keys() - {r["arm"] for r in out["runs"]}):
        raise SystemExit(f"error: {path} has no runs of arm {', '.join(sorted(missing))} (its arms: "
                         f"{', '.join(sorted({r['arm'] for r in out['runs']}))})")
    return out, runs, Path(path).name


def pool(specs: tuple[str, ...], pairs: tuple[str, ...] = ()) -> dict:
    if len(specs) < 2:
        raise SystemExit("error: give two or more results files to pool")
    sources = [read_source(s) for s in specs]
    first = sources[0][0]
    for out, _, name in sources[1:]:
        for key in ("env", "preset", "steps", "flags"):
            if out.get(key) != first.get(key):
                raise SystemExit(f"error: {name} has {key}={out.get(key)!r}, {sources[0][2]} has {first.get(key)!r}: "
                                 f"only runs of one setting pool")
    runs, seen = [], {}
    for _, taken, name in sources:
        for r in taken:
            key = (r["algo"], r["arm"], r["seed"])
            if key in seen:
                raise SystemExit(f"error: {r['algo']} {r['arm']} seed {r['seed']} is in {seen[key]} and in {name}: "
                                 f"take that arm from one of them (file:arm,arm)")
            seen[key] = name
            runs.append(r)
    # paired() reads the summaries' key names; std over seeds as aggregate() (ddof 0)
    scored = [{**r, "final_score": r["final"], "last_score": r["last"], "best_score": r["best"]} for r in runs]
    groups = []
    for algo, arm in sorted({(r["algo"], r["arm"]) for r in runs}):
        rs = sorted((r for r in runs if r["algo"] == algo and r["arm"] == arm), key=lambda r: r["seed"])
        groups.append({"algo": algo, "arm": arm, "seeds": [r["seed"] for r in rs],
                       "sources": sorted({r["source"] for r in rs}),
                       **{f"{m}_mean": float(np.mean([r[m] for r in rs])) for m in ("final", "last", "best")},
                       **{f"{m}_std": float(np.std([r[m] for r in rs])) for m in ("final", "last", "best")},
                       "cpu_min_mean": float(np.mean([(r.get("cpu_s") or np.nan) / 60 for r in rs]))})
    algos, arms = sorted({r["algo"] for r in runs}), {r["arm"] for r in runs}
    extra = parse_pairs(pairs, arms)
    return {"env": first["env"], "steps": first.get("steps"), "preset": first.get("preset"),
            "flags": first.get("flags"), "sources": list(specs), "runs": runs, "groups": groups,
            "paired": all_paired(scored, algos, arms, extra)}


def pool_markdown(out: dict) -> str:
    lines = ["| learner | arm | seeds | final | last | best | CPU min per run | from |", "|---|---|---|---|---|---|---|---|"]
    for g in out["groups"]:
        lines.append(f"| {g['algo']} | {g['arm']} | {len(g['seeds'])} | {g['final_mean']:.1f} +- {g['final_std']:.1f} | "
                     f"{g['last_mean']:.1f} | {g['best_mean']:.1f} | {g['cpu_min_mean']:.1f} | "
                     f"{', '.join(g['sources'])} |")
    return "\n".join(lines) + "\n\n" + paired_markdown(out["paired"])


def pool_main(args: PoolArgs) -> None:
    out = pool(args.sources, args.pairs)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    (results / f"{args.name}.md").write_text(pool_markdown(out) + "\n")
    print(pool_markdown(out))
    print(f"wrote {results / args.name}.json and .md")


# ------------------------------------------------------------------- table: README's results table
DEFAULT_FILE = re.compile(r"ablation_(?P<env>[a-z0-9-]+)_(?P<algo>td3bc|iql)\.json")
LEARNERS = {"td3bc": "TD3+BC", "iql": "IQL"}
MAZES = ("maze2d-umaze", "maze2d-medium", "maze2d-large")


def seed_span(seeds: list[int]) -> str:
    """5, 6, 7, 8, 9 -> "5-9"; seeds that are not one run of numbers are listed."""
    seeds = sorted(seeds)
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def table_row(path: Path) -> tuple[tuple, str]:
    """One row of the results table: a file's three arms (mean +- std of the final score over seeds), its paired
    differences DyDiff - plain and DyDiff - ensemble-only (final score, as the file holds them), seeds, CPU min."""
    m = DEFAULT_FILE.fullmatch(path.name)
    out = json.loads(path.read_text())
    runs = {arm: [r for r in out["runs"] if r["arm"] == arm and r["algo"] == m["algo"]]
            for arm in ("plain", "ensemble", "dydiff")}
    if any(not rs for rs in runs.values()):
        raise SystemExit(f"error: {path.name} lacks an arm of plain, ensemble, dydiff: not a three-arm A/B")
    score = {arm: f"{np.mean([r['final'] for r in rs]):.1f} +- {np.std([r['final'] for r in rs]):.1f}"
             for arm, rs in runs.items()}
    cpu = " / ".join(f"{np.mean([r['cpu_s'] for r in runs[arm]]) / 60:.1f}" for arm in ("plain", "ensemble", "dydiff"))
    diff = {}
    for other in ("plain", "ensemble"):
        p = next(p for p in out["paired"] if p["name"] == f"dydiff-{other}" and p["metric"] == "final_score")
        diff[other] = f"{p['mean']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]"
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    maze = MAZES.index(m["env"]) if m["env"] in MAZES else len(MAZES)
    order = (list(LEARNERS).index(m["algo"]), maze, m["env"])
    return order, (f"| {m['env']} | {LEARNERS[m['algo']]} | {score['plain']} | {score['ensemble']} | {score['dydiff']} | "
                   f"{diff['plain']} | {diff['ensemble']} | {len(seeds)} ({seed_span(seeds)}) | {cpu} |")


def results_table(results: Path = RESULTS) -> str:
    """README's results table: every today's-default file, TD3+BC first, the mazes by size, then locomotion."""
    rows = sorted(table_row(p) for p in results.glob("ablation_*.json") if DEFAULT_FILE.fullmatch(p.name))
    return "\n".join(["| dataset | learner | plain | ensemble-only | DyDiff | DyDiff - plain [95% CI] | "
                      "DyDiff - ensemble-only [95% CI] | seeds | CPU min per run (plain / ens. / DyDiff) |",
                      "|---|---|---|---|---|---|---|---|---|", *(row for _, row in rows)])
