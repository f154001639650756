"""The dynamics diffusion model (DM) of DyDiff: EDM (Karras et al., 2022) + a temporal U-Net over
trajectory segments, used as a multi-step dynamics model driven by someone else's actions.

A segment is H rows x_t = [s_t, a_t] (t = 0..H-1) in the dataset's per-dimension min-max box mapped
to [-1, 1]. The DM is conditioned by inpainting on the first state s_0 and on every action a_t, so it
generates s_1..s_{H-1}: given the learning policy's actions it predicts where they lead (DyDiff,
Zhao et al., 2024, Section 4.1).

EDM in code (Karras et al., Table 1, "EDM" column, and Algorithm 2):
    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)                         DynamicsDiffusion.denoise
    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4,  sd = SIGMA_DATA = 0.5
    training: ln sigma ~ N(P_MEAN, P_STD^2), loss weight (sigma^2 + sd^2) / (sigma sd)^2   .loss
    sampling: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,
              Euler or Heun steps, with churn (S_churn, S_min, S_max, S_noise)        .sample
    F is the U-Net (TemporalUnet); sampling uses its EMA copy.

One departure from the official code: besides inpainting, the clean conditions are also fed as
extra, *unscaled* input channels (each row's action, and s_0 repeated on every row). With inpainting
alone they reach the network multiplied by c_in ~ 1/sigma, so at high noise it barely sees them and
must learn to follow them from many more training steps (the official code trains ~375k).

``python bench/pretrain.py --env maze2d-umaze`` trains (or loads) the DM and prints its validation loss;
``python bench/fidelity.py`` compares its rollouts with the ensemble's against the simulator (Figure 3).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import arrays_digest, gather_segments, segment_index
from runs import code_digest, load_or_train_cached

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2  # training noise levels: ln(sigma) ~ N(P_MEAN, P_STD^2)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
S_MIN, S_MAX, S_NOISE = 0.37, 52.24, 1.002  # the paper's churn window; gamma = min(S_churn/N, sqrt(2)-1)
# The validation set: this many training segments with their noise levels and noise, drawn with a seed of its
# own, so that every DM of a dataset (any --model-seed, any recipe) is measured on the same ones. The value itself
# moves +-5-7% from one draw of such a set to another (+-6-10% with 512 segments: a few segments weigh a lot), but DMs
# measured on one set keep their order: the ratio of two DMs' values moves +-1-2% (+-2-6% with 512 segments;
# bench/dm_validation.py --draws).
VAL_SEGMENTS, VAL_SEED = 2048, 12_345


# -- Temporal U-Net (Diffuser-style, 1-D convolutions over time) -----------------------------------
# The activation: Diffuser's temporal U-Net (and the official DyDiff code) uses Mish; EDM's own networks
# use SiLU, the same kind of smooth gate, which is cheaper to compute on a CPU.
ACTIVATIONS = {"silu": nn.SiLU, "mish": nn.Mish}
# Layout: activations are (B, time, channels), as the segments themselves. A convolution sees that memory
# as a (B, channels, 1, time) channels-last image, which oneDNN's CPU kernels run on their fast path
# (its 1-D path is slower); additions, activations and concatenations stay plain contiguous operations.
# Conv1d, GroupNorm and Upsample keep the parameters of the torch layers they subclass (bench/speed.py).


class Conv1d(nn.Conv1d):
    """nn.Conv1d on a (B, T, C_in) input, returning (B, T', C_out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), self.weight.unsqueeze(2), self.bias, (1, self.stride[0]),
                     (0, self.padding[0]))
        return y.squeeze(2).transpose(1, 2)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm on a (B, T, C) input: per sample and group of channels, over all time steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        G = self.num_groups
        x = x.float()  # under bf16 autocast the statistics are still summed in fp32 (bf16 keeps 8 bits of mantissa)
        # per (sample, group): mean and E[x^2] over time and the group's channels
        mean = x.sum(1).view(B, G, -1).mean(-1, keepdim=True) / T  # (B, G, 1)
        var = (x * x).sum(1).view(B, G, -1).mean(-1, keepdim=True) / T - mean * mean
        scale = var.clamp_min_(0).add_(self.eps).rsqrt_() * self.weight.view(G, -1)  # (B, G, C / G)
        shift = self.bias.view(G, -1) - mean * scale
        return torch.addcmul(shift.view(B, 1, C), x, scale.view(B, 1, C))


class ConvBlock(nn.Sequential):
    """Conv1d(k5) -> GroupNorm(8) -> activation, length preserving."""

    def __init__(self, c_in: int, c_out: int, act: str = "silu", kernel: int = 5):
        super().__init__(Conv1d(c_in, c_out, kernel, padding=kernel // 2), GroupNorm(8, c_out),
                         ACTIVATIONS[act](inplace=True))  # in place: the normalized values are not needed again


class ResidualTemporalBlock(nn.Module):
    """Two conv blocks with the noise embedding added in between, plus a (1x1 conv) residual path."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, act: str = "silu"):
        super().__init__()
        self.block1, self.block2 = ConvBlock(c_in, c_out, act), ConvBlock(c_out, c_out, act)
        self.embed = nn.Sequential(ACTIVATIONS[act](), nn.Linear(embed_dim, c_out))
        self.skip = Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.embed(emb)[:, None, :]
        return self.block2(h) + self.skip(x)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise, then an MLP. c_noise = ln(sigma)/4 spans only ~[-1.6, 1.1] in training,
    so it is stretched by ``scale`` first, or the lowest frequencies would barely change across that range."""

    def __init__(self, dim: int, act: str = "silu", scale: float = 100.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000.0) * torch.arange(half) / half) * scale)
        self.mlp = nn.Sequential(nn.Linear(2 * half, 4 * dim), ACTIVATIONS[act](), nn.Linear(4 * dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        phase = c_noise[:, None] * self.freqs[None]
        return self.mlp(torch.cat([phase.sin(), phase.cos()], dim=-1))


class Upsample(nn.ConvTranspose1d):
    """The U-Net's upsampling (B, T, C) -> (B, 2T, C): ConvTranspose1d(c, c, 4, stride=2, padding=1)
    computed as one ordinary k3 convolution per output phase: out[2t] = W_1 x[t] + W_3 x[t-1],
    out[2t+1] = W_2 x[t] + W_0 x[t+1]. The same function of the same weights (and state-dict keys); the
    CPU backend runs a transposed convolution on a slow path, and this form on its fast one."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W, zero = self.weight, torch.zeros_like(self.weight[..., 0])  # W: (c_in, c_out, 4)
        even = torch.stack([W[..., 3], W[..., 1], zero], -1)  # taps x[t-1], x[t], x[t+1]
        odd = torch.stack([zero, W[..., 2], W[..., 0]], -1)
        kernel = torch.cat([even, odd], 1).transpose(0, 1).unsqueeze(2)  # (2 c_out, c_in, 1, 3)
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), kernel, torch.cat([self.bias, self.bias]), padding=(0, 1))
        B, _, _, T = y.shape
        # y is stored as (B, T, [even | odd] channels): read as (B, 2T, channels) it is interleaved, no copy
        return y.squeeze(2).transpose(1, 2).reshape(B, 2 * T, -1)


def check_horizon(H: int, dim_mults) -> None:
    """H must survive the U-Net's len(dim_mults) - 1 halvings; the message starts with the setting's name."""
    k = 2 ** (len(dim_mults) - 1)
    if H % k or H <= 0:
        raise ValueError(f"horizon H={H} must be a multiple of {k}, as the U-Net halves it {len(dim_mults) - 1} "
                         f"times: use H in {sorted({max(k, H // k * k), (H // k + 1) * k})} or fewer dim_mults")


class TemporalUnet(nn.Module):
    """F_theta of EDM: (B, H, transition_dim + cond_dim) inputs -> (B, H, transition_dim) outputs.

    Each of the len(dim_mults) levels has `blocks` residual blocks on the way down and on the way up (Diffuser:
    2); all but the deepest halve the length (check_horizon). Channel widths are dim * mult (multiples of 8 for
    GroupNorm(8))."""

    def __init__(self, transition_dim: int, cond_dim: int = 0, dim: int = 32, dim_mults=(1, 2, 4),
                 act: str = "silu", blocks: int = 2):
        super().__init__()
        if dim % 8:
            raise ValueError(f"dim={dim} must be a multiple of 8 (GroupNorm uses 8 groups)")
        self.transition_dim, self.cond_dim = transition_dim, cond_dim
        widths = [transition_dim + cond_dim] + [dim * m for m in dim_mults]
        pairs = list(zip(widths[:-1], widths[1:]))
        self.embed = NoiseEmbedding(dim, act)
        self.downs = nn.ModuleList()  # per level: its blocks, then the halving (none at the deepest)
        for i, (c_in, c_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.downs.append(nn.ModuleList(
                [ResidualTemporalBlock(c_out if j else c_in, c_out, dim, act) for j in range(blocks)]
                + [nn.Identity() if last else Conv1d(c_out, c_out, 3, stride=2, padding=1)]))
        mid = widths[-1]
        self.mid = nn.ModuleList([ResidualTemporalBlock(mid, mid, dim, act) for _ in range(blocks)])
        self.ups = nn.ModuleList()
        # Going up: upsample, concatenate the skip saved at that resolution on the way down, the blocks.
        # The deepest level's output is the mid blocks' input, so it needs no skip.
        for level in reversed(range(len(dim_mults) - 1)):
            c_skip, c_h = widths[level + 1], widths[level + 2]
            self.ups.append(nn.ModuleList(
                [Upsample(c_h)] + [ResidualTemporalBlock(c_skip if j else c_h + c_skip, c_skip, dim, act)
                                   for j in range(blocks)]))
        self.final = nn.Sequential(ConvBlock(widths[1], dim, act), Conv1d(dim, transition_dim, 1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)
        h, skips = x, []  # (B, time, channels) throughout
        for *blocks, down in self.downs:
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, emb)
        skips.pop()
        for up, *blocks in self.ups:
            h = torch.cat([up(h), skips.pop()], dim=-1)
            for block in blocks:
                h = block(h, emb)
        return self.final(h)


# -- EDM around the U-Net --------------------------------------------------------------------------
class DynamicsDiffusion(nn.Module):
    """EDM denoiser over segments with conditioning on s_0 and the actions, an EMA copy for sampling,
    and the min-max box of [obs, act] (buffers, so the checkpoint carries them)."""

    def __init__(self, obs_dim: int, act_dim: int, horizon: int = 32, dim: int = 32, dim_mults=(1, 2, 4),
                 x_min: torch.Tensor | None = None, x_max: torch.Tensor | None = None, act: str = "silu",
                 blocks: int = 2):
        super().__init__()
        self.obs_dim, self.act_dim, self.horizon = obs_dim, act_dim, horizon
        D = obs_dim + act_dim
        check_horizon(horizon, dim_mults)
        self.net = TemporalUnet(D, cond_dim=D, dim=dim, dim_mults=dim_mults, act=act, blocks=blocks)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.register_buffer("x_min", torch.full((D,), -1.0) if x_min is None else torch.as_tensor(x_min).float())
        self.register_buffer("x_max", torch.full((D,), 1.0) if x_max is None else torch.as_tensor(x_max).float())

    # ---- coordinate spaces: raw <-> the dataset's min-max box mapped to [-1, 1] ----
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
        # U-Net would have to carry it along the whole segment through its convolutions.
        given = torch.where(cond_mask, cond, 0.0).expand_as(x)
        given = torch.cat([given[:, :1, : self.obs_dim].expand(-1, x.shape[1], -1), given[:, :, self.obs_dim:]], -1)
        F_x = net(torch.cat([c_in * x, given], dim=-1), c_noise)
        return torch.where(cond_mask, cond, c_skip * x + c_out * F_x)

    def loss(self, x: torch.Tensor, cond_mask: torch.Tensor, loss_mask: torch.Tensor,
             generator: torch.Generator | None = None, net: nn.Module | None = None) -> torch.Tensor:
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
        err = weight[:, None, None] * (self.denoise(x + noise, sigma, x, cond_mask, net) - x) ** 2
        keep = (~cond_mask & loss_mask[..., None]).float()
        return (err * keep).sum() / keep.sum().clamp(min=1)

    @torch.no_grad()
    def update_ema(self, samples_seen: int, batch_size: int, halflife: float, rampup: float) -> None:
        """EDM's EMA: a half-life of min(halflife, rampup * samples_seen) training samples, so the average
        forgets the fast-moving early weights quickly and settles to `halflife` later."""
        beta = 0.5 ** (batch_size / max(min(halflife, rampup * samples_seen), 1e-8))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - beta)

    # ---- sampling ----
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, cond_mask: torch.Tensor, sampler_steps: int = 8,
               generator: torch.Generator | None = None, solver: str = "euler", S_churn: float = 0.0,
               S_min: float = S_MIN, S_max: float = S_MAX, S_noise: float = S_NOISE, x_start: torch.Tensor | None = None,
               sigma_start: float = SIGMA_MAX) -> torch.Tensor:
        """EDM's sampler (Karras et al. 2022, Algorithm 2; Algorithm 1 when S_churn = 0) with the EMA weights.
        cond: (B, H, D) values in [-1, 1] at the cond_mask entries; returns (B, H, D) in [-1, 1] space.
        'heun': 2 N - 1 network calls (no correction on the last step, to sigma = 0); 'euler': N (DDIM's).
        x_start: start from it noised to sigma_start instead of from pure noise (SDEdit, Meng et al. 2022)."""
        if solver not in ("euler", "heun"):
            raise ValueError(f"unknown sampler solver {solver!r}: use 'euler' or 'heun'")
        i = torch.arange(sampler_steps, dtype=torch.float64)
        t = (sigma_start ** (1 / RHO) + i / max(sampler_steps - 1, 1) * (SIGMA_MIN ** (1 / RHO) - sigma_start ** (1 / RHO))) ** RHO
        t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()  # t_N = 0
        B = cond.shape[0]
        x = torch.randn(cond.shape, device=cond.device, generator=generator) * t[0]
        x = torch.where(cond_mask, cond, x if x_start is None else x_start + x)
        for t_cur, t_next in zip(t[:-1], t[1:]):
            gamma = min(S_churn / sampler_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
            t_hat = t_cur * (1 + gamma)  # churn: add noise to climb back up to t_hat, then step down
            if gamma > 0:
                eps = torch.randn(x.shape, device=x.device, generator=generator) * S_noise
                x = torch.where(cond_mask, cond, x + math.sqrt(t_hat**2 - t_cur**2) * eps)
            d = (x - self.denoise(x, torch.full((B,), t_hat, device=x.device), cond, cond_mask, self.ema)) / t_hat
            x_next = x + (t_next - t_hat) * d
            if solver == "heun" and t_next > 0:  # Heun's 2nd-order correction
                d2 = (x_next - self.denoise(x_next, torch.full((B,), t_next, device=x.device), cond, cond_mask,
                                            self.ema)) / t_next
                x_next = x + (t_next - t_hat) * (d + d2) / 2
            x = torch.where(cond_mask, cond, x_next)
        return x

    @torch.no_grad()
    def generate(self, s0_raw: torch.Tensor, actions: torch.Tensor, sampler_steps: int = 8,
                 generator: torch.Generator | None = None, states_start: torch.Tensor | None = None,
                 **sampler) -> torch.Tensor:
        """Raw states s_0..s_{H-1} (B, H, obs_dim) for raw s_0 (B, obs_dim) and actions a_0..a_{H-1}
        (B, H, act_dim); index 0 is s_0 itself. Longer rollouts chain windows: dydiff.generate_chained.
        states_start (B, H, obs_dim), raw: the states to refine from (sample's x_start, with sigma_start)."""
        B, H, _ = actions.shape
        if H != self.horizon:
            raise ValueError(f"the DM generates H={self.horizon} rows at a time, got {H}: use dydiff.generate_chained")
        dev, obs = self.x_min.device, slice(0, self.obs_dim)
        s0_raw = s0_raw.to(dev, torch.float32)
        cond = torch.zeros(B, H, self.obs_dim + self.act_dim, device=dev)
        cond[:, 0, obs] = self.normalize(s0_raw, obs)
        cond[:, :, self.obs_dim:] = self.normalize(actions.to(dev, torch.float32), slice(self.obs_dim, None))
        if states_start is not None:
            sampler["x_start"] = torch.cat([self.normalize(states_start.to(dev, torch.float32), obs).clamp(-1, 1),
                                            torch.zeros(B, H, self.act_dim, device=dev)], -1)
        x = self.sample(cond.clamp(-1, 1), self.cond_mask(H), sampler_steps, generator, **sampler)
        states = self.unnormalize(x[..., obs], obs)
        states[:, 0] = s0_raw  # exact, not a normalize/unnormalize round trip
        return states


@dataclass
class DMConfig:
    """The DM's size and training recipe, filled from train.py's flags (train.DM_FLAGS; defaults: its cpu preset).
    Checked once, here: a bad value raises a ValueError whose message starts with the field's name."""

    horizon: int = 32  # H, rows per segment; a multiple of 2 ** (len(dim_mults) - 1)
    dim: int = 32  # U-Net base width
    dim_mults: tuple[int, ...] = (1, 2, 4)  # U-Net width multipliers per level
    # Two residual blocks per level, as Diffuser. One block at dim 40 costs ~0.8x per step and reached a lower
    # validation loss, yet its DM gave TD3+BC lower scores on maze2d-umaze (bench/README.md, "A shallower,
    # wider U-Net"), so it stays a flag (--dm-blocks 1 --dm-dim 40)
    blocks: int = 2  # residual blocks per U-Net level, down and up
    act: str = "silu"  # activation: silu or mish
    train_steps: int = 7200  # gradient steps
    batch_size: int = 96  # segments per gradient step
    lr: float = 2.5e-3  # Adam learning rate after the warm-up
    warmup_steps: int = 200  # linear learning-rate warm-up
    lr_schedule: str = "cosine"  # after the warm-up: constant, or cosine (decay to 0 at the last step)
    grad_clip: float = 1.0  # gradient-norm clipping (0: none)
    ema_halflife: float = 500_000  # EMA half-life in training samples (EDM's default)
    ema_rampup: float = 0.05  # early on the half-life is at most this share of the samples seen (EDM's default)
    seed: int = 0  # seed of the initialisation, the batches and the training noise
    terminal_rows: bool = False  # a terminated episode's last next state is a training row too (training_rows)
    precision: str = "fp32"  # training's forward pass: fp32, or bf16 (autocast; weights, Adam and EMA stay fp32)

    def __post_init__(self):
        for name in ("dim", "blocks", "train_steps", "batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        check_horizon(self.horizon, self.dim_mults)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16 (got {self.precision!r})")


def validation_set(X: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, H: int, n: int = VAL_SEGMENTS,
                   seed: int = VAL_SEED):
    """n segments of X (N, D) drawn with `seed`, whatever the training seed: (x (n, H, D), mask)."""
    gen = torch.Generator(device=X.device).manual_seed(seed)
    pick = torch.randint(len(starts), (n,), generator=gen, device=X.device)
    return gather_segments(X, starts[pick], lengths[pick], H)


@torch.no_grad()
def validation_loss(model: DynamicsDiffusion, x_val: torch.Tensor, m_val: torch.Tensor, seed: int = VAL_SEED) -> float:
    """The EDM loss of the EMA network (the one that samples) on the validation set, with noise levels and noise
    drawn from seed + 1: the same for every call, so that DMs and training steps compare on one smooth curve
    (the per-step training loss jumps with its random sigma)."""
    gen = torch.Generator(device=x_val.device).manual_seed(seed + 1)
    return float(model.loss(x_val, model.cond_mask(), m_val, generator=gen, net=model.ema))


def train(model: DynamicsDiffusion, X: torch.Tensor, starts: np.ndarray, lengths: np.ndarray, cfg: DMConfig,
          progress: bool = True, val_every: int = 250) -> dict:
    """Adam with a linear warm-up on random segments of X (N, D) (normalized rows); EMA after every step.
    Every val_every steps and at the end, the validation loss (validation_loss); its time is not training time."""
    dev = model.x_min.device  # the data, the batches and the noise are drawn there: no copy, no sync per step
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    X, starts_t, lengths_t = X.to(dev), torch.as_tensor(starts, device=dev), torch.as_tensor(lengths, device=dev)
    cond_mask, (x_val, m_val) = model.cond_mask(), validation_set(X, starts_t, lengths_t, model.horizon)
    opt = torch.optim.Adam(model.net.parameters(), lr=cfg.lr, fused=True)  # one kernel for all parameters
    def lr_factor(k: int) -> float:  # linear warm-up, then constant or a cosine decay to 0
        if k < cfg.warmup_steps or cfg.lr_schedule == "constant":
            return min(1.0, (k + 1) / max(cfg.warmup_steps, 1))
        return 0.5 * (1 + math.cos(math.pi * (k - cfg.warmup_steps) / max(cfg.train_steps - cfg.warmup_steps, 1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)  # the factor of step k multiplies cfg.lr
    losses, pending, curve, val_curve, t_val, t0, cpu0 = [], [], [], [], 0.0, time.time(), time.process_time()

    def validate(step: int) -> None:  # appends [step, training seconds so far, validation loss]
        nonlocal t_val
        t1 = time.time()
        val_curve.append([step, t1 - t0 - t_val, validation_loss(model, x_val, m_val)])
        t_val += time.time() - t1

    bar = tqdm(range(cfg.train_steps), desc="diffusion", disable=not progress, mininterval=2.0)
    for step in bar:
        pick = torch.randint(len(starts_t), (cfg.batch_size,), generator=gen, device=dev)
        x, mask = gather_segments(X, starts_t[pick], lengths_t[pick], model.horizon)
        with torch.autocast(dev.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = model.loss(x, cond_mask, mask, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        model.update_ema((step + 1) * cfg.batch_size, cfg.batch_size, cfg.ema_halflife, cfg.ema_rampup)
        pending.append(loss.detach())  # read back every 100 steps: a .item() per step would wait for the GPU
        if (step + 1) % 100 == 0 or step + 1 == cfg.train_steps:
            losses, pending = losses + torch.stack(pending).tolist(), []
            curve.append([step + 1, float(np.mean(losses[-100:]))])  # per-step loss is noisy (random sigma)
            bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
        if (step + 1) % val_every == 0 or step + 1 == cfg.train_steps:
            validate(step + 1)
    return {"train_seconds": time.time() - t0 - t_val, "cpu_seconds": time.process_time() - cpu0,
            "train_steps": cfg.train_steps, "final_loss": float(np.mean(losses[-200:])), "first_loss":
            float(np.mean(losses[:50])), "loss_curve": curve, "val_loss": val_curve[-1][2], "val_curve": val_curve}


# -- Cache: trained once per dataset and settings, then loaded (data.load_or_train_cached) ---------
def code_digests() -> dict[str, str]:
    """The code that defines and trains the DM, as the cache key's digests: this file without the sampler
    (sample and generate use the trained weights, they do not change them) and data.py's flattening and
    training windows. An edit there retrains the cached DM; an edit to a comment or a docstring does not."""
    import sys

    return {"diffusion.py": code_digest(sys.modules[__name__], skip=("DynamicsDiffusion.sample",
                                                                     "DynamicsDiffusion.generate")),
            "data.py": arrays_digest()}


def training_rows(data, terminal_rows: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DM's training rows [s_t, a_t] (N, obs_dim + act_dim), and each episode's first row and end.

    terminal_rows: a terminated episode (its last transition's terminal is 1) gets one row more, [its last
    next state, its last action], so the DM sees the state an episode ends in (hopper's fall) and a generated
    trajectory can reach it as the data does. The action repeats the last one: the DM is conditioned on every
    row's action, and an action after a terminal never reaches the environment, so any value is as true; the
    last one lies in the data and adds no jump to the action sequence. A truncated episode (a timeout) has no
    end state, the environment would go on: it gets no row. Off: the rows and episodes are the dataset's."""
    raw, starts, ends = np.concatenate([data.obs, data.actions], axis=1), data.episode_starts, data.episode_ends
    if not terminal_rows:
        return raw, starts, ends
    fell = data.terminals[ends - 1] > 0  # (E,) per episode
    last = ends[fell] - 1
    raw = np.insert(raw, ends[fell], np.concatenate([data.next_obs[last], data.actions[last]], axis=1), axis=0)
    added = np.cumsum(fell)  # rows added up to and including each episode
    return raw, starts + added - fell, ends + added


def load_or_train(data, cfg: DMConfig | None = None, device: str = "cpu", retrain: bool = False,
                  progress: bool = True) -> tuple[DynamicsDiffusion, dict]:
    """The DM for ``data`` (an OfflineData): from the cache beside the dataset, else trained now."""
    cfg = cfg or DMConfig()
    settings = {"obs_dim": data.obs_dim, "act_dim": data.act_dim, **asdict(cfg)}
    raw, episode_starts, episode_ends = training_rows(data, cfg.terminal_rows)
    # The box of the states spans the next states too: terminal states appear only there, and a box
    # without them would keep every generated state healthy (hopper's terminal could never fire).
    box = np.concatenate([raw, np.concatenate([data.next_obs, data.actions], axis=1)])

    def train_now():
        torch.manual_seed(cfg.seed)  # network initialisation
        model = DynamicsDiffusion(data.obs_dim, data.act_dim, cfg.horizon, cfg.dim, cfg.dim_mults,
                                  torch.as_tensor(box.min(0)), torch.as_tensor(box.max(0)), cfg.act,
                                  cfg.blocks).to(device)
        X = model.normalize(torch.as_tensor(raw).to(device))
        starts, lengths = segment_index(episode_starts, episode_ends, cfg.horizon)
        n_params = sum(p.numel() for p in model.net.parameters())
        print(f"training the diffusion model on {data.dataset_id}: {len(starts)} segments of H={cfg.horizon}, "
              f"{n_params / 1e6:.2f}M params, {cfg.train_steps} steps of batch {cfg.batch_size}")
        info = train(model, X, starts, lengths, cfg, progress=progress)
        return {"state_dict": model.state_dict(), "info": {**info, "n_params": n_params, "n_segments": len(starts)}}

    ckpt, path, cached = load_or_train_cached(data, "diffusion", settings, code_digests(), train_now, device, retrain)
    model = DynamicsDiffusion(data.obs_dim, data.act_dim, cfg.horizon, cfg.dim, cfg.dim_mults, act=cfg.act,
                              blocks=cfg.blocks).to(device)
    model.load_state_dict(ckpt["state_dict"])
    info = {**ckpt["info"], "settings": ckpt["settings"], "path": str(path), "cached": cached}
    print(f"diffusion model: {'loaded' if cached else 'trained and saved'} {path} ({info['train_steps']} steps, "
          f"{info['train_seconds']:.0f} s, validation loss {info['val_loss']:.4f})")
    return model, info

