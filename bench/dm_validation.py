"""The validation loss of every diffusion model cached beside a dataset, by today's measure
(diffusion.validation_loss), whatever code trained it: when the measure changes, the models already trained are
scored again without training them again.

    python bench/dm_validation.py --env maze2d-umaze              # -> bench/results/dm_validation_maze2d-umaze.{json,md}
    python bench/dm_validation.py --env maze2d-umaze --draws 6    # and how much the value moves with the set drawn

Each cached DM is rebuilt from the settings stored with it and evaluated on today's validation set. The loss
recorded at its training (by the measure of its code) is listed beside the new one. A cache whose weights no
longer fit today's U-Net (its code predates a change of the network's layout) is listed as skipped, with why.
With --draws K each DM is also scored on K other sets drawn the same way (diffusion.validation_set with other
seeds) of 512 segments and of today's size: the relative standard deviation across them says how far apart two
DMs' values must be to differ.
"""
from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import diffusion  # noqa: E402
from data import load_dataset, segment_index  # noqa: E402
from runs import CheckpointError, git, load_checkpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Args:
    env: str = "maze2d-umaze"
    """dataset whose cached DMs are scored (its cache: <dataset>/dydiff_cache/diffusion_*.pt)"""
    dataset_steps: int | None = None
    """transitions of the dataset, as train.py's --dataset-steps (default: the env's)"""
    threads: int = 1
    """torch CPU threads"""
    draws: int = 0
    """also score each DM on this many other draws of the set, at 512 segments and at today's size"""
    name: str = ""
    """results file: bench/results/<name>.{json,md} (default dm_validation_<env>)"""


def score(path: Path, data, draws: int = 0) -> dict:
    """One cached DM's settings, its recorded validation loss and today's; raises CheckpointError if unusable."""
    ckpt = load_checkpoint(path, "a cached DM", "cpu")
    if ckpt.get("kind") != "diffusion":
        raise CheckpointError("not a diffusion model")
    if ckpt.get("fingerprint") != data.fingerprint:
        raise CheckpointError("trained on other files than the dataset's today (an earlier build)")
    s, info = ckpt["settings"], ckpt["info"]
    cfg = diffusion.DMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()
                                if k in diffusion.DMConfig.__dataclass_fields__})
    model = diffusion.DynamicsDiffusion(data.obs_dim, data.act_dim, cfg.horizon, cfg.dim, cfg.dim_mults, act=cfg.act,
                                        blocks=cfg.blocks)
    try:
        model.load_state_dict(ckpt["state_dict"])  # the normalization box is among its buffers
    except RuntimeError as e:
        raise CheckpointError(f"its weights do not fit today's U-Net ({str(e).splitlines()[1].strip()[:80]})") from None
    raw, first, ends = diffusion.training_rows(data, cfg.terminal_rows)
    starts, lengths = (torch.as_tensor(a) for a in segment_index(first, ends, cfg.horizon))
    X = model.normalize(torch.as_tensor(raw))

    def value(n: int = diffusion.VAL_SEGMENTS, seed: int = diffusion.VAL_SEED) -> float:  # on the set drawn with seed
        return diffusion.validation_loss(model, *diffusion.validation_set(X, starts, lengths, cfg.horizon, n, seed), seed)

    spread = {}
    for n in (512, diffusion.VAL_SEGMENTS) if draws else ():
        vals = [value(n, diffusion.VAL_SEED + 1000 * (k + 1)) for k in range(draws)]
        spread[str(n)] = {"values": vals, "relative_sd": float(np.std(vals, ddof=1) / np.mean(vals))}
    return {"file": path.name, "settings": {k: s[k] for k in ("dim", "dim_mults", "blocks", "train_steps", "batch_size",
                                                               "lr", "seed", "precision") if k in s},
            "code": ckpt.get("code"), "code_is_today": ckpt.get("code") == diffusion.code_digests(),
            "val_loss_recorded": info["val_loss"], "val_loss": value(),
            "other_draws": spread}


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    data = load_dataset(args.env, steps=args.dataset_steps, verbose=False)
    rows, skipped = [], {}
    for path in sorted(data.cache_dir.glob("diffusion_*.pt")):
        try:
            rows.append(score(path, data, args.draws))
        except CheckpointError as e:
            skipped[path.name] = str(e)
    name = args.name or f"dm_validation_{args.env}"
    rows.sort(key=lambda r: (-r["settings"].get("blocks", 0), r["settings"]["dim"], r["settings"]["seed"]))
    for r in rows:  # on each other set, the value as a share of the first DM's on that set: how well sets rank DMs
        for n, d in r["other_draws"].items():
            ratio = np.array(d["values"]) / np.array(rows[0]["other_draws"][n]["values"])
            d["ratio_to_first"], d["ratio_relative_sd"] = float(ratio.mean()), float(ratio.std(ddof=1) / ratio.mean())
    out = {"env": args.env, "dataset_id": data.dataset_id, "commit": (git("rev-parse", "--short", "HEAD") or "?").strip(),
           "val_segments": diffusion.VAL_SEGMENTS, "val_seed": diffusion.VAL_SEED, "draws": args.draws,
           "machine": f"{platform.machine()}, torch {torch.__version__}", "dms": rows, "skipped": skipped}
    extra = (f" | over {args.draws} other sets of 512 and of {diffusion.VAL_SEGMENTS}: relative sd | value / first DM's "
             f"(relative sd)") if args.draws else ""
    lines = [f"| file | dim, mults, blocks | steps | seed | precision | recorded at training | today's measure{extra} |",
             "|---|---|---|---|---|---|---|" + ("---|---|" if args.draws else "")]
    for r in rows:
        s, d = r["settings"], r["other_draws"].values()
        lines.append(f"| {r['file']} | {s['dim']}, {tuple(s['dim_mults'])}, {s.get('blocks', '-')} | {s['train_steps']} "
                     f"| {s['seed']} | {s.get('precision', 'fp32')} | {r['val_loss_recorded']:.5f} | {r['val_loss']:.5f} |"
                     + (" " + ", ".join(f"{100 * x['relative_sd']:.1f}%" for x in d) + " | "
                        + ", ".join(f"{x['ratio_to_first']:.3f} ({100 * x['ratio_relative_sd']:.1f}%)" for x in d) + " |"
                        if args.draws else ""))
    lines += [f"| {f} | skipped: {why} | | | | | |" for f, why in skipped.items()]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"{name}.md").write_text(f"Validation loss of the DMs cached for {data.dataset_id} ({diffusion.VAL_SEGMENTS} "
                                        f"segments, seed {diffusion.VAL_SEED}; commit {out['commit']})\n\n{table}\n")
    print(f"wrote {RESULTS / name}.json and .md")


if __name__ == "__main__":
    main(tyro.cli(Args))
