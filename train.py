"""DyDiff: offline RL (TD3+BC or IQL) whose data is augmented by Dynamics Diffusion rollouts.

    python train.py --env maze2d-umaze                 # TD3+BC + DyDiff, CPU preset
    python train.py --env maze2d-umaze --no-dydiff     # the plain learner on the same budget
    python train.py --env maze2d-umaze --preset paper  # the official settings (a GPU-day)
    python train.py --help

One readable loop:
  load the dataset (data.py) -> z-score observations
  -> pretrain or load from cache: ensemble + reward model (dynamics.py), diffusion model (diffusion.py)
  -> every rollout_interval steps: a DyDiff round with the current policy (dydiff.py) -> synthetic FIFO buffer
  -> each batch: int(batch * real_ratio) real + the rest synthetic -> learner.update(batch)
  -> every eval_interval steps: D4RL normalized score on the eval env + an atomic checkpoint
  -> summary.json, learning curve, and a picture of the rollouts.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
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
    total_steps: int | None = None
    """gradient steps of the learner (preset cpu: 50k; paper and CORL: 1M)"""
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

    # DyDiff. Flags left unset take their value from --preset; a flag given explicitly always wins.
    dydiff: bool = True
    """augment the learner's batches with DyDiff rollouts (--no-dydiff: the plain learner)"""
    preset: Literal["cpu", "paper"] = "cpu"
    """cpu: small DM and rollouts that fit a 2-core CPU in 30 min; paper: the official settings (GPU)"""
    rollout_batch: int | None = None
    """B, start states per rollout round (cpu 256, paper 2048)"""
    horizon: int | None = None
    """H, rollout length = the DM's segment length (cpu 32, paper 100)"""
    iterations: int = 2
    """M, DM sampling + action relabelling iterations per round (official 2; 0 = ensemble-only rollouts)"""
    rollout_interval: int | None = None
    """K, gradient steps between rollout rounds (cpu 5000, paper 500)"""
    real_ratio: float = 0.6
    """share of real transitions in each batch (official 0.6)"""
    filter: Literal["hardmax", "softmax"] = "hardmax"
    """trajectory filter: keep the top keep_fraction by score, or sample them by softmax(score / T)"""
    keep_fraction: float = 0.6
    """share of the B rollouts kept by the filter (official 0.6)"""
    temperature: float = 0.05
    """softmax filter temperature on z-scored trajectory scores (official 0.05)"""
    reward: Literal["auto", "model", "env"] = "auto"
    """rewards of synthetic transitions: 'model' = the learned r(s, a) (the paper); 'env' = the task's own
    r(s, a, s') (maze2d only: the learned one extrapolates at the goal, README); 'auto' = env on maze2d, else model"""
    sampler_steps: int | None = None
    """N, Heun steps of the DM sampler (cpu 20, paper 34)"""
    synthetic_capacity: int | None = None
    """FIFO capacity of the synthetic buffer in transitions (cpu 50k, paper 2M)"""
    dm_dim: int | None = None
    """U-Net base width of the DM (cpu 32, paper 128)"""
    dm_mults: tuple[int, ...] | None = None
    """U-Net width multipliers per resolution (cpu 1 2 4, paper 1 4 8)"""
    dm_train_steps: int | None = None
    """gradient steps of DM pretraining (cpu 4000, paper 375k)"""
    model_seed: int = 0
    """seed of the pretrained models; shared by all learner seeds, so they are trained once and cached"""


PRESETS = {
    "cpu": dict(total_steps=50_000, rollout_batch=256, horizon=32, rollout_interval=5_000, sampler_steps=20,
                synthetic_capacity=50_000, dm_dim=32, dm_mults=(1, 2, 4), dm_train_steps=4_000),
    "paper": dict(total_steps=1_000_000, rollout_batch=2048, horizon=100, rollout_interval=500, sampler_steps=34,
                  synthetic_capacity=2_000_000, dm_dim=128, dm_mults=(1, 4, 8), dm_train_steps=375_000),
}


def apply_preset(args: Args) -> Args:
    """Fill every flag left unset (None) from the preset, and resolve --reward auto."""
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.reward == "auto":
        from dynamics import ENV_REWARDS

        args.reward = "env" if args.env.split("-")[0] in ENV_REWARDS else "model"
    return args


class ConfigError(ValueError):
    """A bad flag, reported as one line before any work is done."""


def validate(args: Args) -> None:
    positive = ("total_steps", "batch_size", "eval_interval", "eval_episodes", "threads", "rollout_batch", "horizon",
                "rollout_interval", "sampler_steps", "synthetic_capacity", "dm_dim", "dm_train_steps")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.iterations < 0:
        raise ConfigError(f"--iterations must be 0 or more (got {args.iterations})")
    if not 0.0 <= args.real_ratio <= 1.0:
        raise ConfigError(f"--real-ratio must be in [0, 1] (got {args.real_ratio})")
    if not 0.0 < args.keep_fraction <= 1.0:
        raise ConfigError(f"--keep-fraction must be in (0, 1] (got {args.keep_fraction})")
    from dynamics import ENV_REWARDS

    if args.dydiff and args.reward == "env" and args.env.split("-")[0] not in ENV_REWARDS:
        raise ConfigError(f"--reward env needs a known reward function, which only maze2d has (got {args.env}); "
                          f"use --reward model")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be positive (got {args.temperature})")
    down = 2 ** (len(args.dm_mults) - 1)  # the U-Net halves the time axis once per extra resolution
    if args.horizon % down:
        raise ConfigError(f"--horizon {args.horizon} must be divisible by {down}, the U-Net's down-sampling for "
                          f"--dm-mults {' '.join(map(str, args.dm_mults))} (e.g. --horizon {args.horizon // down * down or down})")
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
        if n > self.capacity:  # only the newest `capacity` rows would survive anyway
            batch = {k: v[n - self.capacity:] for k, v in batch.items()}
            self.ptr, n = (self.ptr + n - self.capacity) % self.capacity, self.capacity
        idx = (self.ptr + torch.arange(n, device=self.data["obs"].device)) % self.capacity
        for k in self.KEYS:
            self.data[k][idx] = batch[k].to(self.data[k].dtype)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (n,), generator=gen, device=gen.device)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"size": self.size, "ptr": self.ptr, **{k: v[: self.size].cpu() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.ptr = state["size"], state["ptr"]
        for k in self.KEYS:
            self.data[k][: self.size] = state[k].to(self.data[k].device)


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


def read_checkpoint(path: Path, device: str = "cpu", fix_unreadable: str = "delete it to start over",
                    fix_foreign: str = "delete it or pick another --run-name") -> dict:
    """A train.py checkpoint (weights only: no code is unpickled), or a one-line ConfigError saying what to do."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read checkpoint {path} ({type(exc).__name__}): it is truncated or not ours; "
                          f"{fix_unreadable}") from None
    if not isinstance(state, dict) or state.get("format") != "dydiff-train-v1":
        raise ConfigError(f"{path} is not a train.py checkpoint; {fix_foreign}")
    return state


def load_checkpoint(path: Path, args: Args, fingerprint: str) -> dict:
    state = read_checkpoint(path)
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"{path} was made for another dataset ({state['args']['env']}); use another --run-name")
    free = {"total_steps", "resume", "run_dir", "run_name", "threads", "device", "track_tensorboard"}
    now, then = (json.loads(json.dumps(a)) for a in (asdict(args), state["args"]))  # tuples vs lists
    changed = [k for k in now if k not in free and then.get(k) != now[k]]
    if changed:
        raise ConfigError(f"{path} was made with other settings ({', '.join('--' + k.replace('_', '-') + '=' + str(then.get(k)) for k in changed)}); "
                          f"resume with the same flags or use another --run-name")
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


def learner_from_checkpoint(path, obs_dim: int, act_dim: int, device: str = "cpu"):
    """(learner, checkpoint dict) of a finished or stopped run, for benchmarks and probes of its policy."""
    state = read_checkpoint(path, device, "pass a run's checkpoint.pt", "pass a run's checkpoint.pt")
    a = state["args"]  # only the learner's own settings matter; older checkpoints lack the DyDiff ones
    learner = make_learner(Args(algo=a["algo"], alpha=a["alpha"], expectile=a["expectile"], beta=a["beta"],
                                total_steps=a["total_steps"], seed=a["seed"]), obs_dim, act_dim, device)
    learner.load_state_dict(state["learner"])
    return learner, state


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def sample_batch(real: TransitionBuffer, synthetic: TransitionBuffer | None, batch_size: int, real_ratio: float,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    """int(batch_size * real_ratio) real transitions + the rest synthetic; all real while the synthetic
    buffer holds less than one batch (early rounds would otherwise be sampled hundreds of times)."""
    if synthetic is None or synthetic.size < batch_size:
        return real.sample(batch_size, gen)
    n_real = int(batch_size * real_ratio)
    a, b = real.sample(n_real, gen), synthetic.sample(batch_size - n_real, gen)
    return {k: torch.cat([a[k], b[k]]) for k in a}


def train(args: Args) -> dict:
    apply_preset(args)
    validate(args)
    from data import load_dataset

    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    run_name = args.run_name or f"{args.env}__{args.algo}{'+dydiff' * args.dydiff}__{args.seed}__{int(time.time())}"
    run_path = Path(args.run_dir) / run_name
    ckpt_path = run_path / "checkpoint.pt"
    if not args.resume and ckpt_path.exists():
        raise ConfigError(f"{run_path} already holds a run: add --resume to continue it or pick another --run-name")
    if args.resume and not ckpt_path.exists():
        raise ConfigError(f"nothing to resume: {ckpt_path} does not exist")

    t_start = time.time()
    data = load_dataset(args.env if args.dataset_id is None else None, args.dataset_id, args.dataset_steps)
    obs_dim, act_dim = data.obs.shape[1], data.actions.shape[1]
    real = real_buffer(data, device)
    learner = make_learner(args, obs_dim, act_dim, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    envs = [data.make_eval_env() for _ in range(args.eval_episodes)]
    eval_seed = 10_000 * (args.seed + 1)

    synthetic = None
    if args.dydiff:  # pretrained once per dataset and settings, then loaded from data.cache_dir
        import diffusion
        import dydiff
        import dynamics

        try:
            ensemble, reward_model, _ = dynamics.load_or_train(data, args.env, device, seed=args.model_seed)
            dm, _ = diffusion.load_or_train(data, args.env, H=args.horizon, dim=args.dm_dim, dim_mults=args.dm_mults,
                                            train_steps=args.dm_train_steps, device=device, seed=args.model_seed)
        except ValueError as exc:  # a cached model file that is damaged or made for something else
            raise ConfigError(str(exc)) from None
        terminal = dynamics.terminal_fn(args.env)
        reward_fn = dynamics.env_reward_fn(args.env) if args.reward == "env" else None
        rollout_cfg = dydiff.RolloutConfig(args.rollout_batch, args.horizon, args.iterations, args.sampler_steps,
                                           args.filter, args.keep_fraction, args.temperature)
        synthetic = TransitionBuffer(args.synthetic_capacity, obs_dim, act_dim, device)
    pretrain_time = time.time() - t_start

    step, evals, wall_before, update_time, rollout_time = 0, [], 0.0, 0.0, 0.0
    if args.resume:
        state = load_checkpoint(ckpt_path, args, data.fingerprint)
        learner.load_state_dict(state["learner"])
        gen.set_state(state["gen"])
        if synthetic is not None:
            synthetic.load_state_dict(state["synthetic"])
        step, evals = state["step"], state["evals"]
        wall_before, update_time, rollout_time = state["wall_time"], state["update_time"], state["rollout_time"]
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
            "synthetic": synthetic.state_dict() if synthetic is not None else None,
            "wall_time": wall_before + time.time() - t_start, "update_time": update_time,
            "rollout_time": rollout_time,
            "obs_mean": torch.as_tensor(data.obs_mean), "obs_std": torch.as_tensor(data.obs_std)})

    def rollout_round(at_step: int, n_starts: int, return_iterates: bool = False):
        # A generator seeded by (seed, step), not a running one: an interrupted round replays identically.
        g = torch.Generator(device=device).manual_seed(1_000_003 * (args.seed + 1) + at_step)
        s0, _ = dydiff.draw_start_states(real.data["obs"], n_starts, g)
        cfg = replace(rollout_cfg, n_rollouts=n_starts)
        return dydiff.rollout_round(learner.act, ensemble, reward_model, dm, terminal, s0, data.obs_mean,
                                    data.obs_std, cfg, g, return_iterates, reward_fn)

    from tqdm import tqdm

    bar = tqdm(total=args.total_steps, initial=step, desc=f"{args.algo}{'+dydiff' * args.dydiff} {data.dataset_id}",
               dynamic_ncols=True)
    postfix = {}
    # Ctrl-C / SIGTERM only raise a flag, checked between gradient steps: the checkpoint then never holds a
    # half-done update. SIGKILL loses at most one eval interval (a checkpoint is written at every evaluation).
    stop: list[int] = []
    old_handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while step < args.total_steps and not stop:
            t0, t_roll = time.time(), 0.0
            n = min(args.eval_interval - step % args.eval_interval, args.total_steps - step)
            for _ in range(n):
                if synthetic is not None and step % args.rollout_interval == 0:
                    t1 = time.time()
                    transitions, stats = rollout_round(step, args.rollout_batch)
                    synthetic.add(**transitions)
                    t_roll += time.time() - t1
                    postfix.update(syn=synthetic.size, roll=f"{stats['time_s']:.0f}s")
                    if writer:
                        for k in ("score_kept_mean", "score_rejected_mean", "n_transitions", "time_s"):
                            writer.add_scalar(f"dydiff/{k}", stats[k], step)
                        writer.add_scalar("dydiff/buffer_size", synthetic.size, step)
                losses = learner.update(sample_batch(real, synthetic, args.batch_size, args.real_ratio, gen))
                step += 1
                bar.update(1)
                bad = [k for k, v in losses.items() if not math.isfinite(v)]
                if bad:  # stop before the NaN reaches a checkpoint: the last one on disk stays good
                    last = f"{ckpt_path} (step {evals[-1]['step']})" if evals else "none yet"
                    raise FloatingPointError(f"{args.algo} {bad[0]} became {losses[bad[0]]} at step {step}; "
                                             f"last good checkpoint: {last}")
                if stop:
                    break
            dt = time.time() - t0 - t_roll
            update_time, rollout_time = update_time + dt, rollout_time + t_roll
            if stop:
                break
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
            postfix.update(sps=f"{n / dt:.0f}", score=f"{score:.1f}", best=f"{max(e['score'] for e in evals):.1f}")
            bar.set_postfix(postfix)
        if stop:
            checkpoint()
            bar.close()
            print(f"interrupted at step {step}: checkpoint saved; continue with "
                  f"python train.py --run-name {run_name} --resume (and the same flags)")
            raise SystemExit(130)
    finally:  # an error message must start on its own line, not after the bar
        bar.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if writer:
            writer.close()

    if synthetic is not None:  # the picture for learners: same start states, before and after DyDiff
        _, _, iterates = rollout_round(-1, 8, return_iterates=True)
        raw = lambda x: x.cpu().numpy() * data.obs_std + data.obs_mean  # noqa: E731
        dydiff.plot_rollouts(run_path / "rollouts.png", data, raw(iterates[0][0][:, 0]), raw(iterates[0][0]),
                             raw(iterates[-1][0]), args.env)
    best = max(evals, key=lambda e: e["score"])
    wall = wall_before + time.time() - t_start
    summary = {"env": args.env, "dataset_id": data.dataset_id, "algo": args.algo, "dydiff": args.dydiff,
               "preset": args.preset, "seed": args.seed, "steps": step,
               "last_score": evals[-1]["score"], "best_score": best["score"], "best_step": best["step"],
               "wall_time_s": wall, "pretrain_time_s": pretrain_time, "rollout_time_s": rollout_time,
               "updates_per_s": step / max(update_time, 1e-9),
               "ref_min": data.ref_min, "ref_max": data.ref_max, "device": device, "threads": args.threads,
               "evaluations": evals}
    (run_path / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curve(evals, run_path / "learning_curve.png", f"{run_name} on {data.dataset_id}")
    print(f"done: last {summary['last_score']:.1f}, best {summary['best_score']:.1f} (step {best['step']}), "
          f"{wall / 60:.1f} min (pretraining {pretrain_time / 60:.1f}, rollouts {rollout_time / 60:.1f}), "
          f"{summary['updates_per_s']:.0f} updates/s -> {run_path}")
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
