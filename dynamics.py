"""Single-step models of DyDiff: a probabilistic dynamics ensemble f(s, a), a reward model r(s, a) and
terminal functions done(s, a, s').

DyDiff (Zhao et al., 2024) starts every rollout with the learning policy pi in the ensemble (the
paper's initial trajectory, Algorithm 1), scores the final trajectories with r(s, a) and cuts them at
the first terminal. The ensemble follows MBPO/MOPO: 7 Gaussian MLPs (4x200, SiLU) predicting the mean
and log-variance of s' - s, trained by Gaussian NLL with per-layer weight decay; the 5 members best on
a holdout set are the elites, and a rollout step uses the mean of one elite drawn per sample.

Spaces: both models take z-scored s (with the dataset's obs_mean/obs_std) and a in [-1, 1]; the
ensemble predicts the z-scored s' - s, the reward model the raw reward. Terminal and
reward functions take raw observations.

``python bench/pretrain.py --env maze2d-umaze`` trains both (or loads them from the cache beside the
dataset) and prints their holdout losses.
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import arrays_digest
from runs import code_digest, load_or_train_cached


# -- Batched ensemble layers: every member is computed in one bmm, no Python loop over members -----
class VectorizedLinear(nn.Module):
    """`n` independent linear layers applied to a (n, B, in) input with one batched matmul."""

    def __init__(self, in_features: int, out_features: int, n: int):
        super().__init__()
        bound = 1.0 / in_features**0.5  # nn.Linear's default scale, drawn independently for each member
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class BatchedMLP(nn.Module):
    """n_members SiLU MLPs with `n_layers` hidden layers of width `hidden`, evaluated together."""

    def __init__(self, n_members: int, d_in: int, d_out: int, hidden: int, n_layers: int):
        super().__init__()
        dims = [d_in] + [hidden] * n_layers + [d_out]
        self.layers = nn.ModuleList(VectorizedLinear(i, o, n_members) for i, o in zip(dims[:-1], dims[1:]))
        self.n_members = n_members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # one batch shared by every member
            x = x.expand(self.n_members, *x.shape)
        for layer in self.layers[:-1]:
            x = F.silu(layer(x))
        return self.layers[-1](x)

    def member(self, m: int, x: torch.Tensor) -> torch.Tensor:
        """Member m alone on x (B, d_in): one member's cost, where forward pays for all of them."""
        for layer in self.layers[:-1]:
            x = F.silu(torch.addmm(layer.bias[m, 0], x, layer.weight[m]))
        return torch.addmm(self.layers[-1].bias[m, 0], x, self.layers[-1].weight[m])


class Ensemble(nn.Module):
    """Probabilistic ensemble f(s, a) -> N(mean, exp(logvar)) of delta s = s' - s, z-scored."""

    def __init__(self, obs_dim: int, act_dim: int, n_members: int = 7, n_elites: int = 5,
                 hidden: int = 200, n_layers: int = 4):
        super().__init__()
        assert 1 <= n_elites <= n_members
        self.net = BatchedMLP(n_members, obs_dim + act_dim, 2 * obs_dim, hidden, n_layers)
        self.n_members, self.n_elites, self.obs_dim = n_members, n_elites, obs_dim
        # Learned soft bounds of the log-variance, one pair per member so that restoring a member's
        # best weights restores everything it depends on. Without the upper bound the NLL can buy a
        # lower loss on outliers by inflating the variance; without the lower one it collapses.
        self.max_logvar = nn.Parameter(torch.full((n_members, 1, obs_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((n_members, 1, obs_dim), -10.0))
        # MBPO's per-layer weight decay (grows with depth); the output layer gets the largest.
        self.weight_decay = [min(2.5e-5 * (i + 1), 7.5e-5) for i in range(n_layers)] + [1e-4]
        self.register_buffer("elites", torch.arange(n_elites))
        # The dataset's z-scoring, saved with the weights so that a cached ensemble can be used on raw
        # states without its dataset (bench/fidelity.py); DyDiff's rounds take theirs from the data.
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = self.net(torch.cat([s, a], -1)).chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def train_loss(self, s, a, delta) -> torch.Tensor:
        """Gaussian NLL (constant dropped), summed over members so each gets its own gradient."""
        mean, logvar = self(s, a)
        nll = ((mean - delta) ** 2 * torch.exp(-logvar) + logvar).mean((1, 2)).sum()
        bounds = 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())  # keep the bounds tight
        decay = sum(wd * 0.5 * (layer.weight ** 2).sum() for wd, layer in zip(self.weight_decay, self.net.layers))
        return nll + bounds + decay

    @torch.no_grad()
    def holdout_loss(self, s, a, delta) -> torch.Tensor:
        """MSE of each member's mean on delta s, (n_members,): the early-stopping and elite metric."""
        return ((self(s, a)[0] - delta) ** 2).mean((1, 2))

    def set_elites(self, holdout: torch.Tensor) -> None:
        self.elites = torch.argsort(holdout)[: self.n_elites].to(self.elites.device)

    @torch.no_grad()
    def step(self, s: torch.Tensor, a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """s' = s + mean of a uniformly drawn elite, drawn independently for every sample (z-scored).
        Each elite runs only on the samples that drew it."""
        pick = self.elites[torch.randint(len(self.elites), (s.shape[0],), generator=generator, device=s.device)]
        x, delta = torch.cat([s, a], -1), torch.empty_like(s)
        for m in pick.unique().tolist():
            rows = (pick == m).nonzero().squeeze(1)
            delta[rows] = self.net.member(m, x[rows])[:, : self.obs_dim]  # the mean half of the output
        return s + delta


class RewardModel(nn.Module):
    """r(s, a) with z-scored s: one MLP, stored as a 1-member BatchedMLP to share `fit`."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, n_layers: int = 2):
        super().__init__()
        self.net = BatchedMLP(1, obs_dim + act_dim, 1, hidden, n_layers)
        self.n_members = 1

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([s, a], -1))[0, :, 0]

    def train_loss(self, s, a, r) -> torch.Tensor:
        return ((self.net(torch.cat([s, a], -1))[..., 0] - r) ** 2).mean()

    @torch.no_grad()
    def holdout_loss(self, s, a, r) -> torch.Tensor:
        return ((self(s, a) - r) ** 2).mean().reshape(1)


# -- Training with holdout early stopping ----------------------------------------------------------
@dataclass
class FitConfig:
    """The training recipe of the ensemble and the reward model (defaults: train.py's cpu preset; --preset
    paper: train.PAPER_FIT, the official recipe).

    An "epoch" here is a fixed number of minibatch steps, not a pass over the data (the official code's
    epoch): on a CPU a pass of the 7x(4x200) ensemble over a 1M-transition dataset is slow enough that
    the 7-epoch patience would barely act, and the epoch caps bound pretraining. Batch 256 and lr 1e-3
    are MBPO's; the reward model has its own lr because the sparse maze2d reward (1 within 0.45 of the
    goal) is learnt faster at a higher one (bench/README.md)."""

    batch_size: int = 256
    lr: float = 1e-3
    reward_lr: float = 3e-3
    steps_per_epoch: int = 250  # 0: one pass over the training set (the official epoch)
    max_epochs: int = 16  # 0: no cap, until the patience runs out (the official rule)
    reward_max_epochs: int = 24
    patience: int = 7  # epochs without an improvement of any member before stopping
    improvement: float = 0.01  # relative holdout improvement that counts (official: any, 0)
    holdout: int = 5000  # holdout size = min(holdout, 20% of the data)
    n_members: int = 7
    n_elites: int = 5
    hidden: int = 200
    n_layers: int = 4
    reward_hidden: int = 256
    reward_layers: int = 2
    seed: int = 0  # the holdout split, the initialisation and the minibatches


def fit(model: nn.Module, train: tuple, holdout: tuple, cfg: FitConfig, max_epochs: int,
        generator: torch.Generator | None = None, desc: str = "fit", progress: bool = True) -> dict:
    """Adam on `model.train_loss`; after every epoch the holdout loss of each member. Each member
    keeps a snapshot of its own best epoch (any strict improvement); training stops once no member
    improved by more than cfg.improvement for `patience` epochs (or after max_epochs, 0 = no cap), and
    every member is then restored to its snapshot."""
    n, n_train = model.n_members, train[0].shape[0]
    steps_per_epoch = cfg.steps_per_epoch or math.ceil(n_train / cfg.batch_size)
    params = list(model.parameters())
    assert all(p.shape[0] == n for p in params), "every parameter needs a leading member dimension"
    opt = torch.optim.Adam(params, lr=cfg.lr)
    best = torch.full((n,), float("inf"))
    best_params = [p.detach().clone() for p in params]
    history, stale = [], 0
    bar = tqdm(range(max_epochs) if max_epochs else itertools.count(), desc=desc, disable=not progress, leave=True)
    for _ in bar:
        for _ in range(steps_per_epoch):
            # each member draws its own minibatch (the ensemble's independent data streams)
            idx = torch.randint(n_train, (n, cfg.batch_size), generator=generator, device=train[0].device)
            loss = model.train_loss(*(x[idx] for x in train))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss_h = model.holdout_loss(*holdout).cpu()
        history.append(loss_h.tolist())
        better = loss_h < best
        stale = 0 if bool((loss_h < best * (1 - cfg.improvement)).any()) else stale + 1
        mask = better.to(params[0].device)
        for p, b in zip(params, best_params):
            b.copy_(torch.where(mask.view(-1, *[1] * (p.dim() - 1)), p.detach(), b))
        best = torch.where(better, loss_h, best)
        bar.set_postfix(holdout=f"{loss_h.mean():.4g}", best=f"{best.mean():.4g}", stale=stale)
        if stale >= cfg.patience:
            break
    with torch.no_grad():
        for p, b in zip(params, best_params):
            p.copy_(b)
    return {"history": history, "best": best.tolist(), "epochs": len(history)}


def _zscored_tensors(data, idx: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    s = data.normalize_obs(data.obs[idx])
    delta = data.normalize_obs(data.next_obs[idx]) - s
    return tuple(torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
                 for x in (s, data.actions[idx], delta, data.rewards[idx]))


def train_models(data, cfg: FitConfig, device="cpu", progress: bool = True):
    """Fit the ensemble and the reward model on one random holdout split of the transitions."""
    seed = cfg.seed
    torch.manual_seed(seed)
    n = len(data.obs)
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = min(cfg.holdout, int(0.2 * n))
    s, a, delta, r = _zscored_tensors(data, perm[n_hold:], device)
    s_h, a_h, delta_h, r_h = _zscored_tensors(data, perm[:n_hold], device)
    g = torch.Generator(device).manual_seed(seed)
    obs_dim, act_dim = s.shape[1], a.shape[1]
    t0 = time.time()
    ens = Ensemble(obs_dim, act_dim, cfg.n_members, cfg.n_elites, cfg.hidden, cfg.n_layers).to(device)
    ens.obs_mean.copy_(torch.as_tensor(data.obs_mean))
    ens.obs_std.copy_(torch.as_tensor(data.obs_std))
    ens_fit = fit(ens, (s, a, delta), (s_h, a_h, delta_h), cfg, cfg.max_epochs, g, "ensemble", progress)
    ens.set_elites(torch.tensor(ens_fit["best"]))
    t1 = time.time()
    rew = RewardModel(obs_dim, act_dim, cfg.reward_hidden, cfg.reward_layers).to(device)
    rew_fit = fit(rew, (s, a, r), (s_h, a_h, r_h), replace(cfg, lr=cfg.reward_lr), cfg.reward_max_epochs, g,
                  "reward", progress)
    t2 = time.time()
    member = ens_fit["best"]
    info = {"ensemble_holdout_mse": float(np.mean([member[i] for i in ens.elites.tolist()])),
            "ensemble_holdout_mse_members": member, "elites": ens.elites.tolist(),
            "reward_holdout_mse": rew_fit["best"][0], "reward_variance": float(data.rewards.var()),
            "ensemble_epochs": ens_fit["epochs"], "reward_epochs": rew_fit["epochs"],
            "ensemble_time_s": t1 - t0, "reward_time_s": t2 - t1, "train_time_s": t2 - t0,
            "n_train": n - n_hold, "n_holdout": n_hold}
    return ens, rew, info


# -- Cache: trained once per dataset, settings and code, then loaded (data.load_or_train_cached) ---
def code_digests() -> dict[str, str]:
    """The code that defines and trains the ensemble and the reward model, as the cache key's digests: this
    file without what only the rollouts use (the ensemble's step, the terminal and reward functions) and
    data.py's flattening. An edit there retrains them; an edit to a comment or a docstring does not."""
    skip = ("Ensemble.step", "terminal_fn", "_maze2d_reward", "env_reward_fn")
    return {"dynamics.py": code_digest(sys.modules[__name__], skip=skip), "data.py": arrays_digest()}


def load_or_train(data, cfg: FitConfig | None = None, device="cpu", retrain: bool = False,
                  progress: bool = True) -> tuple[Ensemble, RewardModel, dict]:
    """(ensemble, reward model, info) for `data`: from the cache beside the dataset, else trained now."""
    cfg = cfg or FitConfig()

    def train():
        ens, rew, info = train_models(data, cfg, device, progress)
        return {"info": info, "ensemble": ens.state_dict(), "reward": rew.state_dict()}

    ckpt, path, cached = load_or_train_cached(data, "dynamics", asdict(cfg), code_digests(), train, device, retrain)
    ens = Ensemble(data.obs_dim, data.act_dim, cfg.n_members, cfg.n_elites, cfg.hidden, cfg.n_layers).to(device)
    rew = RewardModel(data.obs_dim, data.act_dim, cfg.reward_hidden, cfg.reward_layers).to(device)
    ens.load_state_dict(ckpt["ensemble"])
    rew.load_state_dict(ckpt["reward"])
    info = ckpt["info"]
    print(f"ensemble and reward model: {'loaded' if cached else 'trained and saved'} {path} (holdout MSE "
          f"{info['ensemble_holdout_mse']:.3g} and {info['reward_holdout_mse']:.3g}, {info['train_time_s']:.0f} s)")
    return ens, rew, {**ckpt["info"], "path": str(path), "cached": cached}


# -- Terminal functions on raw (s, a, s') ----------------------------------------------------------
def terminal_fn(env: str):
    """done(s, a, s') -> bool (B,) for a D4RL-style name. NaN states fail every comparison, so they
    count as terminal for hopper and walker2d."""
    def hopper(s, a, s_next):  # gym's healthy check: all of s'[1:] bounded, not just the velocities
        s_next = torch.as_tensor(s_next)
        healthy = (s_next[:, 1:].abs() < 100).all(-1) & (s_next[:, 0] > 0.7) & (s_next[:, 1].abs() < 0.2)
        return ~healthy

    def walker2d(s, a, s_next):
        s_next = torch.as_tensor(s_next)
        h, ang = s_next[:, 0], s_next[:, 1]
        return ~((h > 0.8) & (h < 2.0) & (ang > -1.0) & (ang < 1.0))

    def never(s, a, s_next):
        return torch.zeros(len(s_next), dtype=torch.bool)

    fns = {"hopper": hopper, "walker2d": walker2d, "halfcheetah": never, "maze2d": never}
    if env.split("-")[0] not in fns:
        raise ValueError(f"no terminal function for '{env}': known prefixes {', '.join(fns)}")
    return fns[env.split("-")[0]]


def _maze2d_reward(s, a, s_next):
    s_next = torch.as_tensor(s_next)
    return ((s_next[:, :2] - s_next[:, 4:6]).norm(dim=-1) <= 0.45).to(s_next.dtype)


# Tasks whose reward is a known function of the state, by env-name prefix (train.py --reward env / auto)
ENV_REWARDS = {"maze2d": _maze2d_reward}


def env_reward_fn(env: str):
    """The task's own reward r(s, a, s') -> (N,) on raw states, where it is a function of the state: maze2d's
    sparse reward is 1 when the ball ends the step within 0.45 of the goal (gymnasium-robotics PointMaze),
    obs = [x, y, vx, vy, goal_x, goal_y]. The learned r(s, a) never sees a state inside that circle (the
    data cuts an episode at every success), so on the states where DyDiff's policy sits at the goal it
    extrapolates (bench/README.md, DyDiff vs the plain learner). Locomotion rewards need
    velocities the observation lacks, so they have no such function."""
    if env.split("-")[0] not in ENV_REWARDS:
        raise ValueError(f"no known reward function for '{env}' (only maze2d has one): use --reward model")
    return ENV_REWARDS[env.split("-")[0]]

