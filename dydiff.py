"""One DyDiff round: long, policy-consistent synthetic trajectories (Zhao et al., 2024, Algorithm 1).

A diffusion model (DM) trained on the data reproduces the behaviour policy. DyDiff instead uses it as
a dynamics model: it generates states *given* the learning policy's actions, lets the policy relabel
the actions on those states, and repeats, so the trajectory becomes consistent with the policy pi.
The steps, each a function below:

  1. draw_start_states  B start states s_0 from the dataset.
  2. initial_rollout    the initial trajectory of T rows from the single-step ensemble f:
                        a_t = pi(s_t), s_{t+1} = f(s_t, a_t) for t < T-1, and a_{T-1} = pi(s_{T-1}).
  3. refine             M times: the DM generates s_1..s_{T-1} given s_0 and the current actions (in
                        windows of its H rows, chained when T > H); states = (DM states + previous
                        states) / 2; every action relabelled a_t = pi(s_t). With M = 0 the round is
                        ensemble-only: the initial trajectory goes on to step 4 as it is.
  4. transition_rewards r_t of each of the T-1 transitions t -> t+1 (s'_t is the trajectory's next row
                        s_{t+1}): the reward model r(s_t, a_t) (the paper), or the task's own reward of
                        (s_t, a_t, s_{t+1}) where it has one (train.py --reward). A trajectory's return R
                        is the sum of these T-1 rewards, the rewards its transitions carry into the
                        buffer. (The official code also adds the reward model's r(s_{T-1}, a_{T-1}) of
                        the last row, which never becomes a transition, and the task's reward has no
                        value there.) --stop-return-at-terminal: R stops at the first terminal transition
                        (its reward counts, the later ones are never transitions), so the dones come first.
  5. select             hardmax_filter keeps every trajectory whose return reaches the (1 - keep_fraction)
                        quantile; softmax_filter samples that share with p = softmax(z-scored return /
                        temperature).
  6. transition_dones,  the terminal flag of every transition, then the kept trajectories cut into
     to_transitions     (s_t, a_t, r_t, s'_t, done_t), t < T-1, each stopped at its first terminal.
rollout runs steps 2-3 and rollout_round steps 2-6, for given start states. Everything is batched over
the B trajectories; the only Python loops run over time steps (the ensemble is autoregressive) and the
M iterations.

As the official code's conversions between spaces do, every state and action the policy or the
ensemble sees, and every one returned, lies in the dataset's box (per-dimension min/max). State
dimensions that never change within a dataset episode (maze2d's goal) are copied from s_0, not generated.

Spaces: states are z-scored (with the dataset's obs_mean/obs_std; names end in _z), as the learner, the
ensemble and the reward model use them; the DM takes and returns raw states; terminal and task reward
functions take raw states. ``act_fn(obs_z (N, obs_dim)) -> actions (N, act_dim)`` in [-1, 1] is the
deterministic policy (TD3+BC's actor, IQL's tanh mean).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

ActFn = Callable[[torch.Tensor], torch.Tensor]
UNIFORM_FLOOR = 1e-6  # softmax filter: every trajectory keeps at least this share of probability mass


@dataclass
class RolloutConfig:
    """A round's settings; train.py fills each field from its flag of the same name (defaults: its cpu preset).
    Checked once, here: a bad value raises a ValueError whose message starts with the field's name."""

    rollout_batch: int = 512  # B, start states per round
    rollout_length: int = 32  # T, rows [s_t, a_t] per trajectory (DM windows of H rows are chained when T > H)
    iterations: int = 2  # M, rounds of DM sampling + action relabelling (0: ensemble-only rollouts)
    sampler_steps: int = 8  # N, steps of the DM sampler
    sampler_solver: str = "euler"  # 'euler' (N network calls) or 'heun' (2N - 1)
    sampler_churn: float = 0.0  # S_churn of the sampler; 0 = deterministic
    filter: str = "hardmax"  # step 5: 'hardmax' or 'softmax'
    keep_fraction: float = 0.6  # share of the B trajectories kept
    temperature: float = 0.05  # softmax filter: temperature on z-scored trajectory returns
    update_weight: float = 0.5  # w of step 3: states = w * DM states + (1 - w) * previous states (official 1/2)
    sdedit_sigma: float = 0.2  # > 0: the DM starts from the previous states noised to this sigma (SDEdit), so it
    # corrects the policy's trajectory rather than replacing it with one drawn from the data; 0: from pure noise, the paper
    stop_return_at_terminal: bool = False  # step 4: R sums the rewards up to the first terminal only (official: all)

    def __post_init__(self):
        for name in ("rollout_batch", "rollout_length", "sampler_steps", "temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if not 0 < self.update_weight <= 1:
            raise ValueError(f"update_weight must be in (0, 1] (got {self.update_weight})")
        if self.sdedit_sigma < 0:
            raise ValueError(f"sdedit_sigma must be 0 (off) or positive (got {self.sdedit_sigma})")
        if self.iterations < 0:
            raise ValueError(f"iterations must be 0 or more (got {self.iterations})")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1] (got {self.keep_fraction})")
        if self.filter not in ("hardmax", "softmax"):
            raise ValueError(f"filter must be 'hardmax' or 'softmax' (got {self.filter!r})")
        if self.sampler_solver not in ("euler", "heun"):
            raise ValueError(f"sampler_solver must be 'euler' or 'heun' (got {self.sampler_solver!r})")


@dataclass
class DyDiffModels:
    """What a round needs besides the policy: the pretrained models and the dataset's z-scoring."""

    ensemble: nn.Module
    """single-step ensemble f (dynamics.Ensemble), on z-scored states"""
    reward_model: nn.Module
    """learned r(s, a) (dynamics.RewardModel), on z-scored states"""
    dm: nn.Module | None
    """the diffusion model (diffusion.DynamicsDiffusion), on raw states; None for ensemble-only rollouts (M = 0)"""
    terminal_fn: Callable
    """done(s, a, s') on raw states (dynamics.terminal_fn)"""
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    reward_fn: Callable | None = None
    """the task's own r(s, a, s') on raw states (dynamics.env_reward_fn); None: use reward_model"""
    constant_dims: torch.Tensor | None = None
    """(obs_dim,) bool: dimensions constant within every dataset episode, copied from s_0 (data.constant_dims)"""
    reward_scale: float = 1.0
    """the learner's reward units: rewards are multiplied by it, as the real data's (train.py --normalize-reward)"""
    x_min: torch.Tensor | None = None
    """(obs_dim + act_dim,) raw lower corner of the dataset's box of [s, a] (train.dataset_box); None: the DM's"""
    x_max: torch.Tensor | None = None

    def __post_init__(self):
        if self.x_min is None or self.x_max is None:
            if self.dm is None:
                raise ValueError("without a DM, give the dataset's box: x_min and x_max (train.dataset_box)")
            self.x_min, self.x_max = self.dm.x_min, self.dm.x_max  # the DM's box spans the same rows

    def raw(self, states_z: torch.Tensor) -> torch.Tensor:
        return states_z * self.obs_std.to(states_z) + self.obs_mean.to(states_z)

    def zscore(self, states_raw: torch.Tensor) -> torch.Tensor:
        return (states_raw - self.obs_mean.to(states_raw)) / self.obs_std.to(states_raw)

    def in_box(self, states_z: torch.Tensor, s0_z: torch.Tensor) -> torch.Tensor:
        """States clipped to the dataset's box (its raw min/max, z-scored), with the constant
        dimensions copied from s_0 (B, obs_dim)."""
        obs = slice(0, states_z.shape[-1])
        lo, hi = self.zscore(self.x_min[obs].to(states_z)), self.zscore(self.x_max[obs].to(states_z))
        states_z = torch.minimum(torch.maximum(states_z, lo), hi)
        if self.constant_dims is not None:
            s0 = s0_z[:, None] if states_z.dim() == 3 else s0_z
            states_z = torch.where(self.constant_dims.to(states_z.device), s0, states_z)
        return states_z

    def action_in_box(self, actions: torch.Tensor) -> torch.Tensor:
        act = slice(len(self.obs_mean), None)
        return torch.minimum(torch.maximum(actions, self.x_min[act].to(actions)), self.x_max[act].to(actions))


# -- Steps 1-3: start states, the initial trajectory, M DM iterations ------------------------------
def draw_start_states(obs_z: torch.Tensor, B: int, generator: torch.Generator | None = None):
    """Step 1: B start states s_0 drawn uniformly (with replacement) from the dataset; also their indices."""
    idx = torch.randint(len(obs_z), (B,), generator=generator, device=obs_z.device)
    return obs_z[idx], idx


def relabel(act_fn: ActFn, states_z: torch.Tensor) -> torch.Tensor:
    """a_t = pi(s_t) for every (b, t) in one call: (B, T, obs_dim) -> (B, T, act_dim)."""
    B, T, _ = states_z.shape
    return act_fn(states_z.reshape(B * T, -1)).reshape(B, T, -1)


@torch.no_grad()
def initial_rollout(act_fn: ActFn, models: DyDiffModels, s0_z: torch.Tensor, T: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: the current policy in the ensemble, its actions clipped to the dataset's box.
    Returns states_z (B, T, obs), actions (B, T, act)."""
    s_t, states, actions = s0_z, [s0_z], []
    for _ in range(T - 1):
        a_t = models.action_in_box(act_fn(s_t))
        s_t = models.in_box(models.ensemble.step(s_t, a_t, generator=generator), s0_z)
        states.append(s_t)
        actions.append(a_t)
    actions.append(models.action_in_box(act_fn(s_t)))  # a_{T-1}: the DM is conditioned on every row's action
    return torch.stack(states, 1), torch.stack(actions, 1)


@torch.no_grad()
def generate_chained(dm: nn.Module, s0_raw: torch.Tensor, actions: torch.Tensor, sampler_steps: int = 8,
                     generator: torch.Generator | None = None, states_start: torch.Tensor | None = None,
                     **sampler) -> torch.Tensor:
    """The DM's raw states s_0..s_{T-1} (B, T, obs_dim) for raw s_0 and T >= H actions, in windows of H rows.

    Each window starts from the last state the previous one generated (a stride of H - 1 rows), and the
    last one is shifted back to end at row T - 1 rather than padded with invented actions (the DM is not
    causal: every row sees every action). states_start (B, T, obs_dim), raw: the states each window is
    refined from (SDEdit; DynamicsDiffusion.generate)."""
    B, T, _ = actions.shape
    H = dm.horizon
    if T < H:
        raise ValueError(f"rollout length T={T} is shorter than the diffusion model's H={H}")
    states = torch.empty(B, T, dm.obs_dim, device=dm.x_min.device)
    states[:, 0] = s0_raw
    filled = 0  # rows 0..filled are final
    while filled < T - 1:
        start = min(filled, T - H)
        start_rows = None if states_start is None else states_start[:, start:start + H]
        window = dm.generate(states[:, start], actions[:, start:start + H], sampler_steps, generator, start_rows,
                             **sampler)
        states[:, filled + 1:start + H] = window[:, filled - start + 1:]
        filled = start + H - 1
    return states


@torch.no_grad()
def refine(act_fn: ActFn, models: DyDiffModels, states_z: torch.Tensor, actions: torch.Tensor, cfg: RolloutConfig,
           generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Step 3: M iterations of (DM states given s_0 and the actions -> average -> box -> relabel).

    Returns [(states_z, actions)] for iterations 0 (the input) .. M, so benchmarks can look at each one;
    the last entry is policy-consistent: its actions are pi(its states), clipped to the dataset's box."""
    if cfg.iterations and models.dm is None:
        raise ValueError(f"M={cfg.iterations} DM iterations need the DM (models.dm is None)")
    s_0 = states_z[:, 0].clone()
    iterates = [(states_z, actions)]
    sdedit = {"sigma_start": cfg.sdedit_sigma} if cfg.sdedit_sigma > 0 else {}
    for _ in range(cfg.iterations):
        start = models.raw(torch.nan_to_num(states_z)) if sdedit else None  # the trajectory the DM corrects
        dm_z = models.zscore(generate_chained(models.dm, models.raw(s_0), actions, cfg.sampler_steps, generator, start,
                                              solver=cfg.sampler_solver, S_churn=cfg.sampler_churn, **sdedit).to(states_z))
        # The official code averages with the previous states (the paper does not say so, w = 1/2): a
        # cheap ensemble of the two models, the DM's sample and the previous trajectory.
        # A diverged ensemble state (inf/NaN) would poison the mean; the DM state alone replaces it there.
        w = cfg.update_weight
        avg = torch.where(torch.isfinite(states_z), w * dm_z + (1 - w) * states_z, dm_z)
        states_z = models.in_box(avg, s_0)
        states_z[:, 0] = s_0  # s_0 is a real data state: keep it bit-exact (the DM only inpaints it)
        actions = models.action_in_box(relabel(act_fn, states_z))
        iterates.append((states_z, actions))
    return iterates


def rollout(act_fn: ActFn, models: DyDiffModels, s0_z: torch.Tensor, cfg: RolloutConfig,
            generator: torch.Generator | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """Steps 2-3: refine's iterates (the last one is the round's trajectory) and the seconds each step took."""
    t0 = time.time()
    states_z, actions = initial_rollout(act_fn, models, s0_z, cfg.rollout_length, generator)
    t1 = time.time()
    iterates = refine(act_fn, models, states_z, actions, cfg, generator)
    return iterates, {"time_ensemble_s": t1 - t0, "time_dm_s": time.time() - t1}


# -- Steps 4-5: rewards, returns and filters --------------------------------------------
@torch.no_grad()
def transition_rewards(models: DyDiffModels, states_z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Step 4: r_t of every transition t -> t+1, (B, T-1): the reward model's r(s_t, a_t), or the task's own
    reward of (s_t, a_t, s_{t+1}) on raw states; in the learner's units (times reward_scale)."""
    B, T, obs_dim = states_z.shape
    n = B * (T - 1)
    s, a = states_z[:, :-1].reshape(n, obs_dim), actions[:, :-1].reshape(n, -1)
    if models.reward_fn is None:
        r = models.reward_model(s, a)
    else:
        r = models.reward_fn(models.raw(s), a, models.raw(states_z[:, 1:].reshape(n, obs_dim)))
    return torch.as_tensor(r, dtype=states_z.dtype, device=states_z.device).reshape(B, T - 1) * models.reward_scale


def n_keep(B: int, keep_fraction: float) -> int:  # the softmax filter's count
    """floor(keep_fraction * B), at least 1. The 1e-6 guards floating point: 0.29 * 100 = 28.999999999999996."""
    return min(B, max(1, math.floor(keep_fraction * B + 1e-6)))


def hardmax_filter(returns: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Step 5: indices (best first) of every trajectory whose return reaches the (1 - keep_fraction)
    quantile, as the official rule: ties at the threshold are all kept. With a sparse reward many
    trajectories tie (often at 0): when at least 1 - keep_fraction of them never earn a reward, the
    quantile is 0 and every trajectory is kept, so the filter filters nothing."""
    R = returns.double()
    threshold = torch.quantile(R, 1.0 - keep_fraction) if keep_fraction < 1 else R.min()
    kept = torch.nonzero(R >= threshold).squeeze(1)
    return kept[torch.argsort(R[kept], descending=True, stable=True)]


def softmax_filter(returns: torch.Tensor, keep_fraction: float, temperature: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Step 5: n_keep(B, keep_fraction) distinct indices drawn without replacement, p = softmax(z-scored
    return / temperature) mixed with a uniform floor. Z-scoring makes the temperature independent of the
    reward scale; the floor keeps every probability positive once exp() underflows, so the draws after the
    favourites stay uniformly random (with p = 0, torch 2.x picks zero-probability indices in a fixed order)."""
    B = len(returns)
    R = returns.double()  # float32 exp() underflows already at a gap of ~5 std for temperature 0.05
    z = (R - R.mean()) / (R.std(correction=0) + 1e-8)  # equal returns give z = 0: a uniform draw
    p = (1 - UNIFORM_FLOOR) * torch.softmax(z / temperature, 0) + UNIFORM_FLOOR / B
    return torch.multinomial(p, n_keep(B, keep_fraction), replacement=False, generator=generator)


def select(returns: torch.Tensor, cfg: RolloutConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Step 5: the indices of the kept trajectories, by cfg.filter."""
    if cfg.filter == "hardmax":
        return hardmax_filter(returns, cfg.keep_fraction)
    return softmax_filter(returns, cfg.keep_fraction, cfg.temperature, generator)


# -- Step 6: terminals and transitions -------------------------------------------------------------
def transition_dones(models: DyDiffModels, states_z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Step 6: done of every transition t -> t+1, (B, T-1) bool, from the terminal function on raw
    (s_t, a_t, s_{t+1})."""
    B, T, obs_dim = states_z.shape
    n = B * (T - 1)
    dones = models.terminal_fn(models.raw(states_z[:, :-1]).reshape(n, obs_dim), actions[:, :-1].reshape(n, -1),
                               models.raw(states_z[:, 1:]).reshape(n, obs_dim))
    return torch.as_tensor(dones, device=states_z.device).bool().reshape(B, T - 1)  # 'never' answers on the CPU


def before_terminal(dones: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: the transitions up to and including each trajectory's first terminal."""
    dones = dones.long()
    return dones.cumsum(1) - dones == 0  # no terminal strictly before t


def to_transitions(states_z: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                   dones: torch.Tensor) -> dict[str, torch.Tensor]:
    """Step 6: (s_t, a_t, r_t, s_{t+1}, done_t) for t < T-1, flattened trajectory by trajectory.

    rewards, dones: (B, T-1), of the transition t -> t+1. A trajectory stops at its first terminal: that
    transition is kept with done = 1, the later ones are dropped (they would continue from a state the
    environment never leaves)."""
    dones, keep = dones.bool(), before_terminal(dones)
    return {"obs": states_z[:, :-1][keep], "actions": actions[:, :-1][keep], "rewards": rewards[keep],
            "next_obs": states_z[:, 1:][keep], "dones": dones[keep].to(states_z.dtype)}


# -- One full round --------------------------------------------------------------------------------
def rollout_round(act_fn: ActFn, models: DyDiffModels, s0_z: torch.Tensor, cfg: RolloutConfig,
                  generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Steps 2-6 for the start states s_0 (B, obs_dim), z-scored. Returns (transitions, stats)."""
    t0 = time.time()
    iterates, times = rollout(act_fn, models, s0_z, cfg, generator)
    states_z, actions = iterates[-1]
    rewards = transition_rewards(models, states_z, actions)
    if cfg.stop_return_at_terminal:  # the dones of all B trajectories, before the filter that reads the returns
        all_dones = transition_dones(models, states_z, actions)
        returns = rewards.masked_fill(~before_terminal(all_dones), 0).sum(1)
        kept = select(returns, cfg, generator)
        dones = all_dones[kept]
    else:  # the official order: returns of all the rewards, the filter, then the dones of the kept ones
        returns = rewards.sum(1)
        kept = select(returns, cfg, generator)
        dones = transition_dones(models, states_z[kept], actions[kept])
    transitions = to_transitions(states_z[kept], actions[kept], rewards[kept], dones)
    stats = round_stats(iterates, returns, kept, dones, len(transitions["obs"]))
    return transitions, {**stats, **times, "time_s": time.time() - t0}


def round_stats(iterates: list, returns: torch.Tensor, kept: torch.Tensor, dones: torch.Tensor,
                n_transitions: int) -> dict:
    """What a round logs: counts, the share kept, the returns kept and rejected, and how far each iteration
    moved the states (large values mean the DM and the ensemble disagree)."""
    rejected = torch.ones(len(returns), dtype=torch.bool, device=returns.device)
    rejected[kept] = False
    shifts = {f"state_shift_m{m}": float(((iterates[m][0] - iterates[m - 1][0]) ** 2).mean())
              for m in range(1, len(iterates))}
    return {"n_rollouts": len(returns), "n_kept": len(kept), "kept_share": len(kept) / len(returns),
            "n_transitions": n_transitions, "return_kept_mean": float(returns[kept].mean()),
            "return_rejected_mean": float(returns[rejected].mean()) if rejected.any() else float("nan"),
            "return_mean": float(returns.mean()), "terminated_fraction": float(dones.any(1).float().mean()),
            **shifts}


# -- The picture for learners ----------------------------------------------------------------------
def plot_rollouts(path, env: str, data, act_fn: ActFn, models: DyDiffModels, s0_z: torch.Tensor,
                  cfg: RolloutConfig, generator: torch.Generator | None = None, draw_background=None) -> None:
    """PNG of (x, y) = obs dims 0, 1: a few dataset episodes (grey) and, from the given start states, the
    initial trajectory (step 2, dashed) and the final DyDiff trajectory (step 3, solid) of the policy.
    ``draw_background(ax, env)`` draws the scene first (rebuild.draw_maze: walls, goal, evaluation starts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    iterates, _ = rollout(act_fn, models, s0_z, cfg, generator)
    initial, final = (models.raw(s).cpu().numpy() for s in (iterates[0][0], iterates[-1][0]))
    fig, ax = plt.subplots(figsize=(6, 6.3))
    if draw_background is not None:
        draw_background(ax, env)
    T, starts, ends = cfg.rollout_length, data.episode_starts, data.episode_ends
    for n, e in enumerate(np.linspace(0, len(starts) - 1, min(20, len(starts))).astype(int)):
        seg = data.obs[starts[e]:min(ends[e], starts[e] + 4 * T)]
        ax.plot(seg[:, 0], seg[:, 1], color="0.6", lw=0.8, label="dataset episodes" if n == 0 else None)
    for b in range(len(final)):
        c = f"C{b % 10}"
        ax.plot(initial[b, :, 0], initial[b, :, 1], ls="--", color=c, lw=1,
                label="initial (pi in the ensemble)" if b == 0 else None)
        ax.plot(final[b, :, 0], final[b, :, 1], color=c, lw=1.8, label=f"DyDiff after M={cfg.iterations}" if b == 0 else None)
        ax.plot(initial[b, 0, 0], initial[b, 0, 1], "o", color=c, ms=5, label="start s_0" if b == 0 else None)
    ax.set(aspect="equal", xlabel="x (obs dim 0)", ylabel="y (obs dim 1)")
    ax.set_title(f"{env}: {len(final)} rollouts of T={T} steps by the final policy", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the legend below the axes stays in the image
    plt.close(fig)
