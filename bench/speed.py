"""Where the time goes: learner updates/s, DM training steps/s, DyDiff rollout transitions/s, the DM
sampler's achieved FLOP/s against a large matmul in the same process, and the share of a run spent in
DyDiff.

    python bench/speed.py                        # CPU preset sizes, 1 thread -> bench/results/speed.json
    python bench/speed.py threads                # each phase at 1 thread and at all cores -> results/threads.json
    python bench/speed.py --preset paper --device cuda --name speed_gpu

Models are freshly initialised at the preset's sizes (maze2d dims: obs 6, act 2): their speed does not
depend on their weights, so this needs no dataset and no pretraining. The share of wall time spent in
DyDiff comes from finished runs (default: the DyDiff runs of bench/compare.py).

Reference point: a CORL-style TD3+BC update (two separate critic MLPs, the actor loss through critic 1,
batches drawn with numpy on the CPU and copied to the device) is timed in the same process, so the
learner's speed-up is measured rather than quoted.

DM training recipes, their validation loss against their cost: bench/dm_recipes.py.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
OBS_DIM, ACT_DIM = 6, 2  # maze2d: [x, y, vx, vy, goal_x, goal_y], force (x, y)

import diffusion  # noqa: E402


@dataclass
class Args:
    preset: Literal["cpu", "paper"] = "cpu"
    """sizes to time (train.py's presets: H, DM width, rollout batch B, sampler steps N)"""
    device: str = "cpu"
    """cpu or cuda"""
    threads: int = 1
    """torch CPU threads (train.py's default is 1)"""
    seconds: float = 10.0
    """target duration of each timed loop"""
    runs: str = "runs/compare/*+dydiff*"
    """glob of finished DyDiff run folders for the wall-time share"""
    name: str = "speed"
    """results file: bench/results/<name>.json"""


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn, device: str, seconds: float, warmup: int = 3) -> tuple[float, int]:
    """Calls per second of fn(), timed for about `seconds` after a warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync(device)
    return n / (time.perf_counter() - t0), n


def matmul_flops(device: str, seconds: float) -> float:
    """FLOP/s of a large square fp32 matmul: the practical peak that the other numbers are compared to."""
    n = 1024 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    per_s, _ = rate(lambda: a @ b, device, seconds)
    return 2 * n**3 * per_s


class CorlTD3BC:
    """A straightforward CORL-style TD3+BC update, the reference our learner is compared with."""

    def __init__(self, device: str):
        mlp = lambda i, o: nn.Sequential(nn.Linear(i, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),  # noqa: E731
                                         nn.Linear(256, o)).to(device)
        self.actor, self.q1, self.q2 = mlp(OBS_DIM, ACT_DIM), mlp(OBS_DIM + ACT_DIM, 1), mlp(OBS_DIM + ACT_DIM, 1)
        self.targets = [copy.deepcopy(m) for m in (self.actor, self.q1, self.q2)]
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=3e-4)
        self.critic_opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=3e-4)
        self.it, self.device = 0, device

    def update(self, data: dict[str, np.ndarray]) -> None:
        idx = np.random.randint(0, len(data["obs"]), 256)
        s, a, r, s2, d = (torch.as_tensor(data[k][idx], device=self.device)
                          for k in ("obs", "actions", "rewards", "next_obs", "dones"))
        self.it += 1
        actor_t, q1_t, q2_t = self.targets
        with torch.no_grad():
            a2 = (torch.tanh(actor_t(s2)) + (0.2 * torch.randn_like(a)).clamp(-0.5, 0.5)).clamp(-1, 1)
            x2 = torch.cat([s2, a2], -1)
            y = r + 0.99 * (1 - d) * torch.min(q1_t(x2), q2_t(x2)).squeeze(-1)
        x = torch.cat([s, a], -1)
        loss = F.mse_loss(self.q1(x).squeeze(-1), y) + F.mse_loss(self.q2(x).squeeze(-1), y)
        self.critic_opt.zero_grad()
        loss.backward()
        self.critic_opt.step()
        if self.it % 2 == 0:
            pi = torch.tanh(self.actor(s))
            q = self.q1(torch.cat([s, pi], -1))
            actor_loss = -2.5 / q.abs().mean().detach() * q.mean() + F.mse_loss(pi, a)
            self.actor_opt.zero_grad()
            actor_loss.backward()
            self.actor_opt.step()
            with torch.no_grad():
                for net, target in zip((self.actor, self.q1, self.q2), self.targets):
                    for p, pt in zip(net.parameters(), target.parameters()):
                        pt.mul_(0.995).add_(0.005 * p)


def learner_rates(device: str, seconds: float) -> dict:
    from iql import IQL
    from td3bc import TD3BC
    from data import TransitionBuffer

    N = 100_000
    data = {"obs": np.random.randn(N, OBS_DIM).astype(np.float32), "next_obs": np.random.randn(N, OBS_DIM).astype(np.float32),
            "actions": np.random.uniform(-1, 1, (N, ACT_DIM)).astype(np.float32),
            "rewards": np.random.rand(N).astype(np.float32), "dones": np.zeros(N, np.float32)}
    buf = TransitionBuffer(N, OBS_DIM, ACT_DIM, device)
    buf.add(**{k: torch.as_tensor(v) for k, v in data.items()})
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, learner in (("td3bc", TD3BC(OBS_DIM, ACT_DIM, device=device)),
                          ("iql", IQL(OBS_DIM, ACT_DIM, device=device, max_steps=10**6))):
        out[f"{name}_updates_per_s"], _ = rate(lambda: learner.update(buf.sample(256, gen)), device, seconds)
    corl = CorlTD3BC(device)
    out["corl_style_td3bc_updates_per_s"], _ = rate(lambda: corl.update(data), device, seconds)
    out["td3bc_speedup_vs_corl_style"] = out["td3bc_updates_per_s"] / out["corl_style_td3bc_updates_per_s"]
    return out


def paths(p) -> dict:
    """The DM and its sampler before this benchmark's speed work ("before": Mish, the official Heun sampler
    with churn S_churn 60 and N = 20 steps) and now (train.py's preset), as (DMConfig, RolloutConfig) pairs."""
    from train import dm_config, rollout_config

    dm_now, roll_now = dm_config(p), rollout_config(p)
    before = (replace(dm_now, act="mish", batch_size=64, lr=5e-4),
              replace(roll_now, sampler_steps=20, sampler_solver="heun", sampler_churn=60.0))
    return {"before": before, "now": (dm_now, roll_now)}


def dydiff_rates(dm_cfg, cfg, device: str, seconds: float, peak: float) -> dict:
    """One path's costs with fresh models (speed does not depend on the weights): DM training steps/s,
    a whole DyDiff round, and the sampler's achieved FLOP/s."""
    import diffusion
    import dydiff
    import dynamics
    from td3bc import TD3BC
    from torch.utils.flop_counter import FlopCounterMode

    H, T, B, N = dm_cfg.horizon, cfg.rollout_length, cfg.rollout_batch, cfg.sampler_steps
    torch.manual_seed(0)
    dm = diffusion.DynamicsDiffusion(OBS_DIM, ACT_DIM, H, dm_cfg.dim, dm_cfg.dim_mults, act=dm_cfg.act,
                                     blocks=dm_cfg.blocks).to(device)
    n_params = sum(p.numel() for p in dm.net.parameters())
    # DM training: random rows stand in for the data (the cost does not depend on the values)
    X = torch.rand(20_000, OBS_DIM + ACT_DIM) * 2 - 1
    starts, lengths = np.arange(0, 20_000 - H), np.full(20_000 - H, H)
    n_train = 5 if device == "cpu" and dm_cfg.dim > 64 else max(10, int(2000 / dm_cfg.batch_size))
    info = diffusion.train(dm, X, starts, lengths, replace(dm_cfg, train_steps=n_train), progress=False,
                           val_every=10**9)
    dm_steps_per_s = n_train / info["train_seconds"]

    # one DyDiff round with fresh models: ensemble trajectory + M DM iterations + filter
    ensemble = dynamics.Ensemble(OBS_DIM, ACT_DIM).to(device)
    reward_model = dynamics.RewardModel(OBS_DIM, ACT_DIM).to(device)
    actor = TD3BC(OBS_DIM, ACT_DIM, device=device)
    s0 = torch.randn(B, OBS_DIM, device=device)
    models = dydiff.DyDiffModels(ensemble=ensemble, reward_model=reward_model, dm=dm,
                                 terminal_fn=dynamics.terminal_fn("maze2d"), obs_mean=torch.zeros(OBS_DIM, device=device),
                                 obs_std=torch.ones(OBS_DIM, device=device))
    g = torch.Generator(device=device).manual_seed(0)
    dydiff.rollout_round(actor.act, models, s0, cfg, g)
    sync(device)
    t0 = time.perf_counter()
    _, stats = dydiff.rollout_round(actor.act, models, s0, cfg, g)
    sync(device)
    round_s = time.perf_counter() - t0

    # sampler FLOPs and network calls: one whole sampler call, counted by torch and by a hook on the network
    cond = torch.zeros(B, H, OBS_DIM + ACT_DIM, device=device)
    mask = dm.cond_mask(H)
    sample = lambda: dm.sample(cond, mask, N, g, cfg.sampler_solver, cfg.sampler_churn)  # noqa: E731
    calls = []
    hook = dm.ema.register_forward_hook(lambda *_: calls.append(1))
    with FlopCounterMode(display=False) as counter:
        sample()
    hook.remove()
    flops_per_sample_call = counter.get_total_flops()
    per_s, _ = rate(sample, device, seconds, warmup=1)
    achieved = flops_per_sample_call * per_s
    return {"dm_act": dm_cfg.act, "dm_params": n_params, "dm_train_batch": dm_cfg.batch_size,
            "dm_train_steps_per_s": dm_steps_per_s, "dm_train_samples_per_s": dm_steps_per_s * dm_cfg.batch_size,
            "sampler_steps": N, "sampler_solver": cfg.sampler_solver, "sampler_churn": cfg.sampler_churn,
            "network_calls_per_sample": len(calls),
            "rollout_round_s": round_s, "rollout_transitions": stats["n_transitions"],
            "rollout_transitions_per_s": stats["n_transitions"] / round_s,
            "rollout_states_generated_per_s": B * (T - 1) / round_s,
            "rollout_dm_share": stats["time_dm_s"] / stats["time_s"],
            "sampler_gflop_per_call": flops_per_sample_call / 1e9, "sampler_calls_per_s": per_s,
            "sampler_gflop_per_s": achieved / 1e9, "sampler_utilisation_of_matmul": achieved / peak}


def run_shares(pattern: str) -> dict:
    rows = []
    for folder in sorted(glob.glob(pattern)):
        path = Path(folder) / "summary.json"
        if path.exists():
            s = json.loads(path.read_text())
            rows.append({"run": Path(folder).name, "wall_s": s["wall_time_s"], "rollout_s": s["rollout_time_s"],
                         "pretrain_s": s["pretrain_time_s"], "rollout_share": s["rollout_time_s"] / s["wall_time_s"]})
    if not rows:
        return {"runs": [], "note": f"no finished runs match {pattern}"}
    return {"runs": rows, "rollout_share_mean": float(np.mean([r["rollout_share"] for r in rows]))}


def main(args: Args) -> None:
    from train import parse_args

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    p = parse_args(["--preset", args.preset])
    peak = matmul_flops(args.device, args.seconds)
    dydiff_paths = {name: dydiff_rates(*cfgs, args.device, args.seconds, peak) for name, cfgs in paths(p).items()}
    before, now = dydiff_paths["before"], dydiff_paths["now"]
    out = {"preset": args.preset, "device": args.device, "threads": args.threads,
           "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}, "
                      f"torch {torch.__version__}"
                      + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
           "sizes": {k: getattr(p, k) for k in ("horizon", "rollout_length", "rollout_batch", "iterations", "dm_dim",
                                                "dm_mults")},
           "matmul_gflop_per_s": peak / 1e9,
           **learner_rates(args.device, args.seconds),
           "dydiff": dydiff_paths,
           "speedup": {k: now[k] / before[k] for k in ("rollout_transitions_per_s", "dm_train_steps_per_s",
                                                       "sampler_gflop_per_s")},
           "wall_time_share": run_shares(args.runs)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    print(f"| measure ({args.preset} sizes, {args.device}, {args.threads} thread(s)) | value |\n|---|---|")
    for key, fmt in (("matmul_gflop_per_s", ".1f"), ("td3bc_updates_per_s", ".0f"), ("iql_updates_per_s", ".0f"),
                     ("corl_style_td3bc_updates_per_s", ".0f"), ("td3bc_speedup_vs_corl_style", ".2f")):
        print(f"| {key} | {out[key]:{fmt}} |")
    print("\n| DyDiff measure | before | now | now / before |\n|---|---|---|---|")
    for key, fmt in (("dm_act", ""), ("sampler_solver", ""), ("network_calls_per_sample", "d"),
                     ("sampler_churn", ".0f"),
                     ("sampler_gflop_per_s", ".1f"), ("sampler_utilisation_of_matmul", ".3f"),
                     ("rollout_round_s", ".2f"), ("rollout_transitions_per_s", ".0f"), ("rollout_dm_share", ".3f"),
                     ("dm_train_batch", "d"), ("dm_train_steps_per_s", ".2f"), ("dm_train_samples_per_s", ".0f")):
        ratio = f"{now[key] / before[key]:.2f}" if isinstance(now[key], float) else ""
        print(f"| {key} | {before[key]:{fmt}} | {now[key]:{fmt}} | {ratio} |")
    share = out["wall_time_share"]
    if share["runs"]:
        print(f"\nDyDiff share of run wall time (mean of {len(share['runs'])} runs): {share['rollout_share_mean']:.3f}")
    print(f"wrote {RESULTS / args.name}.json")


# -- Threads: each phase of a run at 1 thread and at all cores, alternated in one process (subcommand threads) --
@dataclass
class ThreadsArgs:
    threads: int = 0
    """the many-thread side (0: one per core this process may use)"""
    seconds: float = 3.0
    """target duration of each timed loop"""
    repeats: int = 3
    """1-thread and many-thread timings alternate this many times; the median of each counts"""
    name: str = "threads"
    """results file: bench/results/<name>.json"""


def phase_work(device: str = "cpu") -> dict:
    """One unit of each phase that torch computes, at the cpu preset's sizes with fresh models and random data
    (speed does not depend on the values): (the unit's name, a function that does one)."""
    import dydiff
    import dynamics
    from iql import IQL
    from td3bc import TD3BC
    from train import dm_config, parse_args, rollout_config
    from data import TransitionBuffer

    p = parse_args([])
    dm_cfg, roll_cfg, fit_cfg = dm_config(p), rollout_config(p), dynamics.FitConfig()
    torch.manual_seed(0)
    N, g = 20_000, torch.Generator(device=device).manual_seed(0)
    s, a = torch.randn(N, OBS_DIM), torch.rand(N, ACT_DIM) * 2 - 1
    ens, rew = dynamics.Ensemble(OBS_DIM, ACT_DIM), dynamics.RewardModel(OBS_DIM, ACT_DIM)
    one_epoch = replace(fit_cfg, steps_per_epoch=20)  # fit's own loop: 20 minibatch steps and a holdout pass
    dm = diffusion.DynamicsDiffusion(OBS_DIM, ACT_DIM, dm_cfg.horizon, dm_cfg.dim, dm_cfg.dim_mults, act=dm_cfg.act,
                                     blocks=dm_cfg.blocks)
    X, H = torch.rand(N, OBS_DIM + ACT_DIM) * 2 - 1, dm_cfg.horizon
    starts, lengths = np.arange(0, N - H), np.full(N - H, H)
    buf = TransitionBuffer(N, OBS_DIM, ACT_DIM, device)
    buf.add(obs=s, next_obs=s, actions=a, rewards=torch.rand(N), dones=torch.zeros(N))
    td3, iql = TD3BC(OBS_DIM, ACT_DIM, device=device), IQL(OBS_DIM, ACT_DIM, device=device, max_steps=10**6)
    models = dydiff.DyDiffModels(ensemble=ens, reward_model=rew, dm=dm, terminal_fn=dynamics.terminal_fn("maze2d"),
                                 obs_mean=torch.zeros(OBS_DIM), obs_std=torch.ones(OBS_DIM))
    s0 = torch.randn(roll_cfg.rollout_batch, OBS_DIM)
    dm_steps = replace(dm_cfg, train_steps=10)
    return {
        "ensemble: 20 training steps": lambda: dynamics.fit(ens, (s, a, s), (s[:500], a[:500], s[:500]), one_epoch, 1, g,
                                                            progress=False),
        "reward model: 20 training steps": lambda: dynamics.fit(rew, (s, a, s[:, :1]), (s[:500], a[:500], s[:500, :1]),
                                                                one_epoch, 1, g, progress=False),
        "DM: 10 training steps": lambda: diffusion.train(dm, X, starts, lengths, dm_steps, False, val_every=10**9),
        "DyDiff round": lambda: dydiff.rollout_round(td3.act, models, s0, roll_cfg, g),
        "TD3+BC update": lambda: td3.update(buf.sample(256, g)),
        "IQL update": lambda: iql.update(buf.sample(256, g)),
    }


def threads_main(args: ThreadsArgs) -> None:
    from train import cores

    many = args.threads or cores()
    if many < 2:
        raise SystemExit(f"error: speed.py threads compares 1 thread with more: give --threads 2 or more (got {many}; "
                         f"--threads 0 takes the {cores()} core(s) this process may use)")
    rows = {}
    for name, fn in phase_work().items():
        per_s = {1: [], many: []}
        for _ in range(args.repeats):
            for k in per_s:
                torch.set_num_threads(k)
                per_s[k].append(rate(fn, "cpu", args.seconds, warmup=1)[0])
        one, all_ = float(np.median(per_s[1])), float(np.median(per_s[many]))
        rows[name] = {"per_s_1_thread": one, f"per_s_{many}_threads": all_, "speedup": all_ / one,
                      "all": {str(k): v for k, v in per_s.items()}}
        print(f"{name}: {one:.2f}/s at 1 thread, {all_:.2f}/s at {many}: x{all_ / one:.2f}", flush=True)
    torch.set_num_threads(1)
    out = {"threads": many, "cores": os.cpu_count(), "matmul_1thread_gflop_per_s": matmul_flops("cpu", args.seconds) / 1e9,
           "machine": f"{platform.machine()}, torch {torch.__version__}", "phases": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    print(f"\n| phase (cpu preset sizes) | 1 thread | {many} threads | speed-up |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['per_s_1_thread']:.2f}/s | {r[f'per_s_{many}_threads']:.2f}/s | x{r['speedup']:.2f} |")
    print(f"1-thread matmul {out['matmul_1thread_gflop_per_s']:.1f} GFLOP/s; wrote {RESULTS / args.name}.json")


if __name__ == "__main__":
    if sys.argv[1:2] == ["threads"]:
        threads_main(tyro.cli(ThreadsArgs, args=sys.argv[2:], prog="speed.py threads"))
    else:
        main(tyro.cli(Args))
