"""How close the models' rollouts are to the simulator: the paper's Figure 3, two ways (one mode each).

    python bench/fidelity.py dataset --env maze2d-umaze          # the dataset's actions, open loop
    python bench/fidelity.py policy --env maze2d-medium --policy runs/compare/maze2d-medium_td3bc+dydiff_s0/checkpoint.pt

dataset: from 256 dataset states, the dataset's next `horizon` actions are replayed open loop in the
simulator, in the single-step ensemble and in the diffusion model (chaining H-windows past its segment
length); the per-horizon squared error of each model, over any window of the data and over windows inside
one episode (a maze2d episode ends at a success, after which the actions chase a new goal the state does not
show yet). Writes fidelity_<env>_*.{json,png} beside the cached DM.

policy: a learned policy's actions and DyDiff's own iterates (also on hopper, walker2d, halfcheetah in MuJoCo).
   From 256 dataset start states, per horizon h = 1..T-1 (T = train.py's --rollout-length, which may chain
   several DM windows; pass --train-flags="--rollout-length 63" for longer), the mean squared error against
   the simulator (PointMaze, or MuJoCo for hopper/walker2d/halfcheetah: see simulate) of
     ensemble      the single-step ensemble, replaying the actions the policy took in the simulator;
     dm            the plain DM given s_0 and those same actions (one sample);
     dydiff_m0..3  DyDiff's own trajectory after 0, 1, 2, 3 iterations (m0 = the policy in the ensemble);
                   each is compared with the simulator replaying *its* actions from s_0, open loop.
   The first two measure the models on a trajectory the policy really produces; the DyDiff curves measure
   what the learner is actually fed. Each curve is given as the mean and as the median over trajectories
   (a few catastrophic rollouts can drive the mean). Mazes: the error of the (x, y) position, and for each model
   the share of physically impossible rollouts (a position inside a wall cell, or a step its own velocity does
   not explain; see `impossible`), among those a round's hardmax filter keeps and those it rejects: the
   simulator never makes one. Locomotion: the error of the whole state in units of the data's std, and for
   each model the share of rollouts that end by the terminal function (hopper falls), in the model and in the
   simulator replaying the same actions (`terminal_share`). For every model, and the simulator's own rollout as
   a check, the one-step error of each transition the rollout holds (`transition_error`: restart the simulator at
   s_t, step a_t, compare with s_{t+1}), the unit a TD learner consumes.
   Models come from the dataset's cache (trained there when missing, as train.py does); --train-flags
   chooses them and DyDiff's settings (e.g. "--rollout-length 96 --update-weight 1 --sdedit-sigma 1").
   Several --policy checkpoints are measured one after the other; without one, a TD3+BC policy is fitted
   for --policy-steps on the data first.

   Writes bench/results/<name>.json ({"env", "horizons", "by_policy": {label: {"curves", "curves_position",
   "curves_position_median", "impossible_share", "transition_error"}}}; locomotion: "curves_normalized",
   "curves_normalized_median", "terminal_share") and <name>.png.

The reward probe (why train.py's --reward defaults to the task's reward on maze2d) is bench/reward_probe.py.

Every mode takes its models from the dataset's cache (trained there when missing, as train.py does) and
runs on the CPU. `python bench/fidelity.py <mode> --help` lists a mode's flags.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"

import diffusion  # noqa: E402
import dydiff  # noqa: E402
import dynamics  # noqa: E402
from diffusion import DynamicsDiffusion  # noqa: E402
from dynamics import Ensemble  # noqa: E402


# -- Ground truth and the error of any model -------------------------------------------------------
def _simulator(data):
    """(env, the MuJoCo env to set and step, offset): PointMaze's observation is [qpos, qvel, goal];
    MuJoCo locomotion's (Hopper, Walker2d, HalfCheetah) leaves out the x position (offset 1), which never
    enters the dynamics, so a dataset state restarts at x = 0."""
    env = data.make_eval_env()
    env.reset(seed=0)
    u = env.unwrapped
    if hasattr(u, "point_env"):
        return env, u.point_env, 0
    if getattr(u, "_exclude_current_positions_from_observation", False) and hasattr(u, "set_state"):
        return env, u, 1
    raise ValueError(f"rollout_error needs a PointMaze or MuJoCo locomotion dataset, got {data.dataset_id}")


def _restart_state(s0: np.ndarray, sim, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(qpos (B, nq), qvel (B, nv)) of raw dataset states s0, the left-out x position (offset) set to 0."""
    nq, nv = sim.model.nq, sim.model.nv
    qpos = np.concatenate([np.zeros((len(s0), offset)), s0[:, :nq - offset]], 1).astype(np.float64)
    return qpos, s0[:, nq - offset:nq - offset + nv].astype(np.float64)


def simulate(data, s0: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Ground truth (B, H+1, obs_dim): the simulator restarted from each raw dataset state s0 (see
    _simulator; a velocity the observation clipped, Hopper's at +-10, restarts clipped) and stepped under
    the given actions. Dims past the simulator's state (PointMaze's goal) are held fixed."""
    env, sim, offset = _simulator(data)
    nq, nv = sim.model.nq, sim.model.nv
    traj = np.repeat(s0[:, None].astype(np.float64), actions.shape[1] + 1, axis=1)
    qpos, qvel = _restart_state(s0, sim, offset)
    for b in range(len(s0)):
        sim.set_state(qpos[b], qvel[b])
        for h in range(actions.shape[1]):
            # the unwrapped env keeps stepping after a terminal, as the models' rollouts do
            traj[b, h + 1, :nq - offset + nv] = sim.step(actions[b, h].astype(np.float64))[0]
    env.close()
    return traj


def simulate_policy(data, s0: np.ndarray, act, T: int) -> tuple[np.ndarray, np.ndarray]:
    """A policy in the simulator, closed loop from raw states s0: raw states (B, T+1, obs_dim) and its actions
    (B, T); act maps raw (B, obs_dim) states to (B, act_dim) numpy actions. The simulator's own state carries
    from step to step (x position and unclipped velocities included), as in an evaluation episode."""
    env, sim, offset = _simulator(data)
    nq, nv = sim.model.nq, sim.model.nv
    n = nq - offset + nv
    states = np.repeat(s0[:, None].astype(np.float64), T + 1, axis=1)
    qpos, qvel = _restart_state(s0, sim, offset)
    actions = []
    for t in range(T):
        a = np.asarray(act(states[:, t]), dtype=np.float64)
        for b in range(len(s0)):
            sim.set_state(qpos[b], qvel[b])
            states[b, t + 1, :n] = sim.step(a[b])[0]
            qpos[b], qvel[b] = sim.data.qpos, sim.data.qvel
        actions.append(a)
    env.close()
    return states, np.stack(actions, 1)


def rollout_error(predict, data, horizon: int = 100, n_starts: int = 256, seed: int = 0) -> dict:
    """Open-loop accuracy of any model: from random dataset states, replay the dataset's next
    `horizon` actions in `predict` (raw in, raw (B, horizon+1, obs_dim) out, index 0 = s0) and in the
    simulator. The maze2d dataset is one continuous run, so any window of actions is replayable."""
    rng = np.random.default_rng(seed)
    t0 = rng.choice(len(data.obs) - horizon + 1, size=n_starts, replace=False)
    s0 = data.obs[t0]
    actions = data.actions[t0[:, None] + np.arange(horizon)]
    true = simulate(data, s0, actions)
    pred = np.asarray(predict(s0.copy(), actions.copy()), dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"predict returned shape {pred.shape}, expected {true.shape}")
    err = (pred - true)[:, 1:] ** 2
    pos = err[..., :2].mean(-1)  # (B, H) per-start squared position error
    return {"horizons": list(range(1, horizon + 1)), "mse": err.mean((0, 2)).tolist(),
            "mse_pos": pos.mean(0).tolist(), "median_pos": np.median(pos, 0).tolist()}


def ensemble_predict(ens: Ensemble, seed: int = 0):
    """A `predict` for `rollout_error`: raw states in and out, z-scoring with the ensemble's stats."""
    def predict(s0: np.ndarray, actions: np.ndarray) -> np.ndarray:
        dev = ens.obs_mean.device
        g = torch.Generator(dev).manual_seed(seed)
        s = (torch.as_tensor(s0, dtype=torch.float32, device=dev) - ens.obs_mean) / ens.obs_std
        a = torch.as_tensor(actions, dtype=torch.float32, device=dev)
        traj = [s]
        for h in range(a.shape[1]):
            traj.append(ens.step(traj[-1], a[:, h], generator=g))
        return (torch.stack(traj, 1) * ens.obs_std + ens.obs_mean).cpu().numpy()
    return predict


# -- The DM as a predictor of any horizon ----------------------------------------------------------
def dm_predict(model: DynamicsDiffusion, sampler_steps: int = 8, seed: int = 0, S_churn: float = 0.0,
               solver: str = "euler"):
    """The DM as a ``predict(s0, actions) -> states`` callable on numpy arrays (rollout_error's API): states
    s_0..s_T for T actions, in chained H-windows (dydiff.generate_chained). The DM wants an action on
    every row, so the last action is repeated on the row of s_T (and up to H rows)."""
    gen = torch.Generator().manual_seed(seed)

    def predict(s0: np.ndarray, actions: np.ndarray) -> np.ndarray:
        a = torch.as_tensor(actions)
        T = a.shape[1]
        a = torch.cat([a, a[:, -1:].expand(-1, max(T + 1, model.horizon) - T, -1)], 1)
        states = dydiff.generate_chained(model, torch.as_tensor(s0), a, sampler_steps, gen, solver=solver,
                                         S_churn=S_churn)
        return states[:, :T + 1].cpu().numpy()

    return predict


def crossings(a: list, b: list, horizons: list) -> dict:
    """Where curve a (DM) goes below curve b (ensemble): first horizon at all, and the horizon from which
    it stays below to the end (None when never / when it ends above)."""
    below = np.asarray(a) < np.asarray(b)
    above = np.flatnonzero(~below)
    stays = None if not below[-1] else int(horizons[above[-1] + 1 if len(above) else 0])
    return {"first_below": int(horizons[np.argmax(below)]) if below.any() else None, "stays_below_from": stays}


def in_episode_rollout_error(predict, data, horizon: int = 100, n_starts: int = 256, seed: int = 0) -> dict:
    """rollout_error restricted to starts whose next ``horizon`` steps stay inside one episode.

    The maze2d run is continuous, so rollout_error's action windows often cross a success, after which
    the actions chase a new goal while the state (and the simulator) keep the old one. The DM never saw
    that (its segments stay inside episodes), and DyDiff's policy actions always chase the state's goal."""
    ok = np.concatenate([np.arange(s, e - horizon + 1) for s, e in zip(data.episode_starts, data.episode_ends)
                         if e - s >= horizon])
    t0 = np.random.default_rng(seed).choice(ok, size=min(n_starts, len(ok)), replace=False)
    s0, actions = data.obs[t0], data.actions[t0[:, None] + np.arange(horizon)]
    err = (np.asarray(predict(s0.copy(), actions.copy())) - simulate(data, s0, actions))[:, 1:] ** 2
    pos = err[..., :2].mean(-1)
    return {"horizons": list(range(1, horizon + 1)), "mse": err.mean((0, 2)).tolist(),
            "mse_pos": pos.mean(0).tolist(), "median_pos": np.median(pos, 0).tolist()}


def plot_fidelity(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for row, (starts, res) in zip(axes, result["starts"].items()):
        for ax, key, title in ((row[0], "mse", "full state"), (row[1], "mse_pos", "position (x, y)")):
            for name, color in (("dm", "C0"), ("ensemble", "C1")):
                ax.plot(res[name]["horizons"], res[name][key], color=color, label=f"{result['labels'][name]} mean")
                if key == "mse_pos":
                    ax.plot(res[name]["horizons"], res[name]["median_pos"], color=color, ls=":", label="median")
            cross = res["crossover"][key]["stays_below_from"]
            if cross is not None:
                ax.axvline(cross, color="gray", ls="--", lw=0.8, label=f"DM below from h={cross}")
            ax.set(yscale="log", xlabel="rollout horizon h (steps)", ylabel="squared error vs simulator",
                   title=f"{title}, {starts.replace('_', ' ')} starts")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle(f"{result['env']}: open-loop rollouts of the dataset's actions from {result['n_starts']} dataset states")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fidelity(model: DynamicsDiffusion, info: dict, data, env: str, horizon: int = 100, n_starts: int = 256,
             sampler_steps: int = 20, device: str = "cpu", seed: int = 0, progress: bool = True,
             S_churn: float = 0.0, solver: str = "euler") -> dict:
    """DM (chained H-windows) vs the single-step ensemble against the simulator on the same starts: any
    dataset start (rollout_error) and starts that stay inside one episode."""
    ensemble, _, _ = dynamics.load_or_train(data, dynamics.FitConfig(seed=seed), device, progress=progress)
    s = info["settings"]
    result = {"env": env, "dataset_id": data.dataset_id, "fingerprint": data.fingerprint, "n_starts": n_starts,
              "seed": seed, "horizon": horizon, "sampler_steps": sampler_steps,
              "sampler_solver": solver,
              "dm_train": {k: info.get(k) for k in ("train_seconds", "cpu_seconds", "train_steps", "final_loss",
                                                    "n_params", "path")},
              "labels": {"dm": f"DM (H={s['horizon']} chained, {solver} N={sampler_steps})", "ensemble": "ensemble"},
              "starts": {}}
    for starts, error_fn in (("any", rollout_error), ("in_episode", in_episode_rollout_error)):
        t0 = time.time()
        dm = error_fn(dm_predict(model, sampler_steps, seed, S_churn=S_churn, solver=solver), data, horizon=horizon,
                      n_starts=n_starts, seed=seed)
        dm_seconds = time.time() - t0
        ens = error_fn(ensemble_predict(ensemble, seed=seed), data, horizon=horizon, n_starts=n_starts,
                       seed=seed)
        cross = {k: crossings(dm[k], ens[k], dm["horizons"]) for k in ("mse", "mse_pos", "median_pos")}
        result["starts"][starts] = {"dm": dm, "ensemble": ens, "crossover": cross, "dm_seconds": dm_seconds}
    stem = Path(info["path"]).stem.replace("diffusion_", f"fidelity_{env}_")
    out = Path(data.cache_dir) / f"{stem}_{solver}{sampler_steps}_h{horizon}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot_fidelity(result, out.with_suffix(".png"))
    result["paths"] = [str(out.with_suffix(".png")), str(out.with_suffix(".json"))]
    return result


@dataclass
class DatasetArgs:
    env: str = "maze2d-umaze"
    """a maze2d env (the simulator must be able to start from any dataset state)"""
    preset: str = "cpu"
    """train.py preset whose DM (H, width, training steps) and sampler (N, solver, S_churn) are used"""
    horizon: int = 100
    """rollout horizon of the comparison (the DM chains H-windows to reach it)"""
    n_starts: int = 256
    """dataset start states of the comparison"""
    seed: int = 0
    """seed of the start states and the samplers"""
    threads: int = 1
    """torch CPU threads"""


def dataset_main(args: DatasetArgs) -> None:
    from data import DatasetError, load_dataset
    from rebuild import build_dataset
    from runs import CheckpointError
    from train import dm_config, parse_args, resolve

    torch.set_num_threads(args.threads)
    p = resolve(parse_args(["--env", args.env, "--preset", args.preset]))  # train.py's settings for this dataset
    try:
        data = load_dataset(args.env, build=build_dataset)
        model, info = diffusion.load_or_train(data, dm_config(p))
    except (DatasetError, CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    res = fidelity(model, info, data, args.env, args.horizon, args.n_starts, p.sampler_steps, "cpu", args.seed,
                   S_churn=p.sampler_churn, solver=p.sampler_solver)
    for starts, r in res["starts"].items():
        dm, ens = r["dm"], r["ensemble"]
        print(f"{starts} starts (DM sampling {r['dm_seconds']:.0f} s)\n{'h':>4} {'DM mse':>9} {'ens mse':>9} "
              f"{'DM pos':>9} {'ens pos':>9} {'DM med':>9} {'ens med':>9}")
        for i, h in enumerate(dm["horizons"]):
            if h in (1, 5, 10, 20, p.horizon - 1, 50, 75, args.horizon):
                print(f"{h:>4} " + " ".join(f"{x[k][i]:>9.5f}" for k in ("mse", "mse_pos", "median_pos")
                                             for x in (dm, ens)))
        for k, c in r["crossover"].items():
            print(f"  {k}: DM first below the ensemble at h={c['first_below']}, stays below from h={c['stays_below_from']}")
    print("figure:", res["paths"][0], "\ndata:  ", res["paths"][1])


# -- Under a learned policy, with DyDiff's own iterates (mode "policy") -------------------------------
@dataclass
class PolicyArgs:
    env: str = "maze2d-umaze"
    """a maze2d, hopper, walker2d or halfcheetah env (its simulator restarts from any dataset state)"""
    policy: tuple[str, ...] = ()
    """train.py checkpoints whose learners provide the actions, each measured in turn (default: fit TD3+BC for
    --policy-steps)"""
    policy_steps: int = 5000
    """gradient steps of the fallback TD3+BC policy"""
    preset: str = "cpu"
    """train.py preset whose DM (H, width, training) and sampler (N, S_churn) are used"""
    train_flags: str = ""
    """more train.py flags for the DM and sampler, e.g. "--sampler-steps 10 --sampler-churn 0" """
    n_starts: int = 256
    """dataset start states"""
    max_iterations: int = 3
    """DyDiff curves for 0..max_iterations iterations"""
    seed: int = 0
    """seed of the start states, the samplers and the fallback policy"""
    threads: int = 1
    """torch CPU threads"""
    name: str = "rollout_error"
    """results files: bench/results/<name>.json and .png"""


def load_policy(path: str | None, args: PolicyArgs, data, obs_dim: int, act_dim: int):
    """(learner, description, short label) of a run's checkpoint, or of a TD3+BC fitted here when path is None."""
    from data import real_buffer
    from runs import CheckpointError
    from train import learner_from_checkpoint

    if path:
        try:
            learner, state = learner_from_checkpoint(path, obs_dim, act_dim)
        except CheckpointError as exc:
            raise SystemExit(f"error: {exc}") from None
        return learner, f"{path} (step {state['step']})", f"step {state['step']}"
    from td3bc import TD3BC

    learner = TD3BC(obs_dim, act_dim, seed=args.seed)
    real = real_buffer(data, "cpu")
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.policy_steps):
        learner.update(real.sample(256, gen))
    return learner, f"TD3+BC fitted here for {args.policy_steps} steps", "fitted"


def closed_loop(data, act, s0_raw: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """The policy in the simulator: raw states (B, T+1, obs) and its actions (B, T)."""
    return simulate_policy(data, s0_raw, lambda raw: act(torch.as_tensor(data.normalize_obs(raw),
                                                                          dtype=torch.float32)).numpy(), T)


def mse(pred: np.ndarray, true: np.ndarray) -> tuple[list, list]:
    err = (pred[:, 1:] - true[:, 1:]) ** 2  # h = 1..T
    return err.mean((0, 2)).tolist(), err[..., :2].mean((0, 2)).tolist()


def position_median(pred: np.ndarray, true: np.ndarray) -> list:
    """Per horizon, the median over trajectories of the squared position error (mean over x, y)."""
    return np.median(((pred[:, 1:, :2] - true[:, 1:, :2]) ** 2).mean(-1), axis=0).tolist()


def normalized(pred: np.ndarray, true: np.ndarray, std: np.ndarray) -> tuple[list, list]:
    """Per horizon, the mean and the median over trajectories of the squared error in units of the dataset's
    per-dim std (mean over dims): locomotion states mix angles and velocities of very different scales."""
    err = (((pred[:, 1:] - true[:, 1:]) / std) ** 2).mean(-1)
    return err.mean(0).tolist(), np.median(err, 0).tolist()


def terminal_share(pred: np.ndarray, ref: np.ndarray, env: str) -> dict:
    """The share of rollouts that reach a terminal state (dynamics.terminal_fn, gym's healthy check) within the
    horizon in the model's trajectory and in the simulator's, and where the two disagree; a model whose
    hopper falls where the simulator's does not feeds the learner false terminals, and the reverse false
    futures."""
    import dynamics

    def ends(traj):
        x = torch.as_tensor(traj[:, 1:].reshape(-1, traj.shape[-1]))
        d = dynamics.terminal_fn(env)(x, None, x).reshape(len(traj), -1).numpy()
        return d.any(1), np.where(d.any(1), d.argmax(1) + 1, 0)

    (m, hm), (s, hs) = ends(pred), ends(ref)
    med = lambda h, k: float(np.median(h[k])) if k.any() else None  # noqa: E731
    return {"model": float(m.mean()), "simulator": float(s.mean()), "both": float((m & s).mean()),
            "model_only": float((m & ~s).mean()), "simulator_only": float((~m & s).mean()),
            "median_step_model": med(hm, m), "median_step_simulator": med(hs, s)}


def transition_error(data, traj: np.ndarray, actions: np.ndarray, env: str, maze_env: bool) -> dict:
    """The one-step error of each transition (s_t, a_t, s_{t+1}) of rollouts (raw (B, T, obs), actions (B, >= T-1,
    act)): the simulator restarted from s_t and stepped once with a_t, against s_{t+1}. The horizon curves ask
    how far a trajectory drifts from s_0; a TD learner uses transitions one at a time, and this asks whether
    each one is physics. Mazes: squared position error; locomotion: squared error in data-std units, only the
    transitions a round keeps (up to its first terminal, as dydiff.to_transitions). Mean, median and p90."""
    import dynamics

    B, T, d = traj.shape
    s, nxt = traj[:, :-1].reshape(-1, d), traj[:, 1:].reshape(-1, d)
    one = simulate(data, s, actions[:, :T - 1].reshape(B * (T - 1), 1, -1))[:, 1]
    if maze_env:
        err, keep = ((one[:, :2] - nxt[:, :2]) ** 2).mean(-1), np.ones(len(s), dtype=bool)
    else:
        err = (((one - nxt) / data.obs_std) ** 2).mean(-1)
        x = torch.as_tensor(nxt)
        done = dynamics.terminal_fn(env)(x, None, x).reshape(B, T - 1).numpy().astype(bool)
        keep = ((np.cumsum(done, 1) - done) == 0).reshape(-1)  # no terminal strictly before t
    err = err[keep]
    return {"mean": float(err.mean()), "median": float(np.median(err)), "p90": float(np.quantile(err, 0.9)),
            "n": int(keep.sum())}


def impossible(traj: np.ndarray, maze, max_step: float, dt: float) -> dict[str, np.ndarray]:
    """(B,) bool per test of a rollout (raw states; PointMaze obs = x, y, vx, vy, goal):
      wall          a position inside a wall cell or off the map: impossible;
      inconsistent  a step its own velocity does not explain: |x_{t+1} - x_t - dt v_{t+1}| above 10% of the
                    dataset's largest step (the simulator's semi-implicit Euler step makes it 0): impossible;
      jump          a one-step move longer than 1.1x the dataset's largest: a policy faster than the data's
                    controller makes these in the simulator too, so it is reported, not counted."""
    walls = np.array([[c == 1 for c in row] for row in maze.maze_map])
    xy = traj[..., :2]
    i = np.floor((maze.y_map_center - xy[..., 1]) / maze.maze_size_scaling).astype(np.int64)
    j = np.floor((xy[..., 0] + maze.x_map_center) / maze.maze_size_scaling).astype(np.int64)
    off = (i < 0) | (i >= walls.shape[0]) | (j < 0) | (j >= walls.shape[1])
    in_wall = off | walls[i.clip(0, walls.shape[0] - 1), j.clip(0, walls.shape[1] - 1)]
    step = np.diff(xy, axis=1)
    residual = np.linalg.norm(step - dt * traj[:, 1:, 2:4], axis=-1)
    return {"wall": in_wall.any(1), "inconsistent": (residual > 0.1 * max_step).any(1),
            "jump": (np.linalg.norm(step, axis=-1) > 1.1 * max_step).any(1)}


def impossible_share(traj: np.ndarray, maze, max_step: float, dt: float, keep_fraction: float, env: str) -> dict:
    """The share of impossible rollouts (wall or inconsistent) among those a round's hardmax filter keeps and
    those it rejects (scores: the maze's own reward, as train.py's --reward auto), and each test's share."""
    import dydiff
    import dynamics

    tests = impossible(traj, maze, max_step, dt)
    bad = tests["wall"] | tests["inconsistent"]
    nxt = torch.as_tensor(traj[:, 1:].reshape(-1, traj.shape[-1]))
    scores = dynamics.env_reward_fn(env)(None, None, nxt).reshape(len(traj), -1).sum(1)
    kept = np.zeros(len(traj), dtype=bool)
    kept[dydiff.hardmax_filter(scores, keep_fraction).numpy()] = True
    share = lambda m: float(bad[m].mean()) if m.any() else None  # noqa: E731
    return {"all": float(bad.mean()), "kept": share(kept), "rejected": share(~kept), "n_kept": int(kept.sum()),
            **{k: float(v.mean()) for k, v in tests.items()}}


def train_settings(*argv: str, train_flags: str = ""):
    """train.py's resolved Args for `argv` and then --train-flags, with train.py's own checks: a bad flag stops
    the tool with one line, before any work."""
    from runs import ConfigError
    from train import parse_args, resolve

    try:
        return resolve(parse_args([*argv, *shlex.split(train_flags)]))
    except ConfigError as exc:
        raise SystemExit(f"error: --train-flags: {exc}") from None


def policy_main(args: PolicyArgs) -> None:
    import dydiff
    from data import load_dataset
    from rebuild import build_dataset
    from rebuild import maze_eval_env
    from train import dm_config, pretrain, rollout_config

    torch.set_num_threads(args.threads)
    maze_env = args.env.startswith("maze2d")
    if not maze_env and args.env.split("-")[0] not in ("hopper", "walker2d", "halfcheetah"):
        raise SystemExit(f"error: {args.env} has no simulator that starts from dataset states; use a maze2d or "
                         "hopper/walker2d/halfcheetah env")
    t0 = time.time()
    p = train_settings("--env", args.env, "--preset", args.preset, train_flags=args.train_flags)
    data = load_dataset(args.env, build=build_dataset)
    models, _, _ = pretrain(p, data, "cpu", with_dm=True)  # the models train.py loads for these flags (and the DM)
    ens, dm = models.ensemble, models.dm
    T, N = p.rollout_length, p.sampler_steps
    rng = np.random.default_rng(args.seed)
    s0 = data.obs[rng.choice(len(data.obs), args.n_starts, replace=False)].astype(np.float64)
    out = {"env": args.env, "dataset_id": data.dataset_id, "n_starts": args.n_starts, "H": p.horizon, "T": T,
           "sampler_steps": N, "sampler_solver": p.sampler_solver, "sampler_churn": p.sampler_churn,
           "update_weight": p.update_weight, "sdedit_sigma": p.sdedit_sigma,
           "dm": asdict(dm_config(p)),
           "train_flags": args.train_flags, "horizons": list(range(1, T)), "by_policy": {}}
    if maze_env:
        maze = maze_eval_env(args.env).unwrapped.maze
        step, v_next = data.next_obs[:, :2] - data.obs[:, :2], data.next_obs[:, 2:4]
        max_step = float(np.linalg.norm(step, axis=1).max())
        dt = float((step * v_next).sum() / (v_next * v_next).sum())  # x_{t+1} = x_t + dt v_{t+1} in the data
        out.update(max_data_step=max_step, dt=dt)
        keys = ("curves_position", "curves_position_median")
        validity = lambda pred, ref: impossible_share(pred, maze, max_step, dt, p.keep_fraction, args.env)  # noqa: E731
    else:  # locomotion: errors in units of the data's std, and terminals instead of walls
        keys = ("curves_normalized", "curves_normalized_median")
        validity = lambda pred, ref: terminal_share(pred, ref, args.env)  # noqa: E731
    check = "impossible_share" if maze_env else "terminal_share"
    for path in args.policy or [None]:
        learner, policy_info, label = load_policy(path, args, data, data.obs_dim, data.act_dim)
        if label in out["by_policy"]:  # two runs' checkpoints at the same step: name them by their run too
            label = f"{Path(path).parent.name} {label}"
        # models on the trajectory the policy really takes
        true, actions = closed_loop(data, learner.act, s0, T - 1)
        res = {"policy": policy_info, "curves": {}, **{k: {} for k in keys}, check: {}, "transition_error": {}}
        if maze_env:
            res[check]["simulator"] = validity(true, true)
        res["transition_error"]["simulator"] = transition_error(data, true, actions, args.env, maze_env)  # ~0: a check
        dm_pred = dm_predict(dm, N, args.seed, S_churn=p.sampler_churn, solver=p.sampler_solver)
        preds = {"ensemble": (ensemble_predict(ens, args.seed)(s0, actions), true),
                 "dm": (dm_pred(s0, actions), true)}
        preds_actions = {"ensemble": actions, "dm": actions}
        # DyDiff's own iterates, each against the simulator replaying its actions
        g = torch.Generator().manual_seed(args.seed)
        s0_z = torch.as_tensor(data.normalize_obs(s0), dtype=torch.float32)
        iterates, _ = dydiff.rollout(learner.act, models, s0_z, rollout_config(p, iterations=args.max_iterations), g)
        for m, (states_z, acts) in enumerate(iterates):
            preds[f"dydiff_m{m}"] = (states_z.numpy() * data.obs_std + data.obs_mean,
                                     simulate(data, s0, acts[:, : T - 1].numpy()))
            preds_actions[f"dydiff_m{m}"] = acts.numpy().astype(np.float64)
        for name, (pred, ref) in preds.items():
            pred = np.asarray(pred, dtype=np.float64)
            res["curves"][name], position = mse(pred, ref)
            if maze_env:
                res[keys[0]][name], res[keys[1]][name] = position, position_median(pred, ref)
            else:
                res[keys[0]][name], res[keys[1]][name] = normalized(pred, ref, data.obs_std)
            res[check][name] = validity(pred, ref)
            res["transition_error"][name] = transition_error(data, pred, preds_actions[name], args.env, maze_env)
        out["by_policy"][label] = res  # the checkpoint is read once, by load_policy
    out["seconds"] = time.time() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    plot_policy(out, RESULTS / f"{args.name}.png", keys)
    show = sorted({h for h in (1, 4, 8, 16, 31, 47, 63, 95, T - 1) if h < T})
    what = "position" if maze_env else "state in data std units"
    for label, res in out["by_policy"].items():
        for key, stat in zip(keys, ("mean", "median")):
            print(f"\n| {label}: MSE vs simulator, {what}, {stat} | " + " | ".join(f"h={h}" for h in show) + " |")
            print("|---" * (len(show) + 1) + "|")
            for name, c in res[key].items():
                print(f"| {name} | " + " | ".join(f"{c[h - 1]:.2e}" for h in show) + " |")
        cols = (("all", "kept", "rejected", "wall", "inconsistent", "jump") if maze_env else
                ("model", "simulator", "both", "model_only", "simulator_only", "median_step_model",
                 "median_step_simulator"))
        print(f"\n| {label}: {check.replace('_', ' ')} | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
        for name, sh in res[check].items():
            print(f"| {name} | " + " | ".join("-" if sh[k] is None else f"{sh[k]:.3g}" for k in cols) + " |")
        print(f"\n| {label}: one-step error of each transition, {what} | mean | median | p90 | transitions |\n"
              "|---|---|---|---|---|")
        for name, e in res["transition_error"].items():
            print(f"| {name} | {e['mean']:.2e} | {e['median']:.2e} | {e['p90']:.2e} | {e['n']} |")
    print(f"wrote {RESULTS / args.name}.json and .png ({out['seconds']:.0f} s)")


def key_title(key: str) -> str:
    return ("position" if "position" in key else "state / data std") + (", median" if "median" in key else ", mean")


def plot_policy(out: dict, path: Path, keys: tuple[str, str] = ("curves_position", "curves_position_median")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(out["by_policy"].items())
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.8 * len(rows)), squeeze=False)
    for (label, res), row in zip(rows, axes):
        for ax, key, title in ((row[0], keys[0], key_title(keys[0])), (row[1], keys[1], key_title(keys[1]))):
            for name, c in res[key].items():
                ax.plot(out["horizons"], c, label=name, ls="--" if name in ("ensemble", "dm") else "-")
            ax.set(xlabel="horizon h", ylabel="squared error vs simulator", yscale="log")
            ax.set_title(f"{out['env']}, policy {label}:\n{title}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


MODES = {"dataset": (DatasetArgs, dataset_main), "policy": (PolicyArgs, policy_main)}

if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in MODES:
        raise SystemExit(f"usage: python bench/fidelity.py {{{','.join(MODES)}}} [--help | flags]")
    cls, run = MODES[mode]
    run(tyro.cli(cls, args=sys.argv[2:], prog=f"fidelity.py {mode}"))
