"""The GPU check: what a user of `train.py --preset paper` can expect from this machine, in about 4 minutes.

    python bench/gpu_check.py                          # on a CUDA machine: the paper's sizes
    python bench/gpu_check.py --tiny --device cpu      # tiny sizes, seconds (what the tests run)

Each section has its own time box (seconds) and bench/results/gpu_check.json is rewritten after each
one, so a run cut short still reports what it measured. Sections:
  versions   Python, torch, CUDA, the GPU's name and memory;
  tests      the tests with "device" in their name, on this device (DYDIFF_TEST_DEVICE); they need the
             project's requirements (gymnasium, minari, ...): where one is missing the section says so;
  matmul     the matrix-product rate in this process: fp32, tf32 and bf16 autocast;
  dm_train   DM training steps/s at the paper's size (H, dim, mults) at batch 8 and a larger batch;
  round      one DyDiff round at the paper's sizes (B, T = H, M, Heun N with churn), fresh models, time
             per phase; where the whole round would not fit its box, the DM phase is timed on a share of
             its network calls and scaled;
  sampler    FLOP/s of one sampler network call as a share of the matmul rate, for fp32, tf32 and bf16
             autocast, and how far their samples move from fp32's;
  learners   TD3+BC and IQL updates/s at batch 256; the policy's forward pass on an evaluation batch;
  projection the wall time of one full --preset paper run from these rates.
Fresh models and random data stand in for a dataset: speed does not depend on the weights. Phase times
synchronize the device before reading the clock. Peak GPU memory is recorded per section.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
OBS_DIM, ACT_DIM = 11, 3  # hopper's: the locomotion datasets the paper's tables are made of


@dataclass
class Args:
    device: str = "cuda"
    """torch device to check"""
    tiny: bool = False
    """tiny sizes and time boxes (a CPU smoke test of the check itself)"""
    tests: bool = True
    """run the device tests (pytest) as the first section"""
    out: str = str(RESULTS / "gpu_check.json")
    """the JSON report, rewritten after every section"""


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device: str, seconds: float, max_iters: int = 1000) -> tuple[float, int]:
    """Seconds per call of fn: one warm-up call, then calls until `seconds` have passed (at least one)."""
    fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (n == 0 or time.perf_counter() - t0 < seconds):
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - t0) / n, n


class Report:
    """The JSON report: one entry per section, rewritten atomically after each."""

    def __init__(self, path: str, device: str):
        self.path, self.device, self.data = Path(path), device, {"sections": {}}

    def section(self, name: str, values: dict, t0: float) -> None:
        values = {**values, "seconds": round(time.perf_counter() - t0, 2)}
        if self.device.startswith("cuda"):
            values["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.data["sections"][name] = values
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)
        print(f"[{name}] " + ", ".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, (dict, list))),
              flush=True)


def sizes(tiny: bool) -> tuple:
    """(train.Args, DMConfig, RolloutConfig, time box per section in seconds) of the paper preset, or tiny ones.
    Built as train.parse_args builds --preset paper, without tyro (which the GPU machine may lack)."""
    from train import PAPER, Args as TrainArgs, dm_config, rollout_config

    p = replace(TrainArgs(), preset="paper", **PAPER)
    if tiny:
        p = replace(p, horizon=8, rollout_length=8, dm_dim=8, dm_mults=(1, 2), rollout_batch=16, sampler_steps=3)
    return p, dm_config(p), rollout_config(p), 0.2 if tiny else 20.0


def matmul_rates(device: str, seconds: float, n: int) -> dict:
    """TFLOP/s of an n x n x n product: fp32 (tf32 off), tf32 where offered, bf16 autocast."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = {}
    for mode in ("fp32", "tf32", "bf16"):
        if mode != "fp32" and not device.startswith("cuda"):
            continue
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=mode == "bf16"):
            dt, _ = timed(lambda: a @ b, device, seconds / 3)
        out[mode] = 2 * n**3 / dt / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def device_tests(dev: str, box: float, bounded: bool = True) -> dict:
    """The tests with "device" in their name, on this device, where the project's requirements are installed."""
    missing = [m for m in ("gymnasium", "minari", "tyro", "pytest") if not _importable(m)]
    if missing:
        return {"skipped": f"missing packages {', '.join(missing)}: carry them as wheels "
                           f"(pip install -r requirements.txt where pip can reach them)"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_dydiff.py", "-k", "device"],
                       cwd=ROOT, env={**os.environ, "DYDIFF_TEST_DEVICE": dev}, capture_output=True, text=True,
                       # a bound that keeps the check within a device's budget; the tiny run (the test suite's)
                       # waits as long as the tests take, which a loaded CPU stretches past any bound
                       timeout=max(60, 6 * box) if bounded else None)
    return {"returncode": r.returncode, "summary": r.stdout.strip().splitlines()[-1]}


def dm_training(dev: str, dm_cfg, tiny: bool) -> tuple:
    """A fresh DM of the paper's size and its training steps/s at the paper's batch and at 8x that batch."""
    import diffusion

    torch.manual_seed(0)
    dm = diffusion.DynamicsDiffusion(OBS_DIM, ACT_DIM, dm_cfg.horizon, dm_cfg.dim, dm_cfg.dim_mults,
                                     act=dm_cfg.act, blocks=dm_cfg.blocks).to(dev)
    H, n_rows = dm_cfg.horizon, 20 * dm_cfg.horizon
    X = torch.rand(n_rows, OBS_DIM + ACT_DIM, device=dev) * 2 - 1
    seg_starts, seg_lengths = torch.arange(n_rows - H).numpy(), torch.full((n_rows - H,), H).numpy()
    rates = {}
    for batch in (dm_cfg.batch_size, 8 * dm_cfg.batch_size):
        steps = 3 if tiny else 30
        info = diffusion.train(dm, X, seg_starts, seg_lengths, replace(dm_cfg, train_steps=steps, batch_size=batch),
                               progress=False, val_every=10**9)
        rates[f"batch_{batch}"] = steps / info["train_seconds"]
    n_params = sum(q.numel() for q in dm.net.parameters())
    return dm, {"params_m": round(n_params / 1e6, 2), "steps_per_s": rates}


def one_round(dev: str, dm, cfg, actor, box: float) -> tuple:
    """One DyDiff round with fresh models, phase by phase; where the DM's iterations would not fit the box,
    their time is one network call's times the calls. Also returns that network call, for the sampler section."""
    import dydiff
    import dynamics

    ens, rew = dynamics.Ensemble(OBS_DIM, ACT_DIM).to(dev), dynamics.RewardModel(OBS_DIM, ACT_DIM).to(dev)
    models = dydiff.DyDiffModels(ensemble=ens, reward_model=rew, dm=dm, terminal_fn=dynamics.terminal_fn("hopper"),
                                 obs_mean=torch.zeros(OBS_DIM, device=dev), obs_std=torch.ones(OBS_DIM, device=dev))
    g, H, phases = torch.Generator(device=dev).manual_seed(0), dm.horizon, {}
    s0 = torch.randn(cfg.rollout_batch, OBS_DIM, device=dev, generator=g) * 0.1
    t = time.perf_counter()
    states, actions = dydiff.initial_rollout(actor.act, models, s0, cfg.rollout_length, g)
    sync(dev)
    phases["ensemble_s"] = time.perf_counter() - t
    calls = (2 * cfg.sampler_steps - 1 if cfg.sampler_solver == "heun" else cfg.sampler_steps) * \
        -(-(cfg.rollout_length - 1) // (H - 1)) * cfg.iterations  # per window x chained windows x M
    cond, mask = torch.zeros(cfg.rollout_batch, H, OBS_DIM + ACT_DIM, device=dev), dm.cond_mask(H)
    sigma = torch.full((cfg.rollout_batch,), 1.0, device=dev)
    call = torch.no_grad()(lambda: dm.denoise(cond, sigma, cond, mask, dm.ema))  # one network call of the sampler
    call_s, _ = timed(call, dev, box / 4, max_iters=20)
    if call_s * calls < 2 * box:  # the whole refinement fits the box: run it
        t = time.perf_counter()
        states, actions = dydiff.refine(actor.act, models, states, actions, cfg, g)[-1]
        sync(dev)
        phases["dm_s"], phases["dm_measured"] = time.perf_counter() - t, "whole"
    else:
        phases["dm_s"], phases["dm_measured"] = call_s * calls, f"{calls} calls x one call"
    t = time.perf_counter()
    rewards = dydiff.transition_rewards(models, states, actions)  # steps 4-6 as dydiff.rollout_round
    kept = dydiff.select(rewards.sum(1), cfg, g)
    tr = dydiff.to_transitions(states[kept], actions[kept], rewards[kept],
                               dydiff.transition_dones(models, states[kept], actions[kept]))
    sync(dev)
    phases["filter_and_transitions_s"] = time.perf_counter() - t
    phases["round_s"] = phases["ensemble_s"] + phases["dm_s"] + phases["filter_and_transitions_s"]
    return {"B": cfg.rollout_batch, "T": cfg.rollout_length, "M": cfg.iterations, "N": cfg.sampler_steps,
            "solver": cfg.sampler_solver, "network_call_s": call_s, "network_calls": calls,
            "kept_transitions": len(tr["obs"]), **phases}, call


def sampler_precision(dev: str, dm, cfg, call, peak: dict, box: float) -> dict:
    """The sampler's network call's FLOP/s as a share of the matmul's, per precision, and how far each
    precision moves a batch of samples from fp32's."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    flops, H = counter.get_total_flops(), dm.horizon
    cond_s = torch.rand(min(cfg.rollout_batch, 64), H, OBS_DIM + ACT_DIM, device=dev) * 2 - 1
    out, reference = {}, None
    for mode in peak:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
        with torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=mode == "bf16"):
            dt, _ = timed(call, dev, box / 6, max_iters=20)
            x = dm.sample(cond_s, dm.cond_mask(H), cfg.sampler_steps, torch.Generator(device=dev).manual_seed(1),
                          cfg.sampler_solver).float()
        reference = x if reference is None else reference
        out[mode] = {"tflops": flops / dt / 1e12, "share_of_matmul": flops / dt / 1e12 / peak[mode],
                     "max_sample_change_vs_fp32": float((x - reference).abs().max())}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return {"gflop_per_call": flops / 1e9, "by_precision": out}


def learner_rates(dev: str, p, actor, box: float) -> dict:
    """TD3+BC and IQL updates/s at batch 256, and the policy's pass over an evaluation's batch of observations."""
    from iql import IQL
    from td3bc import TD3BC

    batch = {"obs": torch.randn(256, OBS_DIM, device=dev), "actions": torch.rand(256, ACT_DIM, device=dev) * 2 - 1,
             "rewards": torch.rand(256, device=dev), "next_obs": torch.randn(256, OBS_DIM, device=dev),
             "dones": torch.zeros(256, device=dev)}
    rates = {}
    for name, cls in (("td3bc", TD3BC), ("iql", IQL)):
        learner = cls(OBS_DIM, ACT_DIM, device=dev)
        rates[name] = 1 / timed(lambda: learner.update(batch), dev, box / 4, max_iters=2000)[0]
    obs = torch.randn(p.eval_episodes, OBS_DIM, device=dev)
    act_s, _ = timed(lambda: actor.act(obs).cpu(), dev, box / 8, max_iters=2000)
    return {"updates_per_s": rates, "policy_step_on_eval_batch_s": act_s,
            "note": "an evaluation also steps the simulator on the CPU: not measured here"}


def main(args: Args) -> dict:
    from runs import provenance
    from td3bc import TD3BC

    dev, t_all = args.device, time.perf_counter()
    torch.set_num_threads(1)  # the CPU side (the ensemble's loop, the simulator) as train.py runs it
    report = Report(args.out, dev)
    report.data["made_by"] = provenance(ROOT)  # the commit (None where the tree came without .git) and code digests
    p, dm_cfg, cfg, box = sizes(args.tiny)

    t0 = time.perf_counter()
    gpu = torch.cuda.get_device_properties(dev) if dev.startswith("cuda") else None
    report.section("versions", {"python": platform.python_version(), "torch": torch.__version__,
                                "cuda": torch.version.cuda, "device": dev, "gpu": gpu.name if gpu else None,
                                "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if gpu else None,
                                "sizes": "tiny" if args.tiny else "paper"}, t0)
    if args.tests:
        t0 = time.perf_counter()
        report.section("tests", device_tests(dev, box, bounded=not args.tiny), t0)
    t0 = time.perf_counter()
    peak = matmul_rates(dev, box / 2, 256 if args.tiny else 8192)
    report.section("matmul", {"tflops": peak}, t0)
    t0 = time.perf_counter()
    dm, values = dm_training(dev, dm_cfg, args.tiny)
    report.section("dm_train", values, t0)
    t0, actor = time.perf_counter(), TD3BC(OBS_DIM, ACT_DIM, device=dev)
    round_values, call = one_round(dev, dm, cfg, actor, box)
    report.section("round", round_values, t0)
    t0 = time.perf_counter()
    report.section("sampler", sampler_precision(dev, dm, cfg, call, peak, box), t0)
    t0 = time.perf_counter()
    learners = learner_rates(dev, p, actor, box)
    report.section("learners", learners, t0)

    # a full --preset paper run from these rates
    t0 = time.perf_counter()
    rounds = p.total_steps // p.rollout_interval
    hours = {"dm_pretraining": p.dm_train_steps / values["steps_per_s"][f"batch_{dm_cfg.batch_size}"] / 3600,
             "rollout_rounds": rounds * round_values["round_s"] / 3600,
             "td3bc_updates": p.total_steps / learners["updates_per_s"]["td3bc"] / 3600}
    report.section("projection", {"rounds": rounds, "hours": hours, "total_hours_td3bc": sum(hours.values()),
                                  "excluded": "ensemble and reward-model pretraining (epochs until the holdout "
                                              "stops improving), evaluations' simulator steps"}, t0)
    report.data["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report.section("done", {}, t0)
    return report.data


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    try:
        import tyro
    except ImportError:  # the GPU machine may lack it: the defaults, a CUDA check at the paper's sizes, need no flags
        main(Args())
    else:
        main(tyro.cli(Args))
