"""DM training recipes: each one's validation loss against its cost, on one dataset.

    python bench/dm_recipes.py --env maze2d-umaze                                 # -> bench/results/dm_recipes.{json,png}
    python bench/dm_recipes.py --recipes default b48 b32 --threads 2 --name dm_recipes_batch_threads2

Each recipe's DM is the one train.py trains with those settings (loaded from the cache beside the dataset when
trained before; else trained here, at 1 thread), with the validation loss diffusion.train records every 250 steps:
the EDM loss of the EMA network on one fixed set of segments and noise (diffusion.validation_loss), the same for
every recipe, so that recipes compare on one smooth curve. Its cost is its steps times its step time, timed for all
recipes alternately in this process (at 1 thread, or --threads): its ratio to the default recipe's (train.py's
cpu preset) moves less with the machine and its other jobs than a training time does.
"""
from __future__ import annotations

import copy
import json
import platform
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = Path(__file__).resolve().parent / "results"

import diffusion  # noqa: E402
from speed import matmul_flops  # noqa: E402

DEFAULT_DM = diffusion.DMConfig()  # train.py's cpu preset
RECIPES = {  # the default; three recipes at about 45% of its cost (a smaller U-Net or fewer steps); bf16 autocast
    "default": DEFAULT_DM,
    "mults122_4400": replace(DEFAULT_DM, dim_mults=(1, 2, 2), train_steps=4400, lr=3e-3),
    "dim24_4400": replace(DEFAULT_DM, dim=24, train_steps=4400, lr=3e-3),
    "lr4e-3_3300": replace(DEFAULT_DM, train_steps=3300, lr=4e-3),
    # the default's steps in bf16; then bf16 at about 2/3 of them, or at half the steps with twice or 4x the batch
    "bf16": replace(DEFAULT_DM, precision="bf16"),
    "bf16_lr4e-3_4800": replace(DEFAULT_DM, precision="bf16", train_steps=4800, lr=4e-3),
    "bf16_b192_3600": replace(DEFAULT_DM, precision="bf16", batch_size=192, train_steps=3600, lr=3.5e-3),
    "bf16_b384_1800": replace(DEFAULT_DM, precision="bf16", batch_size=384, train_steps=1800, lr=5e-3,
                              warmup_steps=100),
    # one residual block per U-Net level, wider (--dm-blocks 1 --dm-dim 40; bench/README.md,
    # "A shallower, wider U-Net")
    "blocks1_dim40": replace(DEFAULT_DM, blocks=1, dim=40),
    # the default's steps at half or a third of its batch: a step's fixed cost (small operations) stays
    "b48": replace(DEFAULT_DM, batch_size=48),
    "b32": replace(DEFAULT_DM, batch_size=32),
}


@dataclass
class Args:
    env: str = "maze2d-umaze"
    """dataset whose DM is trained"""
    dataset_steps: int | None = None
    """transitions of a rebuilt maze dataset, as train.py's --dataset-steps (None: the dataset's own size)"""
    recipes: tuple[str, ...] = tuple(RECIPES)
    """recipes to train (or load), from: default, mults122_4400, dim24_4400, lr4e-3_3300, bf16, bf16_lr4e-3_4800,
    bf16_b192_3600, bf16_b384_1800, blocks1_dim40, b48, b32"""
    threads: int = 1
    """torch threads of the timed loops (a recipe is trained, when it is not cached, at 1)"""
    timing_steps: int = 20
    """training steps per timed loop of each recipe's network"""
    repeats: int = 3
    """the recipes' timed loops alternate this many times; the median counts"""
    name: str = "dm_recipes"
    """results files: bench/results/<name>.json and .png"""


def step_flops(dm, X, starts, lengths, batch_size: int) -> float:
    """FLOPs of one training step's loss and backward pass at this batch size, as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    pick = torch.arange(batch_size) % len(starts)
    x, mask = diffusion.gather_segments(X, torch.as_tensor(starts)[pick], torch.as_tensor(lengths)[pick], dm.horizon)
    with FlopCounterMode(display=False) as counter:
        copy.deepcopy(dm).loss(x, dm.cond_mask(), mask).backward()
    return float(counter.get_total_flops())


def main(args: Args) -> None:
    """Each recipe's DM from diffusion.load_or_train (a recipe trains once); its cost is its steps times its step
    time at --threads (1 by default), timed for every recipe alternately in this process (the module's docstring says
    why)."""
    from data import load_dataset
    from rebuild import build_dataset

    torch.set_num_threads(1)
    data = load_dataset(args.env, steps=args.dataset_steps, build=build_dataset)
    out = {"env": args.env, "dataset_id": data.dataset_id, "matmul_1thread_gflop_per_s": matmul_flops("cpu", 2.0) / 1e9,
           "machine": f"{platform.machine()}, torch {torch.__version__}", "recipes": {}}
    timers = {}
    for name in args.recipes:
        cfg = RECIPES[name]
        dm, info = diffusion.load_or_train(data, cfg, "cpu", progress=False)
        out["recipes"][name] = {"config": asdict(cfg), "val_loss": info["val_loss"], "val_curve": info["val_curve"],
                                "n_params": info["n_params"], "cached": info["cached"]}
        raw, first, ends = diffusion.training_rows(data, cfg.terminal_rows)
        starts, lengths = diffusion.segment_index(first, ends, cfg.horizon)
        X, short = dm.normalize(torch.as_tensor(raw)), replace(cfg, train_steps=args.timing_steps, warmup_steps=1)
        out["recipes"][name]["gflop_per_step"] = step_flops(dm, X, starts, lengths, cfg.batch_size) / 1e9
        timers[name] = lambda dm=dm, X=X, st=starts, ln=lengths, c=short: diffusion.train(
            copy.deepcopy(dm), X, st, ln, c, progress=False, val_every=10**9)["train_seconds"] / c.train_steps
    per_step = {name: [] for name in timers}
    torch.set_num_threads(args.threads)
    out["threads"] = args.threads
    for _ in range(args.repeats):
        for name, timer in timers.items():
            per_step[name].append(timer())
    for name, r in out["recipes"].items():
        r["step_seconds"] = float(np.median(per_step[name]))
        r["cost_seconds"] = r["step_seconds"] * r["config"]["train_steps"]
    ref = out["recipes"]["default"]["cost_seconds"] if "default" in out["recipes"] else None
    print("\n| recipe | dim, mults, blocks | batch | lr | steps | params | GFLOP per step | ms per step | cost (x default) "
          "| validation loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in out["recipes"].items():
        c = r["config"]
        r["cost_vs_default"] = r["cost_seconds"] / ref if ref else None
        cost = "-" if ref is None else f"{r['cost_vs_default']:.2f}"
        print(f"| {name} | {c['dim']}, {tuple(c['dim_mults'])}, {c['blocks']} | {c['batch_size']} | {c['lr']:g} "
              f"| {c['train_steps']} | {r['n_params'] / 1e6:.2f}M | {r['gflop_per_step']:.2f} "
              f"| {r['step_seconds'] * 1e3:.0f} | {cost} | {r['val_loss']:.4f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    plot(out, RESULTS / f"{args.name}.png")
    print(f"1-thread matmul {out['matmul_1thread_gflop_per_s']:.1f} GFLOP/s; wrote {RESULTS / args.name}.json and .png")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = out["recipes"].get("default", next(iter(out["recipes"].values())))["cost_seconds"]  # x: share of it
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in out["recipes"].items():
        curve = np.array(r["val_curve"])  # [step, seconds, loss]: the cost of step k is k step-times
        ax.plot(curve[:, 0] * r["step_seconds"] / ref, curve[:, 2], marker="o", ms=2, label=name)
    ax.set(xlabel="training cost (share of the default recipe's)", ylabel="validation loss (EMA network)", yscale="log")
    ax.set_title(f"{out['env']}: DM training recipes", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
