"""DyDiff: an offline learner (TD3+BC or IQL) whose batches mix the data with Dynamics Diffusion rollouts.

    python train.py --env maze2d-umaze                 # TD3+BC + DyDiff, CPU preset
    python train.py --env maze2d-umaze --no-dydiff     # the plain learner on the same budget
    python train.py --env maze2d-umaze --preset paper  # the paper's sizes (a GPU-day)
    python train.py --help                             # every flag, with its default

The loop, in `train()` below:
  1. load the dataset D (data.py) and z-score its observations;
  2. pretrain, or load from the cache beside the dataset: the single-step ensemble and reward model
     (dynamics.py) and the diffusion model (diffusion.py);
  3. every K steps, a DyDiff round with the current policy (dydiff.py) into a synthetic FIFO buffer;
  4. each gradient step: int(batch * real_ratio) real transitions + the rest synthetic;
  5. every eval_interval steps: the D4RL normalized score on the eval env, and a checkpoint.
Above it: the flags (Args), the paper preset, and the small helpers the loop calls. The run folder,
TensorBoard, checkpoints, resume, Ctrl-C, the NaN guard and the summary are plumbing, in runs.py.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import diffusion
import dydiff
import dynamics
from data import LOCOMOTION, DatasetError, TransitionBuffer, flat_obs, load_dataset, real_buffer
from iql import IQL
from runs import CheckpointError, ConfigError, Run, read_run_checkpoint
from td3bc import TD3BC

ROLLOUT, DM = dydiff.RolloutConfig(), diffusion.DMConfig()  # the cpu preset's values of the DyDiff flags


@dataclass
class Args:
    env: str = "maze2d-umaze"
    """D4RL-style dataset name: maze2d-umaze/-medium/-large, {hopper,halfcheetah,walker2d}-{medium,medium-replay,medium-expert}"""
    dataset_id: str | None = None
    """any local Minari dataset id; overrides the dataset chosen by --env (the name still picks env-specific settings)"""
    dataset_steps: int | None = None
    """maze2d only: size of the local rebuild when no dataset is found (default as D4RL: 1M/2M/4M steps)"""
    build_data: bool = True
    """build a dataset of --env that is not on this machine (maze2d: minutes; a locomotion build is SAC for about an hour per env on a CPU core); --no-build-data: fail, saying how to get it"""
    algo: Literal["td3bc", "iql"] = "td3bc"
    """the offline learner"""
    seed: int = 0
    """seed of the learner, the batch sampling, the rollout rounds and the evaluation episodes"""
    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    threads: int = 0
    """torch CPU threads; 0: one per core this process may use, right for a run alone on its machine (each phase is
    1.4-1.8x faster at 2 threads than at 1, bench/README.md); 1 where other jobs share the cores: torch at 2 threads
    slowed many times over when another process used them"""
    total_steps: int = 50_000
    """gradient steps of the learner (paper and CORL: 1M)"""
    batch_size: int = 256
    """transitions per gradient step"""
    eval_interval: int = 5_000
    """evaluate and checkpoint every this many steps"""
    eval_episodes: int = 100
    """episodes per evaluation, run in lockstep; fixed seeds per --seed. Default as CORL: 100 on maze2d, 10 on the locomotion names"""
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

    # DyDiff. Defaults: the cpu preset, whose values live in the component configs (dydiff.RolloutConfig,
    # diffusion.DMConfig); --preset paper changes the defaults of the flags in PAPER.
    dydiff: bool = True
    """augment the learner's batches with DyDiff rollouts (--no-dydiff: the plain learner)"""
    preset: Literal["cpu", "paper"] = "cpu"
    """cpu: a small DM and rollouts that fit a 2-core CPU; paper: the paper's sizes (a GPU); flags given win"""
    rollout_batch: int = ROLLOUT.rollout_batch
    """B, start states per rollout round (paper 2048)"""
    horizon: int = DM.horizon
    """H, the DM's segment length (paper 100)"""
    rollout_length: int = ROLLOUT.rollout_length
    """T, rows per synthetic trajectory, at least H: longer rollouts chain DM windows (paper T = H = 100)"""
    iterations: int = ROLLOUT.iterations
    """M, DM sampling + action relabelling iterations per round (paper 2; 0: ensemble-only rollouts, no DM)"""
    rollout_interval: int = 1_000
    """K, gradient steps between rollout rounds (paper 500)"""
    real_ratio: float = 0.6
    """share of real transitions in each batch (paper 0.6)"""
    filter: Literal["hardmax", "softmax"] = ROLLOUT.filter
    """trajectory filter: keep the top keep_fraction by score, or sample them by softmax(score / temperature)"""
    keep_fraction: float = ROLLOUT.keep_fraction
    """share of the B rollouts kept by the filter (paper 0.6)"""
    temperature: float = ROLLOUT.temperature
    """softmax filter: temperature on z-scored trajectory scores (paper 0.05)"""
    reward: Literal["auto", "model", "env"] = "auto"
    """rewards of synthetic transitions: 'model' = the learned r(s, a) (the paper); 'env' = the task's own
    r(s, a, s') (maze2d only: the learned one extrapolates at the goal, bench/README.md); 'auto' = env on maze2d"""
    sampler_steps: int = ROLLOUT.sampler_steps
    """N, steps of the DM sampler (paper 34)"""
    sampler_solver: Literal["euler", "heun"] = ROLLOUT.sampler_solver
    """'euler': N network calls (why it is the cpu default: bench/README.md); 'heun': EDM's 2nd-order
    correction, 2N - 1 calls (paper)"""
    sampler_churn: float = ROLLOUT.sampler_churn
    """S_churn of the sampler: 0 = EDM's deterministic sampler (paper 60, with S_min 0.37, S_max 52.24)"""
    update_weight: float = ROLLOUT.update_weight
    """w of the DyDiff update: states = w * DM states + (1 - w) * previous states (paper 1/2; 1 = the DM's alone)"""
    sdedit_sigma: float = ROLLOUT.sdedit_sigma
    """0: the DM samples from pure noise (paper); > 0: it refines the previous trajectory noised to this sigma"""
    stop_return_at_terminal: bool = ROLLOUT.stop_return_at_terminal
    """a trajectory's return, which the filter ranks, sums its rewards up to its first terminal only (paper: all;
    off until an A/B measures it)"""
    synthetic_capacity: int = 30_000
    """FIFO capacity of the synthetic buffer in transitions: about 3 rounds, so only recent policies' data (paper 2M)"""
    dm_dim: int = DM.dim
    """U-Net base width of the DM (paper 128)"""
    dm_mults: tuple[int, ...] = DM.dim_mults
    """U-Net width multipliers per resolution (paper 1 4 8)"""
    dm_blocks: int = DM.blocks
    """residual blocks per U-Net level, on the way down and on the way up (paper 2, as Diffuser)"""
    dm_act: Literal["silu", "mish"] = DM.act
    """activation of the DM's U-Net (paper: Mish, as Diffuser; SiLU, as EDM's networks, is cheaper on a CPU)"""
    dm_train_steps: int = DM.train_steps
    """gradient steps of DM pretraining (paper 375k)"""
    dm_batch_size: int = DM.batch_size
    """segments per DM training step (paper 8)"""
    dm_lr: float = DM.lr
    """Adam learning rate of the DM after its warm-up (paper 1e-3)"""
    dm_warmup_steps: int = DM.warmup_steps
    """linear learning-rate warm-up of the DM (paper: over 10M samples, 1.25M steps at batch 8)"""
    dm_lr_schedule: Literal["cosine", "constant"] = DM.lr_schedule
    """DM learning rate after the warm-up: cosine decay to 0 at the last step, or constant (paper)"""
    dm_grad_clip: float = DM.grad_clip
    """gradient-norm clipping of the DM (0: none; paper none)"""
    dm_terminal_rows: bool = DM.terminal_rows
    """the DM also trains on each terminated episode's last next state (the fall), so its trajectories can reach one
    (paper: no; off until an A/B measures it)"""
    dm_precision: Literal["fp32", "bf16"] = DM.precision
    """the DM's training forward pass: fp32, or bf16 autocast (weights, optimiser and EMA stay fp32)"""
    model_seed: int = 0
    """seed of the pretrained models; shared by all learner seeds, so they are trained once and cached"""
    retrain: bool = False
    """train the ensemble, the reward model and the DM anew instead of loading them from the cache (which is keyed
    by the dataset, the settings and the code, so an edit to the models' code retrains them without this flag)"""


# --preset paper: the paper's settings (the official code's yaml files and commands) that differ from the cpu
# defaults above; PAPER_FIT is the official recipe of the ensemble and the reward model (no flags).
PAPER = dict(total_steps=1_000_000, rollout_batch=2048, horizon=100, rollout_length=100, rollout_interval=500,
             sampler_steps=34, sampler_solver="heun", sampler_churn=60.0, synthetic_capacity=2_000_000, dm_dim=128,
             dm_mults=(1, 4, 8), dm_blocks=2, dm_act="mish",
             dm_train_steps=375_000, dm_batch_size=8, dm_lr=1e-3, dm_warmup_steps=1_250_000, dm_lr_schedule="constant",
             dm_grad_clip=0.0, sdedit_sigma=0.0)
PAPER_FIT = dict(lr=1e-4, reward_lr=1e-4, steps_per_epoch=0, max_epochs=0, reward_max_epochs=0, improvement=0.0)

# CORL's per-dataset IQL settings (configs/offline/iql/<env>/<dataset>.yaml) that differ from the defaults
IQL_DATASETS = {
    "hopper-medium": dict(iql_deterministic=True, tau=0.001, normalize_reward=True),
    "hopper-medium-replay": dict(iql_deterministic=True, tau=0.001, normalize_reward=True),
    "hopper-medium-expert": dict(beta=6.0, expectile=0.5),
}
# ... and where the cpu preset's 50k steps call for another: CORL's tau 0.001 is tuned for 1M steps, 20 times
# the cpu preset's budget, and at 50k its slow targets held IQL at its starting score on hopper-medium-replay
# (bench/README.md, "IQL on hopper-medium-replay"); hopper-medium's rows were made with 0.001 and keep it
IQL_CPU = {"hopper-medium-replay": dict(tau=0.005)}

# Each component's config is filled from the flags by name: RolloutConfig's fields are flags of the same
# name; DMConfig's field -> its flag:
DM_FLAGS = {"horizon": "horizon", "dim": "dm_dim", "dim_mults": "dm_mults", "blocks": "dm_blocks",
            "act": "dm_act", "train_steps": "dm_train_steps", "batch_size": "dm_batch_size", "lr": "dm_lr",
            "warmup_steps": "dm_warmup_steps", "lr_schedule": "dm_lr_schedule", "grad_clip": "dm_grad_clip",
            "seed": "model_seed", "terminal_rows": "dm_terminal_rows",
            "precision": "dm_precision"}


def rollout_config(args: Args, **override) -> dydiff.RolloutConfig:
    return dydiff.RolloutConfig(**{f.name: getattr(args, f.name) for f in fields(dydiff.RolloutConfig)} | override)


def dm_config(args: Args) -> diffusion.DMConfig:
    return diffusion.DMConfig(**{field: getattr(args, flag) for field, flag in DM_FLAGS.items()})


def fit_config(args: Args) -> dynamics.FitConfig:
    """The ensemble's and reward model's training recipe: FitConfig's defaults, or PAPER_FIT's with --preset paper."""
    return dynamics.FitConfig(seed=args.model_seed, **(PAPER_FIT if args.preset == "paper" else {}))


def parse_args(argv: list[str] | None = None) -> Args:
    """tyro's CLI over Args. The defaults (and --help) follow --preset paper, the dataset's evaluation episodes
    (CORL: 10 on locomotion) and for IQL its CORL settings (IQL_DATASETS; IQL_CPU with the cpu preset); a flag
    given always wins."""
    argv = sys.argv[1:] if argv is None else argv

    def given(flag: str, default: str) -> str:  # the value of --flag X or --flag=X in argv
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return default

    default = Args()
    env = given("--env", default.env)
    if given("--preset", "cpu") == "paper":
        default = replace(default, preset="paper", **PAPER)
    if env in LOCOMOTION:
        default = replace(default, eval_episodes=10)
    if given("--algo", "td3bc") == "iql":
        cpu = IQL_CPU.get(env, {}) if default.preset == "cpu" else {}
        default = replace(default, **IQL_DATASETS.get(env, {}) | cpu)  # the cpu preset's value wins
    import tyro  # here, not at the top: bench/gpu_check.py imports this file on machines with torch alone

    return tyro.cli(Args, args=argv, default=default)


def cores() -> int:
    """The CPU cores this process may use (its affinity where the OS has one): --threads 0 takes one per core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve(args: Args) -> Args:
    """Check every flag (one-line ConfigError) and resolve --reward auto and --device auto. The settings of
    the rollouts and the DM are checked where they are defined, by their configs (__post_init__)."""
    for name in ("total_steps", "batch_size", "eval_interval", "eval_episodes", "rollout_interval",
                 "synthetic_capacity"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    try:
        rollout_config(args), dm_config(args)
    except ValueError as exc:  # the config names its field first: name the flag instead
        field, problem = str(exc).split(" ", 1)
        raise ConfigError(f"--{DM_FLAGS.get(field, field).replace('_', '-')} {problem}") from None
    if args.rollout_length < args.horizon:
        raise ConfigError(f"--rollout-length {args.rollout_length} must be at least --horizon {args.horizon}: "
                          f"a rollout is made of DM windows of H rows")
    if not 0.0 <= args.real_ratio <= 1.0:
        raise ConfigError(f"--real-ratio must be in [0, 1] (got {args.real_ratio})")
    known_reward = args.env.split("-")[0] in dynamics.ENV_REWARDS
    if args.dydiff and args.reward == "env" and not known_reward:
        raise ConfigError(f"--reward env needs a known reward function, which only maze2d has (got {args.env}); "
                          f"use --reward model")
    if args.threads < 0:
        raise ConfigError(f"--threads must be 0 (one per core) or positive (got {args.threads})")
    if args.threads == 0:
        args = replace(args, threads=cores())
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


def reward_scale(args: Args, data) -> float:
    return data.return_scale() if args.normalize_reward else 1.0


def dataset_box(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw min and max of the dataset's [s, a] rows, states and next states alike: the box rollouts are clipped
    to, the same numbers as the DM's x_min/x_max (diffusion.load_or_train), so M = 0 needs no DM for it."""
    lo = np.concatenate([np.minimum(data.obs.min(0), data.next_obs.min(0)), data.actions.min(0)])
    hi = np.concatenate([np.maximum(data.obs.max(0), data.next_obs.max(0)), data.actions.max(0)])
    return torch.as_tensor(lo).float(), torch.as_tensor(hi).float()


def dydiff_models(args: Args, data, ensemble, reward_model, dm, device: str) -> dydiff.DyDiffModels:
    """What a DyDiff round needs besides the policy, for this dataset and these flags (dm: None when M = 0)."""
    t = lambda x: torch.as_tensor(x, device=device)  # noqa: E731
    x_min, x_max = dataset_box(data)
    return dydiff.DyDiffModels(ensemble=ensemble, reward_model=reward_model, dm=dm, x_min=t(x_min), x_max=t(x_max),
                               terminal_fn=dynamics.terminal_fn(args.env), obs_mean=t(data.obs_mean),
                               obs_std=t(data.obs_std),
                               reward_fn=dynamics.env_reward_fn(args.env) if args.reward == "env" else None,
                               constant_dims=t(data.constant_dims), reward_scale=reward_scale(args, data))


def pretrain(args: Args, data, device: str, retrain: bool = False,
             with_dm: bool = False) -> tuple[dydiff.DyDiffModels, dict, dict | None]:
    """DyDiff's models: trained once per dataset and settings (seed --model-seed), then loaded from the cache.
    Returns them with the training summaries of the ensemble/reward model and of the DM. The DM only when the
    rollouts use it (--iterations > 0) or with_dm asks for it: ensemble-only rollouts neither train nor load it."""
    ensemble, reward_model, fit_info = dynamics.load_or_train(data, fit_config(args), device, retrain)
    dm = dm_info = None
    if args.iterations > 0 or with_dm:
        dm, dm_info = diffusion.load_or_train(data, dm_config(args), device, retrain)
    else:
        print("diffusion model: not used with --iterations 0 (ensemble-only rollouts): neither trained nor loaded")
    return dydiff_models(args, data, ensemble, reward_model, dm, device), fit_info, dm_info


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


def learner_from_checkpoint(path, obs_dim: int, act_dim: int, device: str = "cpu"):
    """(learner, checkpoint dict) of a finished or stopped run, for benchmarks and probes of its policy."""
    state = read_run_checkpoint(Path(path), "pass a run's checkpoint.pt")
    a = state["args"]  # only the learner's own settings matter
    learner = make_learner(Args(algo=a["algo"], alpha=a["alpha"], expectile=a["expectile"], beta=a["beta"],
                                iql_deterministic=a["iql_deterministic"], tau=a["tau"],
                                total_steps=a["total_steps"], seed=a["seed"]), obs_dim, act_dim, device)
    learner.load_state_dict(state["learner"])
    return learner, state


# -- The loop --------------------------------------------------------------------------------------
def train(args: Args) -> dict:
    from rebuild import build_dataset, draw_maze  # here, as tyro: bench/gpu_check.py imports this file with torch alone

    args = resolve(args)
    torch.set_num_threads(args.threads)
    device = args.device
    run = Run(args, device)  # checks the run folder before any work (runs.py: the plumbing)

    # 1. The dataset D (observations z-scored), on the device, and the learner.
    data = load_dataset(args.env, args.dataset_id, args.dataset_steps, build=build_dataset if args.build_data else None)
    real = real_buffer(data, device, reward_scale(args, data))
    learner = make_learner(args, data.obs_dim, data.act_dim, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # batch sampling
    envs = [data.make_eval_env() for _ in range(args.eval_episodes)]

    # 2. DyDiff's pretrained models and the synthetic FIFO buffer.
    models = synthetic = None
    if args.dydiff:
        models, fit_info, dm_info = pretrain(args, data, device, args.retrain)
        run.record_pretrained(fit_info, dm_info)
        synthetic = TransitionBuffer(args.synthetic_capacity, data.obs_dim, data.act_dim, device)
        rollout_cfg = rollout_config(args)

    step = run.start(data, learner, gen, synthetic)  # 0, or the step of the checkpoint --resume continues
    with run:  # however the loop ends: close the progress bar and TensorBoard, restore Ctrl-C
        while step < args.total_steps and not run.stopped:
            # 3. Every K steps, a DyDiff round with the current policy pi.
            if synthetic is not None and step % args.rollout_interval == 0:
                t0 = time.time()
                g = round_generator(args.seed, step, device)
                s0, _ = dydiff.draw_start_states(real.obs, args.rollout_batch, g)
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
    run.exit_if_stopped(step)  # Ctrl-C: a checkpoint, and the command that resumes the run

    if models is not None:  # the final policy's rollouts from a few data states, before and after the M iterations
        g = round_generator(args.seed, -1, device)
        s0, _ = dydiff.draw_start_states(real.obs, 8, g)
        dydiff.plot_rollouts(run.path / "rollouts.png", args.env, data, learner.act, models, s0,
                             rollout_config(args, rollout_batch=8), g,
                             draw_maze if args.env.startswith("maze2d") else None)
    return run.finish(step)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    except (ConfigError, DatasetError, CheckpointError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
