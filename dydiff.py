"""The DyDiff rollout (DESIGN.md section 6): long, policy-consistent synthetic trajectories.

One round, for B start states s_0 drawn from the data and the learner's current policy pi:
  1. initial trajectory with the single-step ensemble: a_t = pi(s_t), s_{t+1} = f(s_t, a_t), a_{H-1} = pi(s_{H-1});
  2. M times: the diffusion model (DM) generates s_1..s_{H-1} given s_0 and the current actions,
     states = (DM states + previous states) / 2, clip to the dataset box, every a_t relabelled = pi(s_t);
  3. score every trajectory by sum_t r(s_t, a_t) with the reward model (or the task's own reward of
     each transition, where it has one: train.py --reward), keep the best (hardmax) or a score-weighted
     sample (softmax);
  4. cut the kept trajectories into transitions (s_t, a_t, r_t, s_{t+1}, done_t), t < H-1, each stopped
     at its first terminal.
Everything is batched over the B trajectories; the only Python loops run over time steps t (the ensemble
is autoregressive) and over the M iterations.

Spaces (DESIGN.md section 3): states are returned in env space (z-scored with obs_mean/obs_std), as the
learner, ensemble and reward model use them; the DM takes and returns raw states; terminal functions
take raw states. ``act_fn(obs_env (N, obs_dim)) -> actions (N, act_dim)`` in [-1, 1] is the deterministic
policy (TD3+BC's actor, IQL's tanh mean).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

ActFn = Callable[[torch.Tensor], torch.Tensor]
UNIFORM_FLOOR = 1e-6  # softmax filter: every trajectory keeps at least this share of probability mass


@dataclass
class RolloutConfig:
    n_rollouts: int = 256
    """B start states per round (official 2048 on a GPU; 256 keeps a CPU round near 10 s at H=32)"""
    horizon: int = 32
    """H rows [s_t, a_t] per trajectory; must equal the DM's horizon (official 100)"""
    iterations: int = 2
    """M rounds of DM sampling + action relabelling (official 2)"""
    sampler_steps: int = 20
    """Heun steps N of the DM sampler (official 34; 20 was as accurate on the maze, DESIGN.md 4.1)"""
    filter: str = "hardmax"
    """'hardmax' keeps the top keep_fraction by score; 'softmax' samples that many by score"""
    keep_fraction: float = 0.6
    """share of the B trajectories kept (official 0.6)"""
    temperature: float = 0.05
    """softmax filter temperature on z-scored trajectory scores (official 0.05)"""


# --------------------------------------------------------------------------------------------------
# Rollout: start states, ensemble trajectory, M DM iterations
# --------------------------------------------------------------------------------------------------
def draw_start_states(obs_env: torch.Tensor, B: int, generator: torch.Generator | None = None):
    """B start states s_0 drawn uniformly (with replacement) from the dataset's states; also their indices."""
    idx = torch.randint(len(obs_env), (B,), generator=generator, device=obs_env.device)
    return obs_env[idx], idx


def relabel(act_fn: ActFn, states_env: torch.Tensor) -> torch.Tensor:
    """a_t = pi(s_t) for every (b, t) in one call: (B, H, obs_dim) -> (B, H, act_dim)."""
    B, H, _ = states_env.shape
    return act_fn(states_env.reshape(B * H, -1)).reshape(B, H, -1)


@torch.no_grad()
def initial_rollout(act_fn: ActFn, ensemble, s0_env: torch.Tensor, H: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: the current policy in the ensemble (elite means). Returns states_env (B, H, obs), actions (B, H, act)."""
    s_t, states, actions = s0_env, [s0_env], []
    for _ in range(H - 1):
        a_t = act_fn(s_t)
        s_t = ensemble.step(s_t, a_t, generator=generator)
        states.append(s_t)
        actions.append(a_t)
    actions.append(act_fn(s_t))  # a_{H-1}: the DM is conditioned on H actions
    return torch.stack(states, 1), torch.stack(actions, 1)


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)  # numpy stats (data.py) or tensors


@torch.no_grad()
def refine(act_fn: ActFn, dm, states_env: torch.Tensor, actions: torch.Tensor, obs_mean, obs_std,
           iterations: int, sampler_steps: int = 20,
           generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Step 3: M iterations of (DM states given s_0 and the actions -> average -> clip -> relabel).

    Returns [(states_env, actions)] for iterations 0 (the input) .. M, so benchmarks can look at each one;
    the last entry is policy-consistent: its actions are exactly pi(its states)."""
    mean, std = _as_tensor(obs_mean, states_env), _as_tensor(obs_std, states_env)
    obs = slice(0, dm.obs_dim)
    # The dataset box of the DM (raw min/max of the observations), mapped to env space once: clipping there
    # keeps the returned env-space states exactly inside it, with no round trip through raw space.
    lo, hi = (dm.x_min[obs].to(states_env) - mean) / std, (dm.x_max[obs].to(states_env) - mean) / std
    s_0 = states_env[:, 0].clone()
    iterates = [(states_env, actions)]
    for _ in range(iterations):
        dm_env = (dm.generate(s_0 * std + mean, actions, sampler_steps, generator).to(states_env) - mean) / std
        # The official code averages with the previous states (undocumented in the paper): a cheap
        # ensemble of the two models; DESIGN.md 4.1 measured it beating either one alone at h = 15..31.
        # A diverged ensemble state (inf/NaN) would poison the mean; the DM state alone replaces it there.
        avg = torch.where(torch.isfinite(states_env), (dm_env + states_env) / 2, dm_env)
        states_env = torch.minimum(torch.maximum(avg, lo), hi)
        states_env[:, 0] = s_0  # s_0 is a real data state: keep it bit-exact (the DM only inpaints it)
        actions = relabel(act_fn, states_env)
        iterates.append((states_env, actions))
    return iterates


# --------------------------------------------------------------------------------------------------
# Scores and filters
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def step_rewards(reward_model, states_env: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """r(s_t, a_t) for every (b, t): (B, H)."""
    B, H, _ = states_env.shape
    return reward_model(states_env.reshape(B * H, -1), actions.reshape(B * H, -1)).reshape(B, H)


def score_trajectories(reward_model, states_env: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Step 4: the trajectory score sum_{t<H} r(s_t, a_t), (B,)."""
    return step_rewards(reward_model, states_env, actions).sum(1)


def n_keep(B: int, keep_fraction: float) -> int:
    """floor(keep_fraction * B), at least 1. The 1e-6 guards floating point: 0.29 * 100 = 28.999999999999996."""
    return min(B, max(1, math.floor(keep_fraction * B + 1e-6)))


def hardmax_filter(scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Indices of the n_keep(B, keep_fraction) highest scores (best first)."""
    return torch.topk(scores, n_keep(len(scores), keep_fraction)).indices


def softmax_filter(scores: torch.Tensor, keep_fraction: float, temperature: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """n_keep(B, keep_fraction) distinct indices drawn without replacement, p = softmax(z-scored score / T)
    mixed with a uniform floor. Z-scoring makes T independent of the reward scale; the floor keeps every
    probability positive once exp() underflows, so the draws after the favourites stay uniformly random
    (with p = 0, torch 2.x picks zero-probability indices in a fixed order and older versions raise)."""
    B = len(scores)
    s = scores.double()  # float32 exp() underflows already at a score gap of ~5 std for T = 0.05
    z = (s - s.mean()) / (s.std(correction=0) + 1e-8)  # equal scores give z = 0: a uniform draw
    p = (1 - UNIFORM_FLOOR) * torch.softmax(z / temperature, 0) + UNIFORM_FLOOR / B
    return torch.multinomial(p, n_keep(B, keep_fraction), replacement=False, generator=generator)


# --------------------------------------------------------------------------------------------------
# Transitions
# --------------------------------------------------------------------------------------------------
def to_transitions(states_env: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                   terminal: torch.Tensor) -> dict[str, torch.Tensor]:
    """Step 6: (s_t, a_t, r_t, s_{t+1}, done_t) for t < H-1, flattened trajectory by trajectory.

    rewards: (B, H) or (B, H-1); terminal: (B, H-1) bool, done of the transition t -> t+1. A trajectory
    stops at its first terminal: that transition is kept with done = 1, the later ones are dropped
    (they would continue from a state the environment never leaves)."""
    done = terminal.bool()
    H1 = done.shape[1]
    terminals_before = done.long().cumsum(1) - done.long()  # terminals strictly before t
    keep = terminals_before == 0
    return {"obs": states_env[:, :H1][keep], "actions": actions[:, :H1][keep],
            "rewards": rewards[:, :H1][keep], "next_obs": states_env[:, 1:H1 + 1][keep],
            "dones": done[keep].to(states_env.dtype)}


# --------------------------------------------------------------------------------------------------
# One full round
# --------------------------------------------------------------------------------------------------
def rollout_round(act_fn: ActFn, ensemble, reward_model, dm, terminal, start_states_env: torch.Tensor,
                  obs_mean, obs_std, cfg: RolloutConfig, generator: torch.Generator | None = None,
                  return_iterates: bool = False, reward_fn=None):
    """Steps 2-6 for the given start states s_0 (B, obs_dim), env space. ``terminal`` is
    dynamics.terminal_fn(env). Rewards come from the learned r(s_t, a_t) (the paper), or, when
    ``reward_fn`` (dynamics.env_reward_fn) is given, from the task's own r(s_t, a_t, s_{t+1}) on raw states;
    a trajectory's score then sums its H-1 transitions. Returns (transitions, stats), plus the refine()
    iterates when asked."""
    if cfg.horizon != dm.horizon:
        raise ValueError(f"rollout horizon H={cfg.horizon} differs from the diffusion model's H={dm.horizon}")
    if cfg.filter not in ("hardmax", "softmax"):
        raise ValueError(f"unknown filter '{cfg.filter}': use 'hardmax' or 'softmax'")
    if not 0 < cfg.keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {cfg.keep_fraction}")
    t0 = time.time()
    states, actions = initial_rollout(act_fn, ensemble, start_states_env, cfg.horizon, generator)
    t_ensemble = time.time() - t0
    iterates = refine(act_fn, dm, states, actions, obs_mean, obs_std, cfg.iterations, cfg.sampler_steps, generator)
    t_dm = time.time() - t0 - t_ensemble
    states, actions = iterates[-1]
    B, H, obs_dim = states.shape

    raw_all = states * _as_tensor(obs_std, states) + _as_tensor(obs_mean, states)  # reward and terminal fns: raw
    if reward_fn is None:
        rewards = step_rewards(reward_model, states, actions)
    else:
        rewards = torch.as_tensor(reward_fn(raw_all[:, :-1].reshape(B * (H - 1), obs_dim),
                                            actions[:, :-1].reshape(B * (H - 1), -1),
                                            raw_all[:, 1:].reshape(B * (H - 1), obs_dim)),
                                  dtype=states.dtype, device=states.device).reshape(B, H - 1)
    scores = rewards.sum(1)
    if cfg.filter == "hardmax":
        kept = hardmax_filter(scores, cfg.keep_fraction)
    else:
        kept = softmax_filter(scores, cfg.keep_fraction, cfg.temperature, generator)
    rejected = torch.ones(B, dtype=torch.bool, device=scores.device)
    rejected[kept] = False

    raw = raw_all[kept]
    k = len(kept)
    # terminal functions work on raw states; 'never' answers on the CPU whatever the input device
    done = terminal(raw[:, :-1].reshape(k * (H - 1), obs_dim), actions[kept, :-1].reshape(k * (H - 1), -1),
                    raw[:, 1:].reshape(k * (H - 1), obs_dim))
    done = torch.as_tensor(done, device=states.device).bool().reshape(k, H - 1)
    transitions = to_transitions(states[kept], actions[kept], rewards[kept], done)

    # how far each iteration moved the states: large values mean the DM and the ensemble disagree
    shifts = {f"state_shift_m{m}": float(((iterates[m][0] - iterates[m - 1][0]) ** 2).mean())
              for m in range(1, len(iterates))}
    stats = {"n_rollouts": B, "n_kept": k, "n_transitions": len(transitions["obs"]),
             "score_kept_mean": float(scores[kept].mean()),
             "score_rejected_mean": float(scores[rejected].mean()) if rejected.any() else float("nan"),
             "score_mean": float(scores.mean()),
             "terminated_fraction": float(done.any(1).float().mean()),
             **shifts, "time_ensemble_s": t_ensemble, "time_dm_s": t_dm, "time_s": time.time() - t0}
    return (transitions, stats, iterates) if return_iterates else (transitions, stats)


# --------------------------------------------------------------------------------------------------
# Picture for learners
# --------------------------------------------------------------------------------------------------
def plot_rollouts(path, data, starts_raw, initial_states_raw, final_states_raw, env: str, n_show: int = 8,
                  n_dataset: int = 20) -> None:
    """PNG of (x, y) = obs dims 0, 1: maze walls (maze2d), a few dataset episodes in grey, and for the first
    n_show start states the initial ensemble rollout (dashed) and the final DyDiff rollout (solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    to_np = lambda x: x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)  # noqa: E731
    starts, initial, final = to_np(starts_raw), to_np(initial_states_raw), to_np(final_states_raw)
    fig, ax = plt.subplots(figsize=(6, 6))
    if env.startswith("maze2d"):
        eval_env = data.make_eval_env()
        maze = eval_env.unwrapped.maze
        size = maze.maze_size_scaling
        for i, row in enumerate(maze.maze_map):
            for j, cell in enumerate(row):
                if cell == 1:  # 1 = wall; 0, 'g', 'r', 'c' are free cells
                    x, y = maze.cell_rowcol_to_xy(np.array([i, j]))
                    ax.add_patch(Rectangle((x - size / 2, y - size / 2), size, size, color="0.25"))
        eval_env.close()
    H = final.shape[1]
    starts_idx = np.asarray(data.episode_starts)
    for e in np.linspace(0, len(starts_idx) - 1, min(n_dataset, len(starts_idx))).astype(int):
        seg = data.obs[starts_idx[e]:min(data.episode_ends[e], starts_idx[e] + 4 * H)]
        ax.plot(seg[:, 0], seg[:, 1], color="0.7", lw=0.8, label="dataset episodes" if e == 0 else None)
    for b in range(min(n_show, len(final))):
        c = f"C{b % 10}"
        ax.plot(initial[b, :, 0], initial[b, :, 1], ls="--", color=c, lw=1,
                label="initial (ensemble, pi)" if b == 0 else None)
        ax.plot(final[b, :, 0], final[b, :, 1], color=c, lw=1.8, label="final DyDiff" if b == 0 else None)
        ax.plot(starts[b, 0], starts[b, 1], "o", color=c, ms=5, label="start s_0" if b == 0 else None)
    ax.set(aspect="equal", xlabel="x (obs dim 0)", ylabel="y (obs dim 1)",
           title=f"{env}: {min(n_show, len(final))} rollouts of H={H} from the same starts")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
