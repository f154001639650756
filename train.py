"""Offline RL on a Minari dataset: TD3+BC or IQL, with evaluation, TensorBoard, checkpoints and resume.

    python train.py --env maze2d-umaze --algo td3bc
    python train.py --help

One readable loop: load the dataset (data.py) -> z-score observations -> sample batches on the device
by tensor indexing -> learner.update(batch) -> every eval_interval steps evaluate on the dataset's eval
env (D4RL normalized score) and write an atomic checkpoint -> summary.json and a learning curve.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch


@dataclass
class Args:
    env: str = "maze2d-umaze"
    """D4RL-style dataset name: maze2d-umaze/-medium/-large, {hopper,halfcheetah,walker2d}-{medium,medium-replay,medium-expert}"""
    dataset_id: str | None = None
    """any local Minari dataset id; overrides the dataset chosen by --env (the name still picks env-specific settings)"""
    dataset_steps: int | None = None
    """maze2d only: size of the local rebuild when no dataset is found (default as D4RL: 1M/2M/4M steps)"""
    algo: Literal["td3bc", "iql"] = "td3bc"
    """the offline learner"""
    seed: int = 0
    """seed of the learner, the batch sampling and the evaluation episodes"""
    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    threads: int = 1
    """torch CPU threads; 1 is the safe default: at 2 threads torch slowed 40x here when another process used the cores"""
    total_steps: int = 50_000
    """gradient steps of the learner (CORL uses 1M; 50k keeps a 1-thread CPU run near 10 minutes)"""
    batch_size: int = 256
    """transitions per gradient step"""
    eval_interval: int = 5_000
    """evaluate and checkpoint every this many steps"""
    eval_episodes: int = 10
    """episodes per evaluation (fixed seeds, so every evaluation sees the same start states)"""
    alpha: float = 2.5
    """TD3+BC: weight of the RL term, lambda = alpha / mean|Q|"""
    expectile: float = 0.7
    """IQL: expectile of the value regression"""
    beta: float = 3.0
    """IQL: inverse temperature of the advantage weights"""
    run_dir: str = "runs"
    """parent folder of all runs"""
    run_name: str | None = None
    """folder name of this run under run_dir (default: <env>__<algo>__<seed>__<unix time>)"""
    resume: bool = False
    """continue the run --run-name from its last checkpoint"""
    track_tensorboard: bool = True
    """write TensorBoard scalars to the run folder"""


class ConfigError(ValueError):
    """A bad flag, reported as one line before any work is done."""


def validate(args: Args) -> None:
    for name in ("total_steps", "batch_size", "eval_interval", "eval_episodes", "threads"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.dataset_steps is not None and args.dataset_steps <= 0:
        raise ConfigError(f"--dataset-steps must be positive (got {args.dataset_steps})")
    if args.resume and args.run_name is None:
        raise ConfigError("--resume needs --run-name: the folder under --run-dir of the run to continue")


# --------------------------------------------------------------------------------------------------
# Shared plumbing: transition buffer, evaluation, checkpoints
# --------------------------------------------------------------------------------------------------
class TransitionBuffer:
    """Transitions as device tensors; `sample` draws a batch by indexing, with no per-sample Python.
    `add` appends and, once full, overwrites the oldest rows (FIFO)."""

    KEYS = ("obs", "actions", "rewards", "next_obs", "dones")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: str):
        dims = {"obs": obs_dim, "actions": act_dim, "next_obs": obs_dim}
        self.data = {k: torch.zeros((capacity, dims[k]) if k in dims else (capacity,), device=device)
                     for k in self.KEYS}
        self.capacity, self.size, self.ptr = capacity, 0, 0

    def add(self, **batch: torch.Tensor) -> None:
        n = len(batch["obs"])
        idx = (self.ptr + torch.arange(n, device=self.data["obs"].device)) % self.capacity
        for k in self.KEYS:
            self.data[k][idx] = batch[k].to(self.data[k].dtype)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (n,), generator=gen, device=gen.device)
        return {k: v[idx] for k, v in self.data.items()}


def real_buffer(data, device: str) -> TransitionBuffer:
    """The dataset in env space: z-scored observations, raw actions and rewards."""
    buf = TransitionBuffer(len(data.obs), data.obs.shape[1], data.actions.shape[1], device)
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    buf.add(obs=t(data.normalize_obs(data.obs)), actions=t(data.actions), rewards=t(data.rewards),
            next_obs=t(data.normalize_obs(data.next_obs)), dones=t(data.terminals))
    return buf


def evaluate(act_fn, envs: list, data, seed: int) -> np.ndarray:
    """Undiscounted returns of the deterministic policy, one episode per env, all stepped in lockstep
    so the policy runs once per time step on a batch. Reset seeds are fixed: evaluations are comparable."""
    from data import flat_obs

    obs = [flat_obs(env.reset(seed=seed + i)[0]) for i, env in enumerate(envs)]
    returns, alive = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while alive.any():
        o = torch.as_tensor(data.normalize_obs(np.stack(obs)), dtype=torch.float32)
        actions = act_fn(o).cpu().numpy()
        for i in np.flatnonzero(alive):
            ob, r, terminated, truncated, _ = envs[i].step(actions[i])
            obs[i], returns[i] = flat_obs(ob), returns[i] + r
            alive[i] = not (terminated or truncated)
    return returns


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, then rename: a crash mid-write never corrupts the last checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, args: Args, fingerprint: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {path} ({type(exc).__name__}): it is truncated or not ours; "
                          f"delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != "dydiff-train-v1":
        raise ConfigError(f"{path} is not a train.py checkpoint; delete it or pick another --run-name")
    if state["fingerprint"] != fingerprint or state["args"]["algo"] != args.algo:
        raise ConfigError(f"{path} was made for another dataset or algorithm "
                          f"({state['args']['env']}, {state['args']['algo']}); use another --run-name")
    return state


def plot_curve(evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["step"] for e in evals], [e["score"] for e in evals], marker="o", ms=3)
    ax.set(xlabel="gradient steps", ylabel="normalized score", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_learner(args: Args, obs_dim: int, act_dim: int, device: str):
    if args.algo == "td3bc":
        from td3bc import TD3BC

        return TD3BC(obs_dim, act_dim, device=device, alpha=args.alpha, seed=args.seed)
    from iql import IQL

    return IQL(obs_dim, act_dim, device=device, expectile=args.expectile, beta=args.beta,
               max_steps=args.total_steps, seed=args.seed)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def train(args: Args) -> dict:
    validate(args)
    from data import load_dataset

    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    run_name = args.run_name or f"{args.env}__{args.algo}__{args.seed}__{int(time.time())}"
    run_path = Path(args.run_dir) / run_name
    ckpt_path = run_path / "checkpoint.pt"
    if not args.resume and ckpt_path.exists():
        raise ConfigError(f"{run_path} already holds a run: add --resume to continue it or pick another --run-name")
    if args.resume and not ckpt_path.exists():
        raise ConfigError(f"nothing to resume: {ckpt_path} does not exist")

    data = load_dataset(args.env if args.dataset_id is None else None, args.dataset_id, args.dataset_steps)
    obs_dim, act_dim = data.obs.shape[1], data.actions.shape[1]
    real = real_buffer(data, device)
    learner = make_learner(args, obs_dim, act_dim, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    envs = [data.make_eval_env() for _ in range(args.eval_episodes)]
    eval_seed = 10_000 * (args.seed + 1)

    step, evals, wall_before, update_time = 0, [], 0.0, 0.0
    if args.resume:
        state = load_checkpoint(ckpt_path, args, data.fingerprint)
        learner.load_state_dict(state["learner"])
        gen.set_state(state["gen"])
        step, evals = state["step"], state["evals"]
        wall_before, update_time = state["wall_time"], state["update_time"]
        print(f"resuming {run_path} at step {step}")
    run_path.mkdir(parents=True, exist_ok=True)
    (run_path / "config.json").write_text(json.dumps({**asdict(args), "device": device, "run_name": run_name,
                                                      "dataset_id": data.dataset_id, "ref_min": data.ref_min,
                                                      "ref_max": data.ref_max}, indent=2))
    writer = None
    if args.track_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged after the checkpoint by the run that died: no duplicated curves.
        writer = SummaryWriter(str(run_path), purge_step=step if args.resume else None)
        writer.add_text("config", json.dumps(asdict(args), indent=2))

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "format": "dydiff-train-v1", "args": asdict(args), "fingerprint": data.fingerprint, "step": step,
            "learner": learner.state_dict(), "gen": gen.get_state(), "evals": evals,
            "wall_time": wall_before + time.time() - t_start, "update_time": update_time,
            "obs_mean": torch.as_tensor(data.obs_mean), "obs_std": torch.as_tensor(data.obs_std)})

    from tqdm import tqdm

    t_start = time.time()
    bar = tqdm(total=args.total_steps, initial=step, desc=f"{args.algo} {data.dataset_id}", dynamic_ncols=True)
    # Ctrl-C (or a polite kill) saves a checkpoint at the current step and exits; SIGKILL loses at most
    # one eval interval, because a checkpoint is written at every evaluation.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while step < args.total_steps:
            t0 = time.time()
            n = min(args.eval_interval - step % args.eval_interval, args.total_steps - step)
            for _ in range(n):
                losses = learner.update(real.sample(args.batch_size, gen))
                step += 1
                bar.update(1)
                bad = [k for k, v in losses.items() if not math.isfinite(v)]
                if bad:  # stop before the NaN reaches a checkpoint: the last one on disk stays good
                    last = f"{ckpt_path} (step {evals[-1]['step']})" if evals else "none yet"
                    raise FloatingPointError(f"{args.algo} {bad[0]} became {losses[bad[0]]} at step {step}; "
                                             f"last good checkpoint: {last}")
            dt = time.time() - t0
            update_time += dt
            returns = evaluate(learner.act, envs, data, eval_seed)
            score = float(data.normalized_score(returns).mean())
            evals.append({"step": step, "return": float(returns.mean()), "score": score})
            if writer:
                for k, v in losses.items():
                    writer.add_scalar(f"losses/{k}", v, step)
                writer.add_scalar("charts/normalized_score", score, step)
                writer.add_scalar("charts/return", float(returns.mean()), step)
                writer.add_scalar("charts/SPS", n / dt, step)
            checkpoint()
            bar.set_postfix(sps=f"{n / dt:.0f}", score=f"{score:.1f}", best=f"{max(e['score'] for e in evals):.1f}")
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        print(f"interrupted at step {step}: checkpoint saved; continue with "
              f"python train.py --run-name {run_name} --resume (and the same flags)")
        raise SystemExit(130)
    finally:  # an error message must start on its own line, not after the bar
        bar.close()
        if writer:
            writer.close()

    best = max(evals, key=lambda e: e["score"])
    summary = {"env": args.env, "dataset_id": data.dataset_id, "algo": args.algo, "seed": args.seed, "steps": step,
               "last_score": evals[-1]["score"], "best_score": best["score"], "best_step": best["step"],
               "wall_time_s": wall_before + time.time() - t_start, "updates_per_s": step / max(update_time, 1e-9),
               "ref_min": data.ref_min, "ref_max": data.ref_max, "device": device, "threads": args.threads,
               "evaluations": evals}
    (run_path / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curve(evals, run_path / "learning_curve.png", f"{args.algo} on {data.dataset_id} (seed {args.seed})")
    print(f"done: last {summary['last_score']:.1f}, best {summary['best_score']:.1f} (step {best['step']}), "
          f"{summary['wall_time_s'] / 60:.1f} min, {summary['updates_per_s']:.0f} updates/s -> {run_path}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    import tyro

    args = tyro.cli(Args, args=argv)
    from data import DatasetError

    try:
        return train(args)
    except (ConfigError, DatasetError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
