"""DyDiff: an offline learner (TD3+BC or IQL) whose batches mix the data with Dynamics Diffusion rollouts.

    python train.py --env maze2d-umaze                 # TD3+BC + DyDiff, CPU preset
    python train.py --env maze2d-umaze --no-dydiff     # the plain learner on the same budget
    python train.py --env maze2d-umaze --preset paper  # the official sizes (a GPU-day)
    python train.py --help                             # every flag, with its default

The loop, in `train()` below:
  1. load the dataset D (data.py) and z-score its observations;
  2. pretrain, or load from the cache beside the dataset: the single-step ensemble and reward model
     (dynamics.py) and the diffusion model (diffusion.py);
  3. every K steps, a DyDiff round with the current policy (dydiff.py) into a synthetic FIFO buffer;
  4. each gradient step: int(batch * real_ratio) real transitions + the rest synthetic;
  5. every eval_interval steps: the D4RL normalized score on the eval env, and a checkpoint.
Below `train()`, a marked plumbing section (run folder, TensorBoard, checkpoints, resume, Ctrl-C, NaN
guard, summary) that a reader may skip.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from tqdm import tqdm

import diffusion
import dydiff
import dynamics
from data import (CheckpointError, DatasetError, TransitionBuffer, draw_maze, flat_obs, load_checkpoint,
                  load_dataset, real_buffer, write_atomic)
from iql import IQL
from td3bc import TD3BC


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
    """seed of the learner, the batch sampling, the rollout rounds and the evaluation episodes"""
    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    threads: int = 1
    """torch CPU threads; 1 is the safe default: torch at 2 threads can slow down many times over when another process uses the cores"""
    total_steps: int = 50_000
    """gradient steps of the learner (paper and CORL: 1M)"""
    batch_size: int = 256
    """transitions per gradient step"""
    eval_interval: int = 5_000
    """evaluate and checkpoint every this many steps"""
    eval_episodes: int = 100
    """episodes per evaluation, run in lockstep (CORL: 100 on maze2d, 10 on locomotion); fixed seeds per --seed"""
    alpha: float = 2.5
    """TD3+BC: weight of the RL term, lambda = alpha / mean|Q|"""
    expectile: float = 0.7
    """IQL: expectile of the value regression"""
    beta: float = 3.0
    """IQL: inverse temperature of the advantage weights"""
    iql_deterministic: bool = False
    """IQL: a deterministic tanh actor trained by weighted squared error instead of the Gaussian's likelihood"""
    tau: float = 0.005
    """soft-update rate of the target networks"""
    normalize_reward: bool = False
    """scale rewards (real and synthetic) by 1000 / (max - min episode return) of the data, as CORL's IQL"""
    run_dir: str = "runs"
    """parent folder of all runs"""
    run_name: str | None = None
    """folder name of this run under run_dir (default: <env>__<algo>__<seed>__<unix time>)"""
    resume: bool = False
    """continue the run --run-name from its last checkpoint"""
    track_tensorboard: bool = True
    """write TensorBoard scalars to the run folder"""

    # DyDiff. The defaults are the cpu preset; --preset paper changes the defaults of the flags in PAPER.
    dydiff: bool = True
    """augment the learner's batches with DyDiff rollouts (--no-dydiff: the plain learner)"""
    preset: Literal["cpu", "paper"] = "cpu"
    """cpu: a small DM and rollouts that fit a 2-core CPU; paper: the official sizes (a GPU); flags given win"""
    rollout_batch: int = 512
    """B, start states per rollout round (paper 2048)"""
    horizon: int = 32
    """H, the DM's segment length (paper 100)"""
    rollout_length: int = 32
    """T, rows per synthetic trajectory, at least H: longer rollouts chain DM windows (paper T = H = 100)"""
    iterations: int = 2
    """M, DM sampling + action relabelling iterations per round (paper 2; 0 = ensemble-only rollouts)"""
    rollout_interval: int = 1_000
    """K, gradient steps between rollout rounds (paper 500)"""
    real_ratio: float = 0.6
    """share of real transitions in each batch (paper 0.6)"""
    filter: Literal["hardmax", "softmax"] = "hardmax"
    """trajectory filter: keep the top keep_fraction by score, or sample them by softmax(score / T)"""
    keep_fraction: float = 0.6
    """share of the B rollouts kept by the filter (paper 0.6)"""
    temperature: float = 0.05
    """T, softmax filter temperature on z-scored trajectory scores (paper 0.05)"""
    reward: Literal["auto", "model", "env"] = "auto"
    """rewards of synthetic transitions: 'model' = the learned r(s, a) (the paper); 'env' = the task's own
    r(s, a, s') (maze2d only: the learned one extrapolates at the goal, bench/README.md); 'auto' = env on maze2d"""
    sampler_steps: int = 8
    """N, steps of the DM sampler (paper 34)"""
    sampler_solver: Literal["euler", "heun"] = "euler"
    """'euler': N network calls, closer to the simulator than Heun at N=8 (bench/README.md); 'heun': EDM's
    2nd-order correction, 2N - 1 calls (paper)"""
    sampler_churn: float = 0.0
    """S_churn of the sampler: 0 = EDM's deterministic sampler (paper 60, with S_min 0.37, S_max 52.24)"""
    synthetic_capacity: int = 30_000
    """FIFO capacity of the synthetic buffer in transitions: about 3 rounds, so only recent policies' data (paper 2M)"""
    dm_dim: int = 32
    """U-Net base width of the DM (paper 128)"""
    dm_mults: tuple[int, ...] = (1, 2, 4)
    """U-Net width multipliers per resolution (paper 1 4 8)"""
    dm_act: Literal["silu", "mish"] = "silu"
    """activation of the DM's U-Net (paper: Mish, as Diffuser; SiLU, as EDM's networks, is cheaper on a CPU)"""
    dm_train_steps: int = 1_800
    """gradient steps of DM pretraining (paper 375k)"""
    dm_batch_size: int = 96
    """segments per DM training step (paper 8)"""
    dm_lr: float = 2.5e-3
    """Adam learning rate of the DM after its warm-up (paper 1e-3)"""
    dm_warmup_steps: int = 200
    """linear learning-rate warm-up of the DM (paper: over 10M samples, 1.25M steps at batch 8)"""
    dm_lr_schedule: Literal["cosine", "constant"] = "cosine"
    """DM learning rate after the warm-up: cosine decay to 0 at the last step, or constant (paper)"""
    dm_grad_clip: float = 1.0
    """gradient-norm clipping of the DM (0: none; paper none)"""
    model_seed: int = 0
    """seed of the pretrained models; shared by all learner seeds, so they are trained once and cached"""


# --preset paper: the official settings that differ from the cpu defaults above
PAPER = dict(total_steps=1_000_000, rollout_batch=2048, horizon=100, rollout_length=100, rollout_interval=500,
             sampler_steps=34, sampler_solver="heun", sampler_churn=60.0, synthetic_capacity=2_000_000, dm_dim=128,
             dm_mults=(1, 4, 8), dm_act="mish",
             dm_train_steps=375_000, dm_batch_size=8, dm_lr=1e-3, dm_warmup_steps=1_250_000, dm_lr_schedule="constant",
             dm_grad_clip=0.0)


# CORL's per-dataset IQL settings (configs/offline/iql/<env>/<dataset>.yaml) that differ from the defaults
IQL_DATASETS = {
    "hopper-medium": dict(iql_deterministic=True, tau=0.001, normalize_reward=True),
    "hopper-medium-replay": dict(iql_deterministic=True, tau=0.001, normalize_reward=True),
    "hopper-medium-expert": dict(beta=6.0, expectile=0.5),
}


class ConfigError(ValueError):
    """A bad flag, reported as one line before any work is done."""


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro's CLI over Args. The defaults (and --help) follow --preset paper, and for IQL the dataset's
    CORL settings (IQL_DATASETS); a flag given always wins."""
    argv = sys.argv[1:] if argv is None else argv

    def given(flag: str, default: str) -> str:  # the value of --flag X or --flag=X in argv
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return default

    default = Args()
    if given("--preset", "cpu") == "paper":
        default = replace(default, preset="paper", **PAPER)
    if given("--algo", "td3bc") == "iql":
        default = replace(default, **IQL_DATASETS.get(given("--env", default.env), {}))
    return tyro.cli(Args, args=argv, default=default)


def resolve(args: Args) -> Args:
    """Check every flag (one-line ConfigError) and resolve --reward auto and --device auto."""
    if args.rollout_length < args.horizon:
        raise ConfigError(f"--rollout-length {args.rollout_length} must be at least --horizon {args.horizon}: "
                          f"a rollout is made of DM windows of H rows")
    positive = ("total_steps", "batch_size", "eval_interval", "eval_episodes", "threads", "rollout_batch", "horizon",
                "rollout_interval", "sampler_steps", "synthetic_capacity", "dm_dim", "dm_train_steps", "dm_batch_size",
                "dm_lr")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.iterations < 0:
        raise ConfigError(f"--iterations must be 0 or more (got {args.iterations})")
    if not 0.0 <= args.real_ratio <= 1.0:
        raise ConfigError(f"--real-ratio must be in [0, 1] (got {args.real_ratio})")
    if not 0.0 < args.keep_fraction <= 1.0:
        raise ConfigError(f"--keep-fraction must be in (0, 1] (got {args.keep_fraction})")
    known_reward = args.env.split("-")[0] in dynamics.ENV_REWARDS
    if args.dydiff and args.reward == "env" and not known_reward:
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
    if args.reward == "auto":
        args = replace(args, reward="env" if known_reward else "model")
    if args.device == "auto":
        args = replace(args, device="cuda" if torch.cuda.is_available() else "cpu")
    return args


# -- The method's small helpers --------------------------------------------------------------------
def make_learner(args: Args, obs_dim: int, act_dim: int, device: str):
    if args.algo == "td3bc":
        return TD3BC(obs_dim, act_dim, device=device, tau=args.tau, alpha=args.alpha, seed=args.seed)
    return IQL(obs_dim, act_dim, device=device, tau=args.tau, expectile=args.expectile, beta=args.beta,
               max_steps=args.total_steps, seed=args.seed, deterministic=args.iql_deterministic)


def dm_config(args: Args) -> diffusion.DMConfig:
    return diffusion.DMConfig(args.horizon, args.dm_dim, args.dm_mults, args.dm_act, args.dm_train_steps,
                              args.dm_batch_size, args.dm_lr, args.dm_warmup_steps, args.dm_lr_schedule,
                              args.dm_grad_clip, seed=args.model_seed)


def rollout_config(args: Args, rollout_batch: int | None = None) -> dydiff.RolloutConfig:
    return dydiff.RolloutConfig(rollout_batch or args.rollout_batch, args.rollout_length, args.iterations,
                                args.sampler_steps, args.sampler_solver, args.sampler_churn, args.filter,
                                args.keep_fraction, args.temperature)


def fit_config(args: Args) -> dynamics.FitConfig:
    """The ensemble's and reward model's training: capped epochs of 250 steps on the cpu preset; with
    --preset paper the official recipe: lr 1e-4, an epoch is a pass over the data, no cap, any holdout
    improvement resets the patience of 7 epochs."""
    if args.preset == "paper":
        return dynamics.FitConfig(lr=1e-4, reward_lr=1e-4, steps_per_epoch=0, max_epochs=0, reward_max_epochs=0,
                                  improvement=0.0)
    return dynamics.FitConfig()


def reward_scale(args: Args, data) -> float:
    return data.return_scale() if args.normalize_reward else 1.0


def pretrain(args: Args, data, device: str, retrain: bool = False) -> tuple[dydiff.DyDiffModels, dict, dict]:
    """DyDiff's models: trained once per dataset and settings (seed --model-seed), then loaded from the cache.
    Returns them with the training summaries of the ensemble/reward model and of the DM."""
    ensemble, reward_model, fit_info = dynamics.load_or_train(data, device, seed=args.model_seed, cfg=fit_config(args),
                                                              retrain=retrain)
    dm, dm_info = diffusion.load_or_train(data, dm_config(args), device, retrain)
    t = lambda x: torch.as_tensor(x, device=device)  # noqa: E731
    models = dydiff.DyDiffModels(ensemble, reward_model, dm, dynamics.terminal_fn(args.env), t(data.obs_mean),
                                 t(data.obs_std), dynamics.env_reward_fn(args.env) if args.reward == "env" else None,
                                 t(data.constant_dims), reward_scale(args, data))
    return models, fit_info, dm_info


def round_generator(seed: int, step: int, device: str) -> torch.Generator:
    """Each round's own generator, seeded by (seed, step): an interrupted round replays identically."""
    return torch.Generator(device=device).manual_seed(1_000_003 * (seed + 1) + step)


def sample_batch(real: TransitionBuffer, synthetic: TransitionBuffer | None, batch_size: int, real_ratio: float,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    """int(batch_size * real_ratio) real transitions + the rest synthetic; all real while the synthetic
    buffer holds less than one batch (early rounds would otherwise be sampled hundreds of times)."""
    if synthetic is None or synthetic.size < batch_size:
        return real.sample(batch_size, gen)
    n_real = int(batch_size * real_ratio)
    a, b = real.sample(n_real, gen), synthetic.sample(batch_size - n_real, gen)
    return {k: torch.cat([a[k], b[k]]) for k in a}


def evaluate(act_fn, envs: list, data, seed: int, device: str | torch.device = "cpu") -> np.ndarray:
    """Undiscounted returns of the deterministic policy, one episode per env, all stepped in lockstep
    so the policy runs once per time step on a batch (on the policy's device). Reset seeds are fixed:
    evaluations are comparable."""
    obs = [flat_obs(env.reset(seed=seed + i)[0]) for i, env in enumerate(envs)]
    returns, alive = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while alive.any():
        o = torch.as_tensor(data.normalize_obs(np.stack(obs)), dtype=torch.float32, device=device)
        actions = act_fn(o).cpu().numpy()
        for i in np.flatnonzero(alive):
            ob, r, terminated, truncated, _ = envs[i].step(actions[i])
            obs[i], returns[i] = flat_obs(ob), returns[i] + r
            alive[i] = not (terminated or truncated)
    return returns


# -- The loop --------------------------------------------------------------------------------------
def train(args: Args) -> dict:
    args = resolve(args)
    torch.set_num_threads(args.threads)
    device = args.device
    run = Run(args, device)  # checks the run folder before any work (plumbing, below)

    # 1. The dataset D in env space, on the device, and the learner.
    data = load_dataset(args.env, args.dataset_id, args.dataset_steps)
    real = real_buffer(data, device, reward_scale(args, data))
    learner = make_learner(args, data.obs_dim, data.act_dim, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # batch sampling
    envs = [data.make_eval_env() for _ in range(args.eval_episodes)]

    # 2. DyDiff's pretrained models and the synthetic FIFO buffer.
    models = synthetic = None
    if args.dydiff:
        models, _, _ = pretrain(args, data, device)
        synthetic = TransitionBuffer(args.synthetic_capacity, data.obs_dim, data.act_dim, device)
        rollout_cfg = rollout_config(args)

    step = run.start(data, learner, gen, synthetic)  # 0, or the step of the checkpoint --resume continues
    with run:  # however the loop ends: close the progress bar and TensorBoard, restore Ctrl-C
        while step < args.total_steps and not run.stopped:
            # 3. Every K steps, a DyDiff round with the current policy pi.
            if synthetic is not None and step % args.rollout_interval == 0:
                t0 = time.time()
                g = round_generator(args.seed, step, device)
                s0, _ = dydiff.draw_start_states(real.data["obs"], args.rollout_batch, g)
                transitions, stats = dydiff.rollout_round(learner.act, models, s0, rollout_cfg, g)
                synthetic.add(**transitions)
                run.log_round(step, stats, synthetic.size, time.time() - t0)

            # 4. One gradient step on a batch of real + synthetic transitions.
            losses = learner.update(sample_batch(real, synthetic, args.batch_size, args.real_ratio, gen))
            step += 1
            run.after_update(step, losses)  # progress bar; stops on a NaN loss before it reaches a checkpoint

            # 5. Evaluate and checkpoint.
            if step % args.eval_interval == 0 or step == args.total_steps:
                returns = evaluate(learner.act, envs, data, 10_000 * (args.seed + 1), device)
                run.log_evaluation(step, losses, returns, float(data.normalized_score(returns).mean()))
                run.save(step)
    return run.finish(step, models, real)


# --------------------------------------------------------------------------------------------------
# Plumbing: run folder, TensorBoard, checkpoints, resume, Ctrl-C, NaN guard, summary. Nothing below
# changes what is learnt; a reader may stop here.
# --------------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "dydiff-train-v1"
NAMES = {"td3bc": "TD3+BC", "iql": "IQL"}
FREE_FLAGS = {"total_steps", "resume", "run_dir", "run_name", "threads", "device", "track_tensorboard"}


def read_run_checkpoint(path: Path, fix: str = "delete it to start over") -> dict:
    """A train.py checkpoint, or a one-line CheckpointError saying what to do."""
    state = load_checkpoint(path, fix)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a train.py checkpoint; {fix}")
    return state


def learner_from_checkpoint(path, obs_dim: int, act_dim: int, device: str = "cpu"):
    """(learner, checkpoint dict) of a finished or stopped run, for benchmarks and probes of its policy."""
    state = read_run_checkpoint(Path(path), "pass a run's checkpoint.pt")
    a = state["args"]  # only the learner's own settings matter
    learner = make_learner(Args(algo=a["algo"], alpha=a["alpha"], expectile=a["expectile"], beta=a["beta"],
                                iql_deterministic=a.get("iql_deterministic", False), tau=a.get("tau", 0.005),
                                total_steps=a["total_steps"], seed=a["seed"]), obs_dim, act_dim, device)
    learner.load_state_dict(state["learner"])
    return learner, state


class Run:
    """One run folder: config.json, TensorBoard, the progress bar, checkpoints and --resume, Ctrl-C,
    the NaN guard, timing (updates and rollouts apart) and summary.json."""

    def __init__(self, args: Args, device: str):
        self.args, self.device, self.t_start, self.evals, self.signals = args, device, time.time(), [], []
        self.cpu_start, self.cpu_before = time.process_time(), 0.0
        self.name = args.run_name or f"{args.env}__{args.algo}{'+dydiff' * args.dydiff}__{args.seed}__{int(time.time())}"
        self.path = Path(args.run_dir) / self.name
        self.ckpt = self.path / "checkpoint.pt"
        if not args.resume and self.ckpt.exists():
            raise ConfigError(f"{self.path} already holds a run: add --resume to continue it or pick another --run-name")
        if args.resume and not self.ckpt.exists():
            raise ConfigError(f"nothing to resume: {self.ckpt} does not exist")
        self.wall_before = self.update_time = self.rollout_time = 0.0

    @property
    def stopped(self) -> bool:
        return bool(self.signals)

    def start(self, data, learner, gen, synthetic) -> int:
        """Restore the checkpoint (--resume), write config.json, open TensorBoard, the bar and the Ctrl-C handler."""
        args, self.data, self.learner, self.gen, self.synthetic = self.args, data, learner, gen, synthetic
        self.pretrain_time, step = time.time() - self.t_start, 0
        if args.resume:
            state = read_run_checkpoint(self.ckpt)
            if state["fingerprint"] != data.fingerprint:
                raise ConfigError(f"{self.ckpt} was made for another dataset ({state['args']['env']}); use another --run-name")
            now, then = (json.loads(json.dumps(a)) for a in (asdict(args), state["args"]))  # tuples vs lists
            changed = [k for k in now if k not in FREE_FLAGS and then.get(k) != now[k]]
            if changed:
                raise ConfigError(f"{self.ckpt} was made with other settings "
                                  f"({', '.join('--' + k.replace('_', '-') + '=' + str(then.get(k)) for k in changed)}); "
                                  f"resume with the same flags or use another --run-name")
            learner.load_state_dict(state["learner"])
            gen.set_state(state["gen"])
            if synthetic is not None:
                synthetic.load_state_dict(state["synthetic"])
            step, self.evals = state["step"], state["evals"]
            self.wall_before, self.update_time, self.rollout_time = (state[k] for k in ("wall_time", "update_time",
                                                                                         "rollout_time"))
            self.cpu_before = state.get("cpu_time", 0.0)
            print(f"resuming {self.path} at step {step}")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(json.dumps({**asdict(args), "device": self.device, "run_name": self.name,
                                                           "dataset_id": data.dataset_id, "ref_min": data.ref_min,
                                                           "ref_max": data.ref_max}, indent=2))
        self.writer = None
        if args.track_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint by the run that died: no duplicated curves.
            self.writer = SummaryWriter(str(self.path), purge_step=step if args.resume else None)
            self.writer.add_text("config", json.dumps(asdict(args), indent=2))
        self.bar = tqdm(total=args.total_steps, initial=step, dynamic_ncols=True,
                        desc=f"{args.algo}{'+dydiff' * args.dydiff} {data.dataset_id}")
        self.postfix = {}
        # Ctrl-C / SIGTERM only raise a flag, checked between gradient steps: a checkpoint never holds a
        # half-done update. SIGKILL loses at most one eval interval (a checkpoint is written at every evaluation).
        self.old_handlers = {sig: signal.signal(sig, lambda signum, frame: self.signals.append(signum))
                             for sig in (signal.SIGINT, signal.SIGTERM)}
        self.interval_step, self.interval_t0, self.interval_rollout = step, time.time(), 0.0
        return step

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer:
            self.writer.add_scalar(tag, value, step)

    def log_round(self, step: int, stats: dict, buffer_size: int, seconds: float) -> None:
        self.interval_rollout += seconds
        for k in ("score_kept_mean", "score_rejected_mean", "n_transitions", "time_s"):
            self.scalar(f"dydiff/{k}", stats[k], step)
        self.scalar("dydiff/buffer_size", buffer_size, step)
        self.postfix.update(syn=buffer_size, roll=f"{stats['time_s']:.0f}s")

    def after_update(self, step: int, losses: dict) -> None:
        self.bar.update(1)
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:  # stop before the NaN reaches a checkpoint: the last one on disk stays good
            last = f"{self.ckpt} (step {self.evals[-1]['step']})" if self.evals else "none yet"
            raise FloatingPointError(f"{self.args.algo} {bad[0]} became {losses[bad[0]]} at step {step}; "
                                     f"last good checkpoint: {last}")

    def end_interval(self, step: int) -> float:
        """Close the timing of the steps since the last evaluation; returns their updates per second."""
        dt = time.time() - self.interval_t0 - self.interval_rollout
        self.update_time, self.rollout_time = self.update_time + dt, self.rollout_time + self.interval_rollout
        sps = (step - self.interval_step) / max(dt, 1e-9)
        self.interval_step, self.interval_rollout = step, 0.0
        return sps

    def log_evaluation(self, step: int, losses: dict, returns: np.ndarray, score: float) -> None:
        sps = self.end_interval(step)
        self.evals.append({"step": step, "return": float(returns.mean()), "score": score})
        for k, v in losses.items():
            self.scalar(f"losses/{k}", v, step)
        self.scalar("charts/normalized_score", score, step)
        self.scalar("charts/return", float(returns.mean()), step)
        self.scalar("charts/SPS", sps, step)
        self.postfix.update(sps=f"{sps:.0f}", score=f"{score:.1f}", best=f"{max(e['score'] for e in self.evals):.1f}")
        self.bar.set_postfix(self.postfix)

    def wall_time(self) -> float:  # seconds, all sessions of a resumed run
        return self.wall_before + time.time() - self.t_start

    def cpu_time(self) -> float:  # CPU seconds, all sessions: not inflated by a paused machine
        return self.cpu_before + time.process_time() - self.cpu_start

    def save(self, step: int) -> None:
        """The whole state of the run, written atomically (a crash mid-write keeps the last checkpoint)."""
        state = {"format": CHECKPOINT_FORMAT, "args": asdict(self.args), "fingerprint": self.data.fingerprint,
                 "step": step, "learner": self.learner.state_dict(), "gen": self.gen.get_state(), "evals": self.evals,
                 "synthetic": self.synthetic.state_dict() if self.synthetic is not None else None,
                 "wall_time": self.wall_time(), "update_time": self.update_time,
                 "rollout_time": self.rollout_time, "cpu_time": self.cpu_time(),
                 "obs_mean": torch.as_tensor(self.data.obs_mean),
                 "obs_std": torch.as_tensor(self.data.obs_std)}
        write_atomic(self.ckpt, lambda tmp: torch.save(state, tmp))
        self.interval_t0 = time.time()  # evaluation and checkpoint time count in the wall time only

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()  # an error message must start on its own line, not after the bar
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)
        if self.writer:
            self.writer.close()

    def finish(self, step: int, models, real) -> dict:
        """After the loop: on Ctrl-C a checkpoint and exit 130; else the rollout picture, summary and curve."""
        if self.stopped:
            if self.interval_step != step:
                self.end_interval(step)
                self.save(step)
            print(f"interrupted at step {step}: checkpoint saved; continue with "
                  f"python train.py --run-name {self.name} --resume (and the same flags)")
            raise SystemExit(130)
        args, data = self.args, self.data
        if models is not None:
            # the final policy's rollouts from a few data states, before and after the DM iterations
            g = round_generator(args.seed, -1, self.device)
            s0, _ = dydiff.draw_start_states(real.data["obs"], 8, g)
            cfg = rollout_config(args, rollout_batch=8)
            dydiff.plot_rollouts(self.path / "rollouts.png", args.env, data, self.learner.act, models, s0, cfg, g,
                                 draw_maze if args.env.startswith("maze2d") else None)
        best = max(self.evals, key=lambda e: e["score"])
        wall = self.wall_time()
        summary = {"env": args.env, "dataset_id": data.dataset_id, "algo": args.algo, "dydiff": args.dydiff,
                   "preset": args.preset, "seed": args.seed, "steps": step,
                   # final: the mean of the last 3 evaluations, less noisy than the last one alone
                   "final_score": float(np.mean([e["score"] for e in self.evals[-3:]])),
                   "last_score": self.evals[-1]["score"], "best_score": best["score"], "best_step": best["step"],
                   "wall_time_s": wall, "cpu_time_s": self.cpu_time(),
                   "pretrain_time_s": self.pretrain_time, "rollout_time_s": self.rollout_time,
                   "updates_per_s": step / max(self.update_time, 1e-9), "ref_min": data.ref_min,
                   "ref_max": data.ref_max, "device": self.device,
                   "threads": args.threads, "evaluations": self.evals}
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curve(self.evals, self.path / "learning_curve.png", f"{NAMES[args.algo]}{' + DyDiff' * args.dydiff}, "
                   f"seed {args.seed}", data.dataset_id)
        print(f"done: final {summary['final_score']:.1f} (mean of the last 3 evaluations), last "
              f"{summary['last_score']:.1f}, best {summary['best_score']:.1f} (step {best['step']}), "
              f"{wall / 60:.1f} min (pretraining {self.pretrain_time / 60:.1f}, rollouts {self.rollout_time / 60:.1f}), "
              f"{summary['updates_per_s']:.0f} updates/s -> {self.path}")
        return summary


def plot_curve(evals: list[dict], path: Path, title: str, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([e["step"] for e in evals], [e["score"] for e in evals], marker="o", ms=3)
    ax.set(xlabel="gradient steps", ylabel="normalized score (0 random, 100 expert)")
    ax.set_title(f"{title}\n{subtitle}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    except (ConfigError, DatasetError, CheckpointError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
