"""Why train.py's --reward defaults to the task's own reward on maze2d: the learned reward model, probed.

    python bench/reward_probe.py --runs runs/compare/maze2d-umaze_td3bc+dydiff_s0 runs/compare/maze2d-umaze_td3bc_s0

1. The learned reward model r(s, a) at a still ball 0..1 away from its goal. The data never holds a state
   inside the goal circle (episodes are cut at every success), so there it extrapolates.
2. One DyDiff round (cpu preset sizes) with the first run's policy: the mean learned reward per step of the
   generated transitions against the true sparse reward of the same transitions, and against the simulator
   replaying the round's actions (are the generated trajectories right about the reward?).
3. For every run's final policy, 20 evaluation episodes: the step of the first success and the share of the
   later steps spent inside the goal circle (the eval env keeps the goal, so staying there is the score).

Models come from the dataset's cache (trained there when missing, as train.py does); runs on the CPU.
Writes bench/results/reward_probe.json.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"

import dydiff  # noqa: E402
import dynamics  # noqa: E402
from fidelity import simulate, train_settings  # noqa: E402  (the simulator replay, train.py's flags)


@dataclass
class RewardArgs:
    runs: tuple[str, ...]
    """train.py run folders (maze2d) whose final policies are probed; the first one drives the DyDiff round"""
    episodes: int = 20
    """evaluation episodes per run"""
    n_rollouts: int = 256
    """start states of the DyDiff round"""
    name: str = "reward_probe"
    """results file: <results>/<name>.json"""
    results: str = str(RESULTS)
    """folder of the results file"""
    train_flags: str = ""
    """train.py flags for the models and the round, on top of the cpu preset with --reward model (e.g.
    "--horizon 8"; the tests shrink everything with them)"""


def load_learner(folder: Path):
    from train import learner_from_checkpoint

    learner, state = learner_from_checkpoint(folder / "checkpoint.pt", 6, 2)
    return learner, state["args"]


def stay_share(data, act, episodes: int) -> dict:
    from data import flat_obs

    env, first, stay, returns = data.make_eval_env(), [], [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=10_000 + ep)
        rewards = []
        for _ in range(10_000):
            a = act(torch.as_tensor(data.normalize_obs(flat_obs(obs)[None]), dtype=torch.float32)).numpy()[0]
            obs, r, terminated, truncated, _ = env.step(a)
            rewards.append(r)
            if terminated or truncated:
                break
        rewards = np.asarray(rewards)
        hit = int(np.argmax(rewards > 0)) if rewards.any() else None
        first.append(hit)
        stay.append(float(rewards[hit:].mean()) if hit is not None else 0.0)
        returns.append(float(rewards.sum()))
    hits = [f for f in first if f is not None]
    return {"score": float(data.normalized_score(np.asarray(returns)).mean()), "reached": len(hits) / episodes,
            "first_success_step_mean": float(np.mean(hits)) if hits else None,
            "share_in_goal_after_first_success": float(np.mean([s for s, f in zip(stay, first) if f is not None]))
            if hits else None}


def main(args: RewardArgs) -> None:
    from data import load_dataset
    from rebuild import build_dataset
    from train import pretrain, rollout_config

    torch.set_num_threads(1)
    # the cpu preset, with the learned reward model
    p = train_settings("--env", "maze2d-umaze", "--reward", "model", train_flags=args.train_flags)
    data = load_dataset(p.env, p.dataset_id, p.dataset_steps, build=build_dataset)
    models, _, _ = pretrain(p, data, "cpu")  # the models train.py loads (its round below samples the DM)
    reward_model = models.reward_model
    out = {"dataset_id": data.dataset_id, "data_reward_per_step": float(data.rewards.mean())}

    # 1. the learned reward of a still ball d away from its goal, zero action
    goal = data.obs[int(np.argmax(data.rewards)), 4:6]
    rows = []
    for d in (0.0, 0.2, 0.4, 0.5, 0.7, 1.0):
        s = np.array([[goal[0] + d, goal[1], 0.0, 0.0, goal[0], goal[1]]], dtype=np.float32)
        with torch.no_grad():
            r = reward_model(torch.as_tensor(data.normalize_obs(s)), torch.zeros(1, 2)).item()
        rows.append({"distance": d, "learned_reward": r, "true_reward_if_it_stays": float(d <= 0.45)})
    out["learned_reward_near_goal"] = rows

    # 2. one DyDiff round with the first run's policy: learned vs true reward of the same transitions
    learner, _ = load_learner(Path(args.runs[0]))
    g = torch.Generator().manual_seed(0)
    obs_z = torch.as_tensor(data.normalize_obs(data.obs), dtype=torch.float32)
    s0, _ = dydiff.draw_start_states(obs_z, args.n_rollouts, g)
    # steps 2-4 and 6 of a round (dydiff.py) with every trajectory kept: the learned reward of each transition
    B, H = args.n_rollouts, p.rollout_length
    cfg = rollout_config(p)
    states, actions = dydiff.rollout(learner.act, models, s0, cfg, g)[0][-1]
    tr = dydiff.to_transitions(states, actions, dydiff.transition_rewards(models, states, actions),
                               torch.zeros(B, H - 1, dtype=torch.bool))
    raw = lambda x: x.numpy() * data.obs_std + data.obs_mean  # noqa: E731
    reward = dynamics.env_reward_fn(p.env)
    true = reward(raw(tr["obs"]), None, raw(tr["next_obs"])).numpy()
    # Are the generated trajectories physically right where it matters? Replay their actions in the simulator.
    sim = simulate(data, raw(s0).astype(np.float64), actions[:, : H - 1].numpy())[:, 1:]
    gen_r = reward(None, None, raw(states[:, 1:]).reshape(-1, states.shape[-1])).numpy()
    sim_r = reward(None, None, torch.as_tensor(sim.reshape(-1, sim.shape[-1]))).numpy()
    out["dydiff_round"] = {"policy": args.runs[0], "transitions": len(true),
                           "learned_reward_per_step": float(tr["rewards"].mean()),
                           "true_reward_per_step": float(true.mean()),
                           "learned_reward_range": [float(tr["rewards"].min()), float(tr["rewards"].max())],
                           "simulator_replay_reward_per_step": float(sim_r.mean()),
                           # None where the round generated no step inside the goal circle
                           "share_of_generated_goal_steps_in_goal_in_simulator":
                               float(sim_r[gen_r > 0].mean()) if (gen_r > 0).any() else None}

    # 3. where the final policies spend their time
    out["policies"] = {}
    for folder in map(Path, args.runs):
        learner, a = load_learner(folder)
        out["policies"][folder.name] = {"algo": a["algo"], "dydiff": a.get("dydiff", False),  # runs older than DyDiff lack the flag
                                        "reward": a.get("reward", "model") if a.get("dydiff") else None,
                                        **stay_share(data, learner.act, args.episodes)}

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    print("| distance to goal | " + " | ".join(f"{r['distance']:.1f}" for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    print("| learned r(s, 0), ball at rest | " + " | ".join(f"{r['learned_reward']:.2f}" for r in rows) + " |")
    rd = out["dydiff_round"]
    share = rd["share_of_generated_goal_steps_in_goal_in_simulator"]
    print(f"\nDyDiff round ({rd['transitions']} transitions): learned reward {rd['learned_reward_per_step']:.3f}/step, "
          f"true {rd['true_reward_per_step']:.3f}/step; the data has {out['data_reward_per_step']:.3f}/step.\n"
          f"The simulator replaying the same actions: {rd['simulator_replay_reward_per_step']:.3f}/step; "
          + (f"{share:.2f} of the generated steps in the goal circle are in it there too" if share is not None
             else "the round generated no step inside the goal circle"))
    print("\n| run | score | reached | first success (step) | share in goal after it |\n|---|---|---|---|---|")
    for name, r in out["policies"].items():
        first = "-" if r["first_success_step_mean"] is None else f"{r['first_success_step_mean']:.0f}"
        share = "-" if r["share_in_goal_after_first_success"] is None else f"{r['share_in_goal_after_first_success']:.2f}"
        print(f"| {name} | {r['score']:.1f} | {r['reached']:.2f} | {first} | {share} |")
    print(f"wrote {results / args.name}.json")


if __name__ == "__main__":
    main(tyro.cli(RewardArgs))
