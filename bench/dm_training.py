"""DM pretraining recipes compared on one dataset: validation loss against training time.

    python bench/dm_training.py --env maze2d-umaze                       # every recipe below
    python bench/dm_training.py --env maze2d-umaze --recipes today cpu   # some of them

Each recipe trains the CPU-sized DM (H=32, dim 32, mults 1 2 4) from the same initialisation seed and
records, every 250 steps, the validation loss of diffusion.train: the EDM loss of the EMA network on 512
fixed segments with fixed noise (one smooth curve that recipes with other batch sizes compare on).
"today" is the recipe train.py used before this benchmark existed (Mish, batch 64, Adam 5e-4, 200-step
warm-up, clipping 1.0, 4000 steps, and its EMA, a decay of min(0.999, (1+k)/(10+k)), written in EDM's
half-life form to within 0.5%). The table gives each recipe's final loss and the training time it took to
reach today's final loss. Writes bench/results/<name>.{json,png}.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"

import diffusion  # noqa: E402

TODAY = diffusion.DMConfig(act="mish", batch_size=64, lr=5e-4, warmup_steps=200, grad_clip=1.0, train_steps=4000,
                           ema_halflife=44_350, ema_rampup=0.077)
RECIPES = {
    "today": TODAY,
    "silu": replace(TODAY, act="silu"),
    "silu_edm_ema": replace(TODAY, act="silu", ema_halflife=500_000, ema_rampup=0.05),
    "b128_lr1e-3": replace(TODAY, act="silu", batch_size=128, lr=1e-3, train_steps=2000),
    "b256_lr2e-3": replace(TODAY, act="silu", batch_size=256, lr=2e-3, train_steps=1000),
    "b64_lr1e-3_cos": replace(TODAY, act="silu", lr=1e-3, lr_schedule="cosine", train_steps=2300),
    "b128_lr2e-3_cos": replace(TODAY, act="silu", batch_size=128, lr=2e-3, lr_schedule="cosine", train_steps=1400),
    "b64_lr2e-3_cos": replace(TODAY, act="silu", lr=2e-3, lr_schedule="cosine", train_steps=2300),
    "b256_lr4e-3_cos": replace(TODAY, act="silu", batch_size=256, lr=4e-3, lr_schedule="cosine", train_steps=840),
    "b128_lr3e-3_cos": replace(TODAY, act="silu", batch_size=128, lr=3e-3, lr_schedule="cosine", train_steps=1400),
    "b128_lr3e-3_cos1200": replace(TODAY, act="silu", batch_size=128, lr=3e-3, lr_schedule="cosine", train_steps=1200),
    "b128_lr4e-3_cos1200": replace(TODAY, act="silu", batch_size=128, lr=4e-3, lr_schedule="cosine", train_steps=1200),
    "cpu": diffusion.DMConfig(),  # train.py's cpu preset
}


@dataclass
class Args:
    env: str = "maze2d-umaze"
    """dataset whose DM is trained"""
    recipes: tuple[str, ...] = tuple(RECIPES)
    """recipes to train, from: today, silu, silu_edm_ema, b128_lr1e-3, b256_lr2e-3, cpu"""
    threads: int = 1
    """torch CPU threads"""
    name: str = "dm_training"
    """results files: bench/results/<name>.json and .png"""


def main(args: Args) -> None:
    from data import load_dataset

    torch.set_num_threads(args.threads)
    data = load_dataset(args.env)
    raw = np.concatenate([data.obs, data.actions], axis=1)
    out = {"env": args.env, "dataset_id": data.dataset_id, "threads": args.threads,
           "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}", "recipes": {}}
    for name in args.recipes:
        cfg = RECIPES[name]
        torch.manual_seed(cfg.seed)
        model = diffusion.DynamicsDiffusion(data.obs_dim, data.act_dim, cfg.horizon, cfg.dim, cfg.dim_mults,
                                            torch.as_tensor(raw.min(0)), torch.as_tensor(raw.max(0)), cfg.act)
        X = model.normalize(torch.as_tensor(raw))
        starts, lengths = diffusion.segment_index(data.episode_starts, data.episode_ends, cfg.horizon)
        t0 = time.time()
        info = diffusion.train(model, X, starts, lengths, cfg, progress=False)
        out["recipes"][name] = {"config": asdict(cfg), "train_seconds": info["train_seconds"],
                                "wall_seconds": time.time() - t0, "val_loss": info["val_loss"],
                                "val_curve": info["val_curve"], "steps_per_s": cfg.train_steps / info["train_seconds"]}
        print(f"{name}: {info['train_seconds']:.0f} s, validation loss {info['val_loss']:.4f}", flush=True)
    ref = out["recipes"].get("today", {}).get("val_loss")
    print("\n| recipe | act | batch | lr | steps | steps/s | seconds | validation loss | seconds to today's loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in out["recipes"].items():
        c = r["config"]
        reach = next((t for _, t, v in r["val_curve"] if ref is not None and v <= ref), None)
        r["seconds_to_today_loss"] = reach
        print(f"| {name} | {c['act']} | {c['batch_size']} | {c['lr']:g} | {c['train_steps']} | {r['steps_per_s']:.1f} "
              f"| {r['train_seconds']:.0f} | {r['val_loss']:.4f} | {'-' if reach is None else f'{reach:.0f}'} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    plot(out, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.json and .png")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in out["recipes"].items():
        curve = np.array(r["val_curve"])
        ax.plot(curve[:, 1] / 60, curve[:, 2], marker="o", ms=2, label=name)
    ax.set(xlabel="training time (min, 1 thread)", ylabel="validation loss (EMA network)", yscale="log")
    ax.set_title(f"{out['env']}: DM training recipes", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
