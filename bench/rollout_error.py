"""The paper's Figure 3 with a learned policy: how far each model's rollout drifts from the simulator.

    python bench/rollout_error.py --env maze2d-umaze --policy runs/compare/maze2d-umaze_td3bc_s0/checkpoint.pt

    python bench/rollout_error.py --env hopper-medium-replay --policy runs/compare/hopper-medium-replay_td3bc_s0/checkpoint.pt

From 256 dataset start states, per horizon h = 1..T-1 (T = train.py's --rollout-length, which may chain
several DM windows; pass --train-flags="--rollout-length 63" for longer), the mean squared error against
the simulator (PointMaze, or MuJoCo for hopper/walker2d/halfcheetah: see fidelity.simulate) of
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

from fidelity import dm_predict, ensemble_predict, simulate, simulate_policy  # noqa: E402


@dataclass
class Args:
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


def load_policy(path: str | None, args: Args, data, obs_dim: int, act_dim: int):
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


def transition_error(data, traj: np.ndarray, actions: np.ndarray, env: str, maze_env: bool,
                     next_raw: np.ndarray | None = None) -> dict:
    """The one-step error of each transition (s_t, a_t, s_{t+1}) of rollouts (raw (B, T, obs), actions (B, >= T-1,
    act)): the simulator restarted from s_t and stepped once with a_t, against s_{t+1}. The horizon curves ask
    how far a trajectory drifts from s_0; a TD learner uses transitions one at a time, and this asks whether
    each one is physics. Mazes: squared position error; locomotion: squared error in data-std units, only the
    transitions a round keeps (up to its first terminal, as dydiff.to_transitions). next_raw (B, T-1, obs): the
    transitions' s' where it is not the next row (train.py --next-state ensemble). Mean, median and p90."""
    import dynamics

    B, T, d = traj.shape
    s, nxt = traj[:, :-1].reshape(-1, d), (traj[:, 1:] if next_raw is None else next_raw).reshape(-1, d)
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


def main(args: Args) -> None:
    import dydiff
    from data import load_dataset
    from rebuild import maze_eval_env
    from runs import ConfigError
    from train import dm_config, parse_args, pretrain, resolve, rollout_config

    torch.set_num_threads(args.threads)
    maze_env = args.env.startswith("maze2d")
    if not maze_env and args.env.split("-")[0] not in ("hopper", "walker2d", "halfcheetah"):
        raise SystemExit(f"error: {args.env} has no simulator that starts from dataset states; use a maze2d or "
                         "hopper/walker2d/halfcheetah env")
    t0 = time.time()
    try:  # train.py's own checks of --train-flags (e.g. --guidance needs --dm-action-dropout)
        p = resolve(parse_args(["--env", args.env, "--preset", args.preset, *shlex.split(args.train_flags)]))
    except ConfigError as exc:
        raise SystemExit(f"error: --train-flags: {exc}") from None
    data = load_dataset(args.env)
    models, _, _ = pretrain(p, data, "cpu")  # the models train.py loads for these flags
    ens, dm = models.ensemble, models.dm
    T, N = p.rollout_length, p.sampler_steps
    rng = np.random.default_rng(args.seed)
    s0 = data.obs[rng.choice(len(data.obs), args.n_starts, replace=False)].astype(np.float64)
    out = {"env": args.env, "dataset_id": data.dataset_id, "n_starts": args.n_starts, "H": p.horizon, "T": T,
           "sampler_steps": N, "sampler_solver": p.sampler_solver, "sampler_churn": p.sampler_churn,
           "update_weight": p.update_weight, "sdedit_sigma": p.sdedit_sigma, "guidance": p.guidance,
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
        dm_pred = dm_predict(dm, N, args.seed, S_churn=p.sampler_churn, solver=p.sampler_solver, guidance=p.guidance)
        preds = {"ensemble": (ensemble_predict(ens, args.seed)(s0, actions), true),
                 "dm": (dm_pred(s0, actions), true)}
        preds_actions = {"ensemble": actions, "dm": actions}
        # DyDiff's own iterates, each against the simulator replaying its actions
        g = torch.Generator().manual_seed(args.seed)
        s0_z = torch.as_tensor(data.normalize_obs(s0), dtype=torch.float32)
        iterates, _ = dydiff.rollout(learner.act, models, s0_z, rollout_config(p, iterations=args.max_iterations), g)
        next_raw = {}  # --next-state ensemble: the s' of DyDiff's transitions is the ensemble's step, not the next row
        for m, (states_z, acts) in enumerate(iterates):
            preds[f"dydiff_m{m}"] = (states_z.numpy() * data.obs_std + data.obs_mean,
                                     simulate(data, s0, acts[:, : T - 1].numpy()))
            preds_actions[f"dydiff_m{m}"] = acts.numpy().astype(np.float64)
            nz = dydiff.next_states(models, states_z, acts, rollout_config(p, iterations=m), g)
            next_raw[f"dydiff_m{m}"] = nz.numpy().astype(np.float64) * data.obs_std + data.obs_mean
        for name, (pred, ref) in preds.items():
            pred = np.asarray(pred, dtype=np.float64)
            res["curves"][name], position = mse(pred, ref)
            if maze_env:
                res[keys[0]][name], res[keys[1]][name] = position, position_median(pred, ref)
            else:
                res[keys[0]][name], res[keys[1]][name] = normalized(pred, ref, data.obs_std)
            res[check][name] = validity(pred, ref)
            res["transition_error"][name] = transition_error(data, pred, preds_actions[name], args.env, maze_env,
                                                             next_raw.get(name))
        out["by_policy"][label] = res  # the checkpoint is read once, by load_policy
    out["seconds"] = time.time() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    plot(out, RESULTS / f"{args.name}.png", keys)
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


def plot(out: dict, path: Path, keys: tuple[str, str] = ("curves_position", "curves_position_median")) -> None:
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


if __name__ == "__main__":
    main(tyro.cli(Args))
