"""Rollout accuracy against the PointMaze simulator: the paper's Figure 3 with the dataset's actions.

    python bench/fidelity.py --env maze2d-umaze

From 256 dataset states, the dataset's next `horizon` actions are replayed open loop in the simulator,
in the single-step ensemble and in the diffusion model (chaining H-windows past its segment length),
and the per-horizon squared error of each model is reported twice: over any window of the data, and
over windows that stay inside one episode (a maze2d episode ends at a success, after which the actions
chase a new goal that the state does not show yet). Both models come from the dataset's cache (trained
there when missing, as train.py does). Writes fidelity_<env>_*.{json,png} beside the cached DM.
bench/rollout_error.py does the same with a learned policy's actions and DyDiff's own iterates.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
               solver: str = "euler", guidance: float = 1.0):
    """The DM as a ``predict(s0, actions) -> states`` callable on numpy arrays (rollout_error's API): states
    s_0..s_T for T actions, in chained H-windows (dydiff.generate_chained). The DM wants an action on
    every row, so the last action is repeated on the row of s_T (and up to H rows)."""
    gen = torch.Generator().manual_seed(seed)

    def predict(s0: np.ndarray, actions: np.ndarray) -> np.ndarray:
        a = torch.as_tensor(actions)
        T = a.shape[1]
        a = torch.cat([a, a[:, -1:].expand(-1, max(T + 1, model.horizon) - T, -1)], 1)
        states = dydiff.generate_chained(model, torch.as_tensor(s0), a, sampler_steps, gen, solver=solver,
                                         S_churn=S_churn, guidance=guidance)
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
class Args:
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


def main(args: Args) -> None:
    from data import DatasetError, load_dataset
    from runs import CheckpointError
    from train import dm_config, parse_args, resolve

    torch.set_num_threads(args.threads)
    p = resolve(parse_args(["--env", args.env, "--preset", args.preset]))  # train.py's settings for this dataset
    try:
        data = load_dataset(args.env)
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


if __name__ == "__main__":
    main(tyro.cli(Args))
