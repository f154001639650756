"""TD3+BC (Fujimoto & Gu, 2021): TD3 with a behaviour-cloning term in the actor loss.

Faithful to CORL's `algorithms/offline/td3_bc.py` hyperparameters so scores compare with its tables:
actor/critics 2x256 ReLU, deterministic tanh actor, alpha 2.5 (lambda = alpha / mean|Q|), target
policy noise 0.2 clipped at 0.5, actor and targets updated every 2 steps, tau 0.005, gamma 0.99, lr 3e-4.

Note: the official DyDiff code uses a different TD3+BC (stochastic actor, no target noise, BC term
x0.5). We keep CORL's version on purpose; results are therefore comparable to CORL, not to the paper's
TD3+BC tables.

Speed: the two critics are one module whose layers hold both members' weights, so Q1 and Q2 cost one
batched matmul per layer instead of two Python-level forward passes.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def q1(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Q1 alone, through member 0's weights only: the actor loss needs no Q2 (half the FLOPs)."""
        x = torch.cat([obs, act], -1)
        for layer in self.net:
            x = x @ layer.weight[0] + layer.bias[0] if isinstance(layer, VectorizedLinear) else layer(x)
        return x.squeeze(-1)


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, act_dim), nn.Tanh(),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class TD3BC:
    """One TD3+BC learner. `update(batch)` takes a dict of tensors (obs, actions, rewards, next_obs, dones)
    with z-scored observations and actions in [-1, 1], and returns a dict of losses."""

    def __init__(self, obs_dim: int, act_dim: int, device: str = "cpu", lr: float = 3e-4, gamma: float = 0.99,
                 tau: float = 0.005, alpha: float = 2.5, policy_noise: float = 0.2, noise_clip: float = 0.5,
                 policy_freq: int = 2, seed: int = 0):
        torch.manual_seed(seed)
        self.actor = Actor(obs_dim, act_dim).to(device)
        self.critic = TwinCritic(obs_dim, act_dim).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.gamma, self.tau, self.alpha = gamma, tau, alpha
        self.policy_noise, self.noise_clip, self.policy_freq = policy_noise, noise_clip, policy_freq
        self.total_it = 0
        # Target-noise draws come from a generator of our own so a resumed run replays them exactly.
        self.gen = torch.Generator(device=device).manual_seed(seed + 1)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        obs, act, rew, next_obs, done = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
        self.total_it += 1
        with torch.no_grad():
            noise = torch.randn(act.shape, generator=self.gen, device=act.device) * self.policy_noise
            next_act = (self.actor_target(next_obs) + noise.clamp(-self.noise_clip, self.noise_clip)).clamp(-1, 1)
            target_q = self.critic_target(next_obs, next_act).min(0).values
            target_q = rew + (1.0 - done) * self.gamma * target_q
        q = self.critic(obs, act)
        critic_loss = F.mse_loss(q, target_q.expand_as(q), reduction="none").mean(1).sum()  # = MSE(Q1) + MSE(Q2)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        if self.total_it % self.policy_freq == 0:
            pi = self.actor(obs)
            # Freeze the critic's weights here: only dQ/da is needed, so autograd skips the critic's
            # weight gradients, which this step would throw away.
            self.critic.requires_grad_(False)
            q1 = self.critic.q1(obs, pi)
            self.critic.requires_grad_(True)
            lmbda = self.alpha / q1.abs().mean().detach()  # scale-free trade-off between RL and BC
            actor_loss = -lmbda * q1.mean() + F.mse_loss(pi, act)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            with torch.no_grad():
                for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                    torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), self.tau)
            return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item(), "q_mean": q.mean().item()}
        return {"critic_loss": critic_loss.item(), "q_mean": q.mean().item()}

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action for (B, obs_dim) z-scored observations."""
        return self.actor(obs)

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "total_it": self.total_it, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt"):
            getattr(self, name).load_state_dict(state[name])
        self.total_it = state["total_it"]
        self.gen.set_state(state["gen"])
