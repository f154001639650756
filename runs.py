"""Run plumbing for train.py: the run folder, TensorBoard, the progress bar, checkpoints and --resume,
Ctrl-C, the NaN guard, timing and summary.json; and the file plumbing every other file shares: atomic
writes, the one checkpoint reader (``torch.load(weights_only=True)`` with a one-line error), the cache of
pretrained models beside the dataset, keyed by their settings and the digest of their code, and the
provenance (commit, uncommitted changes, code digests) each run records. Nothing here changes what is learnt.

A run folder ``<run_dir>/<run_name>/`` holds config.json, TensorBoard events, checkpoint.pt (rewritten
atomically at every evaluation), summary.json and learning_curve.png. Ctrl-C, SIGTERM and the signals a
cluster sends before a time-out or pre-emption (SIGUSR1, SIGUSR2: Slurm's --signal, submitit's default)
only raise a flag that the loop checks between gradient steps: the run then saves a checkpoint and exits
with 128 + the signal's number (130 for Ctrl-C), so a checkpoint never holds a half-done update. A
SIGKILL loses at most one evaluation interval.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import os
import platform
import signal
import subprocess
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm


CHECKPOINT_FORMAT = "dydiff-train-v2"  # v2: every flag in "args" and the code's digests in "provenance"
NAMES = {"td3bc": "TD3+BC", "iql": "IQL"}
# Flags that may differ when a run is resumed: they change where and how fast it runs, not what it learns
# (build_data only decides whether a missing dataset may be built; the dataset itself is checked by its fingerprint).
FREE_FLAGS = {"total_steps", "resume", "run_dir", "run_name", "threads", "device", "track_tensorboard", "build_data",
              "retrain"}
ROOT = Path(__file__).resolve().parent
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class CheckpointError(ValueError):
    """A checkpoint or cached model that cannot be used, with a one-line message naming the file and the fix."""


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it: a crash mid-write never leaves a
    truncated file under the real name (os.replace is atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")  # np.savez wants its suffix kept
    write(tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fix: str, device: str | torch.device = "cpu") -> dict:
    """A dict saved by torch.save, loaded with weights_only=True (no code is unpickled), or a one-line
    CheckpointError that names the file and `fix`, what the user should do about it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, foreign or unsafe to unpickle
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}): it is truncated or not ours; {fix}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not one of our checkpoints; {fix}")
    return state


def source(obj) -> str:
    """The source text of a module, class or function (a seam: tests replace it to simulate an edit)."""
    return inspect.getsource(obj)


def code_digest(*objs, skip: tuple[str, ...] = ()) -> str:
    """A digest of what the code of `objs` (modules, classes, functions, or source text) does: sha256 of their parsed source
    (ast.dump) without docstrings and without the definitions named in `skip` ("Class.method" or "function").
    Parsed, so comments, docstrings, blank lines and line breaks do not change it and every token that can
    change behaviour does; a hand-bumped version number forgets edits, a digest of the raw text retrains on
    a comment."""
    h = hashlib.sha256()
    for obj in objs:
        tree = ast.parse(textwrap.dedent(obj if isinstance(obj, str) else source(obj)))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if not isinstance(body, list):
                continue
            scope = getattr(node, "name", "")
            body[:] = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                               and isinstance(n.value.value, str))  # a docstring
                       and not (isinstance(n, (ast.FunctionDef, ast.ClassDef)) and
                                (n.name in skip or f"{scope}.{n.name}" in skip))] or [ast.Pass()]
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:12]


def load_or_train_cached(data, kind: str, settings: dict, code: dict[str, str], train: Callable[[], dict],
                         device: str | torch.device = "cpu", retrain: bool = False) -> tuple[dict, Path, bool]:
    """The cache of pretrained models: <dataset>/dydiff_cache/<kind>_<hash of dataset, settings and code>.pt
    (data: a data.OfflineData, for its cache_dir, fingerprint and dataset_id).

    code: {file: code_digest} of the code that defines and trains the model, so an edit to it retrains the
    model instead of loading one that code which no longer exists has made. Returns (checkpoint dict, its
    path, whether it came from the cache); before training it prints one line saying why. A cached file is
    used only when it was made from this dataset with these settings and this code; otherwise `train()` runs
    and its dict is saved (atomically) with them beside it. Training holds a lock: see training_lock."""
    settings, code = json.loads(json.dumps(settings)), dict(code)  # tuples -> lists, as they come back from the file
    key = hashlib.sha256(json.dumps([kind, data.fingerprint, settings, code], sort_keys=True).encode()).hexdigest()[:12]
    path = data.cache_dir / f"{kind}_{key}.pt"
    header = {"kind": kind, "fingerprint": data.fingerprint, "settings": settings, "code": code}

    def cached() -> dict:
        ckpt = load_checkpoint(path, "delete it and it will be retrained", device)
        if {k: ckpt.get(k) for k in header} != header:
            raise CheckpointError(f"{path} is not a {kind} model of {data.dataset_id} with these settings and this "
                                  f"code; delete it and it will be retrained")
        return ckpt

    if path.exists() and not retrain:
        return cached(), path, True
    with training_lock(path) as waited:
        if path.exists() and (waited or not retrain):  # another run trained it while this one waited
            return cached(), path, True
        print(f"{kind}: not loaded from the cache, training it ({'--retrain' if retrain else why_not_cached(data.cache_dir, header)})",
              flush=True)
        ckpt = {**header, **train()}
        write_atomic(path, lambda tmp: torch.save(ckpt, tmp))
        write_atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(header, indent=1)))
    return ckpt, path, False


def why_not_cached(cache_dir: Path, header: dict) -> str:
    """Why no cached model fits, from the headers (<kind>_<key>.json) of the others of this kind and dataset:
    the nearest one's other code (which files) or other settings (which, then -> now)."""
    near = []
    for f in sorted(cache_dir.glob(f"{header['kind']}_*.json")):
        try:
            other = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if other.get("fingerprint") == header["fingerprint"]:
            settings = sorted(k for k in header["settings"] | other.get("settings", {})
                              if other.get("settings", {}).get(k) != header["settings"].get(k))
            files = sorted(k for k in header["code"] | other.get("code", {}) if other.get("code", {}).get(k) != header["code"].get(k))
            near.append((len(settings), len(files), settings, files, other))
    if not near:
        return "no cached model of this dataset"
    _, _, settings, files, other = min(near, key=lambda n: n[:2])
    if settings:
        return "other settings than the cached one (" + ", ".join(
            f"{k} {other['settings'].get(k)} -> {header['settings'].get(k)}" for k in settings[:4]) + ")"
    return f"other code than the cached one ({', '.join(files)} changed)"


@contextmanager
def training_lock(path: Path):
    """An exclusive lock on <path>.lock while the model of `path` is trained, so that runs started together
    (the seeds of bench/compare.py, bench/pretrain.py beside a run) train it once: the others wait, then
    load it. Yields whether it had to wait. flock is released by the OS when its holder dies, so a crash
    never leaves a stale lock; where there is no fcntl (Windows), there is no lock either."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            print(f"waiting for another process that is training {path.name} (it holds {f.name})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
            waited = True
        yield waited  # closing the file releases the lock, on success and on error


class ConfigError(ValueError):
    """A bad flag or run folder, reported as one line before any work is done."""


def read_run_checkpoint(path: Path, fix: str = "delete it to start over") -> dict:
    """A train.py checkpoint, or a one-line CheckpointError saying what to do."""
    state = load_checkpoint(path, fix)
    if state.get("format") != CHECKPOINT_FORMAT:
        made = f"was made by another version of train.py ({state['format']})" if str(state.get("format", "")).startswith(
            "dydiff-train-") else "is not a train.py checkpoint"
        raise CheckpointError(f"{path} {made}; {fix}")
    return state


def git(*argv: str, root: Path = ROOT) -> str | None:
    try:
        out = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def code_digests(root: Path = ROOT) -> dict[str, str]:
    """{file: code_digest} of every Python file at the top of the project (tests aside): all the code a run executes
    from here. Comments and docstrings do not change a digest."""
    return {f.name: code_digest(f.read_text()) for f in sorted(root.glob("*.py")) if not f.name.startswith("test_")}


def provenance(root: Path = ROOT) -> dict:
    """What made a run, so a number can be traced to its code: the git commit, whether the tree had uncommitted
    changes and a digest of them (the diff against the commit and the untracked files), the code digests and the
    versions of the numerical libraries."""
    status = git("status", "--porcelain", "--untracked-files=all", root=root)
    dirty = bool(status and status.strip())
    changes = None
    if dirty:
        h = hashlib.sha256((git("diff", "HEAD", "--binary", root=root) or "").encode())
        for line in status.splitlines():
            if line.startswith("?? ") and (root / line[3:]).is_file():
                h.update(line[3:].encode() + (root / line[3:]).read_bytes())
        changes = h.hexdigest()[:12]
    return {"commit": (git("rev-parse", "HEAD", root=root) or "").strip() or None, "dirty": dirty,
            "changes_digest": changes, "code": code_digests(root),
            "versions": {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__}}


class Run:
    """One run folder: config.json, TensorBoard, the progress bar, checkpoints and --resume, Ctrl-C,
    the NaN guard, timing (updates and rollouts apart) and summary.json."""

    def __init__(self, args, device: str):
        self.args, self.device, self.t_start, self.evals, self.signals = args, device, time.time(), [], []
        self.cpu_start, self.cpu_before = time.process_time(), 0.0
        self.name = args.run_name or f"{args.env}__{args.algo}{'+dydiff' * args.dydiff}__{args.seed}__{int(time.time())}"
        self.path = Path(args.run_dir) / self.name
        self.ckpt = self.path / "checkpoint.pt"
        if not args.resume and self.ckpt.exists():
            raise ConfigError(f"{self.path} already holds a run: add --resume to continue it or pick another --run-name")
        if args.resume and not self.ckpt.exists():
            raise ConfigError(f"nothing to resume: {self.ckpt} does not exist")
        self.wall_before = self.update_time = self.rollout_time = 0.0
        self.provenance = provenance()
        self.pretrained = None  # DyDiff's models, as train.py records them (record_pretrained)

    def record_pretrained(self, fit_info: dict, dm_info: dict | None) -> None:
        """Which cached models the run used (their files are named by the dataset, settings and code that made them)
        and how well they fit the data, for summary.json: a score can be traced to its models."""
        self.pretrained = {
            "ensemble": {"file": Path(fit_info["path"]).name, "holdout_mse": fit_info["ensemble_holdout_mse"],
                         "reward_holdout_mse": fit_info["reward_holdout_mse"]},
            "dm": None if dm_info is None else {"file": Path(dm_info["path"]).name, "val_loss": dm_info["val_loss"],
                                                "train_steps": dm_info["train_steps"]}}

    @property
    def stopped(self) -> bool:
        return bool(self.signals)

    def start(self, data, learner, gen, synthetic) -> int:
        """Restore the checkpoint (--resume), write config.json, open TensorBoard, the bar and the Ctrl-C handler."""
        args, self.data, self.learner, self.gen, self.synthetic = self.args, data, learner, gen, synthetic
        self.pretrain_time, step = time.time() - self.t_start, 0
        if args.resume:
            state = read_run_checkpoint(self.ckpt)
            if state["fingerprint"] != data.fingerprint:
                raise ConfigError(f"{self.ckpt} was made for another dataset ({state['args']['env']}); use another --run-name")
            now, then = (json.loads(json.dumps(a)) for a in (asdict(args), state["args"]))
            changed = [k for k in now | then if k not in FREE_FLAGS and then.get(k) != now.get(k)]
            if changed:
                was = ", ".join(f"--{k.replace('_', '-')}={then.get(k)}" for k in changed)
                raise ConfigError(f"{self.ckpt} was made with other settings ({was}); "
                                  f"resume with the same flags or use another --run-name")
            other = sorted(f for f in self.provenance["code"] | state["provenance"]["code"]
                           if self.provenance["code"].get(f) != state["provenance"]["code"].get(f))
            if other:
                raise ConfigError(f"{self.ckpt} was made by other code ({', '.join(other)} changed since); "
                                  f"restore that code to resume it, or start over with another --run-name")
            learner.load_state_dict(state["learner"])
            gen.set_state(state["gen"])
            if synthetic is not None:
                synthetic.load_state_dict(state["synthetic"])
            step, self.evals = state["step"], state["evals"]
            self.wall_before, self.update_time, self.rollout_time = (state[k] for k in ("wall_time", "update_time",
                                                                                         "rollout_time"))
            self.cpu_before = state["cpu_time"]
            print(f"resuming {self.path} at step {step}")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(json.dumps({**asdict(args), "device": self.device, "run_name": self.name,
                                                           "dataset_id": data.dataset_id, "fingerprint": data.fingerprint,
                                                           "ref_min": data.ref_min,
                                                           "ref_max": data.ref_max, "provenance": self.provenance},
                                                          indent=2))
        self.writer = None
        if args.track_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint by the run that died: no duplicated curves.
            self.writer = SummaryWriter(str(self.path), purge_step=step if args.resume else None)
            self.writer.add_text("config", json.dumps(asdict(args), indent=2))
        self.bar = tqdm(total=args.total_steps, initial=step, dynamic_ncols=True,
                        desc=f"{args.algo}{'+dydiff' * args.dydiff} {data.dataset_id}")
        self.postfix = {}
        self.old_handlers = {sig: signal.signal(sig, lambda signum, frame: self.signals.append(signum))
                             for sig in STOP_SIGNALS}
        self.interval_step, self.interval_t0, self.interval_rollout = step, time.time(), 0.0
        return step

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer:
            self.writer.add_scalar(tag, value, step)

    def log_round(self, step: int, stats: dict, buffer_size: int, seconds: float) -> None:
        self.interval_rollout += seconds
        for k in ("return_kept_mean", "return_rejected_mean", "kept_share", "n_transitions", "time_s"):
            self.scalar(f"dydiff/{k}", stats[k], step)
        self.scalar("dydiff/buffer_size", buffer_size, step)
        self.postfix.update(syn=buffer_size, roll=f"{stats['time_s']:.0f}s")

    def after_update(self, step: int, losses: dict) -> None:
        self.bar.update(1)
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:  # stop before the NaN reaches a checkpoint: the last one on disk stays good
            last = f"{self.ckpt} (step {self.evals[-1]['step']})" if self.evals else "none yet"
            raise FloatingPointError(f"{self.args.algo} {bad[0]} became {losses[bad[0]]} at step {step}; "
                                     f"last good checkpoint: {last}")

    def end_interval(self, step: int) -> float:
        """Close the timing of the steps since the last evaluation; returns their updates per second."""
        dt = time.time() - self.interval_t0 - self.interval_rollout
        self.update_time, self.rollout_time = self.update_time + dt, self.rollout_time + self.interval_rollout
        sps = (step - self.interval_step) / max(dt, 1e-9)
        self.interval_step, self.interval_rollout = step, 0.0
        return sps

    def log_evaluation(self, step: int, losses: dict, returns: np.ndarray, score: float) -> None:
        sps = self.end_interval(step)
        self.evals.append({"step": step, "return": float(returns.mean()), "score": score})
        for k, v in losses.items():
            self.scalar(f"losses/{k}", v, step)
        self.scalar("charts/normalized_score", score, step)
        self.scalar("charts/return", float(returns.mean()), step)
        self.scalar("charts/SPS", sps, step)
        self.postfix.update(sps=f"{sps:.0f}", score=f"{score:.1f}", best=f"{max(e['score'] for e in self.evals):.1f}")
        self.bar.set_postfix(self.postfix)

    def wall_time(self) -> float:  # seconds, all sessions of a resumed run
        return self.wall_before + time.time() - self.t_start

    def cpu_time(self) -> float:  # CPU seconds, all sessions: not inflated by a paused machine
        return self.cpu_before + time.process_time() - self.cpu_start

    def save(self, step: int) -> None:
        """The whole state of the run, written atomically (a crash mid-write keeps the last checkpoint)."""
        state = {"format": CHECKPOINT_FORMAT, "args": asdict(self.args), "provenance": self.provenance,
                 "fingerprint": self.data.fingerprint,
                 "step": step, "learner": self.learner.state_dict(), "gen": self.gen.get_state(), "evals": self.evals,
                 "synthetic": self.synthetic.state_dict() if self.synthetic is not None else None,
                 "wall_time": self.wall_time(), "update_time": self.update_time,
                 "rollout_time": self.rollout_time, "cpu_time": self.cpu_time(),
                 "obs_mean": torch.as_tensor(self.data.obs_mean),
                 "obs_std": torch.as_tensor(self.data.obs_std)}
        write_atomic(self.ckpt, lambda tmp: torch.save(state, tmp))
        self.interval_t0 = time.time()  # evaluation and checkpoint time count in the wall time only

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()  # an error message must start on its own line, not after the bar
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)
        if self.writer:
            self.writer.close()

    def exit_if_stopped(self, step: int) -> None:
        """After a stop signal: a checkpoint at this step, the command that continues the run, exit 128 + signal."""
        if not self.stopped:
            return
        if self.interval_step != step:
            self.end_interval(step)
            self.save(step)
        print(f"interrupted at step {step}: checkpoint saved; continue with "
              f"python train.py --run-name {self.name} --resume (and the same flags)")
        raise SystemExit(128 + self.signals[0])

    def finish(self, step: int) -> dict:
        """summary.json (final score = the mean of the last 3 evaluations) and learning_curve.png."""
        args, data = self.args, self.data
        best = max(self.evals, key=lambda e: e["score"])
        wall = self.wall_time()
        summary = {"env": args.env, "dataset_id": data.dataset_id, "fingerprint": data.fingerprint,
                   "algo": args.algo, "dydiff": args.dydiff,
                   "preset": args.preset, "seed": args.seed, "steps": step,
                   # final: the mean of the last 3 evaluations, less noisy than the last one alone
                   "final_score": float(np.mean([e["score"] for e in self.evals[-3:]])),
                   "last_score": self.evals[-1]["score"], "best_score": best["score"], "best_step": best["step"],
                   "wall_time_s": wall, "cpu_time_s": self.cpu_time(),
                   "pretrain_time_s": self.pretrain_time, "rollout_time_s": self.rollout_time,
                   "updates_per_s": step / max(self.update_time, 1e-9), "ref_min": data.ref_min,
                   "ref_max": data.ref_max, "device": self.device,
                   "threads": args.threads, "evaluations": self.evals, "pretrained": self.pretrained,
                   # what made it: the resolved settings, the commit, uncommitted changes and the code's digests
                   "settings": json.loads(json.dumps(asdict(args))), "provenance": self.provenance}
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curve(self.evals, self.path / "learning_curve.png", f"{NAMES[args.algo]}{' + DyDiff' * args.dydiff}, "
                   f"seed {args.seed}", data.dataset_id)
        print(f"done: final {summary['final_score']:.1f} (mean of the last 3 evaluations), last "
              f"{summary['last_score']:.1f}, best {summary['best_score']:.1f} (step {best['step']}), "
              f"{wall / 60:.1f} min (pretraining {self.pretrain_time / 60:.1f}, rollouts {self.rollout_time / 60:.1f}), "
              f"{summary['updates_per_s']:.0f} updates/s -> {self.path}")
        return summary


def plot_curve(evals: list[dict], path: Path, title: str, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([e["step"] for e in evals], [e["score"] for e in evals], marker="o", ms=3)
    ax.set(xlabel="gradient steps", ylabel="normalized score (0 random, 100 expert)")
    ax.set_title(f"{title}\n{subtitle}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
