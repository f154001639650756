"""Tests of the DyDiff reference implementation: `pytest -q` (about 2-4 minutes on 2 CPU cores).

Every test runs offline on small datasets generated into a temporary Minari folder, never ~/.minari.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
TINY_STEPS = 3000  # a few thousand maze steps: ~40 episodes, built in seconds


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
    from data import load_dataset

    return load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False)


def fixed_batch(n=256, obs_dim=6, act_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(n, obs_dim, generator=g), "actions": torch.rand(n, act_dim, generator=g) * 2 - 1,
            "rewards": torch.rand(n, generator=g), "next_obs": torch.randn(n, obs_dim, generator=g),
            "dones": (torch.rand(n, generator=g) < 0.1).float()}


# ---------------------------------------------------------------------------------------------- data
def test_tiny_maze_dataset_loads_offline_through_minari(tiny_data, minari_root):
    import minari

    d = tiny_data
    assert d.dataset_id == f"dydiff/pointmaze/umaze-{TINY_STEPS}-v0"
    assert d.dataset_id in minari.list_local_datasets()  # stored with Minari, under our own id
    assert (minari_root / "dydiff" / "pointmaze").is_dir()
    assert d.obs.shape == (TINY_STEPS, 6) and d.next_obs.shape == (TINY_STEPS, 6) and d.actions.shape == (TINY_STEPS, 2)
    assert np.abs(d.actions).max() <= 1.0
    assert d.ref_min is not None and d.ref_max > d.ref_min + 50  # expert controller >> random policy
    assert not d.terminals.any()  # maze episodes are truncated at successes, never terminated


def test_episodes_are_cut_at_successes(tiny_data):
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
    import data as data_mod

    calls = []
    real_flatten = data_mod._flatten
    monkeypatch.setattr(data_mod, "_flatten", lambda ds: calls.append(1) or real_flatten(ds))
    again = data_mod.load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False)
    assert calls == [] and again.fingerprint == tiny_data.fingerprint  # served from dydiff_cache/flat.npz
    data_file = next((tiny_data.cache_dir.parent / "data").glob("*"))
    os.utime(data_file, ns=(data_file.stat().st_atime_ns, data_file.stat().st_mtime_ns + 10**9))
    rebuilt = data_mod.load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False)
    assert calls == [1] and rebuilt.fingerprint != tiny_data.fingerprint
    np.testing.assert_array_equal(rebuilt.obs, tiny_data.obs)


def test_normalized_score_formula(tiny_data):
    from data import DatasetError, normalized_score

    lo, hi = tiny_data.ref_min, tiny_data.ref_max
    np.testing.assert_allclose(tiny_data.normalized_score([lo, hi, (lo + hi) / 2]), [0.0, 100.0, 50.0])
    np.testing.assert_allclose(normalized_score(60.0, 10.0, 110.0), 50.0)
    with pytest.raises(DatasetError, match="no reference scores"):
        normalized_score(1.0, None, 2.0)


def test_planner_controller_reaches_the_goal_in_the_eval_env():
    from data import MAZE2D, WaypointController, maze_eval_env

    for env_name in ("maze2d-umaze", "maze2d-medium"):
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


def test_unknown_env_name_fails_with_the_list_of_valid_names():
    from data import DatasetError, resolve_env

    with pytest.raises(DatasetError, match=r"unknown env 'maze2d-tiny'.*maze2d-umaze.*hopper-medium-replay"):
        resolve_env("maze2d-tiny")
    out = subprocess.run([sys.executable, "train.py", "--env", "maze2d-tiny"], cwd=HERE, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown env 'maze2d-tiny': choose one of maze2d-umaze")
    assert "Traceback" not in out.stderr


def test_locomotion_offline_says_how_to_get_the_data(minari_root):
    from data import DatasetError, load_dataset

    with pytest.raises(DatasetError, match=r"minari download mujoco/hopper/medium-v0"):
        load_dataset("hopper-medium")


# ------------------------------------------------------------------------------------------ learners
@pytest.mark.parametrize("algo", ["td3bc", "iql"])
def test_learner_update_lowers_critic_loss_and_keeps_shapes(algo):
    from iql import IQL
    from td3bc import TD3BC

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
    from td3bc import TwinCritic

    critic, b = TwinCritic(6, 2), fixed_batch(9)
    torch.testing.assert_close(critic.q1(b["obs"], b["actions"]), critic(b["obs"], b["actions"])[0])


@pytest.mark.parametrize("algo", ["td3bc", "iql"])
def test_learner_state_dict_round_trip_continues_identically(algo):
    from iql import IQL
    from td3bc import TD3BC

    cls = TD3BC if algo == "td3bc" else IQL
    a, batch = cls(6, 2, seed=3), fixed_batch()
    for _ in range(5):
        a.update(batch)
    blob = io.BytesIO()  # through bytes, as a resumed run does (in memory, Adam's moments would be shared)
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = cls(6, 2, seed=99)
    b.load_state_dict(torch.load(blob, weights_only=True))
    for _ in range(4):  # includes TD3+BC's target-noise generator and delayed actor steps
        la, lb = a.update(batch), b.update(batch)
        assert la == lb


# --------------------------------------------------------------------------------------------- train
def run_train(tmp_path, *flags):
    from train import main

    return main(["--dataset-steps", str(TINY_STEPS), "--run-dir", str(tmp_path), "--eval-episodes", "2",
                 "--eval-interval", "50", *flags])


@pytest.mark.parametrize("algo", ["td3bc", "iql"])
def test_train_smoke_run_writes_summary(tiny_data, tmp_path, algo):
    summary = run_train(tmp_path, "--algo", algo, "--total-steps", "100", "--run-name", "smoke")
    run = tmp_path / "smoke"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["steps"] == 100 and [e["step"] for e in on_disk["evaluations"]] == [50, 100]
    assert on_disk["last_score"] == on_disk["evaluations"][-1]["score"] == summary["last_score"]
    assert on_disk["best_score"] == max(e["score"] for e in on_disk["evaluations"])
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert json.loads((run / "config.json").read_text())["algo"] == algo
    assert any(run.glob("events.out.tfevents.*"))


def test_resume_gives_the_same_run_as_an_uninterrupted_one(tiny_data, tmp_path):
    full = run_train(tmp_path, "--total-steps", "150", "--run-name", "full")
    run_train(tmp_path, "--total-steps", "100", "--run-name", "split")
    resumed = run_train(tmp_path, "--total-steps", "150", "--run-name", "split", "--resume")
    assert resumed["evaluations"] == full["evaluations"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["learner"]["actor"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["learner"]["actor"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tiny_data, tmp_path):
    import signal
    import time

    cmd = [sys.executable, "train.py", "--dataset-steps", str(TINY_STEPS), "--run-dir", str(tmp_path),
           "--eval-episodes", "2", "--eval-interval", "50", "--total-steps", "250", "--no-track-tensorboard"]
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


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    import td3bc

    real_update = td3bc.TD3BC.update

    def poisoned(self, batch):
        out = real_update(self, batch)
        return {**out, "critic_loss": float("nan")} if self.total_it == 120 else out

    monkeypatch.setattr(td3bc.TD3BC, "update", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run_train(tmp_path, "--total-steps", "200", "--run-name", "nan")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: td3bc critic_loss became nan at step 120; last good checkpoint:")
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["step"] == 100
    assert not (tmp_path / "nan" / "summary.json").exists()


def test_corrupt_flat_cache_is_rebuilt(tiny_data):
    from data import load_dataset

    cache = tiny_data.cache_dir / "flat.npz"
    cache.write_bytes(b"\x00garbage")
    again = load_dataset("maze2d-umaze", steps=TINY_STEPS, verbose=False)
    np.testing.assert_array_equal(again.obs, tiny_data.obs)
    with np.load(cache) as z:  # and the cache on disk is whole again
        assert str(z["fingerprint"]) == again.fingerprint


@pytest.mark.parametrize("flags, message", [
    (["--total-steps", "-5"], "--total-steps must be positive"),
    (["--resume"], "--resume needs --run-name"),
    (["--resume", "--run-name", "nothing-here"], "nothing to resume"),
])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    from train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--run-dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_foreign_checkpoint_is_refused_with_a_clear_error(tiny_data, tmp_path, capsys):
    run = tmp_path / "foreign"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--total-steps", "100", "--run-name", "foreign", "--resume")
    assert "cannot read checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------- dynamics.py (issue 3)
from dynamics import (Ensemble, FitConfig, RewardModel, cache_path, ensemble_predict, fit,  # noqa: E402
                      load_or_train, rollout_error, terminal_fn)

TINY = FitConfig(steps_per_epoch=20, max_epochs=2, reward_max_epochs=2, hidden=32, reward_hidden=32)


@pytest.mark.parametrize("n_members,n_elites", [(1, 1), (3, 2), (7, 5)])
def test_ensemble_shapes_and_independent_members(n_members, n_elites):
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
    """Training targets are 1 but holdout targets 0.3: predictions pass 0.3 and then get worse, so
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


def test_terminal_functions_on_crafted_states():
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


def test_reward_model_fits_a_known_function():
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


def test_load_or_train_caches_and_rejects_another_dataset(tiny_data, monkeypatch):
    data = tiny_data
    ens, rew, info = load_or_train(data, "maze2d-umaze", cfg=TINY, progress=False)
    path = cache_path(data, TINY, seed=0)
    assert not info["cached"] and path.exists() and info["path"] == str(path)
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # atomic write left nothing behind
    # elites are the holdout-best members
    assert info["elites"] == np.argsort(info["ensemble_holdout_mse_members"], kind="stable")[:5].tolist()
    assert math.isfinite(info["ensemble_holdout_mse"]) and math.isfinite(info["reward_holdout_mse"])
    assert cache_path(data, FitConfig(), seed=0) != path and cache_path(data, TINY, seed=1) != path

    ens2, rew2, info2 = load_or_train(data, "maze2d-umaze", cfg=TINY, progress=False)
    assert info2["cached"] and ens2.elites.tolist() == ens.elites.tolist()
    s = torch.as_tensor(data.normalize_obs(data.obs[:10]), dtype=torch.float32)
    a = torch.as_tensor(data.actions[:10])
    torch.testing.assert_close(ens2(s, a), ens(s, a))
    torch.testing.assert_close(rew2(s, a), rew(s, a))
    np.testing.assert_allclose(ens2.obs_mean.numpy(), data.obs_mean, rtol=1e-6)

    monkeypatch.setattr(data, "fingerprint", "0123456789abcdef")
    with pytest.raises(ValueError, match="delete it or pass retrain") as err:
        load_or_train(data, "maze2d-umaze", cfg=TINY, progress=False, path=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    _, _, info3 = load_or_train(data, "maze2d-umaze", cfg=TINY, progress=False, path=path, retrain=True)
    assert not info3["cached"]
    assert torch.load(path, weights_only=True)["fingerprint"] == "0123456789abcdef"


def test_rollout_error_against_the_simulator(tiny_data):
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
