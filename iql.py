"""IQL, Implicit Q-Learning (Kostrikov, Nair & Levine, 2021).

Faithful to CORL's `algorithms/offline/iql.py`: expectile regression of V toward min(Q1, Q2) of the
target critics (expectile 0.7), Q regressed toward r + gamma * V(s'), advantage-weighted regression
for the actor with weights exp(beta * A) clipped at 100 (beta 3.0), Gaussian actor with tanh mean and
state-independent log-std clamped to [-20, 2], cosine decay of the actor's learning rate, lr 3e-4,
tau 0.005, gamma 0.99. The deterministic action used for evaluation is the Gaussian's mean. CORL's
deterministic variant (its iql_deterministic, used on hopper-medium and -medium-replay) replaces the
Gaussian's log-likelihood by the squared error of a tanh MLP's action.

Speed: the two critics are one module whose layers hold both members' weights (one batched matmul).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
EXP_ADV_MAX = 100.0


class VectorizedLinear(nn.Module):
    """`n` independent linear layers applied to a (n, B, in) input with one batched matmul."""

    def __init__(self, in_features: int, out_features: int, n: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # the same init as nn.Linear, per member
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinCritic(nn.Module):
    """Q1 and Q2 in one module: forward returns a (2, B) tensor."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, n: int = 2):
        super().__init__()
        self.n = n
        self.net = nn.Sequential(
            VectorizedLinear(obs_dim + act_dim, hidden, n), nn.ReLU(),
            VectorizedLinear(hidden, hidden, n), nn.ReLU(),
            VectorizedLinear(hidden, 1, n),
        )

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1).unsqueeze(0).expand(self.n, -1, -1)
        return self.net(x).squeeze(-1)


def mlp(inp: int, out: int, hidden: int = 256, out_act: nn.Module | None = None) -> nn.Sequential:
    layers = [nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out)]
    return nn.Sequential(*layers, *([out_act] if out_act is not None else []))


class GaussianActor(nn.Module):
    """N(tanh-squashed mean(s), exp(log_std)); log_std is a free parameter, not a function of s."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.mean = mlp(obs_dim, act_dim, out_act=nn.Tanh())
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: torch.Tensor) -> torch.distributions.Normal:
        std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
        return torch.distributions.Normal(self.mean(obs), std)

    def bc_loss(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Per-sample negative log-likelihood of the dataset's actions (B,)."""
        return -self(obs).log_prob(act).sum(-1)


class DeterministicActor(nn.Module):
    """a = tanh-MLP(s), trained by advantage-weighted squared error (CORL's DeterministicPolicy)."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.mean = mlp(obs_dim, act_dim, out_act=nn.Tanh())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mean(obs)

    def bc_loss(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Per-sample squared error to the dataset's actions (B,)."""
        return ((self(obs) - act) ** 2).sum(-1)


def expectile_loss(u: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric L2: residuals with u > 0 (Q above V) weigh `expectile`, the others 1 - expectile."""
    weight = torch.where(u > 0, expectile, 1.0 - expectile)
    return (weight * u.pow(2)).mean()


class IQL:
    """One IQL learner. `update(batch)` takes a dict of tensors (obs, actions, rewards, next_obs, dones)
    with z-scored observations and actions in [-1, 1], and returns a dict of losses."""

    def __init__(self, obs_dim: int, act_dim: int, device: str = "cpu", lr: float = 3e-4, gamma: float = 0.99,
                 tau: float = 0.005, expectile: float = 0.7, beta: float = 3.0, max_steps: int = 1_000_000,
                 seed: int = 0, deterministic: bool = False):
        torch.manual_seed(seed)
        self.actor = (DeterministicActor if deterministic else GaussianActor)(obs_dim, act_dim).to(device)
        self.critic = TwinCritic(obs_dim, act_dim).to(device)
        self.value = mlp(obs_dim, 1).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=lr)
        # Cosine decay over the whole run, as CORL: the actor's weighted-BC target is noisy early on.
        self.actor_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_opt, max_steps)
        self.gamma, self.tau, self.expectile, self.beta = gamma, tau, expectile, beta
        self.total_it = 0

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        obs, act, rew, next_obs, done = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
        self.total_it += 1
        # V step: expectile of the target critics' min(Q1, Q2) over the dataset's actions.
        with torch.no_grad():
            target_q = self.critic_target(obs, act).min(0).values
            next_v = self.value(next_obs).squeeze(-1)
        v = self.value(obs).squeeze(-1)
        adv = target_q - v
        value_loss = expectile_loss(adv, self.expectile)
        self.value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_opt.step()

        # Q step: one-step TD toward V(s'), so no action outside the data is ever queried.
        q_target = rew + (1.0 - done) * self.gamma * next_v
        q = self.critic(obs, act)
        critic_loss = F.mse_loss(q, q_target.expand_as(q))  # = (MSE(Q1) + MSE(Q2)) / 2, as CORL
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        # Actor step: advantage-weighted log-likelihood (or squared error) of the dataset's actions.
        exp_adv = torch.exp(self.beta * adv.detach()).clamp(max=EXP_ADV_MAX)
        actor_loss = (exp_adv * self.actor.bc_loss(obs, act)).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.actor_sched.step()

        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), self.tau)
        return {"value_loss": value_loss.item(), "critic_loss": critic_loss.item(),
                "actor_loss": actor_loss.item(), "q_mean": q.mean().item()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action (the Gaussian's mean) for (B, obs_dim) z-scored observations."""
        return self.actor.mean(obs).clamp(-1.0, 1.0)

    def state_dict(self) -> dict:
        names = ("actor", "critic", "value", "critic_target", "actor_opt", "critic_opt", "value_opt", "actor_sched")
        return {**{n: getattr(self, n).state_dict() for n in names}, "total_it": self.total_it}

    def load_state_dict(self, state: dict) -> None:
        for n in ("actor", "critic", "value", "critic_target", "actor_opt", "critic_opt", "value_opt", "actor_sched"):
            getattr(self, n).load_state_dict(state[n])
        self.total_it = state["total_it"]
