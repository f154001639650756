"""Offline datasets for DyDiff: D4RL names, Minari loading, flat arrays and scores.

A D4RL-style name means D4RL's recipe; it loads the first found of these Minari datasets:
  maze2d-umaze: the official D4RL/pointmaze/umaze-v2 (local, else a download attempt that gives up at
    once offline), then our local rebuild dydiff/pointmaze/umaze-v0;
  hopper-medium-replay: D4RL's own file imported here (import_d4rl) as dydiff/d4rl/hopper/medium-replay-v2,
    the only like-for-like comparison with the paper's and CORL's tables, then our local rebuild
    dydiff/mujoco/hopper/medium-replay-v0. (Minari's mujoco/<env>/medium-v0 is another recipe, with a far
    stronger "medium" and no medium-replay or medium-expert: only --dataset-id loads it.)
If none is here the rebuild is built (rebuild.py: the maze planner in minutes, SAC for about an hour per
locomotion env) when the caller passes that builder (rebuild.build_dataset); without it a one-line
DatasetError says how to get it. The dataset is then
flattened to transition arrays, cached beside it (dydiff_cache/flat.npz), rebuilt when its files or the
flattening code change.

Also the diffusion model's training windows (segments of H rows inside episodes), the transition buffer
and the digest of the code that makes the models' training data (their caches follow it: runs.py).

Commands (rebuild.py, which imports this file and not the other way round):
    python rebuild.py --env maze2d-umaze                          # build/load a dataset, print a summary
    python rebuild.py --import-d4rl hopper_medium_replay-v2.hdf5  # store D4RL's file (name from the file)
"""
from __future__ import annotations

import hashlib
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from runs import code_digest, write_atomic

# D4RL names -> Minari ids. maze2d entries also describe the local rebuild (rebuild.py) and its evaluation env.
MAZE2D = {
    # name: (official Minari id, gymnasium-robotics map, goal cell (row, col), eval steps, D4RL size)
    "maze2d-umaze": ("D4RL/pointmaze/umaze-v2", "U_MAZE", (1, 1), 300, 1_000_000),
    "maze2d-medium": ("D4RL/pointmaze/medium-v2", "MEDIUM_MAZE", (6, 6), 600, 2_000_000),
    "maze2d-large": ("D4RL/pointmaze/large-v2", "LARGE_MAZE", (7, 9), 800, 4_000_000),
}
# The locomotion envs: gymnasium id (v5, as Minari's mujoco sets; D4RL used the mujoco-py envs, same observation
# layout) and D4RL's reference returns (d4rl/infos.py: a random policy, SAC's expert), the 0 and 100 of a score.
LOCOMOTION_ENVS = {
    "hopper": ("Hopper-v5", -20.272305, 3234.3),
    "halfcheetah": ("HalfCheetah-v5", -280.178953, 12135.0),
    "walker2d": ("Walker2d-v5", 1.629008, 4592.3),
}
LOCOMOTION = {f"{env}-{level}": (env, level) for env in LOCOMOTION_ENVS
              for level in ("medium", "medium-replay", "medium-expert")}
ENV_NAMES = list(MAZE2D) + list(LOCOMOTION)


class DatasetError(RuntimeError):
    """A dataset problem with a one-line, actionable message (train.py prints it without a traceback)."""


# -- Names -----------------------------------------------------------------------------------------
def resolve_env(env: str, steps: int | None = None) -> list[str]:
    """The Minari ids a D4RL-style name loads, first found wins (module docstring); or fail with the valid names.
    maze2d with a size override (``steps``) means our rebuild of that size alone."""
    if env in MAZE2D:
        local = local_maze_id(env, steps or MAZE2D[env][4])
        return [local] if steps is not None else [MAZE2D[env][0], local]
    if env in LOCOMOTION:
        return list(locomotion_ids(env))
    raise DatasetError(f"unknown env '{env}': choose one of {', '.join(ENV_NAMES)} (or pass --dataset-id <minari id>)")


def local_maze_id(env: str, steps: int) -> str:
    """Our own Minari id for a local maze2d rebuild; a non-default size gets its own id."""
    maze = env.split("-", 1)[1]
    size = "" if steps == MAZE2D[env][4] else f"-{steps}"
    return f"dydiff/pointmaze/{maze}{size}-v0"


def locomotion_ids(env: str) -> tuple[str, str]:
    """Our own Minari ids of a locomotion name: D4RL's file imported here (import_d4rl), our rebuild (rebuild.py)."""
    robot, level = LOCOMOTION[env]
    return f"dydiff/d4rl/{robot}/{level}-v2", f"dydiff/mujoco/{robot}/{level}-v0"


def missing_dataset_message(env: str, steps: int | None = None) -> str:
    """One line: a name's dataset is not here and may not be built; the ways to get it."""
    where = f"dataset {env} is not on this machine (looked for {' and '.join(resolve_env(env, steps))}) and building is off"
    if env in LOCOMOTION:
        return (f"{where}: import D4RL's file with `python rebuild.py --import-d4rl {env}-v2.hdf5`, or rebuild it "
                f"with `python rebuild.py --env {env}` (SAC, about an hour per env on a CPU core)")
    return f"{where}: rebuild it with `python rebuild.py --env {env}{f' --steps {steps}' if steps else ''}` (minutes)"


# -- Loading and flattening ------------------------------------------------------------------------
def _try_download(dataset_id: str) -> bool:
    """One fast connectivity probe, then Minari's download; False instead of a long hang offline."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    try:
        import minari

        minari.download_dataset(dataset_id)
        return True
    except Exception as exc:  # any remote failure means "not available": fall back
        print(f"download of {dataset_id} failed: {exc}")
        return False


def local_id(candidates: list[str]) -> str | None:
    """The first of these Minari ids stored on this machine (the order a name's ids are tried in), or None."""
    import minari

    local = set(minari.list_local_datasets())
    return next((cid for cid in candidates if cid in local), None)


def open_minari(env: str | None = None, dataset_id: str | None = None, steps: int | None = None,
                build: Callable | None = None):
    """Find, download or build the Minari dataset (the order: module docstring). ``build(env, steps)`` makes a
    missing one (rebuild.build_dataset); None: a dataset that is not here is never built, a one-line DatasetError
    says how to get it. Returns (MinariDataset, how)."""
    import minari

    candidates = [dataset_id] if dataset_id is not None else resolve_env(env, steps)
    found = local_id(candidates)
    if found is not None:
        return minari.load_dataset(found), "local"
    # Only an official id can be downloaded: one given explicitly, or maze2d's D4RL set (never our own ids).
    official = dataset_id or (candidates[0] if env in MAZE2D and steps is None else None)
    if official is not None and _try_download(official):
        return minari.load_dataset(official), "downloaded"
    if dataset_id is None:  # an explicit dataset_id is never swapped for a rebuild
        if build is None:
            raise DatasetError(missing_dataset_message(env, steps))
        return build(env, steps), "built locally"
    raise DatasetError(f"dataset {official} is not on this machine and cannot be downloaded: on a connected "
                       f"machine run `minari download {official}` and copy ~/.minari/datasets/{official} here "
                       f"(or set MINARI_DATASETS_PATH)")


@dataclass
class OfflineData:
    """A dataset flattened to transitions. Observations are raw; ``obs_mean``/``obs_std`` z-score them."""

    dataset_id: str
    obs: np.ndarray          # (N, obs_dim) float32; pointmaze: [qpos, qvel, desired_goal]
    actions: np.ndarray      # (N, act_dim) float32 in [-1, 1]
    rewards: np.ndarray      # (N,) float32
    next_obs: np.ndarray     # (N, obs_dim) float32
    terminals: np.ndarray    # (N,) float32, from terminations (never truncations)
    episode_starts: np.ndarray  # (E,) int64 index of each episode's first transition
    ref_min: float | None
    ref_max: float | None
    fingerprint: str         # changes whenever the dataset files change: the key for every cache
    cache_dir: Path
    minari_dataset: object = field(repr=False, default=None)
    obs_mean: np.ndarray = field(init=False)
    obs_std: np.ndarray = field(init=False)

    def __post_init__(self):
        self.obs_mean = self.obs.mean(0)
        self.obs_std = self.obs.std(0) + 1e-3  # CORL's eps

    @property
    def episode_ends(self) -> np.ndarray:
        return np.append(self.episode_starts[1:], len(self.obs))

    @property
    def constant_dims(self) -> np.ndarray:
        """(obs_dim,) bool: the state dimensions that never change within any episode (maze2d: the goal)."""
        first = np.repeat(self.episode_starts, self.episode_ends - self.episode_starts)
        return (self.obs == self.obs[first]).all(0)

    @property
    def obs_dim(self) -> int:
        return self.obs.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    def return_scale(self) -> float:
        """1000 / (max - min episode return): CORL's reward normalization for the locomotion datasets."""
        returns = np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts)
        return 1000.0 / max(float(returns.max() - returns.min()), 1e-8)

    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        return (obs - self.obs_mean) / self.obs_std

    def normalized_score(self, returns) -> np.ndarray:
        return normalized_score(returns, self.ref_min, self.ref_max)

    def make_eval_env(self):
        """The dataset's evaluation env (a gymnasium.Env)."""
        import gymnasium_robotics  # noqa: F401  (registers envs named in the eval spec)

        return self.minari_dataset.recover_environment(eval_env=True)


def normalized_score(returns, ref_min: float, ref_max: float) -> np.ndarray:
    """D4RL normalized score: 0 = random policy, 100 = expert."""
    if ref_min is None or ref_max is None:
        raise DatasetError("this dataset has no reference scores (ref_min_score/ref_max_score in its metadata)")
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


def flat_obs(observations) -> np.ndarray:
    """Pointmaze dict observations -> [observation, desired_goal]; arrays pass through."""
    if isinstance(observations, dict):
        return np.concatenate([observations["observation"], observations["desired_goal"]], axis=-1)
    return np.asarray(observations)


def _fingerprint(dataset_id: str, root: Path) -> str:
    h = hashlib.sha256(dataset_id.encode())
    for f in sorted((root / "data").rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def stored_dataset(env: str | None = None, dataset_id: str | None = None, steps: int | None = None
                   ) -> tuple[str, str] | None:
    """(id, fingerprint) of the dataset load_dataset would open here now, without opening, downloading or building
    it; None where none is stored. bench/compare.py asks it to tell a run made on these files from one made on
    files since rebuilt."""
    from minari.storage import get_dataset_path

    cid = local_id([dataset_id] if dataset_id is not None else resolve_env(env, steps))
    return None if cid is None else (cid, _fingerprint(cid, Path(get_dataset_path(cid))))


def load_dataset(env: str | None = None, dataset_id: str | None = None, steps: int | None = None,
                 verbose: bool = True, build: Callable | None = None) -> OfflineData:
    """Open (or obtain with ``build``, see open_minari) a dataset and return its flat arrays, from the cache when
    current."""
    from minari.storage import get_dataset_path

    ds, how = open_minari(env, dataset_id, steps, build)
    dataset_id = ds.spec.dataset_id
    root = Path(get_dataset_path(dataset_id))
    cache_dir = root / "dydiff_cache"
    fingerprint = _fingerprint(dataset_id, root)
    cache = cache_dir / "flat.npz"
    flat_key = f"{fingerprint}:{code_digest(_flatten)}"  # the files and the code that flattens them
    arrays = None
    if cache.exists():
        try:
            with np.load(cache) as z:
                if str(z["fingerprint"]) == flat_key:
                    arrays = {k: z[k] for k in z.files if k != "fingerprint"}
        except Exception:  # a corrupt cache is rebuilt, never trusted
            arrays = None
    if arrays is None:
        arrays = _flatten(ds)
        write_atomic(cache, lambda tmp: np.savez(tmp, fingerprint=flat_key, **arrays))
    meta = ds.storage.metadata
    data = OfflineData(dataset_id=dataset_id, ref_min=meta.get("ref_min_score"), ref_max=meta.get("ref_max_score"),
                       fingerprint=fingerprint, cache_dir=cache_dir, minari_dataset=ds, **arrays)
    if verbose:
        print(f"dataset {dataset_id} ({how}): {len(data.obs)} transitions, {len(data.episode_starts)} episodes, "
              f"obs dim {data.obs.shape[1]}, act dim {data.actions.shape[1]}")
    return data


def _flatten(ds) -> dict[str, np.ndarray]:
    obs, act, rew, nxt, term, starts, n = [], [], [], [], [], [], 0
    for ep in ds.iterate_episodes():
        o = flat_obs(ep.observations).astype(np.float32)
        obs.append(o[:-1])
        nxt.append(o[1:])
        act.append(np.asarray(ep.actions, dtype=np.float32))
        rew.append(np.asarray(ep.rewards, dtype=np.float32))
        term.append(np.asarray(ep.terminations, dtype=np.float32))
        starts.append(n)
        n += len(ep.rewards)
    return {"obs": np.concatenate(obs), "actions": np.concatenate(act), "rewards": np.concatenate(rew),
            "next_obs": np.concatenate(nxt), "terminals": np.concatenate(term),
            "episode_starts": np.asarray(starts, dtype=np.int64)}


# -- Flat transitions -> Minari episodes: D4RL's files here, the SAC rebuild in rebuild.py --------
def episode_buffers(obs, actions, rewards, terminals, timeouts, next_obs=None) -> list:
    """Transitions in time order -> Minari EpisodeBuffers. An episode ends at a termination, or at a timeout
    (a truncation: the episode was cut, not ended by the task); a trailing episode with neither is a truncation.
    Without ``next_obs`` the next state of an episode's last transition is unknown: that transition is dropped
    and the episode, ending one step early, counts as truncated."""
    from minari.data_collector import EpisodeBuffer

    term = np.asarray(terminals, dtype=bool)
    trunc = np.asarray(timeouts, dtype=bool) & ~term  # a step flagged both ended by the task
    trunc[-1] |= not term[-1]  # the trailing episode
    ends = np.flatnonzero(term | trunc) + 1
    buffers = []
    for s, e in zip(np.r_[0, ends[:-1]], ends):
        if next_obs is None:
            if e - s < 2:
                continue  # one transition whose next state is unknown: nothing left
            o, e = obs[s:e], e - 1
            done = {"terminations": np.zeros(e - s, bool), "truncations": np.arange(s, e) == e - 1}
        else:
            o = np.concatenate([obs[s:e], next_obs[e - 1:e]])
            done = {"terminations": term[s:e], "truncations": trunc[s:e]}
        buffers.append(EpisodeBuffer(id=len(buffers), observations=np.asarray(o), actions=np.asarray(actions[s:e]),
                                     rewards=np.asarray(rewards[s:e], dtype=np.float64), **done))
    return buffers


def import_d4rl(path: str | Path, env: str | None = None) -> str:
    """Store D4RL's hdf5 file of a locomotion dataset with Minari under ``dydiff/d4rl/<env>/<level>-v2``, with
    D4RL's reference returns and the v5 env's spec. ``env``: the name (default: from the file name, D4RL's
    ``hopper_medium_replay-v2.hdf5`` or ``hopper-medium-replay-v2.hdf5``). Returns the Minari id."""
    import gymnasium as gym
    import h5py
    import minari

    path = Path(path)
    name = env or "-".join(path.name.removesuffix(".hdf5").replace("_", "-").split("-")[:-1])
    if name not in LOCOMOTION:
        raise DatasetError(f"cannot tell a locomotion dataset from {env or path.name!r}: pass --env, one of "
                           f"{', '.join(LOCOMOTION)}")
    gym_id, ref_min, ref_max = LOCOMOTION_ENVS[LOCOMOTION[name][0]]
    dataset_id = locomotion_ids(name)[0]
    if dataset_id in minari.list_local_datasets():
        raise DatasetError(f"{dataset_id} is already here: `minari delete {dataset_id}` first to import again")
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    try:
        with h5py.File(path, "r") as f:  # v0/v1 files have no next_observations
            d = {k: f[k][()] for k in keys if k in f}
    except OSError as exc:
        raise DatasetError(f"cannot read {path} as hdf5 ({exc})") from None
    if any(k not in d for k in keys[:-1]):
        raise DatasetError(f"{path} is not a D4RL dataset file: it lacks {[k for k in keys[:-1] if k not in d]}")
    genv = gym.make(gym_id)
    if d["observations"].shape[1] != genv.observation_space.shape[0]:
        raise DatasetError(f"{path.name} has {d['observations'].shape[1]}-wide observations, {gym_id} has "
                           f"{genv.observation_space.shape[0]}: not a {name} file (pass the right --env)")
    next_obs = d.get("next_observations")
    buffers = episode_buffers(d["observations"], d["actions"], d["rewards"], d["terminals"], d["timeouts"], next_obs)
    dropped = "" if next_obs is not None else " No next_observations: each episode's last transition dropped, truncated."
    warnings.filterwarnings("ignore", message=".*author_email.*")  # an import has no contact address
    minari.create_dataset_from_buffers(
        dataset_id=dataset_id, buffer=buffers, env=genv.spec, eval_env=genv.spec, algorithm_name="D4RL (imported)",
        author="D4RL (Fu et al. 2020), imported by the DyDiff reference implementation", code_permalink="data.py",
        ref_min_score=ref_min, ref_max_score=ref_max,
        description=f"D4RL's {name}, imported from {path.name} ({len(d['rewards'])} transitions). D4RL "
                    f"collected it on the mujoco-py env of gym (v2 datasets); the env spec here is gymnasium's "
                    f"{gym_id}, with the same observation layout. Refs: D4RL's random and expert returns.{dropped}")
    print(f"imported {path.name} as {dataset_id}: {sum(len(b.rewards) for b in buffers)} transitions, {len(buffers)} episodes")
    return dataset_id


# -- Segments of length H inside episodes: the diffusion model's training data ---------------------
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
    offs = torch.arange(H, device=starts.device)
    mask = offs[None] < lengths[:, None]
    rows = starts[:, None] + torch.minimum(offs[None], lengths[:, None] - 1)
    return X[rows], mask


# -- Transitions as device tensors (the real data D and DyDiff's synthetic FIFO) -------------------
class TransitionBuffer:
    """Transitions as device tensors; `sample` draws a batch by indexing, with no per-sample Python.
    `add` appends and, once full, overwrites the oldest rows (FIFO)."""

    KEYS = ("obs", "actions", "rewards", "next_obs", "dones")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: str | torch.device):
        dims = {"obs": obs_dim, "actions": act_dim, "next_obs": obs_dim}
        self.data = {k: torch.zeros((capacity, dims[k]) if k in dims else (capacity,), device=device)
                     for k in self.KEYS}
        self.capacity, self.size, self.ptr = capacity, 0, 0

    def add(self, **batch: torch.Tensor) -> None:
        n = len(batch["obs"])
        if n > self.capacity:  # only the newest `capacity` rows would survive anyway
            batch = {k: v[n - self.capacity:] for k, v in batch.items()}
            self.ptr, n = (self.ptr + n - self.capacity) % self.capacity, self.capacity
        idx = (self.ptr + torch.arange(n, device=self.data["obs"].device)) % self.capacity
        for k in self.KEYS:
            self.data[k][idx] = batch[k].to(self.data[k])
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    @property
    def obs(self) -> torch.Tensor:
        """The stored observations, (size, obs_dim): DyDiff draws its start states s_0 from them."""
        return self.data["obs"][: self.size]

    def sample(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (n,), generator=gen, device=gen.device)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"size": self.size, "ptr": self.ptr, **{k: v[: self.size].cpu() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.ptr = state["size"], state["ptr"]
        for k in self.KEYS:
            self.data[k][: self.size] = state[k].to(self.data[k].device)


def real_buffer(data: OfflineData, device: str | torch.device, reward_scale: float = 1.0) -> TransitionBuffer:
    """The dataset D as the learner sees it: z-scored observations, raw actions, rewards times reward_scale."""
    buf = TransitionBuffer(len(data.obs), data.obs_dim, data.act_dim, device)
    t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    buf.add(obs=t(data.normalize_obs(data.obs)), actions=t(data.actions), rewards=t(data.rewards * reward_scale),
            next_obs=t(data.normalize_obs(data.next_obs)), dones=t(data.terminals))
    return buf


# -- The code the models' caches follow (runs.load_or_train_cached) -------------------------------
def arrays_digest() -> str:
    """code_digest of the code that turns a dataset into the arrays and windows the models train on."""
    return code_digest(_flatten, OfflineData, segment_index, gather_segments)
