"""Pool the runs of several A/B results files (bench/compare.py's JSON) into one table: more seeds for an
interval that straddles zero, or a second set of DyDiff runs paired with arms that were run earlier.

    python bench/pool.py bench/results/ablation_maze2d-umaze_td3bc_sdedit02.json \
        bench/results/compare_maze2d-umaze_td3bc_s10-14.json --name ablation_maze2d-umaze_td3bc_s5-14
    python bench/pool.py bench/results/ablation_maze2d-medium_td3bc_ms1_dm7200.json:plain,ensemble \
        bench/results/compare_maze2d-medium_td3bc_ms1.json:dydiff --name ablation_maze2d-medium_td3bc_ms1
    python bench/pool.py bench/results/ablation_maze2d-umaze_td3bc_dm7200_s5-14.json \
        bench/results/ablation_maze2d-umaze_td3bc_s5-14.json:dydiff=dydiff1800 \
        --pairs dydiff-dydiff1800 dydiff1800-ensemble --name ablation_maze2d-umaze_td3bc_dm1800-vs-7200

Each source is a results file, optionally with ":arm,arm" to take only those arms from it; "arm=new"
renames an arm, so two variants of one arm (DyDiff with two DMs) pool side by side. dydiff - plain and
dydiff - ensemble are paired whenever those arms are present; --pairs adds any other "a-b". The run
folders are not needed: this works from the files, so results measured on another machine or in an
earlier session pool with today's. The sources must agree on env, preset, steps and learner flags, and no
(learner, arm, seed) may come from two sources. The DyDiff flags of each source are kept beside every run
it gives, so a reader sees which settings an arm's runs had (e.g. an ensemble-only arm does not depend on
the DM's flags, a DyDiff arm does). Writes bench/results/<name>.json (runs, groups per arm, the paired
differences with 95% BCa intervals as bench/compare.py computes them) and <name>.md.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from compare import all_paired, paired_markdown, parse_pairs
from summarize import RESULTS

ARM_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass
class Args:
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
    # bench/compare.py's paired() reads the summaries' key names; std over seeds as bench/summarize.py (ddof 0)
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


def markdown(out: dict) -> str:
    lines = ["| learner | arm | seeds | final | last | best | CPU min per run | from |", "|---|---|---|---|---|---|---|---|"]
    for g in out["groups"]:
        lines.append(f"| {g['algo']} | {g['arm']} | {len(g['seeds'])} | {g['final_mean']:.1f} +- {g['final_std']:.1f} | "
                     f"{g['last_mean']:.1f} | {g['best_mean']:.1f} | {g['cpu_min_mean']:.1f} | "
                     f"{', '.join(g['sources'])} |")
    return "\n".join(lines) + "\n\n" + paired_markdown(out["paired"])


def main(args: Args) -> None:
    out = pool(args.sources, args.pairs)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    (results / f"{args.name}.md").write_text(markdown(out) + "\n")
    print(markdown(out))
    print(f"wrote {results / args.name}.json and .md")


if __name__ == "__main__":
    main(tyro.cli(Args))
