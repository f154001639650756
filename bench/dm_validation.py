"""The validation loss of every diffusion model cached beside a dataset, by today's measure
(diffusion.validation_loss), whatever code trained it: when the measure changes, the models already trained are
scored again without training them again.

    python bench/dm_validation.py --env maze2d-umaze     # -> bench/results/dm_validation_maze2d-umaze.{json,md}

Each cached DM is rebuilt from the settings stored with it and evaluated on today's validation set. The loss
recorded at its training (by the measure of its code) is listed beside the new one. A cache whose weights no
longer fit today's U-Net (its code predates a change of the network's layout) is listed as skipped, with why.
"""
from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

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
    name: str = ""
    """results file: bench/results/<name>.{json,md} (default dm_validation_<env>)"""


def score(path: Path, data) -> dict:
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
    starts, lengths = segment_index(first, ends, cfg.horizon)
    X = model.normalize(torch.as_tensor(raw))
    x_val, m_val = diffusion.validation_set(X, torch.as_tensor(starts), torch.as_tensor(lengths), cfg.horizon)
    return {"file": path.name, "settings": {k: s[k] for k in ("dim", "dim_mults", "blocks", "train_steps", "batch_size",
                                                               "lr", "seed", "precision") if k in s},
            "code": ckpt.get("code"), "code_is_today": ckpt.get("code") == diffusion.code_digests(),
            "val_loss_recorded": info["val_loss"], "val_loss": diffusion.validation_loss(model, x_val, m_val)}


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    data = load_dataset(args.env, steps=args.dataset_steps, verbose=False)
    rows, skipped = [], {}
    for path in sorted(data.cache_dir.glob("diffusion_*.pt")):
        try:
            rows.append(score(path, data))
        except CheckpointError as e:
            skipped[path.name] = str(e)
    name = args.name or f"dm_validation_{args.env}"
    out = {"env": args.env, "dataset_id": data.dataset_id, "commit": (git("rev-parse", "--short", "HEAD") or "?").strip(),
           "val_segments": diffusion.VAL_SEGMENTS, "val_seed": diffusion.VAL_SEED,
           "machine": f"{platform.machine()}, torch {torch.__version__}", "dms": rows, "skipped": skipped}
    lines = ["| file | dim, mults, blocks | steps | seed | precision | recorded at training | today's measure |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["settings"].get("blocks", 0), r["settings"]["dim"], r["settings"]["seed"])):
        s = r["settings"]
        lines.append(f"| {r['file']} | {s['dim']}, {tuple(s['dim_mults'])}, {s.get('blocks', '-')} | {s['train_steps']} "
                     f"| {s['seed']} | {s.get('precision', 'fp32')} | {r['val_loss_recorded']:.5f} | {r['val_loss']:.5f} |")
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
