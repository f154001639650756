"""Pretrain (or load) DyDiff's models for one dataset and print how good they are: the ensemble's and the
reward model's holdout errors and the diffusion model's validation loss, with their training times.

    python bench/pretrain.py --env maze2d-umaze                  # the cpu preset's models
    python bench/pretrain.py --env maze2d-umaze --preset paper   # the official recipe's
    python bench/pretrain.py --env maze2d-umaze --retrain        # train again, overwriting the cache

It takes train.py's flags (those of the dataset, the preset, the models, --retrain, --device and --threads
matter) and trains exactly the models that `python train.py` with the same flags loads from the cache beside
the dataset (keyed by the dataset, the settings and the models' code); a missing dataset is built first.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from data import DatasetError, load_dataset  # noqa: E402
from rebuild import build_dataset  # noqa: E402
from runs import CheckpointError  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    try:
        args = train.resolve(train.parse_args(sys.argv[1:] if argv is None else argv))
        torch.set_num_threads(args.threads)
        data = load_dataset(args.env, args.dataset_id, args.dataset_steps,
                            build=build_dataset if args.build_data else None)
        _, info, dm_info = train.pretrain(args, data, args.device, args.retrain)  # the very models train.py loads
    except (train.ConfigError, DatasetError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    print(f"ensemble: holdout MSE of the z-scored s'-s (mean of elites {info['elites']}) "
          f"{info['ensemble_holdout_mse']:.3e}; members {[f'{x:.2e}' for x in info['ensemble_holdout_mse_members']]}; "
          f"{info['ensemble_epochs']} epochs, {info['ensemble_time_s']:.0f} s")
    print(f"reward model: holdout MSE {info['reward_holdout_mse']:.3e} (reward variance {info['reward_variance']:.3e}); "
          f"{info['reward_epochs']} epochs, {info['reward_time_s']:.0f} s")
    if dm_info is None:  # --iterations 0: train.pretrain said so
        return
    first, last = dm_info["val_curve"][0], dm_info["val_curve"][-1]
    print(f"diffusion model: validation loss {first[2]:.4f} (step {first[0]}) -> {last[2]:.4f} (step {last[0]}); "
          f"{dm_info['train_steps']} steps, {dm_info['train_seconds']:.0f} s")


if __name__ == "__main__":
    main()
