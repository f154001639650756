"""Dynamics diffusion model of DyDiff: EDM + temporal U-Net over trajectory segments (DESIGN.md section 4).

A segment is H rows [s_t, a_t] in the dataset's min-max [-1, 1] box. The model is conditioned by
inpainting on the first state s_0 and on every action a_0..a_{H-1}, so it generates s_1..s_{H-1}:
the DM acts as a multi-step dynamics model driven by someone else's actions.

Departure from the official code (DESIGN.md 4.1): besides inpainting, the clean conditions are fed
as extra, *unscaled* input channels (each row's action, and s_0 repeated on every row). With
inpainting alone they reach the network scaled by c_in ~ 1/sigma, so at high noise it ignores them
and needs ~100x more training steps than a CPU budget allows.

Defaults, CPU (this file) vs official DyDiff (GPU, ~59M params):
    H 32 vs 100 | dim 32 vs 128 | dim_mults (1,2,4) vs (1,4,8) (1.03M params) | batch 64 | Adam 5e-4,
    200-step warm-up, EMA 0.999 | 4000 gradient steps vs ~375k | Heun sampler N=20 vs 34 steps.
    4000 steps took 12 min on 1 thread with other jobs sharing the 2 cores (0.17 s/step); DESIGN.md 4.1
    measured ~0.11 s/step for this size on a quieter machine (~7.5 min).
Longer horizons are reached by chaining H-windows (``generate_long``).

``python diffusion.py --env maze2d-umaze`` trains and caches the model, then compares its rollout
accuracy against the simulator with the ensemble's (the paper's Figure 3) and writes a PNG and JSON.
On maze2d-umaze the DM beats the ensemble's position error from h=17 on rollouts that stay inside one
episode, but not when the replayed actions cross a success (the goal in the state then no longer
matches where the actions go, a situation absent from its training segments): see ``fidelity``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2  # training noise levels: ln(sigma) ~ N(P_MEAN, P_STD^2)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
# Official DyDiff churn settings; gamma = min(S_churn/N, sqrt(2)-1) saturates for any N <= 145.
S_CHURN, S_MIN, S_MAX, S_NOISE = 60.0, 0.37, 52.24, 1.002
MODEL_VERSION = 2  # part of the cache key: bump whenever the network's inputs or layout change


# --------------------------------------------------------------------------------------------------
# Temporal U-Net (Diffuser-style, 1-D convolutions over time)
# --------------------------------------------------------------------------------------------------
class ConvBlock(nn.Sequential):
    """Conv1d(k5) -> GroupNorm(8) -> Mish, length preserving."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 5):
        super().__init__(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(8, c_out), nn.Mish())


class ResidualTemporalBlock(nn.Module):
    """Two conv blocks with the noise embedding added in between, plus a (1x1 conv) residual path."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int):
        super().__init__()
        self.block1, self.block2 = ConvBlock(c_in, c_out), ConvBlock(c_out, c_out)
        self.embed = nn.Sequential(nn.Mish(), nn.Linear(embed_dim, c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.embed(emb)[:, :, None]
        return self.block2(h) + self.skip(x)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise, then an MLP. c_noise = ln(sigma)/4 spans only ~[-1.6, 1.1], so it
    is stretched by ``scale`` first (measured: unstretched, as in EDM's own nets, trained slower here)."""

    def __init__(self, dim: int, scale: float = 100.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000.0) * torch.arange(half) / half) * scale)
        self.mlp = nn.Sequential(nn.Linear(2 * half, 4 * dim), nn.Mish(), nn.Linear(4 * dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        phase = c_noise[:, None] * self.freqs[None]
        return self.mlp(torch.cat([phase.sin(), phase.cos()], dim=-1))


class TemporalUnet(nn.Module):
    """F_theta of EDM: (B, H, transition_dim + cond_dim) inputs -> (B, H, transition_dim) outputs.

    Each of the len(dim_mults) levels has two residual blocks; all but the deepest halve the length,
    so H must be divisible by 2 ** (len(dim_mults) - 1). Channel widths are dim * mult (multiples of 8
    for GroupNorm(8)).
    """

    def __init__(self, transition_dim: int, cond_dim: int = 0, dim: int = 32, dim_mults=(1, 2, 4)):
        super().__init__()
        if dim % 8:
            raise ValueError(f"dim={dim} must be a multiple of 8 (GroupNorm uses 8 groups)")
        self.transition_dim, self.cond_dim = transition_dim, cond_dim
        self.downsampling = 2 ** (len(dim_mults) - 1)
        widths = [transition_dim + cond_dim] + [dim * m for m in dim_mults]
        pairs = list(zip(widths[:-1], widths[1:]))
        self.embed = NoiseEmbedding(dim)
        self.downs = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.downs.append(nn.ModuleList([
                ResidualTemporalBlock(c_in, c_out, dim), ResidualTemporalBlock(c_out, c_out, dim),
                nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1)]))
        mid = widths[-1]
        self.mid1, self.mid2 = ResidualTemporalBlock(mid, mid, dim), ResidualTemporalBlock(mid, mid, dim)
        self.ups = nn.ModuleList()
        # Going up: upsample, concatenate the skip saved at that resolution on the way down, two blocks.
        # The deepest level's output is the mid blocks' input, so it needs no skip.
        for level in reversed(range(len(dim_mults) - 1)):
            c_skip, c_h = widths[level + 1], widths[level + 2]
            self.ups.append(nn.ModuleList([
                nn.ConvTranspose1d(c_h, c_h, 4, stride=2, padding=1),
                ResidualTemporalBlock(c_h + c_skip, c_skip, dim), ResidualTemporalBlock(c_skip, c_skip, dim)]))
        self.final = nn.Sequential(ConvBlock(widths[1], dim), nn.Conv1d(dim, transition_dim, 1))

    def check_horizon(self, H: int) -> None:
        k = self.downsampling
        if H % k or H == 0:
            near = sorted({max(k, H // k * k), (H // k + 1) * k})
            raise ValueError(f"horizon H={H} must be a multiple of {k} (the U-Net halves it {len(self.downs) - 1} "
                             f"times): use H in {near} or fewer dim_mults")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        self.check_horizon(x.shape[1])
        emb = self.embed(c_noise)
        h, skips = x.transpose(1, 2), []  # Conv1d wants (B, channels, time)
        for block1, block2, down in self.downs:
            h = block2(block1(h, emb), emb)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid1(h, emb), emb)
        skips.pop()
        for up, block1, block2 in self.ups:
            h = block2(block1(torch.cat([up(h), skips.pop()], dim=1), emb), emb)
        return self.final(h).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# EDM around the U-Net
# --------------------------------------------------------------------------------------------------
class DynamicsDiffusion(nn.Module):
    """EDM denoiser over segments with conditioning on s_0 and the actions, an EMA copy for sampling,
    and the min-max box of [obs, act] (buffers, so the checkpoint carries them)."""

    def __init__(self, obs_dim: int, act_dim: int, horizon: int = 32, dim: int = 32, dim_mults=(1, 2, 4),
                 x_min: torch.Tensor | None = None, x_max: torch.Tensor | None = None):
        super().__init__()
        self.obs_dim, self.act_dim, self.horizon = obs_dim, act_dim, horizon
        D = obs_dim + act_dim
        self.net = TemporalUnet(D, cond_dim=D, dim=dim, dim_mults=dim_mults)
        self.net.check_horizon(horizon)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.register_buffer("x_min", torch.full((D,), -1.0) if x_min is None else torch.as_tensor(x_min).float())
        self.register_buffer("x_max", torch.full((D,), 1.0) if x_max is None else torch.as_tensor(x_max).float())

    # ---- coordinate spaces (DESIGN.md section 3) ----
    def normalize(self, x_raw: torch.Tensor, cols: slice = slice(None)) -> torch.Tensor:
        lo, hi = self.x_min[cols], self.x_max[cols]
        return 2 * (x_raw - lo) / (hi - lo).clamp(min=1e-6) - 1

    def unnormalize(self, x: torch.Tensor, cols: slice = slice(None)) -> torch.Tensor:
        lo, hi = self.x_min[cols], self.x_max[cols]
        return (x.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo  # clip first: stay inside the dataset's box

    def cond_mask(self, H: int | None = None) -> torch.Tensor:
        """(H, D) bool: True where the entry is given (s_0 and every action), False where generated."""
        mask = torch.zeros(H or self.horizon, self.obs_dim + self.act_dim, dtype=torch.bool, device=self.x_min.device)
        mask[0, : self.obs_dim] = True
        mask[:, self.obs_dim:] = True
        return mask

    # ---- EDM preconditioning ----
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                net: nn.Module | None = None) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), with the conditions inpainted in x and in
        the output, and passed again as unscaled channels: each row's action and s_0 on *every* row."""
        net = self.net if net is None else net
        sigma = sigma.reshape(-1, 1, 1)
        x = torch.where(cond_mask, cond, x)
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
        c_in = 1 / (sigma**2 + SIGMA_DATA**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        # s_0 is repeated on every row so that each row sees it directly; given only at row 0, the
        # U-Net had to carry it along the whole segment and learnt ~10x slower (measured, h1 error).
        given = torch.where(cond_mask, cond, 0.0).expand_as(x)
        given = torch.cat([given[:, :1, : self.obs_dim].expand(-1, x.shape[1], -1), given[:, :, self.obs_dim:]], -1)
        F_x = net(torch.cat([c_in * x, given], dim=-1), c_noise)
        return torch.where(cond_mask, cond, c_skip * x + c_out * F_x)

    def loss(self, x: torch.Tensor, cond_mask: torch.Tensor, loss_mask: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """EDM loss on the generated entries of valid rows. x: (B, H, D) clean segments in [-1, 1];
        cond_mask: (H, D) or (B, H, D); loss_mask: (B, H), True on real rows (a prefix of each segment).

        Padded rows are overwritten with the last real row before anything else, so neither their loss
        nor their content (which the convolutions would otherwise see) depends on what the caller put there."""
        B, H, _ = x.shape
        last = (loss_mask.sum(1) - 1).clamp(min=0)
        idx = torch.where(loss_mask, torch.arange(H, device=x.device)[None], last[:, None])
        x = torch.gather(x, 1, idx[..., None].expand_as(x))
        sigma = (P_MEAN + P_STD * torch.randn(B, device=x.device, generator=generator)).exp()
        noise = torch.randn(x.shape, device=x.device, generator=generator) * sigma[:, None, None]
        weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
        err = weight[:, None, None] * (self.denoise(x + noise, sigma, x, cond_mask) - x) ** 2
        keep = (~cond_mask & loss_mask[..., None]).float()
        return (err * keep).sum() / keep.sum().clamp(min=1)

    @torch.no_grad()
    def update_ema(self, step: int, decay: float = 0.999) -> None:
        decay = min(decay, (1 + step) / (10 + step))  # short memory early, when the weights move fast
        for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
            p_ema.lerp_(p, 1 - decay)

    # ---- sampling ----
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, cond_mask: torch.Tensor, n_steps: int = 20,
               generator: torch.Generator | None = None, S_churn: float = S_CHURN, S_min: float = S_MIN,
               S_max: float = S_MAX, S_noise: float = S_NOISE) -> torch.Tensor:
        """EDM Heun sampler with churn (Karras et al. 2022, Algorithm 2) using the EMA weights.
        cond: (B, H, D) values in [-1, 1] at the cond_mask entries. Returns (B, H, D) in [-1, 1] space."""
        i = torch.arange(n_steps, dtype=torch.float64)
        t = (SIGMA_MAX ** (1 / RHO) + i / max(n_steps - 1, 1) * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
        t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()  # t_N = 0
        B = cond.shape[0]
        x = torch.randn(cond.shape, device=cond.device, generator=generator) * t[0]
        x = torch.where(cond_mask, cond, x)
        for t_cur, t_next in zip(t[:-1], t[1:]):
            gamma = min(S_churn / n_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
            t_hat = t_cur * (1 + gamma)  # churn: add noise to climb back up to t_hat, then step down
            if gamma > 0:
                eps = torch.randn(x.shape, device=x.device, generator=generator) * S_noise
                x = torch.where(cond_mask, cond, x + math.sqrt(t_hat**2 - t_cur**2) * eps)
            d = (x - self.denoise(x, torch.full((B,), t_hat, device=x.device), cond, cond_mask, self.ema)) / t_hat
            x_next = x + (t_next - t_hat) * d
            if t_next > 0:  # Heun's 2nd-order correction, skipped on the last step to sigma = 0
                d2 = (x_next - self.denoise(x_next, torch.full((B,), t_next, device=x.device), cond, cond_mask,
                                            self.ema)) / t_next
                x_next = x + (t_next - t_hat) * (d + d2) / 2
            x = torch.where(cond_mask, cond, x_next)
        return x

    @torch.no_grad()
    def generate(self, s0_raw: torch.Tensor, actions: torch.Tensor, n_steps: int = 20,
                 generator: torch.Generator | None = None, **sampler) -> torch.Tensor:
        """Raw states (B, H, obs_dim) for raw s_0 (B, obs_dim) and actions (B, H, act_dim); index 0 is s_0."""
        B, H, _ = actions.shape
        if H != self.horizon:
            raise ValueError(f"generate needs exactly H={self.horizon} actions (got {H}): use generate_long")
        dev, obs = self.x_min.device, slice(0, self.obs_dim)
        s0_raw = s0_raw.to(dev, torch.float32)
        cond = torch.zeros(B, H, self.obs_dim + self.act_dim, device=dev)
        cond[:, 0, obs] = self.normalize(s0_raw, obs)
        cond[:, :, self.obs_dim:] = self.normalize(actions.to(dev, torch.float32), slice(self.obs_dim, None))
        x = self.sample(cond.clamp(-1, 1), self.cond_mask(H), n_steps, generator, **sampler)
        states = self.unnormalize(x[..., obs], obs)
        states[:, 0] = s0_raw  # exact, not a normalize/unnormalize round trip
        return states


@torch.no_grad()
def generate_long(model: DynamicsDiffusion, s0_raw: torch.Tensor, actions: torch.Tensor, n_steps: int = 20,
                  generator: torch.Generator | None = None, stride: int | None = None, **sampler) -> torch.Tensor:
    """Chain H-windows to any length T: states (B, T+1, obs_dim) for actions (B, T, act_dim), index 0 = s_0.

    Each window keeps its first ``stride`` transitions (at most H-1, the default) and the next window starts
    from the last kept state. The last window is shifted back to end exactly at s_T, starting from an
    earlier generated state: padding it with invented actions instead (the DM is not causal, every row
    sees every action) spoilt the states next to the padding. A window needs one action more than it
    has transitions; where the data end, the final action is repeated."""
    B, T, _ = actions.shape
    H = model.horizon
    stride = min(stride or H - 1, H - 1)
    traj = torch.empty(B, T + 1, model.obs_dim, device=model.x_min.device)
    traj[:, 0] = s0_raw.to(traj)
    covered = 0  # states 0..covered are done
    while covered < T:
        start = covered if covered + H - 1 <= T else max(T - (H - 1), 0)
        end = min(start + stride, T) if start == covered else T
        window = actions[:, start:start + H]
        if window.shape[1] < H:
            window = torch.cat([window, window[:, -1:].expand(-1, H - window.shape[1], -1)], dim=1)
        out = model.generate(traj[:, start], window, n_steps, generator, **sampler)
        traj[:, covered + 1:end + 1] = out[:, covered - start + 1:end - start + 1]
        covered = end
    return traj


# --------------------------------------------------------------------------------------------------
# Data: segments of length H inside episodes
# --------------------------------------------------------------------------------------------------
def segment_index(episode_starts: np.ndarray, episode_ends: np.ndarray, H: int) -> tuple[np.ndarray, np.ndarray]:
    """(first row, number of real rows) of every segment: all full H-windows inside each episode, and one
    shorter, padded segment for an episode shorter than H."""
    starts, lengths = [], []
    for s, e in zip(episode_starts, episode_ends):
        L = int(e - s)
        n = max(L - H + 1, 1)
        starts.append(np.arange(s, s + n))
        lengths.append(np.full(n, min(L, H)))
    return np.concatenate(starts).astype(np.int64), np.concatenate(lengths).astype(np.int64)


def gather_segments(X: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, H: int):
    """Rows X[start : start+H] (B, H, D) and their mask (B, H); padded rows repeat the last real row."""
    offs = torch.arange(H)
    mask = offs[None] < lengths[:, None]
    rows = starts[:, None] + torch.minimum(offs[None], lengths[:, None] - 1)
    return X[rows], mask


def train(model: DynamicsDiffusion, X: torch.Tensor, starts: np.ndarray, lengths: np.ndarray, train_steps: int,
          batch_size: int = 64, lr: float = 5e-4, warmup: int = 200, seed: int = 0, progress: bool = True) -> dict:
    """Adam with a linear warm-up on random segments of X (N, D) (normalized rows); EMA after every step."""
    from tqdm import tqdm

    dev = model.x_min.device
    gen = torch.Generator().manual_seed(seed)
    starts_t, lengths_t = torch.as_tensor(starts), torch.as_tensor(lengths)
    cond_mask = model.cond_mask()
    opt = torch.optim.Adam(model.net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup))
    losses, curve, t0, cpu0 = [], [], time.time(), time.process_time()
    bar = tqdm(range(train_steps), desc="diffusion", disable=not progress, mininterval=2.0)
    for step in bar:
        pick = torch.randint(len(starts_t), (batch_size,), generator=gen)
        x, mask = gather_segments(X, starts_t[pick], lengths_t[pick], model.horizon)
        loss = model.loss(x.to(dev), cond_mask, mask.to(dev), generator=gen if dev == torch.device("cpu") else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
        opt.step()
        sched.step()
        model.update_ema(step)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == train_steps:
            curve.append([step + 1, float(np.mean(losses[-100:]))])  # per-step loss is noisy (random sigma)
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
    # cpu_seconds ~ the wall time on an idle core (torch runs single-threaded here by default)
    return {"train_seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0, "train_steps": train_steps,
            "final_loss": float(np.mean(losses[-200:])), "first_loss": float(np.mean(losses[:50])),
            "loss_curve": curve}


# --------------------------------------------------------------------------------------------------
# Cache: one checkpoint per dataset fingerprint and settings
# --------------------------------------------------------------------------------------------------
def load_checkpoint(path: Path, fingerprint: str | None = None, settings: dict | None = None,
                    device: str = "cpu") -> tuple[DynamicsDiffusion, dict]:
    """Rebuild a model from a checkpoint; refuse one made for another dataset or other settings."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, foreign or unsafe to unpickle
        raise ValueError(f"cannot read {path} ({type(exc).__name__}): it is truncated or not a DM checkpoint; "
                         f"delete it and it will be retrained") from None
    if not isinstance(ckpt, dict) or not {"fingerprint", "settings", "state_dict"} <= ckpt.keys():
        raise ValueError(f"{path} is not a DM checkpoint: delete it and it will be retrained")
    if fingerprint is not None and ckpt["fingerprint"] != fingerprint:
        raise ValueError(f"{path} was trained on another dataset (fingerprint {ckpt['fingerprint']} != "
                         f"{fingerprint}): delete it or retrain (--retrain)")
    if settings is not None and ckpt["settings"] != settings:
        raise ValueError(f"{path} has settings {ckpt['settings']}, wanted {settings}: delete it or retrain (--retrain)")
    s = ckpt["settings"]
    model = DynamicsDiffusion(s["obs_dim"], s["act_dim"], s["H"], s["dim"], tuple(s["dim_mults"])).to(device)
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt["info"]


def load_or_train(data, env: str | None = None, H: int = 32, dim: int = 32, dim_mults=(1, 2, 4),
                  train_steps: int = 4000, batch_size: int = 64, lr: float = 5e-4, device: str = "cpu",
                  seed: int = 0, retrain: bool = False, progress: bool = True) -> tuple[DynamicsDiffusion, dict]:
    """The DM for ``data`` (an OfflineData): from data.cache_dir when trained before with the same
    settings, else trained now and saved there. ``env`` (the dataset name) only labels messages."""
    obs_dim, act_dim = data.obs.shape[1], data.actions.shape[1]
    settings = {"version": MODEL_VERSION, "obs_dim": obs_dim, "act_dim": act_dim, "H": H, "dim": dim,
                "dim_mults": list(dim_mults), "train_steps": train_steps, "batch_size": batch_size, "lr": lr,
                "seed": seed}
    key = hashlib.sha256(json.dumps([data.fingerprint, settings], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(data.cache_dir) / f"diffusion_{key}.pt"
    name = env or data.dataset_id
    if path.exists() and not retrain:
        model, info = load_checkpoint(path, data.fingerprint, settings, device)
        print(f"diffusion model for {name}: loaded {path} (trained {info['train_steps']} steps, "
              f"{info['train_seconds']:.0f} s, final loss {info['final_loss']:.4f})")
        return model, {**info, "path": str(path), "cached": True}

    raw = np.concatenate([data.obs, data.actions], axis=1)
    x_min, x_max = torch.as_tensor(raw.min(0)), torch.as_tensor(raw.max(0))
    torch.manual_seed(seed)  # network initialisation
    model = DynamicsDiffusion(obs_dim, act_dim, H, dim, dim_mults, x_min, x_max).to(device)
    X = model.normalize(torch.as_tensor(raw).to(device)).cpu()
    starts, lengths = segment_index(data.episode_starts, data.episode_ends, H)
    n_params = sum(p.numel() for p in model.net.parameters())
    print(f"training diffusion model for {name}: {len(starts)} segments of H={H}, {n_params / 1e6:.2f}M params, "
          f"{train_steps} steps of batch {batch_size}")
    info = train(model, X, starts, lengths, train_steps, batch_size, lr, seed=seed, progress=progress)
    info.update(settings=settings, n_params=n_params, n_segments=len(starts), env=name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "settings": settings, "fingerprint": data.fingerprint,
                "info": info}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
    print(f"diffusion model: {info['train_seconds']:.0f} s, final loss {info['final_loss']:.4f} -> {path}")
    return model, {**info, "path": str(path), "cached": False}


# --------------------------------------------------------------------------------------------------
# Rollout accuracy against the simulator (the paper's Figure 3)
# --------------------------------------------------------------------------------------------------
def dm_predict(model: DynamicsDiffusion, n_steps: int = 20, seed: int = 0, stride: int | None = None):
    """The DM as a ``predict(s0, actions) -> states`` callable on numpy arrays (dynamics.rollout_error's API)."""
    gen = torch.Generator().manual_seed(seed)

    def predict(s0: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return generate_long(model, torch.as_tensor(s0), torch.as_tensor(actions), n_steps, gen, stride).cpu().numpy()

    return predict


def crossings(a: list, b: list, horizons: list) -> dict:
    """Where curve a (DM) goes below curve b (ensemble): first horizon at all, and the horizon from which
    it stays below to the end (None when never / when it ends above)."""
    below = np.asarray(a) < np.asarray(b)
    above = np.flatnonzero(~below)
    stays = None if not below[-1] else int(horizons[above[-1] + 1 if len(above) else 0])
    return {"first_below": int(horizons[np.argmax(below)]) if below.any() else None, "stays_below_from": stays}


def in_episode_rollout_error(predict, data, horizon: int = 100, n_starts: int = 256, seed: int = 0) -> dict:
    """dynamics.rollout_error restricted to starts whose next ``horizon`` steps stay inside one episode.

    The maze2d run is continuous, so rollout_error's action windows often cross a success, after which
    the actions chase a new goal while the state (and the simulator) keep the old one. The DM never saw
    that (its segments stay inside episodes), and DyDiff's policy actions always chase the state's goal."""
    import dynamics

    ok = np.concatenate([np.arange(s, e - horizon + 1) for s, e in zip(data.episode_starts, data.episode_ends)
                         if e - s >= horizon])
    t0 = np.random.default_rng(seed).choice(ok, size=min(n_starts, len(ok)), replace=False)
    s0, actions = data.obs[t0], data.actions[t0[:, None] + np.arange(horizon)]
    err = (np.asarray(predict(s0.copy(), actions.copy())) - dynamics.simulate(data, s0, actions))[:, 1:] ** 2
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
             n_steps: int = 20, device: str = "cpu", seed: int = 0, progress: bool = True) -> dict:
    """DM (chained H-windows) vs the single-step ensemble against the simulator on the same starts: any
    dataset start (dynamics.rollout_error) and starts that stay inside one episode."""
    import dynamics

    ensemble, _, _ = dynamics.load_or_train(data, env, device=device, seed=seed, progress=progress)
    s = info["settings"]
    result = {"env": env, "dataset_id": data.dataset_id, "fingerprint": data.fingerprint, "n_starts": n_starts,
              "seed": seed, "horizon": horizon, "sampler_steps": n_steps,
              "dm_train": {k: info.get(k) for k in ("train_seconds", "cpu_seconds", "train_steps", "final_loss",
                                                    "n_params", "path")},
              "labels": {"dm": f"DM (H={s['H']} chained, N={n_steps})", "ensemble": "ensemble"}, "starts": {}}
    for starts, error_fn in (("any", dynamics.rollout_error), ("in_episode", in_episode_rollout_error)):
        t0 = time.time()
        dm = error_fn(dm_predict(model, n_steps, seed), data, horizon=horizon, n_starts=n_starts, seed=seed)
        dm_seconds = time.time() - t0
        ens = error_fn(dynamics.ensemble_predict(ensemble, seed=seed), data, horizon=horizon, n_starts=n_starts,
                       seed=seed)
        cross = {k: crossings(dm[k], ens[k], dm["horizons"]) for k in ("mse", "mse_pos", "median_pos")}
        result["starts"][starts] = {"dm": dm, "ensemble": ens, "crossover": cross, "dm_seconds": dm_seconds}
    stem = Path(info["path"]).stem.replace("diffusion_", f"fidelity_{env}_")
    out = Path(data.cache_dir) / f"{stem}_N{n_steps}_h{horizon}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot_fidelity(result, out.with_suffix(".png"))
    result["paths"] = [str(out.with_suffix(".png")), str(out.with_suffix(".json"))]
    return result


if __name__ == "__main__":
    import tyro

    @dataclass
    class Args:
        env: str = "maze2d-umaze"
        """D4RL-style dataset name (see data.py)"""
        H: int = 32
        """segment length (official 100); a multiple of 2**(len(dim_mults)-1)"""
        dim: int = 32
        """U-Net base width (official 128)"""
        dim_mults: tuple[int, ...] = (1, 2, 4)
        """U-Net width multipliers per level (official (1, 4, 8))"""
        train_steps: int = 4000
        """gradient steps (~8 min at 1 thread on the 2-core CPU; the official code trains far longer)"""
        batch_size: int = 64
        """segments per gradient step"""
        lr: float = 5e-4
        """Adam learning rate (after a 200-step linear warm-up)"""
        n_steps: int = 20
        """Heun sampler steps N (official 34; 20 is as accurate on the maze)"""
        device: str = "cpu"
        """torch device"""
        seed: int = 0
        """seed of initialisation, batches, sampler and rollout starts"""
        threads: int = 1
        """torch CPU threads (more threads collapse when other processes share the cores)"""
        retrain: bool = False
        """ignore a cached model and train again"""
        fidelity: bool = True
        """compare DM and ensemble rollouts against the simulator (Figure 3) and save a PNG and JSON"""
        horizon: int = 100
        """rollout horizon of the comparison (the DM chains H-windows to reach it)"""
        n_starts: int = 256
        """dataset start states of the comparison"""
        dataset_steps: int | None = None
        """maze2d only: size of a local dataset rebuild (default: the full D4RL size)"""

    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    from data import DatasetError, load_dataset

    try:
        data = load_dataset(args.env, steps=args.dataset_steps)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    model, info = load_or_train(data, args.env, args.H, args.dim, args.dim_mults, args.train_steps, args.batch_size,
                                args.lr, args.device, args.seed, args.retrain)
    if args.fidelity:
        res = fidelity(model, info, data, args.env, args.horizon, args.n_starts, args.n_steps, args.device, args.seed)
        for starts, r in res["starts"].items():
            dm, ens = r["dm"], r["ensemble"]
            print(f"{starts} starts (DM sampling {r['dm_seconds']:.0f} s)\n{'h':>4} {'DM mse':>9} {'ens mse':>9} "
                  f"{'DM pos':>9} {'ens pos':>9} {'DM med':>9} {'ens med':>9}")
            for i, h in enumerate(dm["horizons"]):
                if h in (1, 5, 10, 20, args.H - 1, 50, 75, args.horizon):
                    print(f"{h:>4} " + " ".join(f"{x[k][i]:>9.5f}" for k in ("mse", "mse_pos", "median_pos")
                                                 for x in (dm, ens)))
            for k, c in r["crossover"].items():
                print(f"  {k}: DM first below the ensemble at h={c['first_below']}, "
                      f"stays below from h={c['stays_below_from']}")
        print("figure:", res["paths"][0], "\ndata:  ", res["paths"][1])
