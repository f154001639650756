"""Tests of the DyDiff reference implementation, in pipeline order: data, learners, dynamics models,
diffusion model, the DyDiff round, the training loop, robustness, benchmark tools.

    python -m pytest -q test_dydiff.py

Every test runs offline on small datasets generated into a temporary Minari folder, never ~/.minari.
The tests with "device" in their name run on DYDIFF_TEST_DEVICE (default cpu; bench/gpu_check.py sets cuda).
"""
from __future__ import annotations

import io
import json
import math
import os
import signal
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import minari
import numpy as np
import pytest
import torch
import torch.nn as nn

import diffusion
import dydiff
import dynamics
from data import (LOCOMOTION, LOCOMOTION_ENVS, DatasetError, MAZE2D, TransitionBuffer, import_d4rl, load_dataset, normalized_score, open_minari, resolve_env, stored_dataset)
from diffusion import DynamicsDiffusion, TemporalUnet, gather_segments, segment_index
from dynamics import Ensemble, FitConfig, RewardModel, env_reward_fn, fit, terminal_fn
from iql import IQL
from runs import CheckpointError, code_digest, code_digests
from rebuild import SACBuild, WaypointController, build_dataset, draw_maze, generate_locomotion_dataset, maze_eval_env, read_sac_state, sac_dir
from td3bc import TD3BC, TwinCritic
from train import evaluate, main, parse_args, sample_batch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "bench"))
from fidelity import (crossings, dm_predict, ensemble_predict, in_episode_rollout_error, rollout_error,  # noqa: E402
                      simulate, simulate_policy)
import pretrain  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """train.main sets the process's torch threads (--threads 0: one per core); each test starts again from 1."""
    yield
    torch.set_num_threads(1)


DEVICE = os.environ.get("DYDIFF_TEST_DEVICE", "cpu")
TINY_STEPS = 3000  # a few thousand maze steps: ~40 episodes, built in seconds
TINY = FitConfig(steps_per_epoch=20, max_epochs=2, reward_max_epochs=2, hidden=32, reward_hidden=32)
TINY_DYDIFF = ["--dydiff", "--horizon", "8", "--rollout-length", "8", "--dm-dim", "8", "--dm-mults", "1", "2", "--dm-train-steps", "30",
               "--rollout-batch", "16", "--rollout-interval", "40", "--sampler-steps", "4", "--synthetic-capacity", "500"]
# DyDiff unit tests: hand-made dataset stats (raw = z * STD + MEAN) and a tight dataset box
OBS, ACT, H = 4, 2, 8
MEAN = torch.tensor([0.5, -1.0, 2.0, 0.0])
STD = torch.tensor([2.0, 0.5, 1.0, 3.0])
BOX = 0.3  # the dataset box is [-0.3, 0.3] z-scored: tight, so the ensemble leaves it


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory):
    """One private Minari folder for the whole session (the tiny dataset is built once)."""
    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


@pytest.fixture(scope="session")
def tiny_data(minari_root):
    return load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False, build=build_dataset)


@pytest.fixture(scope="session")
def tiny_hopper(minari_root):
    """A few thousand Hopper steps of a noisy policy, stored with Minari with the real terminations and
    D4RL's reference returns in its metadata, under a test id."""
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    env, rng, buffers, steps = gym.make("Hopper-v5"), np.random.default_rng(0), [], 0
    while steps < 3000:
        obs, _ = env.reset(seed=len(buffers))
        o, a, r, term, trunc = [obs], [], [], [], []
        while not (term and (term[-1] or trunc[-1])):
            act = np.clip(rng.normal(0.0, 0.5, 3), -1, 1).astype(np.float32)
            obs, rew, te, tr, _ = env.step(act)
            o.append(obs), a.append(act), r.append(float(rew)), term.append(te), trunc.append(tr)
        buffers.append(EpisodeBuffer(id=len(buffers), observations=np.asarray(o), actions=np.asarray(a), rewards=r,
                                     terminations=term, truncations=trunc))
        steps += len(a)
    minari.create_dataset_from_buffers(dataset_id="dydifftest/hopper/tiny-v0", buffer=buffers, env=env.spec,
                                       eval_env=env.spec, algorithm_name="noisy zero-mean policy",
                                       author="DyDiff tests", author_email="none@example.org",
                                       description="test data", code_permalink="test_dydiff.py",
                                       ref_min_score=-20.272305, ref_max_score=3234.3)
    return "dydifftest/hopper/tiny-v0"


@pytest.fixture
def tiny_fit(monkeypatch):
    """Seconds, not minutes, of ensemble training wherever a FitConfig is asked for: TINY's network sizes and
    epoch caps, with the settings asked for (the seed, --preset paper's recipe) on top."""
    monkeypatch.setattr(dynamics, "FitConfig", lambda **kw: replace(TINY, **kw))


def fixed_batch(n=256, obs_dim=6, act_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(n, obs_dim, generator=g), "actions": torch.rand(n, act_dim, generator=g) * 2 - 1,
            "rewards": torch.rand(n, generator=g), "next_obs": torch.randn(n, obs_dim, generator=g),
            "dones": (torch.rand(n, generator=g) < 0.1).float()}


def run_train(tmp_path, *flags):
    return main(["--dataset-steps", str(TINY_STEPS), "--run-dir", str(tmp_path), "--eval-episodes", "2",
                 "--eval-interval", "50", *flags, *([] if "--dydiff" in flags else ["--no-dydiff"])])


def tiny_model(obs_dim=3, act_dim=2, H=8, seed=0):
    torch.manual_seed(seed)
    return DynamicsDiffusion(obs_dim, act_dim, horizon=H, dim=8, dim_mults=(1, 2))


def toy_rows(n_episodes=20, length=40, seed=0):
    """Linear toy dynamics s' = s + 0.1 a (a 2-D point), rows [s, a], episodes concatenated."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_episodes):
        s = rng.uniform(-0.5, 0.5, 2)
        for _ in range(length):
            a = rng.uniform(-1, 1, 2)
            rows.append(np.concatenate([s, a]))
            s = np.clip(s + 0.1 * a, -1, 1)
    starts = np.arange(n_episodes) * length
    return torch.tensor(np.array(rows), dtype=torch.float32), starts, starts + length


# ----------------------------------------------------------------------------------------- data
def test_tiny_maze_dataset_loads_offline_through_minari(tiny_data, minari_root):
    """Data: a local maze2d rebuild is stored with Minari under our own id."""
    d = tiny_data
    assert d.dataset_id == f"dydiff/pointmaze/umaze-{TINY_STEPS}-v0"
    assert d.dataset_id in minari.list_local_datasets()  # stored with Minari, under our own id
    assert (minari_root / "dydiff" / "pointmaze").is_dir()
    assert d.obs.shape == (TINY_STEPS, 6) and d.next_obs.shape == (TINY_STEPS, 6) and d.actions.shape == (TINY_STEPS, 2)
    assert np.abs(d.actions).max() <= 1.0
    assert d.ref_min is not None and d.ref_max > d.ref_min + 50  # expert controller >> random policy
    assert not d.terminals.any()  # maze episodes are truncated at successes, never terminated


def test_episodes_are_cut_at_successes(tiny_data):
    """Data: the continuing run is cut into episodes at every success."""
    d = tiny_data
    starts, ends = d.episode_starts, d.episode_ends
    assert len(starts) > 5 and starts[0] == 0 and ends[-1] == TINY_STEPS
    # The sparse reward is 1 exactly at the last step of every finished episode and nowhere else.
    assert np.all(d.rewards[ends[:-1] - 1] == 1.0)
    assert d.rewards.sum() in (len(starts) - 1, len(starts))
    # Within an episode next_obs[t] == obs[t+1]; across a cut the goal (dims 4:6) changes.
    inside = np.setdiff1d(np.arange(TINY_STEPS - 1), ends - 1)
    np.testing.assert_array_equal(d.next_obs[inside], d.obs[inside + 1])
    assert np.all(np.linalg.norm(d.obs[starts[1:], 4:] - d.obs[starts[1:] - 1, 4:], axis=1) > 0.1)
    # The ball itself is continuous across cuts: the run is one physical trajectory.
    np.testing.assert_allclose(d.obs[starts[1:], :4], d.next_obs[starts[1:] - 1, :4])


def test_flat_cache_is_used_and_rebuilt_when_the_dataset_changes(tiny_data, monkeypatch):
    """Data: the flat arrays are cached and rebuilt when the dataset files or the flattening code change."""
    import data as data_mod
    import runs as runs_mod

    calls, real_flatten, real_source = [], data_mod._flatten, runs_mod.source
    counting = lambda ds: calls.append(1) or real_flatten(ds)  # noqa: E731
    monkeypatch.setattr(data_mod, "_flatten", counting)
    monkeypatch.setattr(runs_mod, "source", lambda obj: real_source(real_flatten if obj is counting else obj))
    again = data_mod.load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False, build=build_dataset)
    assert calls == [] and again.fingerprint == tiny_data.fingerprint  # served from dydiff_cache/flat.npz
    data_file = next((tiny_data.cache_dir.parent / "data").glob("*"))
    os.utime(data_file, ns=(data_file.stat().st_atime_ns, data_file.stat().st_mtime_ns + 10**9))
    rebuilt = data_mod.load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False, build=build_dataset)
    assert calls == [1] and rebuilt.fingerprint != tiny_data.fingerprint
    np.testing.assert_array_equal(rebuilt.obs, tiny_data.obs)
    edited = lambda obj: real_source(real_flatten).replace("def _flatten(ds)", "def _flatten(ds, edited=1)")  # noqa
    monkeypatch.setattr(runs_mod, "source", lambda obj: edited(obj) if obj is counting else real_source(obj))
    data_mod.load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False, build=build_dataset)
    assert calls == [1, 1]  # the code that flattens changed: the arrays are made again


def test_corrupt_flat_cache_is_rebuilt(tiny_data):
    """Data: a damaged flat cache is rebuilt, never trusted."""
    cache = tiny_data.cache_dir / "flat.npz"
    cache.write_bytes(b"\x00garbage")
    again = load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False, build=build_dataset)
    np.testing.assert_array_equal(again.obs, tiny_data.obs)
    with np.load(cache) as z:  # and the cache on disk is whole again
        assert str(z["fingerprint"]).split(":")[0] == again.fingerprint


def test_normalized_score_formula(tiny_data):
    """Scores: 0 = random policy, 100 = expert."""
    lo, hi = tiny_data.ref_min, tiny_data.ref_max
    np.testing.assert_allclose(tiny_data.normalized_score([lo, hi, (lo + hi) / 2]), [0.0, 100.0, 50.0])
    np.testing.assert_allclose(normalized_score(60.0, 10.0, 110.0), 50.0)
    with pytest.raises(DatasetError, match="no reference scores"):
        normalized_score(1.0, None, 2.0)


def test_planner_controller_reaches_the_goal_in_the_eval_env():
    """Data: the D4RL planner + PD controller reaches and holds the goal."""
    for env_name in ("maze2d-umaze", "maze2d-medium", "maze2d-large"):
        env = maze_eval_env(env_name)
        goal_cell = MAZE2D[env_name][2]
        for seed in range(3):
            obs, _ = env.reset(seed=seed)
            assert tuple(env.unwrapped.maze.cell_xy_to_rowcol(obs["desired_goal"])) == goal_cell
            ctrl, ret, done = WaypointController(env.unwrapped.maze), 0.0, False
            while not done:
                obs, r, term, trunc, _ = env.step(ctrl(obs["observation"][:2], obs["observation"][2:], obs["desired_goal"]))
                ret, done = ret + r, term or trunc
            assert ret > 0  # reached the goal
            assert np.linalg.norm(obs["achieved_goal"] - obs["desired_goal"]) < 0.45  # and stayed there


@pytest.mark.parametrize("env_name", ["maze2d-medium", "maze2d-large"])
def test_medium_and_large_rebuilds_at_a_small_size(minari_root, env_name):
    """Data: the medium and large mazes rebuild too (here 2000 steps), with their own ids and references."""
    d = load_dataset(env_name, steps=2000, verbose=False, build=build_dataset)
    assert d.dataset_id == f"dydiff/pointmaze/{env_name.split('-')[1]}-2000-v0" and d.obs.shape == (2000, 6)
    assert d.ref_max > d.ref_min + 50 and len(d.episode_starts) > 3  # the expert reaches its goals; cuts at successes
    assert np.all(d.rewards[d.episode_ends[:-1] - 1] == 1.0) and d.constant_dims.tolist()[4:] == [True, True]
    env = d.make_eval_env()
    assert env.spec.max_episode_steps == MAZE2D[env_name][3]  # 600 / 800 evaluation steps
    goal = env.reset(seed=0)[0]["desired_goal"]
    assert tuple(env.unwrapped.maze.cell_xy_to_rowcol(goal)) == MAZE2D[env_name][2]


def test_unknown_env_name_fails_with_the_list_of_valid_names():
    """Data: an unknown name gives a one-line error listing the valid names."""
    with pytest.raises(DatasetError, match=r"unknown env 'maze2d-tiny'.*maze2d-umaze.*hopper-medium-replay"):
        resolve_env("maze2d-tiny")
    out = subprocess.run([sys.executable, "train.py", "--env", "maze2d-tiny"], cwd=HERE, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown env 'maze2d-tiny': choose one of maze2d-umaze")
    assert "Traceback" not in out.stderr


def test_locomotion_offline_says_how_to_get_the_data(minari_root, tmp_path, capsys):
    """Data: a locomotion name that is not here, with building off, fails with one line naming both ways to get
    it (D4RL's file, or the rebuild), in train.py too; an explicit Minari id (Minari's own mujoco sets) says how
    to download it; neither is ever built instead."""
    with pytest.raises(DatasetError) as err:
        load_dataset("hopper-medium")
    msg = str(err.value)
    assert "\n" not in msg and "dydiff/d4rl/hopper/medium-v2 and dydiff/mujoco/hopper/medium-v0" in msg
    assert "`python rebuild.py --import-d4rl hopper-medium-v2.hdf5`" in msg and "`python rebuild.py --env hopper-medium`" in msg
    with pytest.raises(SystemExit) as exit_info:
        main(["--env", "walker2d-medium-expert", "--no-build-data", "--run-dir", str(tmp_path)])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err_lines) == 1 and err_lines[0].startswith(
        "error: dataset walker2d-medium-expert is not on this machine") and "--import-d4rl walker2d-medium-expert-v2.hdf5" in err_lines[0]
    with pytest.raises(DatasetError, match=r"minari download mujoco/hopper/medium-v0"):
        load_dataset(dataset_id="mujoco/hopper/medium-v0")
    with pytest.raises(DatasetError, match=r"minari download nobody/maze-v0"):  # never a maze rebuilt instead
        load_dataset("maze2d-umaze", dataset_id="nobody/maze-v0")


def test_imports_go_one_way_from_the_plumbing_up():
    """Layout: runs.py (the plumbing) is below data.py, data.py below rebuild.py and the models, never the
    reverse, so a reader can take the files bottom-up and no import cycle exists."""
    import ast

    for name in ("data.py", "runs.py", "rebuild.py", "diffusion.py", "dynamics.py", "dydiff.py"):
        tree = ast.parse((Path(__file__).parent / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        below = {"runs.py": set(), "data.py": {"runs"}, "rebuild.py": {"data", "runs"},
                 "diffusion.py": {"data", "runs"}, "dynamics.py": {"data", "runs"}, "dydiff.py": set()}[name]
        project = {"data", "runs", "rebuild", "diffusion", "dynamics", "dydiff", "train", "td3bc", "iql"}
        assert imported & project == below, name


def test_locomotion_names_resolve_to_the_d4rl_import_then_the_rebuild(minari_root, monkeypatch):
    """Data: each of the 9 locomotion names loads D4RL's imported file first, then our rebuild (never Minari's
    mujoco/*-v0, another recipe), with D4RL's reference returns and the v5 env; a missing one is built."""
    assert LOCOMOTION_ENVS == {"hopper": ("Hopper-v5", -20.272305, 3234.3), "halfcheetah": ("HalfCheetah-v5", -280.178953, 12135.0),
                               "walker2d": ("Walker2d-v5", 1.629008, 4592.3)}
    names = [f"{robot}-{level}" for robot in ("hopper", "halfcheetah", "walker2d")
             for level in ("medium", "medium-replay", "medium-expert")]
    assert sorted(LOCOMOTION) == sorted(names)
    for name in names:
        robot, level = name.split("-", 1)
        assert resolve_env(name) == [f"dydiff/d4rl/{robot}/{level}-v2", f"dydiff/mujoco/{robot}/{level}-v0"]
    import rebuild

    calls = []
    monkeypatch.setattr(rebuild, "generate_locomotion_dataset", lambda env: calls.append(env) or "the rebuild")
    assert open_minari("walker2d-medium-replay", build=rebuild.build_dataset) == ("the rebuild", "built locally") and calls == ["walker2d-medium-replay"]


def write_d4rl_file(path, obs_dim=11, next_observations=True):
    """An hdf5 file in D4RL's layout: 5 steps ending in a termination, 4 ending in a timeout, then 3 steps of an
    episode still running at the end of the file. Episode e's states are 100 e + t in every dimension."""
    import h5py

    obs, term, tout = [], [], []
    for e, (length, end) in enumerate(((5, "terminal"), (4, "timeout"), (3, None))):
        obs.append(100.0 * e + np.arange(length + 1))
        term += [False] * (length - 1) + [end == "terminal"]
        tout += [False] * (length - 1) + [end == "timeout"]
    with h5py.File(path, "w") as f:
        f["observations"] = np.concatenate([o[:-1] for o in obs])[:, None].repeat(obs_dim, 1).astype(np.float32)
        if next_observations:
            f["next_observations"] = np.concatenate([o[1:] for o in obs])[:, None].repeat(obs_dim, 1).astype(np.float32)
        f["actions"] = np.random.default_rng(0).uniform(-1, 1, (12, 3)).astype(np.float32)
        f["rewards"], f["terminals"], f["timeouts"] = np.arange(12, dtype=np.float32), np.array(term), np.array(tout)
    return path


def test_d4rl_import_keeps_episodes_terminations_and_truncations(tmp_path, monkeypatch):
    """Data: D4RL's hdf5 file is stored under our own id with its episodes (ended by a termination or a timeout;
    the trailing one truncated), D4RL's refs and the v5 env; the name then loads it. Without next_observations
    each episode's last transition is dropped; a file of the wrong env is refused in one line; the CLI imports."""
    import h5py

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    path = write_d4rl_file(tmp_path / "hopper_medium_replay-v2.hdf5")  # D4RL's own file name
    assert import_d4rl(path) == "dydiff/d4rl/hopper/medium-replay-v2"
    ds = minari.load_dataset("dydiff/d4rl/hopper/medium-replay-v2")
    eps = list(ds.iterate_episodes())
    assert [len(e.rewards) for e in eps] == [5, 4, 3] and ds.total_steps == 12
    assert [e.terminations.tolist().index(True) if e.terminations.any() else None for e in eps] == [4, None, None]
    assert [e.truncations.nonzero()[0].tolist() for e in eps] == [[], [3], [2]]
    meta = ds.storage.metadata
    assert (meta["ref_min_score"], meta["ref_max_score"], ds.spec.env_spec.id) == (-20.272305, 3234.3, "Hopper-v5")
    assert "hopper_medium_replay-v2.hdf5" in meta["description"] and "mujoco-py" in meta["description"]
    d = load_dataset("hopper-medium-replay", verbose=False)  # the name now loads the import
    with h5py.File(path) as f:
        assert d.dataset_id == "dydiff/d4rl/hopper/medium-replay-v2" and d.terminals.tolist() == f["terminals"][()].tolist()
        np.testing.assert_array_equal(d.obs, f["observations"][()])
        np.testing.assert_array_equal(d.next_obs, f["next_observations"][()])  # each episode's last next obs kept
        np.testing.assert_array_equal(d.rewards, f["rewards"][()])
    old = write_d4rl_file(tmp_path / "walker2d-medium-v1.hdf5", obs_dim=17, next_observations=False)
    ds = minari.load_dataset(import_d4rl(old))
    eps = list(ds.iterate_episodes())
    assert ds.spec.dataset_id == "dydiff/d4rl/walker2d/medium-v2" and [len(e.rewards) for e in eps] == [4, 3, 2]
    assert not any(e.terminations.any() for e in eps) and all(e.truncations[-1] for e in eps)
    np.testing.assert_array_equal(eps[1].observations[:, 0], [100, 101, 102, 103])  # obs and next obs still line up
    assert "No next_observations: each episode's last transition dropped" in ds.storage.metadata["description"]
    with pytest.raises(DatasetError, match=r"^x.hdf5 has 17-wide observations, Hopper-v5 has 11: not a hopper-medium file"):
        import_d4rl(write_d4rl_file(tmp_path / "x.hdf5", obs_dim=17), env="hopper-medium")
    cli = write_d4rl_file(tmp_path / "halfcheetah-medium-expert-v2.hdf5", obs_dim=17)
    out = subprocess.run([sys.executable, "rebuild.py", "--import-d4rl", str(cli)], cwd=HERE, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari")})
    assert out.returncode == 0, out.stderr
    assert "imported halfcheetah-medium-expert-v2.hdf5 as dydiff/d4rl/halfcheetah/medium-expert-v2: 12 transitions, 3 episodes" in out.stdout


# A tiny SAC rebuild: medium at the first evaluation (any return reaches -1 x D4RL's expert return), the expert
# threshold (1 x) never, so the step cap picks the best evaluated policy as the expert.
TINY_SAC = SACBuild(max_steps=600, eval_every=200, snapshot_every=200, eval_episodes=2, learning_starts=100,
                    medium_fraction=-1.0, expert_fraction=1.0, collect_steps=300, collect_envs=3, episode_steps=200)


def test_sac_rebuild_at_a_tiny_size_builds_each_level_from_one_resumable_run(tmp_path, monkeypatch):
    """Data: the locomotion rebuild, D4RL's recipe at a tiny size. medium-replay trains only to the medium
    point and is the replay buffer up to it; medium-expert resumes that run (again after an interruption) to
    the cap and stitches the two collections; medium then reuses the cached policy and collection, no training."""
    import rebuild
    from stable_baselines3 import SAC

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    folder = sac_dir("hopper")
    replay = generate_locomotion_dataset("hopper-medium-replay", TINY_SAC, progress=False)
    state = read_sac_state("hopper")
    assert (state["step"], state["medium"]["step"], state["expert"]) == (200, 200, None)
    assert not (folder / "expert.zip").exists() and not list(folder.glob("collect_*"))
    with np.load(folder / "checkpoint.npz") as z:
        dones, timeouts = z["dones"], z["timeouts"]
    eps = list(replay.iterate_episodes())
    assert replay.spec.dataset_id == "dydiff/mujoco/hopper/medium-replay-v0" and replay.total_steps == 200
    assert len(eps) == dones.sum() + (not dones[-1])  # split at the buffer's dones; the last one unfinished
    assert sum(e.terminations.sum() for e in eps) == (dones * (1 - timeouts)).sum() > 0  # hopper falls

    calls, evaluate = [], rebuild._evaluate

    def killed_once(model, envs):  # the process dies in its evaluation at step 400, before that checkpoint
        calls.append(model.num_timesteps)
        if len(calls) == 1:
            raise RuntimeError("killed")
        return evaluate(model, envs)

    monkeypatch.setattr(rebuild, "_evaluate", killed_once)
    with pytest.raises(RuntimeError, match="killed"):
        generate_locomotion_dataset("hopper-medium-expert", TINY_SAC, progress=False)
    assert read_sac_state("hopper")["step"] == 200
    both = generate_locomotion_dataset("hopper-medium-expert", TINY_SAC, progress=False)
    state = read_sac_state("hopper")
    # the rerun resumed at the checkpoint of step 200 (its first evaluation at 400, not 200); the killed run
    # never checkpointed, so the state records one resume
    assert calls == [400, 400, 600] and state["resumes"] == [200]
    assert [s for s, _ in state["evals"]] == [200, 400, 600] and state["medium"]["step"] == 200
    best = max(state["evals"], key=lambda e: e[1])
    assert state["expert"] == {"step": best[0], "return": best[1], "capped": True}
    counts = {}
    for which in ("medium", "expert"):
        with np.load(folder / f"collect_{which}.npz") as z:
            counts[which] = (len(z["rewards"]), int(z["terminals"].sum() + z["timeouts"].sum()))
            assert np.abs(z["actions"]).max() <= 1 and not (z["terminals"] * z["timeouts"]).any()
    assert counts["medium"][0] == counts["expert"][0] == 300
    assert (both.total_steps, both.total_episodes) == (600, counts["medium"][1] + counts["expert"][1])

    monkeypatch.setattr(rebuild, "_evaluate", evaluate)
    monkeypatch.setattr(SAC, "learn", lambda *a, **kw: pytest.fail("the medium policy was trained again"))
    medium = generate_locomotion_dataset("hopper-medium", TINY_SAC, progress=False)
    assert read_sac_state("hopper")["step"] == 600 and (medium.total_steps, medium.total_episodes) == (300, counts["medium"][1])
    for ep, stitched in zip(medium.iterate_episodes(), both.iterate_episodes()):  # medium-expert: medium's episodes first
        np.testing.assert_array_equal(ep.observations, stitched.observations)
    for ds in (replay, both, medium):
        meta = ds.storage.metadata
        assert (meta["ref_min_score"], meta["ref_max_score"], ds.spec.env_spec.id) == (-20.272305, 3234.3, "Hopper-v5")
        assert "SAC (stable-baselines3 2.9.2, seed 0)" in meta["algorithm_name"] and "medium policy at env step 200" in meta["description"]
    assert f"expert policy at env step {best[0]} (the best by the cap)" in both.storage.metadata["description"]
    report = json.loads((folder / "build.json").read_text())
    assert {k: (v["transitions"], v["episodes"]) for k, v in report.items()} == {
        "dydiff/mujoco/hopper/medium-replay-v0": (200, len(eps)), "dydiff/mujoco/hopper/medium-expert-v0": (600, both.total_episodes),
        "dydiff/mujoco/hopper/medium-v0": (300, medium.total_episodes)}
    d = load_dataset("hopper-medium", verbose=False)  # no import here: the name loads the rebuild
    inside = np.setdiff1d(np.arange(len(d.obs) - 1), d.episode_ends - 1)
    assert d.dataset_id == "dydiff/mujoco/hopper/medium-v0"
    np.testing.assert_array_equal(d.next_obs[inside], d.obs[inside + 1])


def test_sac_rebuild_takes_the_medium_at_the_threshold_from_the_policies_kept_between_evaluations(tmp_path, monkeypatch):
    """Data: between evaluations (every eval_every steps) the policy is kept every snapshot_every steps; when
    an evaluation reaches a third of D4RL's expert return, the kept policies are evaluated in order up to the
    first reaching it (300), and the medium is the one nearest a third (250 here: 0.30 against 0.50, not the
    evaluation point 400), saved as it was then; medium-replay is the buffer up to it. A scripted return curve (fractions of hopper's expert return)
    replaces the evaluations; SAC itself runs, tiny."""
    import rebuild
    from stable_baselines3 import SAC

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    curve = {200: 0.10, 250: 0.30, 300: 0.50, 350: 0.40, 400: 0.70, 600: 0.70}  # 1/3 first passed at 300
    monkeypatch.setattr(rebuild, "_evaluate", lambda model, envs: curve[model.num_timesteps] * 3234.3)
    cfg = replace(TINY_SAC, medium_fraction=1 / 3, expert_fraction=0.9, snapshot_every=50)
    replay = generate_locomotion_dataset("hopper-medium-replay", cfg, progress=False)
    state = read_sac_state("hopper")
    assert [s for s, _ in state["evals"]] == [200, 250, 300, 400]  # 350 never evaluated: 300 reached it
    assert state["medium"] == {"step": 250, "return": 0.30 * 3234.3} and replay.total_steps == 250
    medium, best = (SAC.load(sac_dir("hopper") / f"{w}.zip", device="cpu") for w in ("medium", "best"))
    assert (medium.num_timesteps, best.num_timesteps) == (250, 400)  # the kept policy; the model then restored
    assert not torch.equal(medium.policy.actor.mu.weight, best.policy.actor.mu.weight)
    numbers = json.loads((sac_dir("hopper") / "build.json").read_text())["dydiff/mujoco/hopper/medium-replay-v0"]
    assert numbers["transitions"] == 250 and (numbers["d4rl"]["transitions"], numbers["d4rl"]["episodes"]) == (402_000, 2041)
    assert numbers["d4rl"]["score"] == pytest.approx(normalized_score(467.30, -20.272305, 3234.3))  # 15.0
    assert numbers["policies"]["medium"]["score"] == pytest.approx(normalized_score(0.30 * 3234.3, -20.272305, 3234.3))
    assert {"cpu_time_s", "episodes", "data_return_mean", "data_score"} <= set(numbers)
    assert set(numbers["made_by"]) == {"commit", "dirty", "changes_digest"}  # the code that built it
    assert numbers["data_score"] == pytest.approx(normalized_score(numbers["data_return_mean"], -20.272305, 3234.3))
    import locomotion_builds  # bench/: the results file's entry, with the evaluations around the medium point

    entry = locomotion_builds.gather()["hopper-medium-replay"]
    assert entry["transitions"] == 250 and [s for s, _, _ in entry["sac_evals_near_medium"]] == [250, 300, 400]
    assert "| hopper-medium-replay | " in locomotion_builds.table({"hopper-medium-replay": entry})
    # once the medium exists only the evaluation points count (600: the cap, 0.7 < 0.9 makes the best the expert)
    generate_locomotion_dataset("hopper-medium-expert", replace(cfg, collect_steps=30), progress=False)
    assert [s for s, _ in read_sac_state("hopper")["evals"]] == [200, 250, 300, 400, 600]


# ------------------------------------------------------------------------------------- learners
@pytest.mark.parametrize("algo", ["td3bc", "iql"])
def test_learner_update_lowers_critic_loss_and_keeps_shapes(algo):
    """Learners: update(batch) fits the critics; act() is bounded."""
    learner = (TD3BC if algo == "td3bc" else IQL)(6, 2, seed=0)
    batch = fixed_batch()
    losses = [learner.update(batch) for _ in range(300)]
    first, last = losses[0]["critic_loss"], np.mean([l["critic_loss"] for l in losses[-20:]])
    assert last < 0.5 * first, (first, last)
    assert set(losses[1]) >= {"critic_loss", "actor_loss", "q_mean"}
    a = learner.act(batch["obs"][:7])
    assert a.shape == (7, 2) and a.abs().max() <= 1.0
    assert learner.critic(batch["obs"][:7], a).shape == (2, 7)  # twin critics in one module


def test_td3bc_q1_is_the_first_twin_critic():
    """TD3+BC: the actor's Q1 shortcut equals the first twin critic."""
    critic, b = TwinCritic(6, 2), fixed_batch(9)
    torch.testing.assert_close(critic.q1(b["obs"], b["actions"]), critic(b["obs"], b["actions"])[0])


@pytest.mark.parametrize("algo", ["td3bc", "iql"])
def test_learner_round_trip_on_the_device_continues_identically(algo):
    """Learners: a saved and reloaded learner continues bit for bit, its generators' state included (on DEVICE)."""
    cls = TD3BC if algo == "td3bc" else IQL
    a, batch = cls(6, 2, seed=3, device=DEVICE), {k: v.to(DEVICE) for k, v in fixed_batch().items()}
    for _ in range(5):
        a.update(batch)
    blob = io.BytesIO()  # through bytes, as a resumed run does (in memory, Adam's moments would be shared)
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = cls(6, 2, seed=99, device=DEVICE)
    b.load_state_dict(torch.load(blob, weights_only=True))
    assert all(p.device.type == torch.device(DEVICE).type for p in b.actor.parameters())
    for _ in range(4):  # includes TD3+BC's target-noise generator and delayed actor steps
        la, lb = a.update(batch), b.update(batch)
        assert la == lb


# --------------------------- dynamics.py: ensemble, reward model, terminal and reward functions
@pytest.mark.parametrize("n_members,n_elites", [(1, 1), (3, 2), (7, 5)])
def test_ensemble_shapes_and_independent_members(n_members, n_elites):
    """Ensemble: every member is computed in one bmm and never mixes with the others."""
    torch.manual_seed(0)
    ens = Ensemble(5, 3, n_members=n_members, n_elites=n_elites, hidden=16, n_layers=2)
    s, a = torch.randn(9, 5), torch.rand(9, 3) * 2 - 1
    mean, logvar = ens(s, a)
    assert mean.shape == logvar.shape == (n_members, 9, 5)
    assert (logvar <= ens.max_logvar + 1e-6).all() and (logvar >= ens.min_logvar - 1e-6).all()
    assert ens(s.expand(n_members, 9, 5), a.expand(n_members, 9, 3))[0].shape == (n_members, 9, 5)
    assert ens.elites.dtype == torch.long and len(ens.elites) == n_elites
    assert ens.step(s, a).shape == (9, 5)
    # batched layers must not mix members: member 0's output has no gradient on the others' weights
    mean[0].sum().backward()
    for layer in ens.net.layers:
        assert layer.weight.grad[0].abs().sum() > 0
        assert (layer.weight.grad[1:] == 0).all()


@pytest.mark.parametrize("kind", ["reward", "ensemble"])
def test_early_stopping_restores_best_weights(kind):
    """Ensemble/reward training: early stopping restores each member's best weights. Training targets are 1 but holdout targets 0.3: predictions pass 0.3 and then get worse, so
    the best epoch lies in the middle and the last weights are clearly not the best ones."""
    torch.manual_seed(0)
    s, a = torch.randn(512, 4), torch.rand(512, 2) * 2 - 1
    if kind == "reward":
        model, y_train, y_hold = RewardModel(4, 2, hidden=32), torch.ones(512), torch.full((512,), 0.3)
    else:
        model = Ensemble(4, 2, n_members=4, n_elites=2, hidden=32, n_layers=2)
        y_train, y_hold = torch.ones(512, 4), torch.full((512, 4), 0.3)
    cfg = FitConfig(steps_per_epoch=5, batch_size=64, lr=3e-3, patience=7)
    out = fit(model, (s, a, y_train), (s, a, y_hold), cfg, max_epochs=200, progress=False)
    hist = np.array(out["history"])  # (epochs, members)
    assert out["epochs"] < 200  # stopped early
    final = model.holdout_loss(s, a, y_hold).numpy()
    np.testing.assert_allclose(final, hist.min(0), rtol=1e-5)  # each member at its own best epoch
    assert (hist[-1] > 2 * hist.min(0)).all()  # ...which is much better than the last epoch
    assert (hist.argmin(0) < len(hist) - 1).all()


def test_elites_are_the_holdout_best_and_step_uses_only_elites():
    """Ensemble: elites are the holdout-best members; a rollout step uses only them."""
    torch.manual_seed(0)
    s, a = torch.randn(600, 3), torch.rand(600, 1) * 2 - 1
    delta = 0.1 * a.expand(600, 3)
    ens = Ensemble(3, 1, n_members=7, n_elites=5, hidden=32, n_layers=2)
    fit(ens, (s, a, delta), (s, a, delta), FitConfig(steps_per_epoch=50, batch_size=64), 4, progress=False)
    with torch.no_grad():  # ruin members 2 and 5
        for m in (2, 5):
            ens.net.layers[-1].bias[m] += 50.0
    holdout = ens.holdout_loss(s, a, delta)
    ens.set_elites(holdout)
    assert sorted(ens.elites.tolist()) == [0, 1, 3, 4, 6]
    assert ens.elites.tolist() == torch.argsort(holdout)[:5].tolist()
    g = torch.Generator().manual_seed(0)
    s_next = ens.step(s, a, generator=g)
    assert (s_next - s).abs().max() < 5  # the ruined members (+50) are never used
    # each sample equals exactly one elite's mean prediction, and several elites get used
    mean = ens(s, a)[0]
    match = ((s + mean - s_next).abs().amax(-1) < 1e-6)  # (members, B)
    assert (match[ens.elites].sum(0) >= 1).all()
    assert (match[ens.elites].sum(1) > 0).sum() >= 3


def test_reward_model_fits_a_known_function():
    """Reward model r(s, a): fits a known function on a holdout."""
    torch.manual_seed(0)
    s, a = torch.randn(5000, 4), torch.rand(5000, 2) * 2 - 1
    r = torch.sin(2 * s[:, 0]) + s[:, 1] * a[:, 0] - 0.5 * a[:, 1] ** 2
    model = RewardModel(4, 2)
    hold = slice(4000, None)
    cfg = FitConfig(steps_per_epoch=200, batch_size=256)
    out = fit(model, (s[:4000], a[:4000], r[:4000]), (s[hold], a[hold], r[hold]), cfg, 8, progress=False)
    mse = model.holdout_loss(s[hold], a[hold], r[hold]).item()
    assert mse == pytest.approx(min(h[0] for h in out["history"]))
    assert mse < 0.03 * r[hold].var().item()
    assert model(s[:7], a[:7]).shape == (7,)


def test_terminal_functions_on_crafted_states():
    """Terminal functions done(s, a, s') on crafted states."""
    hop = terminal_fn("hopper-medium-replay")
    ok = np.zeros((1, 11), dtype=np.float32)
    ok[0, 0] = 1.2
    cases = {"healthy": (ok, False)}
    for name, (i, v) in {"low": (0, 0.6), "tilted": (1, 0.3), "tilted_neg": (1, -0.25), "fast": (7, 150.0),
                         "fast_neg": (9, -150.0),  # the classic abs(s' < 100) bug lets this pass
                         "nan": (3, np.nan)}.items():
        x = ok.copy()
        x[0, i] = v
        cases[name] = (x, True)
    for name, (s2, want) in cases.items():
        assert hop(ok, np.zeros((1, 3)), torch.as_tensor(s2)).tolist() == [want], name
    walk = terminal_fn("walker2d-medium")
    s2 = torch.tensor([[1.2, 0.0], [0.7, 0.0], [2.1, 0.0], [1.2, 1.1], [1.2, -1.1], [1.9, 0.9]])
    s2 = torch.cat([s2, torch.zeros(6, 15)], 1)
    assert walk(s2, None, s2).tolist() == [False, True, True, True, True, False]
    wild = torch.full((4, 17), 1e6)
    assert not terminal_fn("halfcheetah-medium")(wild, None, wild).any()
    assert not terminal_fn("maze2d-umaze")(wild[:, :6], None, wild[:, :6]).any()
    with pytest.raises(ValueError):
        terminal_fn("ant-medium")


def test_env_reward_fn_reproduces_the_dataset_rewards(tiny_data):
    """Task reward (--reward env): reproduces every reward of the maze2d data."""
    r = env_reward_fn("maze2d-umaze")
    got = r(tiny_data.obs, tiny_data.actions, tiny_data.next_obs).numpy()
    assert tiny_data.rewards.sum() > 10  # the tiny run has successes, so both values are checked
    np.testing.assert_array_equal(got, tiny_data.rewards)
    at = lambda d: torch.tensor([[1.0 + d, 1.0, 0.0, 0.0, 1.0, 1.0]])  # noqa: E731  ball d from the goal
    assert r(at(0), None, at(0.44)).item() == 1.0 and r(at(0), None, at(0.46)).item() == 0.0
    with pytest.raises(ValueError, match="only maze2d has one"):
        env_reward_fn("hopper-medium")


def test_dynamics_cache_trains_once_and_refuses_a_foreign_file(tiny_data):
    """Cache: the ensemble and reward model are trained once per dataset and settings, then loaded."""
    ens, rew, info = dynamics.load_or_train(tiny_data, cfg=TINY, progress=False)
    path = Path(info["path"])
    assert not info["cached"] and path.parent == tiny_data.cache_dir and path.name.startswith("dynamics_")
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # the atomic write left nothing behind
    # elites are the holdout-best members
    assert info["elites"] == np.argsort(info["ensemble_holdout_mse_members"], kind="stable")[:5].tolist()
    assert math.isfinite(info["ensemble_holdout_mse"]) and math.isfinite(info["reward_holdout_mse"])

    ens2, rew2, info2 = dynamics.load_or_train(tiny_data, cfg=TINY, progress=False)
    assert info2["cached"] and info2["path"] == str(path) and ens2.elites.tolist() == ens.elites.tolist()
    s = torch.as_tensor(tiny_data.normalize_obs(tiny_data.obs[:10]), dtype=torch.float32)
    a = torch.as_tensor(tiny_data.actions[:10])
    torch.testing.assert_close(ens2(s, a), ens(s, a))
    torch.testing.assert_close(rew2(s, a), rew(s, a))
    other_seed = dynamics.load_or_train(tiny_data, cfg=replace(TINY, seed=1), progress=False)[2]
    assert not other_seed["cached"] and other_seed["path"] != str(path)  # other settings, another file

    ckpt = torch.load(path, weights_only=True)
    backup = path.read_bytes()
    try:
        torch.save({**ckpt, "fingerprint": "0123456789abcdef"}, path)  # a file of another dataset under this name
        with pytest.raises(CheckpointError, match="delete it and it will be retrained") as err:
            dynamics.load_or_train(tiny_data, cfg=TINY, progress=False)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert not dynamics.load_or_train(tiny_data, cfg=TINY, progress=False, retrain=True)[2]["cached"]
        assert torch.load(path, weights_only=True)["fingerprint"] == tiny_data.fingerprint
    finally:
        path.write_bytes(backup)


def test_model_cache_lock_makes_a_second_run_wait_and_load_instead_of_training(tmp_path, capsys):
    """Cache: while one process trains a model (it holds <file>.lock), another one asking for the same
    model waits, then loads that process's file instead of training its own copy."""
    fcntl = pytest.importorskip("fcntl")
    import threading
    from types import SimpleNamespace

    import runs as runs_mod

    fake = SimpleNamespace(cache_dir=tmp_path, fingerprint="f" * 16, dataset_id="test/fake-v0")
    calls, result = [], {}
    train_fn = lambda: calls.append(1) or {"w": torch.ones(2)}  # noqa: E731
    _, path, cached = runs_mod.load_or_train_cached(fake, "dynamics", {"seed": 0}, {"x.py": "c"}, train_fn)
    assert calls == [1] and not cached
    path.unlink()  # as if never trained; now another process trains it and holds the lock
    with open(path.with_suffix(".lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: result.update(
            zip(("ckpt", "path", "cached"),
                runs_mod.load_or_train_cached(fake, "dynamics", {"seed": 0}, {"x.py": "c"}, train_fn))))
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive() and not path.exists()  # waiting, not training
        ckpt = {"kind": "dynamics", "fingerprint": fake.fingerprint, "settings": {"seed": 0}, "code": {"x.py": "c"},
                "w": torch.full((2,), 7.0)}
        runs_mod.write_atomic(path, lambda tmp: torch.save(ckpt, tmp))
        fcntl.flock(held, fcntl.LOCK_UN)
    t.join(timeout=30)
    assert not t.is_alive() and calls == [1] and result["cached"] and result["path"] == path
    torch.testing.assert_close(result["ckpt"]["w"], torch.full((2,), 7.0))  # the other process's model
    assert "waiting for another process that is training" in capsys.readouterr().out


# ----------------------------------------------------------- diffusion.py: EDM + temporal U-Net
@pytest.mark.parametrize("D,H,mults", [(3, 8, (1, 2)), (8, 32, (1, 2, 4)), (17, 12, (1, 2, 4)), (5, 5, (1,))])
def test_unet_output_shape_equals_input(D, H, mults):
    """U-Net F: (B, H, D + cond) in, (B, H, D) out, for any H its levels divide."""
    net = TemporalUnet(D, cond_dim=D, dim=8, dim_mults=mults)
    out = net(torch.randn(3, H, 2 * D), torch.randn(3))
    assert out.shape == (3, H, D)


def test_unet_blocks_per_level(tiny_data):
    """U-Net F: `blocks` residual blocks per level down, in the middle and up; the cached DM is built with the
    config's count, and a count below 1 is refused by name."""
    count = lambda net: sum(isinstance(m, diffusion.ResidualTemporalBlock) for m in net.modules())
    for blocks in (1, 2, 3):  # 3 levels: 3 down, 1 middle, 2 up
        net = TemporalUnet(4, cond_dim=4, dim=8, dim_mults=(1, 2, 4), blocks=blocks)
        assert count(net) == 6 * blocks
        assert net(torch.randn(2, 16, 8), torch.randn(2)).shape == (2, 16, 4)
    assert count(DynamicsDiffusion(3, 2, horizon=8, dim=8, dim_mults=(1, 2), blocks=1).net) == 4  # 2 + 1 + 1
    cfg = diffusion.DMConfig(horizon=8, dim=8, dim_mults=(1, 2), blocks=1, train_steps=4, batch_size=4)
    for _ in range(2):  # trained, then loaded from the cache
        dm, info = diffusion.load_or_train(tiny_data, cfg, progress=False)
        assert count(dm.net) == count(dm.ema) == 4 and info["settings"]["blocks"] == 1
    assert info["cached"]
    with pytest.raises(ValueError, match=r"^blocks must be positive \(got 0\)"):
        diffusion.DMConfig(blocks=0)


def test_unet_rejects_bad_horizon_clearly():
    """U-Net F: an H its down-sampling cannot halve gives a clear error, from the config and from the model."""
    with pytest.raises(ValueError, match=r"^horizon H=30 must be a multiple of 4, .* use H in \[28, 32\]"):
        diffusion.DMConfig(horizon=30, dim_mults=(1, 2, 4))
    with pytest.raises(ValueError, match="multiple of 2"):
        DynamicsDiffusion(3, 2, horizon=7, dim=8, dim_mults=(1, 2))


def test_upsample_is_the_transposed_convolution():
    """U-Net F: its phase-convolution upsampling of (B, T, C) computes ConvTranspose1d(c, c, 4, stride 2, padding 1)."""
    torch.manual_seed(0)
    up = diffusion.Upsample(16)
    ref = nn.ConvTranspose1d(16, 16, 4, stride=2, padding=1)
    ref.load_state_dict(up.state_dict())  # the same parameters under the same names
    x = torch.randn(5, 16, 8, requires_grad=True)  # (B, C, T) for the torch layer, (B, T, C) for ours
    torch.testing.assert_close(up(x.transpose(1, 2)), ref(x).transpose(1, 2), rtol=1e-5, atol=1e-6)
    up(x.transpose(1, 2)).square().sum().backward()  # and it trains the same weights
    g_up = up.weight.grad.clone()
    ref(x).square().sum().backward()
    torch.testing.assert_close(g_up, ref.weight.grad, rtol=1e-4, atol=1e-5)


def test_unet_layers_compute_the_torch_layers_on_time_major_inputs():
    """U-Net F: Conv1d and GroupNorm on (B, T, C) compute nn.Conv1d and nn.GroupNorm on (B, C, T)."""
    torch.manual_seed(0)
    x = torch.randn(6, 64, 12) * 3 + 1  # (B, C, T); an offset, as conv outputs have
    for ours, ref in ((diffusion.Conv1d(64, 32, 5, padding=2), nn.Conv1d(64, 32, 5, padding=2)),
                      (diffusion.Conv1d(64, 64, 3, stride=2, padding=1), nn.Conv1d(64, 64, 3, stride=2, padding=1)),
                      (diffusion.GroupNorm(8, 64), nn.GroupNorm(8, 64))):
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_()  # GroupNorm's affine too
        ref.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(x.transpose(1, 2)), ref(x).transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_dm_bf16_training_autocasts_the_network_and_keeps_groupnorm_statistics_in_fp32(tiny_data):
    """precision="bf16": the training forward runs under bf16 autocast (other weights than fp32 training from the same
    seed), GroupNorm still sums its statistics in fp32 (at an offset of 50 and a std of 3, E[x^2] - mean^2 in bf16
    would lose the variance), and the precision is a key of the cache; an unknown precision is refused by name."""
    torch.manual_seed(0)
    ours, ref = diffusion.GroupNorm(8, 32), nn.GroupNorm(8, 32)
    x = (torch.randn(4, 16, 32) * 3 + 50).bfloat16()  # (B, T, C), as a bf16 convolution's output
    y = ours(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref(x.float().transpose(1, 2)).transpose(1, 2), rtol=1e-4, atol=1e-3)

    tiny = dict(horizon=8, dim=8, dim_mults=(1, 2), train_steps=24, batch_size=12)  # settings no other test caches
    fp32, _ = diffusion.load_or_train(tiny_data, diffusion.DMConfig(**tiny), progress=False)
    bf16, info = diffusion.load_or_train(tiny_data, diffusion.DMConfig(**tiny, precision="bf16"), progress=False)
    assert not info["cached"] and info["settings"]["precision"] == "bf16" and np.isfinite(info["val_loss"])
    assert all(p.dtype == torch.float32 for p in bf16.state_dict().values() if p.is_floating_point())
    w32, w16 = fp32.net.final[1].weight, bf16.net.final[1].weight
    assert not torch.equal(w32, w16) and torch.allclose(w32, w16, atol=0.05)  # same seed, other arithmetic
    with pytest.raises(ValueError, match="^precision must be fp32 or bf16"):
        diffusion.DMConfig(precision="fp16")


def test_denoiser_returns_input_as_sigma_goes_to_zero():
    """EDM preconditioning: D(x; sigma) -> x as sigma -> 0 (c_skip -> 1, c_out -> 0)."""
    model = tiny_model()
    x = torch.rand(4, 8, 5) * 2 - 1
    for sigma in (1e-4, 1e-6):
        out = model.denoise(x, torch.full((4,), sigma), x, model.cond_mask())
        assert torch.allclose(out, x, atol=50 * sigma)
    # and it is not the identity at a real noise level
    assert not torch.allclose(model.denoise(x, torch.full((4,), 1.0), x, model.cond_mask()), x, atol=1e-3)


def test_sampling_keeps_conditions_exactly():
    """Sampler: s_0 and every action are inpainted exactly; states stay in the box."""
    model = tiny_model()
    model.x_min[:] = torch.tensor([-2.0, -1.0, 0.0, -1.0, -1.0])
    model.x_max[:] = torch.tensor([2.0, 3.0, 1.0, 1.0, 1.0])
    cond = torch.rand(6, 8, 5) * 2 - 1
    mask = model.cond_mask()
    x = model.sample(cond, mask, sampler_steps=5, generator=torch.Generator().manual_seed(0))
    assert (x[:, mask] - cond[:, mask]).abs().max() < 1e-6  # s_0 and every action
    assert (x[:, ~mask] - cond[:, ~mask]).abs().max() > 1e-2  # the rest is generated
    s0 = torch.rand(6, 3) * torch.tensor([4.0, 4.0, 1.0]) + torch.tensor([-2.0, -1.0, 0.0])
    states = model.generate(s0, torch.rand(6, 8, 2) * 2 - 1, sampler_steps=5, generator=torch.Generator().manual_seed(0))
    assert states.shape == (6, 8, 3) and (states[:, 0] - s0).abs().max() < 1e-6
    assert (states >= model.x_min[:3] - 1e-6).all() and (states <= model.x_max[:3] + 1e-6).all()  # clipped to box


def test_generate_chains_windows_beyond_H():
    """dydiff.generate_chained, T > H: each window starts at the last state the previous one made; the last shifts back."""
    model = tiny_model()  # H = 8
    s0, actions = torch.rand(4, 3) * 2 - 1, torch.rand(4, 20, 2) * 2 - 1
    states = dydiff.generate_chained(model, s0, actions, 3, generator=torch.Generator().manual_seed(1))
    assert states.shape == (4, 20, 3) and torch.equal(states[:, 0], s0)
    # rows 0-7, then 7-14 (from the generated s_7), then 12-19 (shifted back to end at row 19, from s_12)
    g = torch.Generator().manual_seed(1)
    w1 = model.generate(s0, actions[:, :8], 3, generator=g)
    w2 = model.generate(w1[:, -1], actions[:, 7:15], 3, generator=g)
    w3 = model.generate(w2[:, 5], actions[:, 12:], 3, generator=g)
    assert torch.allclose(states[:, :8], w1, atol=1e-6) and torch.allclose(states[:, 8:15], w2[:, 1:], atol=1e-6)
    assert torch.allclose(states[:, 15:], w3[:, 3:], atol=1e-6)
    with pytest.raises(ValueError, match="rollout length T=5 is shorter than the diffusion model.s H=8"):
        dydiff.generate_chained(model, s0, actions[:, :5], 3)
    with pytest.raises(ValueError, match="generates H=8 rows at a time"):
        model.generate(s0, actions, 3)


def test_sdedit_refines_the_given_states_instead_of_noise(models):
    """Sampler from given states (SDEdit): from a low sigma the sample stays near them; from pure noise it does not;
    in a round, --sdedit-sigma hands refine's previous trajectory to the DM."""
    model, g = models.dm, lambda: torch.Generator().manual_seed(3)  # noqa: E731
    s0, actions = starts(6) * STD + MEAN, torch.rand(6, H, ACT) - 0.5
    before = models.dm.generate(s0, actions, 4, g())  # any states inside the box
    near = model.generate(s0, actions, 4, g(), states_start=before, sigma_start=0.01)
    far = model.generate(s0, actions, 4, g())
    other = model.generate(s0, actions, 4, torch.Generator().manual_seed(4))
    assert (near - before).abs().max() < 0.1 * (other - far).abs().max()
    seen = []
    generate = model.generate
    model.generate = lambda *a, **k: seen.append((a[4], k.get("sigma_start"))) or generate(*a, **k)
    states, acts = dydiff.initial_rollout(models.act_fn, models.bundle(), starts(6), H, g())
    cfg = dydiff.RolloutConfig(rollout_length=H, iterations=1, sampler_steps=3, sdedit_sigma=0.5)
    dydiff.refine(models.act_fn, models.bundle(), states, acts, cfg, g())
    assert seen[0][1] == 0.5 and torch.allclose(seen[0][0], states * STD + MEAN)


def test_sampler_is_deterministic_for_a_seed():
    """Sampler: the same generator seed gives the same samples."""
    model = tiny_model()
    s0, actions = torch.rand(5, 3) * 2 - 1, torch.rand(5, 8, 2) * 2 - 1
    run = lambda seed: model.generate(s0, actions, sampler_steps=4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_sampler_solvers_make_n_or_2n_minus_1_network_calls():
    """Sampler: Euler makes N network calls, Heun 2N - 1 (no correction on the last step, to sigma = 0);
    with N = 1 (one step, to 0) they are the same sampler; an unknown solver is a one-line error."""
    model = tiny_model()
    calls = []
    model.ema.register_forward_hook(lambda *_: calls.append(1))
    cond, mask = torch.rand(3, 8, 5) * 2 - 1, model.cond_mask()
    run = lambda n, solver: model.sample(cond, mask, n, torch.Generator().manual_seed(0), solver=solver)
    for n, solver, expected in ((6, "euler", 6), (6, "heun", 11), (1, "heun", 1)):
        calls.clear()
        run(n, solver)
        assert len(calls) == expected, (n, solver)
    assert torch.equal(run(1, "euler"), run(1, "heun"))
    assert not torch.allclose(run(6, "euler"), run(6, "heun"))
    with pytest.raises(ValueError, match="unknown sampler solver 'rk4': use 'euler' or 'heun'"):
        run(6, "rk4")


def test_segments_and_mask_keep_padding_out():
    """DM data: segments stay inside episodes; padded rows never reach the loss."""
    starts, ends = np.array([0, 10, 13]), np.array([10, 13, 30])  # lengths 10, 3 (short), 17
    seg_start, seg_len = segment_index(starts, ends, H=8)
    assert len(seg_start) == 3 + 1 + 10
    assert np.all(seg_start + seg_len <= np.repeat(ends, [3, 1, 10]))  # never crosses an episode end
    assert seg_len[3] == 3 and seg_start[3] == 10
    X = torch.arange(30, dtype=torch.float32)[:, None].repeat(1, 5)
    x, mask = gather_segments(X, torch.as_tensor(seg_start), torch.as_tensor(seg_len), 8)
    assert mask[3].tolist() == [True] * 3 + [False] * 5 and torch.all(x[3, 3:] == 12)

    model = tiny_model()
    x = torch.rand(4, 8, 5) * 2 - 1
    loss_mask = torch.ones(4, 8, dtype=torch.bool)
    loss_mask[1, 5:] = False
    loss_mask[2, 1:] = False  # only s_0 is real: nothing to learn in this segment
    garbage = x.clone()
    garbage[~loss_mask] = 100.0
    loss = lambda x_, m: model.loss(x_, model.cond_mask(), m, generator=torch.Generator().manual_seed(0))
    ref = loss(x, loss_mask)
    assert torch.equal(ref, loss(garbage, loss_mask))  # neither the loss nor the network sees the padding
    assert not torch.equal(ref, loss(garbage, torch.ones_like(loss_mask)))  # unmasked, garbage would be learnt
    garbage.requires_grad_(True)
    loss(garbage, loss_mask).backward()
    assert torch.all(garbage.grad[~loss_mask] == 0)


def test_loss_falls_on_toy_dataset():
    """DM training: the EDM loss falls on toy linear dynamics."""
    X, starts, ends = toy_rows()
    seg_start, seg_len = segment_index(starts, ends, H=8)
    torch.manual_seed(0)
    model = DynamicsDiffusion(2, 2, horizon=8, dim=16, dim_mults=(1, 2))

    def eval_loss():  # fixed batch and noise, so before/after are comparable
        g = torch.Generator().manual_seed(123)
        x, m = gather_segments(X, torch.as_tensor(seg_start[:256]), torch.as_tensor(seg_len[:256]), 8)
        return float(np.mean([model.loss(x, model.cond_mask(), m, generator=g).item() for _ in range(8)]))

    before = eval_loss()
    cfg = diffusion.DMConfig(horizon=8, dim=16, dim_mults=(1, 2), train_steps=200, batch_size=32, lr=2e-3, warmup_steps=20,
                             lr_schedule="constant")
    info = diffusion.train(model, X, seg_start, seg_len, cfg, progress=False, val_every=50)
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
    assert info["final_loss"] < info["first_loss"]
    assert info["val_curve"][-1][2] < 0.5 * info["val_curve"][0][2]  # the EMA network's fixed validation loss too
    assert info["train_seconds"] > info["val_curve"][-1][1] > info["val_curve"][0][1] > 0


def test_dm_validation_set_is_the_same_for_every_training_seed():
    """The DM's validation loss is measured on one set of segments, noise levels and noise per dataset, drawn with
    a seed of its own: DMs trained with other seeds (or recipes) compare on it, and repeated calls agree."""
    X, starts, ends = toy_rows()
    seg_start, seg_len = segment_index(starts, ends, H=8)
    st, ln = torch.as_tensor(seg_start), torch.as_tensor(seg_len)
    x_val, m_val = diffusion.validation_set(X, st, ln, 8)
    torch.manual_seed(999)  # the global generator plays no part
    x_again, m_again = diffusion.validation_set(X, st, ln, 8)
    assert x_val.shape == (diffusion.VAL_SEGMENTS, 8, 4) and torch.equal(x_val, x_again) and torch.equal(m_val, m_again)
    for seed, batch in ((0, 32), (1, 16)):
        torch.manual_seed(seed)
        model = DynamicsDiffusion(2, 2, horizon=8, dim=8, dim_mults=(1, 2))
        cfg = diffusion.DMConfig(horizon=8, dim=8, dim_mults=(1, 2), train_steps=20, batch_size=batch, seed=seed)
        info = diffusion.train(model, X, seg_start, seg_len, cfg, progress=False)
        assert info["val_loss"] == diffusion.validation_loss(model, x_val, m_val) == \
            diffusion.validation_loss(model, x_val, m_val)


def test_dm_terminal_rows_add_a_terminated_episodes_last_state_not_a_truncated_ones(tmp_path, monkeypatch):
    """DM training data with --dm-terminal-rows: a terminated episode gets one row more, [its last next state, its
    last action]; a truncated one (a timeout) none. Off (the default and the paper's), the rows, the segments and
    so the trained weights are the dataset's as before."""
    obs = np.arange(12, dtype=np.float32).reshape(6, 2)  # episodes: 0-2 terminated, 3-4 truncated, 5 terminated
    data = SimpleNamespace(obs=obs, next_obs=obs + 100, actions=-np.arange(6, dtype=np.float32)[:, None],
                           terminals=np.array([0, 0, 1, 0, 0, 1], dtype=np.float32),
                           episode_starts=np.array([0, 3, 5]), episode_ends=np.array([3, 5, 6]),
                           obs_dim=2, act_dim=1, dataset_id="test/rows-v0", cache_dir=tmp_path, fingerprint="r" * 16)
    raw, starts, ends = diffusion.training_rows(data)
    np.testing.assert_array_equal(raw, np.concatenate([data.obs, data.actions], 1))
    assert starts is data.episode_starts and ends.tolist() == [3, 5, 6]
    raw_t, starts_t, ends_t = diffusion.training_rows(data, terminal_rows=True)
    assert (starts_t.tolist(), ends_t.tolist()) == ([0, 4, 6], [4, 6, 8])
    np.testing.assert_array_equal(raw_t[[0, 1, 2, 4, 5, 6]], raw)
    np.testing.assert_array_equal(raw_t[[3, 7]], [[104, 105, -2], [110, 111, -5]])  # the falls, last actions repeated
    assert not np.isin(data.next_obs[4], raw_t[:, :2]).any()  # the truncated episode's last next state is no row

    seen = []  # load_or_train trains on these rows and segments (the training itself replaced by a recorder)
    monkeypatch.setattr(diffusion, "train", lambda model, X, st, ln, cfg, **kw: seen.append((model.unnormalize(X), st, ln))
                        or {"train_steps": 0, "train_seconds": 0.0, "val_loss": 0.0})
    import train

    box = train.dataset_box(data)  # what rollouts are clipped to without a DM (M = 0)
    assert box[0].tolist() == [0, 1, -5] and box[1].tolist() == [110, 111, 0]  # next states count (the falls)
    for flag, (rows, first, end) in ((False, (raw, starts, ends)), (True, (raw_t, starts_t, ends_t))):
        model, _ = diffusion.load_or_train(data, diffusion.DMConfig(horizon=4, dim=8, dim_mults=(1, 2),
                                                                    terminal_rows=flag), progress=False)
        assert torch.equal(model.x_min, box[0]) and torch.equal(model.x_max, box[1])  # the DM's box is the same
        X, seg_start, seg_len = seen[-1]
        assert np.allclose(X.numpy(), rows, atol=1e-4)
        want = segment_index(first, end, 4)
        np.testing.assert_array_equal(seg_start, want[0])
        np.testing.assert_array_equal(seg_len, want[1])
    assert seen[0][2].tolist() == [3, 2, 1] and seen[1][2].tolist() == [4, 2, 2]  # the fall is a real (unmasked) row
    assert diffusion.DMConfig().terminal_rows is False

def test_dm_cache_trains_once_and_refuses_a_foreign_file(tiny_data):
    """Cache: the DM is trained once per dataset and settings, then loaded with its EMA weights and box."""
    kw = dict(cfg=diffusion.DMConfig(horizon=8, dim=8, dim_mults=(1, 2), train_steps=30, batch_size=16), progress=False)
    model, info = diffusion.load_or_train(tiny_data, **kw)
    assert not info["cached"] and np.isfinite(info["final_loss"]) and info["train_steps"] == 30
    again, info2 = diffusion.load_or_train(tiny_data, **kw)
    assert info2["cached"] and info2["path"] == info["path"]
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k  # weights, EMA weights and min/max all round-trip
    raw = np.concatenate([np.concatenate([tiny_data.obs, tiny_data.next_obs]), np.tile(tiny_data.actions, (2, 1))], 1)
    assert np.allclose(again.x_min.numpy(), raw.min(0)) and np.allclose(again.x_max.numpy(), raw.max(0))

    s0 = torch.as_tensor(tiny_data.obs[:4])
    acts = torch.as_tensor(tiny_data.actions[:8])[None].repeat(4, 1, 1)
    states = again.generate(s0, acts, 3, generator=torch.Generator().manual_seed(0))
    assert states.shape == (4, 8, tiny_data.obs_dim) and torch.equal(states[:, 0], s0)

    path = Path(info["path"])
    backup = path.read_bytes()
    try:
        ckpt = torch.load(path, weights_only=True)
        torch.save({**ckpt, "settings": {**ckpt["settings"], "horizon": 16}}, path)
        with pytest.raises(CheckpointError, match=r"diffusion_.*\.pt is not a diffusion model of .* with these settings and this code"):
            diffusion.load_or_train(tiny_data, **kw)
    finally:
        path.write_bytes(backup)


def test_model_caches_follow_the_code_not_its_comments(tiny_data, monkeypatch, capsys):
    """Cache: an edit to the code that defines or trains a model (here through data.source, as if the file had
    been edited) gives a new key and retrains it, saying why; an edit to a docstring, or to the DM's sampler,
    which does not change the weights, loads the cached model; --retrain retrains."""
    import runs

    real = runs.source

    def edit(module, old: str, new: str):  # the source of `module` as if the file had this edit
        assert old in real(module)
        monkeypatch.setattr(runs, "source", lambda obj: real(obj).replace(old, new) if obj is module else real(obj))

    kw = dict(cfg=diffusion.DMConfig(horizon=8, dim=8, dim_mults=(1, 2), train_steps=20, batch_size=8, seed=5),
              progress=False)
    path = diffusion.load_or_train(tiny_data, **kw)[1]["path"]
    edit(diffusion, "EDM denoiser over segments", "An edited docstring: EDM denoiser")
    assert diffusion.load_or_train(tiny_data, **kw)[1]["path"] == path
    edit(diffusion, "t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()",
         "t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist() + []")  # the sampler: same weights
    assert diffusion.load_or_train(tiny_data, **kw)[1]["cached"]
    capsys.readouterr()
    edit(diffusion, "SIGMA_DATA = 0.5", "SIGMA_DATA = 0.5 + 0.0")  # the network's preconditioning: another model
    _, info = diffusion.load_or_train(tiny_data, **kw)
    assert not info["cached"] and info["path"] != path
    assert "diffusion: not loaded from the cache, training it (other code than the cached one (diffusion.py " \
           "changed))" in capsys.readouterr().out
    assert diffusion.load_or_train(tiny_data, **kw)[1]["cached"]  # now cached for the edited code

    fit = replace(TINY, seed=9)
    first = dynamics.load_or_train(tiny_data, cfg=fit, progress=False)[2]
    edit(dynamics, '"""r(s, a) with z-scored s', '"""An edited docstring: r(s, a) with z-scored s')
    assert dynamics.load_or_train(tiny_data, cfg=fit, progress=False)[2]["path"] == first["path"]
    edit(dynamics, "self.net = BatchedMLP(1, obs_dim + act_dim, 1, hidden, n_layers)",
         "self.net = BatchedMLP(1, obs_dim + act_dim, 1, hidden, n_layers + 0)")
    edited = dynamics.load_or_train(tiny_data, cfg=fit, progress=False)[2]
    assert not edited["cached"] and edited["path"] != first["path"]
    capsys.readouterr()
    assert not dynamics.load_or_train(tiny_data, cfg=fit, progress=False, retrain=True)[2]["cached"]
    assert "training it (--retrain)" in capsys.readouterr().out
    assert parse_args(["--retrain"]).retrain and not parse_args([]).retrain


# ------------------------------------------------------------------------- dydiff.py: one round
@pytest.fixture
def models():
    """Tiny random models around a tight dataset box; state dim 2 is constant within episodes (a 'goal');
    the policy's action box is narrower than [-1, 1] in dim 0, so the final actions need clipping."""
    torch.manual_seed(0)
    ens = Ensemble(OBS, ACT, n_members=3, n_elites=2, hidden=16, n_layers=2)
    with torch.no_grad():  # x, y drift by +0.5 per step: the ensemble leaves the box within a step
        ens.net.layers[-1].bias[..., :2] += 0.5
    reward = RewardModel(OBS, ACT, hidden=16, n_layers=1)
    x_min = torch.cat([MEAN - BOX * STD, torch.tensor([-1.0, -1.0])])
    x_max = torch.cat([MEAN + BOX * STD, torch.tensor([0.0, 1.0])])
    dm = DynamicsDiffusion(OBS, ACT, horizon=H, dim=8, dim_mults=(1, 2), x_min=x_min, x_max=x_max)
    policy = nn.Sequential(nn.Linear(OBS, 16), nn.Tanh(), nn.Linear(16, ACT), nn.Tanh())
    act_fn = lambda s: policy(s)  # noqa: E731  (the dydiff functions run it under no_grad)
    constant = torch.tensor([False, False, True, False])

    def bundle(terminal=terminal_fn("maze2d"), reward_fn=None):
        return dydiff.DyDiffModels(ensemble=ens, reward_model=reward, dm=dm, terminal_fn=terminal, obs_mean=MEAN,
                                   obs_std=STD, reward_fn=reward_fn, constant_dims=constant)

    return SimpleNamespace(ens=ens, reward=reward, dm=dm, act_fn=act_fn, bundle=bundle, constant=constant)


def starts(B, seed=1):
    return (torch.rand(B, OBS, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * BOX


def test_constant_dims_are_found_from_the_data(tiny_data):
    """Data: maze2d's goal (dims 4, 5) is the only part of the state constant within every episode."""
    assert tiny_data.constant_dims.tolist() == [False, False, False, False, True, True]


def test_initial_rollout_follows_policy_and_ensemble_inside_the_box(models):
    """Step 2: pi in the ensemble, a_{T-1} included; every action and state clipped to the box, constant dims = s_0's."""
    models.ens.n_elites = 1
    models.ens.set_elites(torch.tensor([0.3, 0.1, 0.2]))  # one elite (member 1): the step is deterministic
    bundle, s0 = models.bundle(), starts(16)
    s, a = dydiff.initial_rollout(models.act_fn, bundle, s0, H, torch.Generator().manual_seed(0))
    assert s.shape == (16, H, OBS) and a.shape == (16, H, ACT)
    assert torch.equal(s[:, 0], s0)
    with torch.no_grad():
        for t in range(H):
            pi = models.act_fn(s[:, t])
            assert torch.equal(a[:, t], torch.stack([pi[:, 0].clamp(-1, 0), pi[:, 1]], -1))
        assert (models.act_fn(s.reshape(-1, OBS))[:, 0] > 0).any()  # so the clipping is exercised
        for t in range(H - 1):
            free = models.ens.step(s[:, t], a[:, t])
            assert (free[:, :2].abs() > BOX).any()  # the ensemble alone leaves the box...
            expect = free.clamp(-BOX, BOX)  # ...the official conversions clip it back before pi sees it
            expect[:, 2] = s0[:, 2]
            assert torch.allclose(s[:, t + 1], expect, atol=1e-6)


def test_refine_is_policy_consistent_and_stays_in_dataset_box(models):
    """Step 3: after M iterations a_t = clip(pi(s_t)), s_0 and the constant dims kept, states in the box."""
    g = torch.Generator().manual_seed(0)
    s0, bundle = starts(32), models.bundle()
    states, actions = dydiff.initial_rollout(models.act_fn, bundle, s0, H, g)
    cfg = dydiff.RolloutConfig(rollout_length=H, iterations=2, sampler_steps=4)
    iterates = dydiff.refine(models.act_fn, bundle, states, actions, cfg, g)
    assert len(iterates) == 3 and iterates[0][0] is states and iterates[0][1] is actions
    final_s, final_a = iterates[-1]
    with torch.no_grad():
        pi = models.act_fn(final_s.reshape(-1, OBS)).reshape(32, H, ACT)
    assert (pi[..., 0] > 0).any()  # the policy leaves the action box in dim 0...
    assert torch.equal(final_a, torch.stack([pi[..., 0].clamp(-1, 0), pi[..., 1]], -1))  # ...the final actions do not
    assert not torch.allclose(final_a, actions, atol=1e-3)  # the relabelling did change the actions
    assert torch.equal(final_s[:, 0], s0)  # s_0 is kept exactly
    for s, _ in iterates:
        assert torch.equal(s[..., 2], s0[:, None, 2].expand(32, H))  # the constant dim never moves
        assert s.min() >= -BOX - 1e-6 and s.max() <= BOX + 1e-6
        raw = s * STD + MEAN  # and in the DM's raw coordinates
        assert (raw >= models.dm.x_min[:OBS] - 1e-5).all() and (raw <= models.dm.x_max[:OBS] + 1e-5).all()


@pytest.mark.parametrize("w", [0.5, 1.0, 0.25])
def test_state_averaging_with_previous_states(models, w):
    """Step 3: states = clip(w * DM states + (1 - w) * previous states); w = 1/2 is the official code's."""
    s0, bundle = starts(8), models.bundle()
    states, actions = dydiff.initial_rollout(models.act_fn, bundle, s0, H, torch.Generator().manual_seed(0))
    cfg = dydiff.RolloutConfig(rollout_length=H, iterations=1, sampler_steps=4, update_weight=w, sdedit_sigma=0)
    out = dydiff.refine(models.act_fn, bundle, states, actions, cfg, torch.Generator().manual_seed(5))
    dm_raw = models.dm.generate(s0 * STD + MEAN, actions, 4, torch.Generator().manual_seed(5))
    expect = (w * (dm_raw - MEAN) / STD + (1 - w) * states).clamp(-BOX, BOX)
    assert torch.allclose(out[1][0][:, 1:, [0, 1, 3]], expect[:, 1:, [0, 1, 3]], atol=1e-5)


def test_refine_chains_dm_windows_for_rollouts_longer_than_H(models):
    """Step 3 with T > H: the DM's windows are chained, and the whole T-row trajectory is refined."""
    T, bundle, s0 = 20, models.bundle(), starts(6)
    states, actions = dydiff.initial_rollout(models.act_fn, bundle, s0, T, torch.Generator().manual_seed(0))
    cfg = dydiff.RolloutConfig(rollout_length=T, iterations=1, sampler_steps=3, sdedit_sigma=0)  # from noise
    out = dydiff.refine(models.act_fn, bundle, states, actions, cfg, torch.Generator().manual_seed(5))
    dm_raw = dydiff.generate_chained(models.dm, s0 * STD + MEAN, actions, 3, torch.Generator().manual_seed(5))  # 3 windows of 8
    assert dm_raw.shape == (6, T, OBS)
    expect = (((dm_raw - MEAN) / STD + states) / 2).clamp(-BOX, BOX)
    assert torch.allclose(out[1][0][:, 1:, [0, 1, 3]], expect[:, 1:, [0, 1, 3]], atol=1e-5)


def test_hardmax_keeps_every_trajectory_at_or_above_the_quantile():
    """Step 5 (hardmax): the official rule, return >= the (1 - fraction) quantile; ties are all kept."""
    returns = torch.randn(50, generator=torch.Generator().manual_seed(0))
    kept = dydiff.hardmax_filter(returns, 0.6)
    assert len(kept) == 30 and set(kept.tolist()) == set(torch.argsort(returns, descending=True)[:30].tolist())
    assert returns[kept].tolist() == sorted(returns[kept].tolist(), reverse=True)  # best first
    sparse = torch.cat([torch.zeros(70), torch.ones(30)])  # a sparse reward: most trajectories return 0
    assert len(dydiff.hardmax_filter(sparse, 0.6)) == 100  # the 40% quantile is 0: every tie is kept
    assert sorted(dydiff.hardmax_filter(1 - sparse, 0.6).tolist()) == list(range(70))  # the 70 ones, not 60
    assert len(dydiff.hardmax_filter(torch.randn(10), 1.0)) == 10
    assert len(dydiff.hardmax_filter(torch.randn(10), 0.01)) == 1  # never empty


def test_softmax_keeps_count_without_repeats_and_prefers_high_returns():
    """Step 5 (softmax): distinct draws that favour high returns; uniform floor."""
    g = torch.Generator().manual_seed(0)
    returns = torch.arange(100.0)
    for frac in (0.6, 1.0):
        kept = dydiff.softmax_filter(returns, frac, 0.05, g)
        assert len(kept) == int(frac * 100) and len(set(kept.tolist())) == len(kept)
    kept = dydiff.softmax_filter(returns, 0.3, 0.05, g)
    # T = 0.05 concentrates on the top: the 15 best are always drawn (once the top ~25 are used up, the
    # uniform floor dominates and the rest is drawn nearly uniformly)
    assert set(range(85, 100)) <= set(kept.tolist())
    kept = dydiff.softmax_filter(returns, 0.3, 1e3, g)
    assert 25 < returns[kept].mean() < 75  # a huge T is nearly uniform
    # an outlier at a small T underflows exp() even in float64 (z gap 4.6 / 1e-3): the outlier is drawn
    # first, and thanks to the uniform floor the rest are drawn uniformly (with p = 0 torch 2.x draws
    # zero-probability indices in a fixed order, and older versions raise)
    outlier = torch.cat([torch.tensor([1e6]), torch.zeros(19)])
    assert sorted(dydiff.softmax_filter(outlier, 1.0, 1e-3, g).tolist()) == list(range(20))
    draws = torch.stack([dydiff.softmax_filter(outlier, 0.1, 1e-3, g) for _ in range(200)])
    assert (draws[:, 0] == 0).all() and len(set(draws[:, 1].tolist())) > 10


def test_transitions_stop_at_first_terminal():
    """Step 6: transitions stop at the first terminal, which keeps done = 1."""
    B, H6 = 3, 6
    states = (torch.arange(B)[:, None] * 100 + torch.arange(H6)[None]).float()[..., None].expand(B, H6, OBS)
    actions = -states[..., :ACT]
    rewards = states[:, :-1, 0] + 0.5  # r_t of the transition t -> t + 1
    terminal = torch.zeros(B, H6 - 1, dtype=torch.bool)
    terminal[1, 2] = terminal[1, 4] = True  # trajectory 1: t = 0, 1, 2 kept, done at t = 2
    terminal[2, 0] = True                   # trajectory 2: only its first transition
    tr = dydiff.to_transitions(states, actions, rewards, terminal)
    t_expect = [(0, t) for t in range(5)] + [(1, 0), (1, 1), (1, 2), (2, 0)]
    code = torch.tensor([100.0 * b + t for b, t in t_expect])
    assert torch.equal(tr["obs"][:, 0], code) and torch.equal(tr["next_obs"][:, 0], code + 1)
    assert torch.equal(tr["actions"], -tr["obs"][:, :ACT]) and torch.equal(tr["rewards"], code + 0.5)
    assert tr["dones"].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1]


def test_rollout_round_with_the_env_reward(models):
    """Steps 4-5 with the task's reward: r(s_t, a_t, s_{t+1}) of raw states, summed."""
    cfg = dydiff.RolloutConfig(rollout_batch=30, rollout_length=H, iterations=1, sampler_steps=4, keep_fraction=0.5)
    g = torch.Generator().manual_seed(0)

    def reward_fn(s, a, s_next):  # a known function of the raw next state, as dynamics.env_reward_fn
        return torch.sigmoid(s_next[:, 3] - MEAN[3])  # continuous: no ties in the returns

    tr, stats = dydiff.rollout_round(models.act_fn, models.bundle(terminal_fn("maze2d"), reward_fn), starts(30), cfg, g)
    assert stats["n_kept"] == 15 and len(tr["obs"]) == 15 * (H - 1)  # no terminals on the maze
    raw_next = tr["next_obs"] * STD + MEAN
    assert torch.allclose(tr["rewards"], reward_fn(None, None, raw_next), atol=1e-6)
    assert 0 < tr["rewards"].mean() < 1
    # a trajectory's return is the sum of the H - 1 rewards its transitions carry
    assert stats["return_kept_mean"] == pytest.approx(float(tr["rewards"].reshape(15, H - 1).sum(1).mean()), rel=1e-5)


def test_ensemble_only_round_with_m_0(models):
    """Steps 2 and 4-6 with M = 0 (--iterations 0, the ablation): the DM is never sampled; the transitions
    are the initial ensemble trajectories that the filter keeps, their actions clipped to the box."""
    def no_dm(*args, **kwargs):
        raise AssertionError("the DM was sampled with M = 0")

    models.dm.generate = no_dm
    cfg = dydiff.RolloutConfig(rollout_batch=20, rollout_length=H, iterations=0, keep_fraction=0.5)
    bundle, s0 = models.bundle(), starts(20)
    tr, stats = dydiff.rollout_round(models.act_fn, bundle, s0, cfg, torch.Generator().manual_seed(0))
    states, actions = dydiff.initial_rollout(models.act_fn, bundle, s0, H, torch.Generator().manual_seed(0))
    with torch.no_grad():
        returns = models.reward(states[:, :-1].reshape(-1, OBS), actions[:, :-1].reshape(-1, ACT)).reshape(20, H - 1)
    kept = dydiff.hardmax_filter(returns.sum(1), 0.5)
    assert stats["n_kept"] == len(kept) == 10 and not any(k.startswith("state_shift") for k in stats)
    assert torch.equal(tr["obs"], states[kept, :-1].reshape(-1, OBS))
    assert torch.equal(tr["next_obs"], states[kept, 1:].reshape(-1, OBS))
    assert torch.equal(tr["actions"], actions[kept, :-1].reshape(-1, ACT)) and tr["actions"][:, 0].max() <= 0
    assert torch.equal(tr["rewards"], returns[kept].reshape(-1))

    # without a DM (train.py with --iterations 0), given the same box: the same round, to the bit
    no_dm_bundle = replace(bundle, dm=None, x_min=models.dm.x_min.clone(), x_max=models.dm.x_max.clone())
    tr2, _ = dydiff.rollout_round(models.act_fn, no_dm_bundle, s0, cfg, torch.Generator().manual_seed(0))
    assert all(torch.equal(tr[k], tr2[k]) for k in tr)
    with pytest.raises(ValueError, match=r"^M=2 DM iterations need the DM \(models.dm is None\)$"):
        dydiff.rollout_round(models.act_fn, no_dm_bundle, s0, replace(cfg, iterations=2))
    with pytest.raises(ValueError, match="without a DM, give the dataset's box"):
        replace(bundle, dm=None, x_min=None)


def test_return_stops_at_the_first_terminal_only_with_the_flag(models):
    """Steps 4-6 with --stop-return-at-terminal: a trajectory's return sums its rewards up to and including its
    first terminal transition, and the filter ranks that; off (the paper, the official code) it sums all T-1."""
    dones = torch.tensor([[0, 0, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert dydiff.before_terminal(dones).sum(1).tolist() == [3, 1, 5]  # the terminal's own reward counts

    def terminal(s, a, s_next):  # fires for some trajectories, at various steps
        return s_next[:, 3] > MEAN[3] + 0.2 * STD[3]

    ones = lambda s, a, s_next: torch.ones(len(s))  # noqa: E731  (a return counts its transitions)
    bundle, s0 = models.bundle(terminal, ones), starts(40)
    states, actions = dydiff.initial_rollout(models.act_fn, bundle, s0, H, torch.Generator().manual_seed(0))
    alive = dydiff.before_terminal(dydiff.transition_dones(bundle, states, actions))
    lengths = alive.sum(1).double()
    assert 0 < (lengths < H - 1).sum() < 40  # some trajectories fall, not all of them
    for stop, returns in ((True, lengths), (False, torch.full((40,), H - 1.0, dtype=torch.float64))):
        cfg = dydiff.RolloutConfig(rollout_batch=40, rollout_length=H, iterations=0, keep_fraction=0.5,
                                   stop_return_at_terminal=stop)
        tr, stats = dydiff.rollout_round(models.act_fn, bundle, s0, cfg, torch.Generator().manual_seed(0))
        kept = dydiff.hardmax_filter(returns, 0.5)
        assert stats["return_mean"] == pytest.approx(float(returns.mean()))
        assert stats["n_kept"] == len(kept) and stats["return_kept_mean"] == pytest.approx(float(returns[kept].mean()))
        assert len(tr["obs"]) == int(lengths[kept].sum())  # either way the transitions stop at the first terminal
    assert dydiff.RolloutConfig().stop_return_at_terminal is False

def test_round_on_the_device_keeps_every_tensor_there(models):
    """Steps 1-6 on DEVICE: the models, the start states and every transition stay on the learner's device."""
    bundle = models.bundle()
    for m in (bundle.ensemble, bundle.reward_model, bundle.dm):
        m.to(DEVICE)
    bundle.obs_mean, bundle.obs_std, bundle.constant_dims = (x.to(DEVICE) for x in (MEAN, STD, models.constant))
    policy = nn.Sequential(nn.Linear(OBS, 16), nn.Tanh(), nn.Linear(16, ACT), nn.Tanh()).to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    s0, _ = dydiff.draw_start_states(starts(64).to(DEVICE), 32, g)
    cfg = dydiff.RolloutConfig(rollout_batch=32, rollout_length=2 * H, iterations=2, sampler_steps=3, filter="softmax")
    tr, stats = dydiff.rollout_round(policy, bundle, s0, cfg, g)
    assert {v.device.type for v in tr.values()} == {torch.device(DEVICE).type} and stats["n_transitions"] > 0
    assert all(math.isfinite(stats[k]) for k in ("return_kept_mean", "state_shift_m1", "state_shift_m2"))


def test_dm_training_and_sampling_on_the_device():
    """DM on DEVICE: training draws its segments and noise there, and sampling returns states there."""
    X, starts_, ends = toy_rows(n_episodes=4)
    model = tiny_model(obs_dim=2, act_dim=2).to(DEVICE)
    seg_start, seg_len = segment_index(starts_, ends, 8)
    cfg = diffusion.DMConfig(horizon=8, dim=8, dim_mults=(1, 2), train_steps=20, batch_size=8)
    info = diffusion.train(model, X.to(DEVICE), seg_start, seg_len, cfg, progress=False)
    assert len(info["loss_curve"]) == 1 and math.isfinite(info["val_loss"])
    out = model.generate(X[:3, :2].to(DEVICE), X[:24, 2:].reshape(3, 8, 2).to(DEVICE), 3,
                         torch.Generator(device=DEVICE).manual_seed(0))
    assert out.shape == (3, 8, 2) and out.device.type == torch.device(DEVICE).type


@pytest.mark.parametrize("filt", ["hardmax", "softmax"])
def test_rollout_round_end_to_end(models, filt):
    """Steps 2-6: a round with terminals, either filter, reward model scores."""
    cfg = dydiff.RolloutConfig(rollout_batch=40, rollout_length=H, iterations=2, sampler_steps=4, filter=filt,
                               keep_fraction=0.5)
    data_env = starts(200, seed=3)
    g = torch.Generator().manual_seed(0)
    s0, idx = dydiff.draw_start_states(data_env, cfg.rollout_batch, g)
    assert torch.equal(s0, data_env[idx])
    def terminal(s, a, s_next):  # raw states, as dynamics.terminal_fn; fires on part of the box
        return s_next[:, 3] > 0.2

    tr, stats = dydiff.rollout_round(models.act_fn, models.bundle(terminal), s0, cfg, g)
    assert stats["n_kept"] == 20 and stats["n_transitions"] == len(tr["obs"]) > 0
    assert 0 < stats["terminated_fraction"] < 1  # both kinds of trajectories occur, so the cut is exercised
    assert len(tr["obs"]) < 20 * (H - 1)
    # every transition is consistent with the final (policy-consistent) trajectories and the reward model
    with torch.no_grad():
        pi = models.act_fn(tr["obs"])
        assert torch.allclose(tr["actions"], torch.stack([pi[:, 0].clamp(max=0.0), pi[:, 1]], -1))
        assert torch.allclose(tr["rewards"], models.reward(tr["obs"], tr["actions"]), atol=1e-6)
    raw_next = tr["next_obs"] * STD + MEAN
    done = raw_next[:, 3] > 0.2
    assert torch.equal(tr["dones"].bool(), done)
    # at most one done per kept trajectory, and it ends it: #dones = #terminated kept trajectories
    assert tr["dones"].sum() == round(stats["terminated_fraction"] * 20)
    assert tr["obs"].abs().max() <= BOX + 1e-6 and tr["next_obs"].abs().max() <= BOX + 1e-6
    with pytest.raises(ValueError, match="shorter than the diffusion model's H=8"):
        dydiff.rollout_round(models.act_fn, models.bundle(), s0, dydiff.RolloutConfig(rollout_length=6), g)


def test_maze_picture_marks_walls_goal_and_evaluation_starts():
    """Pictures: the maze drawing has one square per wall cell, the start cells, and the goal's circle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    fig, ax = plt.subplots()
    draw_maze(ax, "maze2d-umaze")
    maze = maze_eval_env("maze2d-umaze").unwrapped.maze
    walls = sum(c == 1 for row in maze.maze_map for c in row)
    free = sum(c != 1 for row in maze.maze_map for c in row)
    squares = [p for p in ax.patches if not isinstance(p, Circle)]
    assert sum(p.get_facecolor()[0] < 0.3 for p in squares) == walls
    assert len(squares) == walls + free - 1  # every free cell but the goal's is a start cell
    (goal,) = [p for p in ax.patches if isinstance(p, Circle)]
    assert goal.radius == 0.45
    np.testing.assert_allclose(goal.center, maze.cell_rowcol_to_xy(np.array(MAZE2D["maze2d-umaze"][2])))
    assert {"evaluation starts", "goal (success radius 0.45)"} <= set(ax.get_legend_handles_labels()[1])
    plt.close(fig)


# --------------------------------------------------------------------------- train.py: the loop
def test_batch_mix_has_the_requested_real_ratio():
    """Mixed batches: int(batch * real_ratio) real; the synthetic FIFO keeps the newest rows."""
    real, syn = TransitionBuffer(1000, 3, 1, "cpu"), TransitionBuffer(100, 3, 1, "cpu")
    z = lambda n, v: dict(obs=torch.zeros(n, 3), actions=torch.zeros(n, 1), rewards=torch.full((n,), v),  # noqa: E731
                          next_obs=torch.zeros(n, 3), dones=torch.zeros(n))
    real.add(**z(1000, 0.0))
    gen = torch.Generator().manual_seed(0)
    syn.add(**z(50, 1.0))  # fewer than one batch: all real
    assert sample_batch(real, syn, 256, 0.6, gen)["rewards"].sum() == 0
    syn.add(**z(300, 1.0))  # FIFO: 350 added, capacity 100
    assert syn.size == 100 and syn.ptr == 50
    fifo = TransitionBuffer(4, 3, 1, "cpu")
    fifo.add(**{**z(3, 0.0), "rewards": torch.arange(3.0)})
    fifo.add(**{**z(6, 0.0), "rewards": torch.arange(3.0, 9.0)})  # more than the capacity in one call
    assert fifo.ptr == 1 and sorted(fifo.data["rewards"].tolist()) == [5.0, 6.0, 7.0, 8.0]  # the newest four
    for ratio, n_syn in ((0.6, 64 - int(64 * 0.6)), (0.0, 64), (1.0, 0)):
        assert sample_batch(real, syn, 64, ratio, gen)["rewards"].sum() == n_syn


def test_paper_preset_changes_defaults_but_flags_given_win():
    """Args: the cpu values are the defaults; --preset paper changes them; a flag given always wins."""
    cpu = parse_args([])
    assert (cpu.total_steps, cpu.horizon, cpu.dm_dim, cpu.dm_blocks, cpu.sampler_steps, cpu.sampler_solver,
            cpu.rollout_batch) == (50_000, 32, 32, 2, 8, "euler", 512)
    paper = parse_args(["--preset", "paper", "--rollout-batch", "64"])
    assert paper.rollout_batch == 64 and paper.preset == "paper"
    assert (paper.horizon, paper.dm_dim, paper.dm_mults, paper.dm_blocks, paper.sampler_steps, paper.sampler_solver,
            paper.rollout_interval, paper.total_steps) == (100, 128, (1, 4, 8), 2, 34, "heun", 500, 1_000_000)
    assert parse_args(["--rollout-batch", "64", "--preset=paper"]).horizon == 100  # in any order, either spelling


def test_evaluation_episodes_follow_the_env_and_a_flag_wins():
    """Args: 10 evaluation episodes on the locomotion names, 100 on maze2d (CORL), unless --eval-episodes is given."""
    assert [parse_args(a).eval_episodes for a in ([], ["--env", "maze2d-large"], ["--env", "hopper-medium"],
                                                   ["--env=walker2d-medium-expert", "--algo", "iql"],
                                                   ["--env", "hopper-medium", "--eval-episodes", "7"])] == [100, 100, 10, 10, 7]


def test_corl_iql_settings_per_dataset_are_the_defaults_and_flags_win():
    """Args: with --algo iql, CORL's per-dataset settings (hopper) are the defaults; a flag given wins."""
    assert (parse_args(["--algo", "iql", "--env", "hopper-medium-expert"]).beta,
            parse_args(["--algo", "iql", "--env", "hopper-medium-expert"]).expectile) == (6.0, 0.5)
    med = parse_args(["--env=hopper-medium", "--algo=iql"])
    assert (med.iql_deterministic, med.tau, med.normalize_reward, med.beta) == (True, 0.001, True, 3.0)
    assert parse_args(["--algo", "iql", "--env", "hopper-medium", "--tau", "0.005"]).tau == 0.005
    # hopper-medium-replay: CORL's tau 0.001 with --preset paper's 1M steps, 0.005 with the cpu preset's 50k
    assert [parse_args(["--algo=iql", "--env=hopper-medium-replay", *p]).tau
            for p in ([], ["--preset", "paper"], ["--tau", "0.002"])] == [0.005, 0.001, 0.002]
    td3 = parse_args(["--env", "hopper-medium"])  # TD3+BC: CORL uses its defaults on every dataset
    assert (td3.iql_deterministic, td3.tau, td3.normalize_reward) == (False, 0.005, False)


def test_evaluation_feeds_the_policy_on_the_learners_device(tiny_data, tmp_path, monkeypatch):
    """Device: the evaluation hands the policy its batch on the learner's device, in the loop too."""
    actor, seen = TD3BC(6, 2).actor.to("meta"), []

    def act_fn(o):  # a policy on the meta device: a CPU batch would raise "not on the expected device"
        seen.append(actor(o).shape)
        return torch.zeros(len(o), 2)

    returns = evaluate(act_fn, [tiny_data.make_eval_env() for _ in range(2)], tiny_data, 0, device="meta")
    assert returns.shape == (2,) and seen and seen[0] == (2, 2)
    import train

    devices = []
    monkeypatch.setattr(train, "evaluate", lambda act, envs, data, seed, device="cpu": devices.append(device)
                        or evaluate(act, envs, data, seed, device))
    run_train(tmp_path, "--total-steps", "50", "--run-name", "dev", "--device", "cpu")
    assert devices == ["cpu"]  # the loop passes the learner's device


def test_paper_preset_dry_run(tiny_data, tmp_path, monkeypatch, tiny_fit):
    """--preset paper end to end on a CPU with tiny networks: the paper's recipe reaches every model, the
    ensemble's too (lr 1e-4, an epoch is a pass over the data, no epoch cap, any improvement counts)."""
    fits, train_models = [], dynamics.train_models
    monkeypatch.setattr(dynamics, "train_models", lambda data, cfg, *a, **kw: fits.append(cfg) or
                        train_models(data, cfg, *a, **kw))
    tiny = ["--total-steps", "20", "--eval-interval", "10", "--horizon", "8", "--rollout-length", "8", "--dm-dim", "8",
            "--dm-mults", "1", "2", "--dm-train-steps", "20", "--rollout-batch", "16", "--rollout-interval", "10",
            "--sampler-steps", "3", "--synthetic-capacity", "200"]
    summary = run_train(tmp_path, "--preset", "paper", "--dydiff", *tiny, "--run-name", "paper", "--model-seed", "7")
    assert summary["preset"] == "paper" and summary["steps"] == 20 and len(fits) == 1
    assert (fits[0].lr, fits[0].reward_lr, fits[0].steps_per_epoch, fits[0].max_epochs, fits[0].reward_max_epochs,
            fits[0].improvement, fits[0].seed) == (1e-4, 1e-4, 0, 0, 0, 0.0, 7)
    config = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert (config["sampler_churn"], config["dm_act"], config["dm_batch_size"], config["dm_lr"], config["dm_grad_clip"],
            config["dm_warmup_steps"], config["dm_lr_schedule"], config["real_ratio"]) == (
        60.0, "mish", 8, 1e-3, 0.0, 1_250_000, "constant", 0.6)


def test_flags_fill_each_component_config_by_name():
    """train.py: every RolloutConfig and DMConfig field comes from its flag, whatever the order of the fields."""
    import train

    flags = ["--rollout-batch", "7", "--horizon", "16", "--rollout-length", "40", "--iterations", "3",
             "--sampler-steps", "5", "--sampler-solver", "heun", "--sampler-churn", "2.5", "--filter", "softmax",
             "--keep-fraction", "0.3", "--temperature", "0.2", "--update-weight", "0.7", "--sdedit-sigma", "1.5",
             "--dm-dim", "24", "--dm-mults", "1", "2",
             "--dm-act", "mish", "--dm-train-steps", "11", "--dm-batch-size", "13", "--dm-lr", "0.01",
             "--dm-warmup-steps", "3", "--dm-lr-schedule", "constant", "--dm-grad-clip", "0.5",
             "--model-seed", "4", "--stop-return-at-terminal", "--dm-terminal-rows"]
    args = parse_args(flags)
    assert train.rollout_config(args) == dydiff.RolloutConfig(7, 40, 3, 5, "heun", 2.5, "softmax", 0.3, 0.2, 0.7, 1.5, True)
    assert train.dm_config(args) == diffusion.DMConfig(horizon=16, dim=24, dim_mults=(1, 2), act="mish", train_steps=11,
                                                       batch_size=13, lr=0.01, warmup_steps=3, lr_schedule="constant",
                                                       grad_clip=0.5, seed=4, terminal_rows=True)
    assert train.fit_config(args).seed == 4
    # the cpu preset's defaults are the configs' own
    defaults = parse_args([])
    assert train.rollout_config(defaults) == dydiff.RolloutConfig() and train.dm_config(defaults) == diffusion.DMConfig()
    # the two levers of a DM that can fall are off in both presets (the official code has neither; not yet measured)
    for preset in (defaults, parse_args(["--preset", "paper"])):
        assert not train.rollout_config(preset).stop_return_at_terminal and not train.dm_config(preset).terminal_rows


def test_paper_ensemble_recipe_is_the_official_one():
    """--preset paper: the ensemble trains at lr 1e-4, epochs are passes, no cap, any improvement counts."""
    import train

    cfg = train.fit_config(parse_args(["--preset", "paper"]))
    assert (cfg.lr, cfg.reward_lr, cfg.steps_per_epoch, cfg.max_epochs, cfg.improvement, cfg.patience) == (
        1e-4, 1e-4, 0, 0, 0.0, 7)
    torch.manual_seed(0)  # an epoch of 0 steps is one pass; max_epochs 0 stops only on patience
    s, a = torch.randn(300, 3), torch.rand(300, 1) * 2 - 1
    model = RewardModel(3, 1, hidden=8)
    out = fit(model, (s, a, torch.ones(300)), (s, a, torch.full((300,), 0.3)),
              FitConfig(steps_per_epoch=0, batch_size=100, lr=3e-3, patience=3, improvement=0.0), 0, progress=False)
    assert 3 < out["epochs"] < 1000  # stopped by the patience, not by a cap


def test_locomotion_dataset_with_dydiff_and_corl_iql(tiny_hopper, tmp_path, tiny_fit):
    """Locomotion end to end: a Minari Hopper dataset, IQL with CORL's hopper settings, DyDiff rollouts cut
    by hopper's terminal function, a learned reward, a normalized score from the dataset's references."""
    flags = ["--dataset-id", tiny_hopper, "--env", "hopper-medium-replay", "--algo", "iql", "--total-steps", "60",
             "--eval-interval", "30", "--eval-episodes", "2", *TINY_DYDIFF[:-2], "--synthetic-capacity", "2000",
             "--rollout-interval", "20", "--sampler-solver", "heun"]  # the paper's sampler: with this barely
    # trained DM its samples spread far enough to reach hopper's unhealthy states (Euler's stay near the middle)
    summary = main(["--run-dir", str(tmp_path), "--run-name", "hop", *flags])
    assert summary["dataset_id"] == tiny_hopper and summary["ref_min"] == -20.272305 and summary["steps"] == 60
    assert all(np.isfinite(e["score"]) for e in summary["evaluations"])
    config = json.loads((tmp_path / "hop" / "config.json").read_text())
    assert (config["reward"], config["iql_deterministic"], config["tau"], config["normalize_reward"]) == (
        "model", True, 0.005, True)
    syn = torch.load(tmp_path / "hop" / "checkpoint.pt", weights_only=True)["synthetic"]
    assert syn["size"] > 0 and syn["dones"].sum() > 0  # hopper's terminal function cut rollouts
    data = load_dataset(dataset_id=tiny_hopper, verbose=False)
    assert data.terminals.sum() > 0 and not data.constant_dims.any()
    # the files it learnt from, as compare.py finds them before a run: a rebuilt dataset has another fingerprint
    assert summary["fingerprint"] == config["fingerprint"] == data.fingerprint
    assert stored_dataset(dataset_id=tiny_hopper) == (tiny_hopper, data.fingerprint)
    assert stored_dataset("walker2d-medium") is None  # not on this machine (nor built by asking)


@pytest.mark.parametrize("algo", ["td3bc", "iql"])
def test_train_smoke_run_writes_summary(tiny_data, tmp_path, algo):
    """The loop: a plain run writes its summary, curve, config and TensorBoard events."""
    summary = run_train(tmp_path, "--algo", algo, "--total-steps", "200", "--run-name", "smoke", "--eval-episodes", "3")
    run = tmp_path / "smoke"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["steps"] == 200 and [e["step"] for e in on_disk["evaluations"]] == [50, 100, 150, 200]
    assert on_disk["last_score"] == on_disk["evaluations"][-1]["score"] == summary["last_score"]
    assert on_disk["best_score"] == max(e["score"] for e in on_disk["evaluations"])
    final = np.mean([e["score"] for e in on_disk["evaluations"][1:]])  # the mean of the last 3 evaluations
    assert on_disk["final_score"] == pytest.approx(final) and summary["final_score"] == on_disk["final_score"]
    assert 0 < on_disk["cpu_time_s"] and on_disk["wall_time_s"] > 0
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert json.loads((run / "config.json").read_text())["algo"] == algo
    assert any(run.glob("events.out.tfevents.*"))


def test_tiny_end_to_end_run_with_dydiff(tiny_data, tmp_path, tiny_fit):
    """The loop with DyDiff: rounds every K steps fill the synthetic buffer; a picture is drawn; the summary names
    the cached models the run used, with how well they fit."""
    summary = run_train(tmp_path, "--total-steps", "100", "--run-name", "dyd", *TINY_DYDIFF)
    assert summary["dydiff"] and summary["steps"] == 100 and summary["rollout_time_s"] > 0
    import train

    args = train.resolve(parse_args(["--dataset-steps", str(TINY_STEPS), *TINY_DYDIFF]))
    data = load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False)  # as the run loaded it
    _, fit_info, dm_info = train.pretrain(args, data, "cpu")  # the models the run loaded, from the cache
    assert summary["pretrained"] == {
        "ensemble": {"file": Path(fit_info["path"]).name, "holdout_mse": fit_info["ensemble_holdout_mse"],
                     "reward_holdout_mse": fit_info["reward_holdout_mse"]},
        "dm": {"file": Path(dm_info["path"]).name, "val_loss": dm_info["val_loss"], "train_steps": 30}}
    ckpt = torch.load(tmp_path / "dyd" / "checkpoint.pt", weights_only=True)
    # rounds at steps 0, 40, 80; each keeps the trajectories at or above the 40% score quantile (at least
    # 60% of the 16, more with ties) of T - 1 = 7 transitions
    assert 3 * 9 * 7 <= ckpt["synthetic"]["size"] <= 3 * 16 * 7
    assert (tmp_path / "dyd" / "rollouts.png").stat().st_size > 1000


def test_ensemble_only_rollouts_fill_the_buffer_in_the_loop(tiny_data, tmp_path, tiny_fit, monkeypatch):
    """The loop with --iterations 0: rounds of ensemble-only rollouts reach the synthetic buffer and the
    batches, and the DM is never sampled (not for the picture either)."""
    def no_dm(*args, **kwargs):
        raise AssertionError("the DM was sampled with --iterations 0")

    monkeypatch.setattr(DynamicsDiffusion, "generate", no_dm)
    monkeypatch.setattr(diffusion, "load_or_train", no_dm)  # nor trained or loaded: its ~15 CPU minutes are saved
    summary = run_train(tmp_path, "--total-steps", "100", "--run-name", "m0", *TINY_DYDIFF, "--iterations", "0")
    ckpt = torch.load(tmp_path / "m0" / "checkpoint.pt", weights_only=True)
    assert summary["steps"] == 100 and 3 * 9 * 7 <= ckpt["synthetic"]["size"] <= 3 * 16 * 7  # rounds at 0, 40, 80
    assert summary["pretrained"]["dm"] is None and summary["pretrained"]["ensemble"]["file"].startswith("dynamics_")
    assert (tmp_path / "m0" / "rollouts.png").stat().st_size > 1000


def test_resume_gives_the_same_run_as_an_uninterrupted_one(tiny_data, tmp_path):
    """Resume: a run stopped and resumed equals the uninterrupted run."""
    full = run_train(tmp_path, "--total-steps", "150", "--run-name", "full")
    run_train(tmp_path, "--total-steps", "100", "--run-name", "split")
    resumed = run_train(tmp_path, "--total-steps", "150", "--run-name", "split", "--resume")
    assert resumed["evaluations"] == full["evaluations"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["learner"]["actor"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["learner"]["actor"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_dydiff_run_on_the_device_resumed_mid_way_matches_an_uninterrupted_one(tiny_data, tmp_path, tiny_fit):
    """Resume with DyDiff: rounds are seeded by (seed, step) and the synthetic buffer and the generators are in the
    checkpoint, so a DyDiff run (on DEVICE) stopped at step 100 and resumed (in a rollout interval that began before the
    stop) ends bit-identical."""
    flags = [*TINY_DYDIFF, "--reward", "env", "--device", DEVICE]
    full = run_train(tmp_path, "--total-steps", "150", "--run-name", "full", *flags)
    run_train(tmp_path, "--total-steps", "100", "--run-name", "split", *flags)
    resumed = run_train(tmp_path, "--total-steps", "150", "--run-name", "split", "--resume", *flags)
    assert resumed["evaluations"] == full["evaluations"]
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("full", "split"))
    assert a["synthetic"]["size"] == b["synthetic"]["size"] > 0
    for k in ("obs", "rewards", "next_obs"):
        torch.testing.assert_close(a["synthetic"][k], b["synthetic"][k], rtol=0, atol=0)
    for k in a["learner"]["critic"]:
        torch.testing.assert_close(a["learner"]["critic"][k], b["learner"]["critic"][k], rtol=0, atol=0)


# ------------------------------------------------------- robustness: interrupts, NaN, bad input
def test_sigkill_or_ctrl_c_mid_run_then_resume_matches_an_uninterrupted_run(tiny_data, tmp_path):
    """Robustness: SIGKILL loses at most an eval interval; Ctrl-C saves and exits 130."""
    cmd = [sys.executable, "train.py", "--dataset-steps", str(TINY_STEPS), "--run-dir", str(tmp_path),
           "--eval-episodes", "2", "--eval-interval", "50", "--total-steps", "250", "--no-track-tensorboard",
           "--no-dydiff"]
    full = subprocess.run(cmd + ["--run-name", "full"], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    victim = subprocess.Popen(cmd + ["--run-name", "killed"], cwd=HERE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    ckpt, deadline = tmp_path / "killed" / "checkpoint.pt", time.time() + 300
    while victim.poll() is None and time.time() < deadline:  # kill right after the first checkpoint
        if ckpt.exists():
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < 250
    resumed = subprocess.run(cmd + ["--run-name", "killed", "--resume"], cwd=HERE, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {tmp_path / 'killed'} at step {killed_at}" in resumed.stdout
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert a["evaluations"] == b["evaluations"] and a["last_score"] == b["last_score"]

    # Ctrl-C: the run saves a checkpoint between two gradient steps and exits 130; resuming it is exact too.
    victim = subprocess.Popen(cmd + ["--run-name", "ctrl-c"], cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    ckpt, deadline = tmp_path / "ctrl-c" / "checkpoint.pt", time.time() + 300
    while victim.poll() is None and time.time() < deadline and not ckpt.exists():
        time.sleep(0.02)
    victim.send_signal(signal.SIGINT)
    out, _ = victim.communicate(timeout=120)
    assert victim.returncode == 130 and "interrupted at step" in out and "--resume" in out
    resumed = subprocess.run(cmd + ["--run-name", "ctrl-c", "--resume"], cwd=HERE, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    c = json.loads((tmp_path / "ctrl-c" / "summary.json").read_text())
    assert c["evaluations"] == a["evaluations"]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    """Robustness: a NaN loss stops the run with a one-line error; the last checkpoint stays good."""
    real_update = TD3BC.update

    def poisoned(self, batch):
        out = real_update(self, batch)
        return {**out, "critic_loss": float("nan")} if self.total_it == 120 else out

    monkeypatch.setattr(TD3BC, "update", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_train(tmp_path, "--total-steps", "200", "--run-name", "nan")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: td3bc critic_loss became nan at step 120; last good checkpoint:")
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["step"] == 100
    assert not (tmp_path / "nan" / "summary.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--total-steps", "-5"], "--total-steps must be positive"),
    (["--resume"], "--resume needs --run-name"),
    (["--resume", "--run-name", "nothing-here"], "nothing to resume"),
    (["--real-ratio", "1.5"], "--real-ratio must be in [0, 1] (got 1.5)"),
    (["--keep-fraction", "0"], "--keep-fraction must be in (0, 1] (got 0.0)"),
    (["--horizon", "30"], "--horizon H=30 must be a multiple of 4, as the U-Net halves it 2 times: use H in [28, 32]"),
    (["--dm-lr", "0"], "--dm-lr must be positive (got 0.0)"),
    (["--temperature", "-1"], "--temperature must be positive (got -1.0)"),
    (["--update-weight", "0"], "--update-weight must be in (0, 1] (got 0.0)"),
    (["--sdedit-sigma", "-1"], "--sdedit-sigma must be 0 (off) or positive (got -1.0)"),
    (["--rollout-batch", "0"], "--rollout-batch must be positive"),
    (["--threads", "-1"], "--threads must be 0 (one per core) or positive (got -1)"),
    (["--rollout-length", "16"], "--rollout-length 16 must be at least --horizon 32"),
    (["--iterations", "-1"], "--iterations must be 0 or more"),
    (["--reward", "env", "--env", "hopper-medium-replay"], "--reward env needs a known reward function"),
    (["--algo", "sac"], "invalid choice 'sac' for argument '--algo'. Expected one of ('td3bc', 'iql')"),
    (["--preset", "gpu"], "invalid choice 'gpu' for argument '--preset'. Expected one of ('cpu', 'paper')"),
])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    """Robustness: every bad flag fails before any work with a one-line message."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--run-dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(tiny_data, tmp_path, capsys):
    """Robustness: resuming with other settings names the flag that differs."""
    run_train(tmp_path, "--total-steps", "50", "--run-name", "r")
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--total-steps", "100", "--run-name", "r", "--resume", "--alpha", "3.0")
    assert "was made with other settings (--alpha=2.5)" in capsys.readouterr().err


def test_checkpoint_of_older_code_is_refused_in_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    """Resume: a checkpoint of an older train.py, or one made by code that has changed since, is refused with
    one line saying what to do, never resumed through compatibility guesses."""
    run_train(tmp_path, "--total-steps", "50", "--run-name", "old")
    ckpt = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "format": "dydiff-train-v1"}, ckpt)
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--total-steps", "100", "--run-name", "old", "--resume")
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the bar of the first run stands above it
    assert err.startswith("error: ") and "was made by another version of train.py (dydiff-train-v1)" in err

    torch.save(state, ckpt)
    import runs

    real = runs.code_digests
    monkeypatch.setattr(runs, "code_digests", lambda root=runs.ROOT: {**real(root), "dydiff.py": "edited"})
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--total-steps", "100", "--run-name", "old", "--resume")
    assert "was made by other code (dydiff.py changed since)" in capsys.readouterr().err
    monkeypatch.setattr(runs, "code_digests", real)
    assert run_train(tmp_path, "--total-steps", "100", "--run-name", "old", "--resume")["steps"] == 100


def test_summary_records_the_commit_the_changes_the_settings_and_the_code(tiny_data, tmp_path):
    """Provenance: summary.json holds the resolved settings (--reward auto -> env on a maze), the commit, whether
    the tree had uncommitted changes (with their digest) and the digest of every project file, as the code is."""
    import runs

    summary = run_train(tmp_path, "--total-steps", "20", "--eval-interval", "20", "--run-name", "p")
    assert json.loads((tmp_path / "p" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["settings"]["reward"] == "env" and summary["settings"]["total_steps"] == 20
    prov = summary["provenance"]
    assert set(prov) == {"commit", "dirty", "changes_digest", "code", "versions"}
    assert prov["code"] == runs.code_digests() and {"train.py", "dydiff.py", "diffusion.py"} <= set(prov["code"])
    if prov["commit"] is not None:  # a git checkout (CI's is one)
        assert prov["commit"] == runs.git("rev-parse", "HEAD").strip()
        assert prov["dirty"] == bool(runs.git("status", "--porcelain").strip())
        assert (prov["changes_digest"] is None) == (not prov["dirty"])
    # a digest follows the code, not its comments or docstrings
    code = "def f(x):\n    return x + 1\n"
    assert code_digest(code) == code_digest('def f(x):\n    """doc"""\n    # why\n    return (x +\n            1)\n')
    assert code_digest(code) != code_digest(code.replace("+ 1", "+ 2"))


def test_foreign_checkpoint_is_refused_with_a_clear_error(tiny_data, tmp_path, capsys):
    """Robustness: a file that is not a checkpoint gives a one-line error."""
    run = tmp_path / "foreign"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--total-steps", "100", "--run-name", "foreign", "--resume")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: cannot read {run / 'checkpoint.pt'} (") and err.endswith("delete it to start over")


def test_truncated_cached_model_gives_a_one_line_error(tiny_data, tmp_path, tiny_fit, capsys):
    """Robustness: a damaged cached model gives a one-line error naming the file."""
    fresh = load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False, build=build_dataset)  # an earlier test touched the files
    path = Path(dynamics.load_or_train(fresh, progress=False)[2]["path"])  # the file the run will look for
    backup = path.read_bytes()
    path.write_bytes(b"PK\x03\x04 truncated")
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_train(tmp_path, "--total-steps", "50", "--run-name", "t", *TINY_DYDIFF)
    finally:
        path.write_bytes(backup)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: cannot read {path} (") and "delete it and it will be retrained" in err


# ------------------------------- bench/: the pretraining tool, the simulator and the fidelity tools
def test_rollout_error_against_the_simulator(tiny_data):
    """Benchmark tools: the simulator replays the data exactly; errors grow with h."""
    data = tiny_data

    def dataset_lookup(s0, actions):  # the recorded future: the simulator must reproduce it
        t = np.array([np.argmin(((data.obs - x) ** 2).sum(1)) for x in s0])
        traj = data.obs[t[:, None] + np.arange(actions.shape[1] + 1)].copy()
        traj[..., 4:] = s0[:, None, 4:]  # the goal jumps at episode cuts; the simulator keeps it
        return traj

    exact = rollout_error(dataset_lookup, data, horizon=30, n_starts=16)
    assert exact["horizons"] == list(range(1, 31)) and len(exact["mse"]) == 30
    assert max(exact["mse"]) < 1e-9

    frozen = rollout_error(lambda s0, act: np.repeat(s0[:, None], act.shape[1] + 1, 1), data, 30, 16)
    assert frozen["mse_pos"][-1] > frozen["mse_pos"][0] > 0
    assert frozen["median_pos"][-1] > 0

    torch.manual_seed(0)
    ens = Ensemble(6, 2, hidden=16, n_layers=2)
    ens.obs_mean.copy_(torch.as_tensor(data.obs_mean))
    ens.obs_std.copy_(torch.as_tensor(data.obs_std))
    s0, acts = data.obs[:5], np.zeros((5, 7, 2), dtype=np.float32)
    traj = ensemble_predict(ens)(s0, acts)
    assert traj.shape == (5, 8, 6)
    np.testing.assert_allclose(traj[:, 0], s0, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        rollout_error(lambda s0, act: s0, data, horizon=5, n_starts=4)


def test_hopper_simulator_restarts_from_dataset_states(tiny_hopper):
    """Benchmark tools on locomotion: MuJoCo restarted from a Hopper observation (x = 0) gives the recorded next
    observation; closed loop keeps the simulator's state; terminal shares count the falls on each side."""
    import fidelity as rollout_error

    data = load_dataset(dataset_id=tiny_hopper, verbose=False)
    ok = (np.abs(data.obs[:, 5:]) < 10).all(1)  # the observation clips velocities at 10: those restart clipped
    t = np.flatnonzero(ok)[:40]
    nxt = simulate(data, data.obs[t], data.actions[t][:, None])[:, 1]
    np.testing.assert_allclose(nxt, data.next_obs[t], atol=1e-5)
    zero = lambda raw: np.zeros((len(raw), 3))  # noqa: E731
    s0 = data.obs[t[:4]]
    states, actions = simulate_policy(data, s0, zero, 6)
    assert states.shape == (4, 7, 11) and actions.shape == (4, 6, 3)
    np.testing.assert_allclose(states, simulate(data, s0, actions), atol=1e-4)  # (the solver warm-starts differ)
    standing, fallen = np.zeros((1, 3, 11)), np.zeros((1, 3, 11))
    standing[..., 0] = fallen[..., 0] = 1.2
    fallen[0, 2, 0] = 0.5  # the torso drops below 0.7 at the second step
    share = rollout_error.terminal_share(np.concatenate([standing, fallen]), np.concatenate([fallen, fallen]), "hopper")
    assert share == {"model": 0.5, "simulator": 1.0, "both": 0.5, "model_only": 0.0, "simulator_only": 0.5,
                     "median_step_model": 2.0, "median_step_simulator": 2.0}


def test_transition_error_is_zero_on_physics_and_stops_at_a_terminal(tiny_data, tiny_hopper):
    """bench/fidelity.py policy: a transition's one-step error is 0 where it is the simulator's own step, not where
    a state was moved, and on hopper only the transitions up to a rollout's first fall are counted."""
    import fidelity as rollout_error

    ok = tiny_data.obs[None, :40].astype(np.float64)
    acts = tiny_data.actions[None, :39].astype(np.float64)
    exact = rollout_error.transition_error(tiny_data, ok, acts, "maze2d-umaze", True)
    assert exact["mean"] < 1e-12 and exact["n"] == 39
    moved = ok.copy()
    moved[0, 20, 0] += 0.3  # s_20 is off: 19 -> 20 lands 0.3 away from it, 20 -> 21 starts from a wrong place
    err = rollout_error.transition_error(tiny_data, moved, acts, "maze2d-umaze", True)
    assert err["median"] < 1e-12 and err["mean"] >= 0.3 ** 2 / 2 / 39 * 0.99

    data = load_dataset(dataset_id=tiny_hopper, verbose=False)
    upright = (np.abs(data.obs[:, 5:]) < 10).all(1) & (data.obs[:, 0] > 1.2) & (np.abs(data.obs[:, 1]) < 0.05)
    s0 = data.obs[np.flatnonzero(upright)[:4]]
    states, actions = simulate_policy(data, s0, lambda raw: np.zeros((len(raw), 3)), 6)
    base = rollout_error.transition_error(data, states, actions, "hopper", False)
    assert base["mean"] < 1e-6 and base["n"] == 4 * 6  # upright, 6 steps of zero torque: no fall
    states[0, 3, 0] = 0.5  # trajectory 0 falls at its third transition: the three after it are not counted
    fell = rollout_error.transition_error(data, states, actions, "hopper", False)
    assert fell["n"] == 4 * 6 - 3 and fell["mean"] > 1e-3


def test_fidelity_helpers(tiny_data):
    """Benchmark tools: in-episode windows line up; crossings of two error curves."""
    perfect = lambda s0, actions: simulate(tiny_data, s0, actions)
    r = in_episode_rollout_error(perfect, tiny_data, horizon=12, n_starts=8)
    assert r["horizons"] == list(range(1, 13)) and max(r["mse"]) < 1e-10  # starts and actions line up
    model, _ = diffusion.load_or_train(tiny_data, diffusion.DMConfig(horizon=8, dim=8, dim_mults=(1, 2), train_steps=30,
                                                                     batch_size=16), progress=False)
    s0, actions = tiny_data.obs[:3], tiny_data.actions[:17][None].repeat(3, 0)
    assert dm_predict(model, sampler_steps=3)(s0, actions).shape == (3, 18, tiny_data.obs.shape[1])
    assert crossings([3, 1, 3, 1, 1], [2, 2, 2, 2, 2], [1, 2, 3, 4, 5]) == {"first_below": 2, "stays_below_from": 4}
    assert crossings([3, 3], [2, 2], [1, 2]) == {"first_below": None, "stays_below_from": None}


def test_dm_validation_tool_scores_every_cached_dm_by_todays_measure(tiny_data, tmp_path, monkeypatch, capsys):
    """bench/dm_validation.py: each DM cached beside the dataset scored again by validation_loss (for a DM of today's
    code, the value it recorded at training); a file that is not a usable DM is listed as skipped, with why."""
    import dm_validation

    data = load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False)  # as the tool loads it (tests rewrite its files)
    cfg = diffusion.DMConfig(horizon=8, dim=8, dim_mults=(1, 2), train_steps=20, batch_size=16, seed=3)
    _, info = diffusion.load_or_train(data, cfg, progress=False)
    foreign = data.cache_dir / "diffusion_foreign.pt"
    torch.save({"kind": "dynamics", "fingerprint": data.fingerprint}, foreign)
    monkeypatch.setattr(dm_validation, "RESULTS", tmp_path)
    try:
        dm_validation.main(dm_validation.Args(dataset_steps=TINY_STEPS, name="v", draws=2))
    finally:
        foreign.unlink()
    out = json.loads((tmp_path / "v.json").read_text())
    row = next(r for r in out["dms"] if r["file"] == Path(info["path"]).name)
    assert row["val_loss"] == row["val_loss_recorded"] == info["val_loss"] and row["code_is_today"]
    assert row["settings"]["seed"] == 3 and out["skipped"]["diffusion_foreign.pt"] == "not a diffusion model"
    assert len(row["other_draws"]["512"]["values"]) == 2 and row["other_draws"]["2048"]["relative_sd"] > 0
    assert out["dms"][0]["other_draws"]["2048"]["ratio_to_first"] == 1.0  # each DM as a share of the first's
    assert "skipped: not a diffusion model" in (tmp_path / "v.md").read_text() and "wrote" in capsys.readouterr().out


def test_pretrain_tool_trains_the_models_train_py_loads(tiny_data, tiny_fit, capsys):
    """bench/pretrain.py: train.py's flags pick the models; --retrain trains them, then the cache serves them."""
    flags = ["--dataset-steps", str(TINY_STEPS), *TINY_DYDIFF]
    pretrain.main([*flags, "--retrain"])
    out = capsys.readouterr().out
    assert "ensemble and reward model: trained and saved" in out and "diffusion model: trained and saved" in out
    assert "training it (--retrain)" in out
    assert "ensemble: holdout MSE" in out and "diffusion model: validation loss" in out
    pretrain.main(flags)
    out = capsys.readouterr().out
    assert "ensemble and reward model: loaded" in out and "diffusion model: loaded" in out
    with pytest.raises(SystemExit, match="--horizon H=7 must be a multiple of 2"):
        pretrain.main([*flags, "--horizon", "7"])
    pretrain.main([*flags, "--iterations", "0"])  # ensemble-only rollouts: train.py loads no DM, nor does this
    assert "diffusion model: not used with --iterations 0" in capsys.readouterr().out


def test_dm_recipes_bench_trains_what_train_py_trains_and_costs_it_against_the_default(tiny_data, tmp_path,
                                                                                       monkeypatch, capsys):
    """bench/dm_recipes.py: each recipe is diffusion.load_or_train's DM (cached: a second run trains
    nothing), its cost its steps times its step time measured here, as a share of the default recipe's."""
    import dm_recipes

    tiny = diffusion.DMConfig(horizon=8, dim=8, dim_mults=(1, 2), train_steps=40, batch_size=16)
    monkeypatch.setattr(dm_recipes, "RECIPES", {"default": tiny, "half": replace(tiny, train_steps=20)})
    monkeypatch.setattr(dm_recipes, "RESULTS", tmp_path)
    monkeypatch.setattr(dm_recipes, "matmul_flops", lambda device, seconds: 1e9)
    args = dm_recipes.Args(dataset_steps=TINY_STEPS, recipes=("default", "half"), timing_steps=5, repeats=3)
    dm_recipes.main(args)
    out = json.loads((tmp_path / "dm_recipes.json").read_text())
    default, half = out["recipes"]["default"], out["recipes"]["half"]
    assert default["cost_vs_default"] == 1.0 and 0.3 < half["cost_vs_default"] < 0.7  # one network, half the steps
    assert half["cost_seconds"] == pytest.approx(20 * half["step_seconds"])
    assert half["gflop_per_step"] == default["gflop_per_step"] > 0  # the same network and batch
    assert [c[0] for c in half["val_curve"]] == [20] and default["val_loss"] == default["val_curve"][-1][2]
    assert capsys.readouterr().out.count("training it") == 2
    data = load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False)  # as the bench loads it
    assert default["val_loss"] == diffusion.load_or_train(data, tiny, progress=False)[1]["val_loss"]  # train.py's DM
    dm_recipes.main(args)
    assert "training it" not in capsys.readouterr().out  # both loaded from the cache
    assert (tmp_path / "dm_recipes.png").stat().st_size > 1000


def test_gpu_check_runs_at_tiny_size_and_reports_every_section(tmp_path):
    """bench/gpu_check.py at tiny sizes on DEVICE: every section in the JSON (rewritten after each) with finite,
    positive rates; the round makes M x the sampler's network calls; the projection is the paper's counts
    (1M steps, a round every 500, 375,000 DM steps at batch 8) divided by the rates the other sections measured."""
    import gpu_check

    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(gpu_check.Args(device=DEVICE, tiny=True, tests=True, out=str(out)))
    on_disk = json.loads(out.read_text())
    assert on_disk == report and list(on_disk["sections"]) == [
        "versions", "tests", "matmul", "dm_train", "round", "sampler", "learners", "projection", "done"]
    s = on_disk["sections"]
    assert s["tests"]["returncode"] == 0 and " passed" in s["tests"]["summary"]  # the device tests, on DEVICE
    assert s["versions"]["torch"] == torch.__version__
    assert on_disk["made_by"]["code"] == code_digests()  # the code that measured it

    def positive(x):
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    assert all(positive(v) for v in s["matmul"]["tflops"].values()) and "fp32" in s["matmul"]["tflops"]
    rates = s["dm_train"]["steps_per_s"]
    assert sorted(rates) == ["batch_64", "batch_8"] and all(positive(v) for v in rates.values())
    assert s["round"]["network_calls"] == 2 * (2 * 3 - 1) and s["round"]["kept_transitions"] > 0  # M=2, Heun N=3
    assert all(positive(s["round"][k]) for k in ("ensemble_s", "dm_s", "filter_and_transitions_s", "round_s"))
    assert all(positive(v["share_of_matmul"]) for v in s["sampler"]["by_precision"].values())
    assert all(positive(v) for v in s["learners"]["updates_per_s"].values())
    hours = s["projection"]["hours"]
    assert s["projection"]["rounds"] == 2000
    assert hours["dm_pretraining"] == pytest.approx(375_000 / rates["batch_8"] / 3600)
    assert hours["rollout_rounds"] == pytest.approx(2000 * s["round"]["round_s"] / 3600)
    assert hours["td3bc_updates"] == pytest.approx(1_000_000 / s["learners"]["updates_per_s"]["td3bc"] / 3600)


def test_slurm_launcher_path_with_submitit_local_jobs(tiny_data, tmp_path):
    """bench/compare.py --launcher submitit-local, the Slurm path on local processes: a preparing job, then two tiny
    runs as jobs; one gets the cluster's pre-emption signal (SIGUSR2) after its first checkpoint, saves, is requeued
    and resumes on its own; its summary equals an uninterrupted run's, and the same command again gathers the A/B."""
    import compare

    # one thread per job: two jobs at all cores each slow down many times on a small machine
    flags = f"--dataset-steps {TINY_STEPS} --total-steps 1500 --eval-interval 100 --eval-episodes 2 --threads 1"
    args = compare.Args(env="maze2d-umaze", seeds=(0, 1), algos=("td3bc",), arms=("plain",), flags=flags,
                        run_dir=str(tmp_path / "runs"), results=str(tmp_path / "results"), name="ab",
                        launcher="submitit-local", slurm_time_min=30)
    compare.main(args)  # submits and returns
    jobs = json.loads((tmp_path / "runs" / "ab_jobs.json").read_text())
    victim = tmp_path / "runs" / "maze2d-umaze_td3bc_s1"
    deadline = time.time() + 120
    while not (victim / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    # the job's task is the child of submitit's local controller, whose pid is the job id
    task = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and
            (p / "stat").exists() and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == jobs["maze2d-umaze_td3bc_s1"]]
    assert len(task) == 1 and not (victim / "summary.json").exists()
    os.kill(task[0], signal.SIGUSR2)
    while not all((tmp_path / "runs" / f"maze2d-umaze_td3bc_s{s}" / "summary.json").exists() for s in (0, 1)):
        assert time.time() < deadline + 180, "the jobs did not finish"
        time.sleep(0.2)
    log = next((tmp_path / "runs" / "jobs").glob(f"{jobs['maze2d-umaze_td3bc_s1']}_0_log.out")).read_text()
    assert "interrupted at step" in log and "resuming" in log  # saved, requeued, resumed by the job itself
    compare.main(args)  # the same command again: all done, so it gathers
    out = json.loads((tmp_path / "results" / "ab.json").read_text())
    assert sorted(r["seed"] for r in out["runs"]) == [0, 1]
    reference = main(["--run-dir", str(tmp_path / "ref"), "--run-name", "s1", "--env", "maze2d-umaze", "--seed", "1",
                      "--no-dydiff", *flags.split()])
    resumed = json.loads((victim / "summary.json").read_text())
    assert resumed["evaluations"] == reference["evaluations"] and resumed["steps"] == 1500
    a, b = (torch.load(f, weights_only=True)["learner"]["actor"] for f in (victim / "checkpoint.pt",
                                                                          tmp_path / "ref" / "s1" / "checkpoint.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fidelity_policy_figure_draws_each_models_curve_per_policy(tmp_path, monkeypatch):
    """bench/fidelity.py policy's figure: per policy a mean and a median panel, one line per model over the horizons."""
    import matplotlib.figure

    import fidelity

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    curves = {"ensemble": [1e-3, 1e-2, 1e-1], "dm": [5e-2, 6e-2, 7e-2], "dydiff_m0": [2e-3, 2e-2, 2e-1]}
    out = {"env": "hopper-medium", "horizons": [1, 2, 3], "by_policy": {
        label: {"curves_normalized": curves, "curves_normalized_median": curves} for label in ("step 10", "step 20")}}
    fidelity.plot_policy(out, tmp_path / "f.png", ("curves_normalized", "curves_normalized_median"))
    (fig,) = saved
    assert len(fig.axes) == 4 and all(len(ax.lines) == 3 for ax in fig.axes)
    assert [line.get_label() for line in fig.axes[0].lines] == list(curves)
    assert list(fig.axes[0].lines[2].get_ydata()) == curves["dydiff_m0"]


def test_reward_probe_runs_end_to_end(tmp_path, tiny_data, tiny_fit):
    """bench/reward_probe.py on tiny data and models: the learned reward near the goal against the sparse one, one
    DyDiff round's B x (T-1) transitions with the learned, true and simulator-replayed reward per step, and the
    final policy's episodes of each run."""
    import reward_probe

    run_train(tmp_path, "--total-steps", "50", "--run-name", "p")
    small = f"--dataset-steps {TINY_STEPS} " + " ".join(a for a in TINY_DYDIFF if a != "--dydiff")
    reward_probe.main(reward_probe.RewardArgs(runs=(str(tmp_path / "p"),), episodes=2, n_rollouts=8,
                                              train_flags=small, results=str(tmp_path)))
    out = json.loads((tmp_path / "reward_probe.json").read_text())
    near = out["learned_reward_near_goal"]
    assert [r["distance"] for r in near] == [0.0, 0.2, 0.4, 0.5, 0.7, 1.0]
    assert [r["true_reward_if_it_stays"] for r in near] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    rd = out["dydiff_round"]
    assert rd["transitions"] == 8 * (8 - 1) and rd["policy"] == str(tmp_path / "p")
    assert rd["learned_reward_range"][0] <= rd["learned_reward_per_step"] <= rd["learned_reward_range"][1]
    assert 0.0 <= rd["true_reward_per_step"] <= 1.0 and 0.0 <= rd["simulator_replay_reward_per_step"] <= 1.0
    share = rd["share_of_generated_goal_steps_in_goal_in_simulator"]  # None: no generated step in the goal
    assert share is None or 0.0 <= share <= 1.0
    (name, policy), = out["policies"].items()
    assert name == "p" and policy["algo"] == "td3bc" and policy["dydiff"] is False and policy["reward"] is None
    assert policy["reached"] in (0.0, 0.5, 1.0) and np.isfinite(policy["score"])
    with pytest.raises(SystemExit, match=r"^error: --train-flags: --horizon H=7 must be a multiple of 4"):
        reward_probe.main(reward_probe.RewardArgs(runs=(str(tmp_path / "p"),), train_flags="--horizon 7"))


def test_fidelity_policy_checks_its_train_flags_as_train_py_does():
    """bench/fidelity.py policy: --train-flags get train.py's own checks, one line before any work."""
    import fidelity as rollout_error

    with pytest.raises(SystemExit, match=r"^error: --train-flags: --horizon H=7 must be a multiple of 4"):
        rollout_error.policy_main(rollout_error.PolicyArgs(env="maze2d-umaze", train_flags="--horizon 7"))


def test_pool_pairs_runs_from_several_results_files(tmp_path):
    """bench/compare.py pool (bench/summarize.py): arms taken from two results files pair by seed with the A/B's interval; a seed
    given twice, an arm a file lacks or a different setting is one line."""
    import summarize as pool

    def results(name, arms, **extra):
        runs = [{"algo": "td3bc", "arm": arm, "seed": seed, "final": score, "last": score, "best": score + 1,
                 "cpu_s": 60.0} for arm, scores in arms.items() for seed, score in scores.items()]
        out = {"env": "maze2d-umaze", "steps": [50000], "preset": "cpu", "flags": "", "dydiff_flags": name,
               "runs": runs, **extra}
        (tmp_path / f"{name}.json").write_text(json.dumps(out))
        return str(tmp_path / f"{name}.json")

    old = results("old", {"plain": {0: 50.0, 1: 60.0, 2: 70.0}, "dydiff": {0: 0.0, 1: 0.0, 2: 0.0}})
    new = results("new", {"dydiff": {0: 55.0, 1: 70.0, 2: 71.0}})
    out = pool.pool((f"{old}:plain", new))
    final = next(p for p in out["paired"] if p["name"] == "dydiff-plain" and p["metric"] == "final_score")
    assert final["seeds"] == [0, 1, 2] and final["differences"] == [5.0, 10.0, 1.0]
    assert final["mean"] == pytest.approx(16 / 3) and final["ci_low"] <= final["mean"] <= final["ci_high"]
    dydiff_runs = [r for r in out["runs"] if r["arm"] == "dydiff"]
    assert {r["dydiff_flags"] for r in dydiff_runs} == {"new"} and {r["source"] for r in dydiff_runs} == {"new.json"}
    with pytest.raises(SystemExit, match=r"^error: td3bc dydiff seed 0 is in old.json and in new.json"):
        pool.pool((old, new))
    with pytest.raises(SystemExit, match=r"^error: .*old.json has no runs of arm ensemble"):
        pool.pool((f"{old}:ensemble", new))
    other = results("other", {"dydiff": {5: 1.0}}, preset="paper")
    with pytest.raises(SystemExit, match=r"^error: other.json has preset='paper'"):
        pool.pool((f"{old}:plain", other))


def test_pool_renames_arms_and_pairs_any_two(tmp_path):
    """bench/compare.py pool (bench/summarize.py): file:arm=new pools two variants of one arm side by side, --pairs a-b pairs them by
    seed (and is not repeated where it is a default pair); a name with '-' or an absent arm is one line."""
    import summarize as pool

    def results(name, arms):
        runs = [{"algo": "td3bc", "arm": arm, "seed": seed, "final": score, "last": score, "best": score,
                 "cpu_s": 60.0} for arm, scores in arms.items() for seed, score in scores.items()]
        (tmp_path / f"{name}.json").write_text(json.dumps({"env": "maze2d-umaze", "steps": [50000], "preset": "cpu",
                                                           "flags": "", "runs": runs}))
        return str(tmp_path / f"{name}.json")

    old = results("old", {"plain": {0: 50.0, 1: 60.0, 2: 70.0}, "dydiff": {0: 40.0, 1: 65.0, 2: 60.0}})
    new = results("new", {"dydiff": {0: 55.0, 1: 70.0, 2: 71.0}})
    out = pool.pool((f"{old}:plain,dydiff=dydiff_old", new), pairs=("dydiff-dydiff_old", "dydiff_old-plain",
                                                                      "dydiff-plain"))
    final = {p["name"]: p for p in out["paired"] if p["metric"] == "final_score"}
    assert sorted(final) == ["dydiff-dydiff_old", "dydiff-plain", "dydiff_old-plain"]
    assert final["dydiff-dydiff_old"]["differences"] == [15.0, 5.0, 11.0]
    assert final["dydiff_old-plain"]["differences"] == [-10.0, 5.0, -10.0]
    assert final["dydiff_old-plain"]["dydiff_wins"] == 1  # the first arm ahead on one seed
    assert len([p for p in out["paired"] if p["name"] == "dydiff-plain"]) == 3  # final, last, best: once each
    renamed = [r for r in out["runs"] if r["arm"] == "dydiff_old"]
    assert len(renamed) == 3 and {r["source_arm"] for r in renamed} == {"dydiff"}
    assert "source_arm" not in next(r for r in out["runs"] if r["arm"] == "dydiff")
    with pytest.raises(SystemExit, match=r"^error: --pairs dydiff-ensemble: give first-second, two arm names .*"
                                         r"\(arms: dydiff, dydiff_old, plain\)"):
        pool.pool((f"{old}:plain,dydiff=dydiff_old", new), pairs=("dydiff-ensemble",))
    with pytest.raises(SystemExit, match=r"^error: .*old.json:dydiff=dm-1800: arm name 'dm-1800' must be letters"):
        pool.pool((f"{old}:dydiff=dm-1800", new))


def test_compare_pairs_any_two_arms_after_the_default_pairs(tmp_path):
    """bench/compare.py --pairs ensemble-plain: finished runs are reused (none started) and paired by seed after
    dydiff - plain and dydiff - ensemble; an arm that does not run is one line, before any run starts."""
    import compare

    args = compare.Args(env="maze2d-umaze", seeds=(0, 1), algos=("td3bc",), arms=("plain", "ensemble", "dydiff"),
                        pairs=("ensemble-plain",), run_dir=str(tmp_path / "runs"), results=str(tmp_path / "out"),
                        name="ab")
    for arm, scores in {"plain": (50.0, 60.0), "ensemble": (70.0, 62.0), "dydiff": (65.0, 70.0)}.items():
        for seed, score in zip(args.seeds, scores):
            folder = Path(args.run_dir) / compare.run_name(args, "td3bc", arm, seed)
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(json.dumps({"preset": "cpu", "iterations": 0 if arm == "ensemble" else 2}))
            (folder / "summary.json").write_text(json.dumps({**made_by(compare, args, "td3bc", arm, seed),
                "env": "maze2d-umaze", "algo": "td3bc", "dydiff": arm != "plain", "seed": seed, "steps": 15000,
                "final_score": score, "last_score": score, "best_score": score + 1, "best_step": 15000,
                "wall_time_s": 1.0, "cpu_time_s": 1.0, "updates_per_s": 1.0, "pretrained": {"arm": arm},
                "evaluations": [{"step": 5000 * i, "score": score} for i in (1, 2, 3)]}))
    compare.main(args)
    out = json.loads((tmp_path / "out" / "ab.json").read_text())
    assert all(r["provenance"]["commit"] == "c0ffee" and r["settings"]["env"] == "maze2d-umaze" for r in out["runs"])
    assert all(r["pretrained"] == {"arm": r["arm"]} for r in out["runs"])  # each run's models, as its summary names them
    final = {p["name"]: p["differences"] for p in out["paired"] if p["metric"] == "final_score"}
    assert list(final) == ["dydiff-plain", "dydiff-ensemble", "ensemble-plain"]
    assert final["ensemble-plain"] == [20.0, 2.0] and final["dydiff-ensemble"] == [-5.0, 8.0]
    with pytest.raises(SystemExit, match=r"^error: --pairs ensemble-iql: give first-second, two arm names of the "
                                         r"runs \(arms: dydiff, ensemble, plain\)$"):
        compare.main(replace(args, pairs=("ensemble-iql",), run_dir=str(tmp_path / "empty")))
    assert not (tmp_path / "empty").exists()


def made_by(compare, args, algo, arm, seed, **changes) -> dict:
    """The settings and provenance a run of this compare.py job records when made by today's code (or with changes)."""
    want = compare.expected(args, algo, arm, seed)
    prov = {"commit": "c0ffee", "dirty": False, "changes_digest": None, "code": want["code"], "versions": want["versions"]}
    return {"settings": {**want["settings"], **changes}, "fingerprint": want["fingerprint"], "provenance": prov}


def test_compare_reuses_a_run_only_when_its_settings_and_code_match(tmp_path, monkeypatch):
    """bench/compare.py: a finished run is reused only when its resolved settings, its dataset's files and its code
    match what the command would run now; another --flags value, a rebuilt dataset or an edited file runs it again
    in a new folder, saying why; an interrupted run that matches is resumed there."""
    import compare
    import runs

    monkeypatch.setattr(compare, "stored_dataset", lambda env, dataset_id, steps: ("dydiff/pointmaze/umaze-v0", "f0"))

    args = compare.Args(env="maze2d-umaze", seeds=(0,), algos=("td3bc",), arms=("dydiff",), steps=15000,
                        run_dir=str(tmp_path / "runs"))
    folder = Path(args.run_dir) / compare.run_name(args, "td3bc", "dydiff", 0)
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(made_by(compare, args, "td3bc", "dydiff", 0)))
    assert compare.find_run(args, "td3bc", "dydiff", 0) == (folder, "finished earlier, reused")

    second = folder.with_name(folder.name + "_2")
    monkeypatch.setattr(compare, "stored_dataset", lambda *a: ("dydiff/pointmaze/umaze-v0", "f1"))  # rebuilt since
    assert compare.find_run(args, "td3bc", "dydiff", 0) == (
        second, f"started anew: {folder.name} was made with other dataset files (fingerprint f0 -> f1: the dataset "
                f"was rebuilt or replaced since)")
    old = {**made_by(compare, args, "td3bc", "dydiff", 0), "fingerprint": None}  # made before runs recorded it
    assert compare.differs(old, compare.expected(args, "td3bc", "dydiff", 0)) == ("no record of its dataset files "
                                                                               "(no fingerprint)")
    monkeypatch.setattr(compare, "stored_dataset", lambda *a: ("dydiff/pointmaze/umaze-v0", "f0"))
    other = replace(args, flags="--keep-fraction 0.5")  # the same run name, other settings
    assert compare.find_run(other, "td3bc", "dydiff", 0) == (
        second, f"started anew: {folder.name} was made with other settings (keep_fraction 0.6 -> 0.5)")
    cmd = compare.command(other, "td3bc", "dydiff", 0, second)
    assert cmd[cmd.index("--run-name") + 1] == second.name and "--resume" not in cmd

    real = runs.code_digests
    monkeypatch.setattr(runs, "code_digests", lambda root=runs.ROOT: {**real(root), "dydiff.py": "edited"})
    compare.here.cache_clear()
    assert compare.find_run(args, "td3bc", "dydiff", 0) == (
        second, f"started anew: {folder.name} was made with other code (dydiff.py changed)")
    second.mkdir()  # that run was interrupted: it resumes where it stopped, by the same code
    (second / "checkpoint.pt").write_bytes(b"a checkpoint")
    # (config.json holds the dataset id that --env resolved to, where the summary's settings keep --dataset-id's None)
    (second / "config.json").write_text(json.dumps({**made_by(compare, args, "td3bc", "dydiff", 0)["settings"],
                                                      "dataset_id": "dydiff/pointmaze/umaze-v0", "fingerprint": "f0",
                                                      "provenance": {**made_by(compare, args, "td3bc", "dydiff", 0)[
                                                          "provenance"]}}))
    assert compare.find_run(args, "td3bc", "dydiff", 0) == (second, "interrupted earlier, resumed")
    assert compare.command(args, "td3bc", "dydiff", 0, second)[-1] == "--resume"
    monkeypatch.setattr(runs, "code_digests", real)
    compare.here.cache_clear()
    assert compare.find_run(args, "td3bc", "dydiff", 0) == (folder, "finished earlier, reused")
    no_record = folder.with_name("maze2d-umaze_td3bc_s0")  # a summary without provenance is never reused
    no_record.mkdir()
    (no_record / "summary.json").write_text(json.dumps({"final_score": 1.0}))
    assert compare.find_run(args, "td3bc", "plain", 0)[1] == ("started anew: maze2d-umaze_td3bc_s0 was made with no "
                                                              "record of its settings and code")


def test_compare_against_a_commit_runs_each_arm_with_that_commits_code(tmp_path, monkeypatch, capsys):
    """bench/compare.py --against HEAD: every arm also runs from a checkout of that commit, in its own folders
    (arm@<commit>), and is paired with this tree's arm; the commit's own train.py resolves the flags. A relative
    --run-dir is made absolute, so the commit's runs (started in its checkout) write where the command reads."""
    import compare
    import runs

    monkeypatch.setattr(compare, "CHECKOUTS", tmp_path / "code")
    monkeypatch.chdir(tmp_path)
    commit = runs.git("rev-parse", "--short=12", "HEAD").strip()
    args = compare.Args(env="maze2d-umaze", seeds=(3,), algos=("td3bc",), arms=("dydiff",), against="HEAD",
                        run_dir="runs", dry_run=True)
    compare.main(args)
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert [shlex.split(line)[1] for line in lines] == [str(compare.ROOT / "train.py"),
                                                        str(tmp_path / "code" / commit / "train.py")]
    assert {shlex.split(line)[shlex.split(line).index("--run-dir") + 1] for line in lines} == {str(tmp_path / "runs")}
    assert [shlex.split(line)[shlex.split(line).index("--run-name") + 1] for line in lines] == [
        "maze2d-umaze_td3bc+dydiff_s3", f"maze2d-umaze_td3bc+dydiff@{commit}_s3"]
    want = compare.expected(args, "td3bc", f"dydiff@{commit}", 3)
    assert want["settings"]["seed"] == 3 and want["code"] == runs.code_digests(tmp_path / "code" / commit)
    with pytest.raises(SystemExit, match="^error: --against no-such-commit: not a commit of this repository$"):
        compare.main(replace(args, against="no-such-commit"))
    subprocess.run(["git", "worktree", "remove", "--force", str(tmp_path / "code" / commit)], cwd=compare.ROOT)


def test_compare_groups_keep_an_arm_and_its_against_commit_apart():
    """bench/compare.py's per-arm rows: plain and plain@<commit> are two groups of their own seeds, not one."""
    import compare

    def run(arm, seed, score):
        return {"env": "hopper-medium", "algo": "iql", "arm": arm, "seed": seed, "steps": 10, "final_score": score,
                "last_score": score, "best_score": score, "wall_time_s": 1.0, "cpu_time_s": 1.0, "updates_per_s": 1.0}

    rows = compare.aggregate([run("plain", 5, 10.0), run("plain", 6, 20.0),
                              run("plain@1a2b3c4d5e6f", 5, 50.0), run("plain@1a2b3c4d5e6f", 6, 70.0)])
    assert [(r["learner"], r["seeds"], r["final_score_mean"]) for r in rows] == [
        ("iql", [5, 6], 15.0), ("iql @1a2b3c4d5e6f", [5, 6], 60.0)]


def test_threads_default_to_one_per_core_and_side_by_side_runs_share_them(tmp_path, monkeypatch):
    """--threads 0 (the default) resolves to the cores this process may use; compare.py --jobs N gives each of
    its N runs cores / N threads, so runs side by side never ask for more threads than there are cores."""
    import compare
    import train

    assert train.resolve(parse_args([])).threads == train.cores() == len(os.sched_getaffinity(0))
    assert train.resolve(parse_args(["--threads", "3"])).threads == 3
    args = compare.Args(env="maze2d-umaze", seeds=(0,), algos=("td3bc",), arms=("plain",), run_dir=str(tmp_path))
    threads = lambda cmd: cmd[cmd.index("--threads") + 1] if "--threads" in cmd else None  # noqa: E731
    assert threads(compare.command(args, "td3bc", "plain", 0)) is None  # one job: the run's default, all cores
    monkeypatch.setattr(train, "cores", lambda: 8)
    assert threads(compare.command(replace(args, jobs=2), "td3bc", "plain", 0)) == "4"
    assert threads(compare.command(replace(args, jobs=16), "td3bc", "plain", 0)) == "1"
    assert threads(compare.command(replace(args, jobs=2, flags="--threads 3"), "td3bc", "plain", 0)) == "3"


def test_first_run_cuts_the_phases_at_the_lines_that_end_them():
    """bench/first_run.py: each phase's wall and CPU seconds run from the line that ends the one before (a known answer)."""
    import first_run

    lines = [(1.0, 0.9, "loading"), (30.0, 29.0, "dataset dydiff/pointmaze/umaze-v0 (built): 1000000 transitions"),
             (150.0, 260.0, "ensemble and reward model: trained and saved x (holdout MSE 0.001 and 0.003, 120 s)"),
             (600.0, 1100.0, "diffusion model: trained and saved y (7200 steps, 450 s, validation loss 0.0043)"),
             (601.0, 1101.0, "dataset z is not a phase's end when it comes again"),
             (900.0, 1700.0, "done: final 105.7 (mean of the last 3 evaluations)"), (905.0, None, "<exit>")]
    got = first_run.phases(lines, total_cpu=1709.0)
    assert list(got) == ["dataset", "ensemble and reward model", "DM", "learning", "finish"]
    assert got["dataset"] == {"wall_s": 30.0, "cpu_s": 29.0}
    assert got["DM"] == {"wall_s": 450.0, "cpu_s": 840.0}
    assert got["learning"] == {"wall_s": 300.0, "cpu_s": 600.0} and got["finish"] == {"wall_s": 5.0, "cpu_s": 9.0}
    with pytest.raises(SystemExit, match="printed no line starting with 'done:'"):
        first_run.phases(lines[:4] + lines[-1:], total_cpu=1.0)


def test_first_run_floor_counts_the_main_commands_work():
    """bench/first_run.py floor: the units are the main command's (7,200 DM steps, a round every 1,000 of 50,000
    updates), and a TD3+BC update's FLOPs are the hand count of its products (batch B = 256, MLPs 6-256-256-2 and
    8-256-256-1; a layer's forward, input gradient and weight gradient are 2 B in out each): every update the
    target actor, the target and online twin critics forward, the critics' weight gradients and their input
    gradients but the first layer's; every second update the actor's forward, Q1's forward and its input gradients
    (the critic frozen), the actor's weight gradients and its input gradients but the first layer's."""
    import first_run

    units = first_run.floor_units()
    assert [(k, v[0]) for k, v in units.items()] == [("DM training step", 7200), ("DyDiff round", 50),
                                                    ("TD3+BC update", 50_000)]
    actor, critic, B = 6 * 256 + 256 * 256 + 256 * 2, 8 * 256 + 256 * 256 + 256, 256
    every = actor + 2 * critic + 2 * critic + 2 * critic + 2 * (256 * 256 + 256)
    second = actor + critic + critic + actor + (256 * 256 + 256 * 2)
    assert units["TD3+BC update"][1] == 2 * B * (every + second / 2)
    assert units["DM training step"][1] > 0 and units["DyDiff round"][1] > 0
    assert 0 < units["TD3+BC update"][2]() < 10  # one unit's seconds


def test_readme_results_table_is_the_scripts_output():
    """README's results table is what `python bench/compare.py table` prints from bench/results, to the character:
    edit a results file (or the table code) and README must be regenerated."""
    import summarize

    readme = (HERE / "README.md").read_text()
    begin, end = "<!-- results-table:begin -->", "<!-- results-table:end -->"
    assert readme.count(begin) == 1 and readme.count(end) == 1, "README lost its results-table markers"
    held = readme.split(begin)[1].split(end)[0].strip()
    assert held == summarize.results_table(), "README's table differs: paste `python bench/compare.py table` into it"


def test_results_table_reads_the_three_arms_of_each_default_file(tmp_path):
    """bench/compare.py table (bench/summarize.py): one row per ablation_<dataset>_<algo>.json (variants with another suffix left out),
    scores as mean +- std over seeds, the file's own paired intervals, CPU minutes from cpu_s."""
    import summarize

    def results(name, scores):
        runs = [{"algo": "iql", "arm": arm, "seed": seed, "final": score, "cpu_s": 60.0 * (seed + 1)}
                for arm, by_seed in scores.items() for seed, score in by_seed.items()]
        paired = [{"name": f"dydiff-{o}", "metric": m, "mean": 1.25, "ci_low": -0.5, "ci_high": 3.0}
                  for o in ("plain", "ensemble") for m in ("best_score", "final_score")]
        (tmp_path / name).write_text(json.dumps({"runs": runs, "paired": paired}))

    three = {"plain": {0: 10.0, 1: 20.0}, "ensemble": {0: 30.0, 1: 30.0}, "dydiff": {0: 40.0, 1: 50.0}}
    results("ablation_maze2d-large_iql.json", three)
    results("ablation_maze2d-large_iql_ms1.json", three)  # a variant: not a row
    rows = summarize.results_table(tmp_path).splitlines()
    assert len(rows) == 3 and rows[2] == ("| maze2d-large | IQL | 15.0 +- 5.0 | 30.0 +- 0.0 | 45.0 +- 5.0 | +1.2 [-0.5, +3.0] "
                                          "| +1.2 [-0.5, +3.0] | 2 (0, 1) | 1.5 / 1.5 / 1.5 |")
    results("ablation_maze2d-umaze_iql.json", {"plain": {0: 1.0}, "dydiff": {0: 2.0}})
    with pytest.raises(SystemExit, match=r"^error: ablation_maze2d-umaze_iql.json lacks an arm"):
        summarize.results_table(tmp_path)


def test_optimism_weighs_kept_and_rejected_rollouts_and_pairs_q_with_plain(tmp_path):
    """bench/optimism.py: synthetic reward/step over the second half of the rounds, kept and rejected returns
    weighted by the kept share (a round that kept all logs a NaN rejected mean), over T - 1 transitions; real
    reward/step on halfcheetah only; Q at the last 3 evaluations, over the same seed's plain run."""
    import optimism

    logs = {
        "p": {"losses/q_mean": np.array([1.0, 100.0, 100.0, 100.0]), "charts/return": np.array([0, 3000, 3000, 3000.0])},
        "d": {"losses/q_mean": np.array([9.0, 150.0, 150.0, 150.0]), "charts/return": np.array([0, 2000, 2000, 2000.0]),
              # rounds 1-2 are the first half, left out; round 3 kept 60%, round 4 kept all
              "dydiff/return_kept_mean": np.array([999, 999, 62.0, 93.0]),
              "dydiff/return_rejected_mean": np.array([0, 0, 31.0, np.nan]),
              "dydiff/kept_share": np.array([0.6, 0.6, 0.6, 1.0])},
    }
    runs = [{"arm": "plain", "seed": 3, "final": 40.0, "run": "p"}, {"arm": "dydiff", "seed": 3, "final": 30.0, "run": "d"}]
    for run in ("p", "d"):  # T comes from each run's config.json
        (tmp_path / run).mkdir()
        (tmp_path / run / "config.json").write_text(json.dumps({"rollout_length": 32}))
    out = optimism.optimism({"env": "halfcheetah-medium", "runs": runs}, tmp_path, read=lambda f: logs[f.name])
    d = out["arms"]["dydiff"]
    # round 3: (0.6 * 62 + 0.4 * 31) / 31 = 1.6; round 4: 93 / 31 = 3.0; kept: (2 + 3) / 2
    assert d["synthetic_per_step"] == pytest.approx(2.3) and d["synthetic_kept_per_step"] == pytest.approx(2.5)
    assert d["real_per_step"] == pytest.approx(2.0) and d["q_over_plain"] == pytest.approx(1.5)
    assert out["arms"]["plain"]["synthetic_per_step"] is None and out["arms"]["plain"]["real_per_step"] == 3.0
    hopper = optimism.optimism({"env": "hopper-medium", "runs": runs}, tmp_path, read=lambda f: logs[f.name])
    assert hopper["arms"]["dydiff"]["real_per_step"] is None  # its episodes end at a fall, lengths not logged
    assert "| dydiff | 30.0 | - | 2.30 (2.50) | 150 | 1.50 |" in optimism.markdown(hopper)


def test_impossible_rollouts_are_found_in_walls_and_jumps(tiny_data):
    """bench/fidelity.py policy: a rollout through a wall cell, or whose step its velocity does not explain, is
    impossible; the data's own trajectories are not; the shares split by the round's hardmax filter."""
    import fidelity as rollout_error

    maze = maze_eval_env("maze2d-umaze").unwrapped.maze
    ok = tiny_data.obs[None, :40].astype(np.float64)  # a real episode piece: x_{t+1} = x_t + 0.01 v_{t+1}
    through_wall = ok.copy()
    through_wall[0, 20, :2] = maze.cell_rowcol_to_xy(np.array([2, 2]))  # the middle of the U: a wall
    jump = ok.copy()
    jump[0, 20:, 0] += 0.3  # a step of 0.3 that no velocity explains
    fast = ok.copy()  # consistent with its velocities, only 4x faster than the data (a wall may stop it)
    fast[0, 1:, :2] = fast[0, :1, :2] + np.cumsum(0.01 * fast[0, 1:, 2:4] * 4, axis=0)
    fast[0, 1:, 2:4] *= 4
    tests = rollout_error.impossible(np.concatenate([ok, through_wall, jump, fast]), maze, 0.1, 0.01)
    assert tests["wall"][:3].tolist() == [False, True, False]
    assert tests["inconsistent"].tolist() == [False, True, True, False]
    assert tests["jump"][2] and not tests["jump"][0]
    share = rollout_error.impossible_share(np.concatenate([ok, through_wall, jump]), maze, 0.1, 0.01, 1.0,
                                           "maze2d-umaze")
    assert share["all"] == pytest.approx(2 / 3) and share["kept"] == pytest.approx(2 / 3) and share["rejected"] is None
