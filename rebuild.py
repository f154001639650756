"""Local rebuilds of the datasets that cannot be downloaded here, made the way their authors made them.

maze2d (D4RL's recipe, as Minari's D4RL/pointmaze sets): one continuing run of a waypoint planner
(breadth-first search over the maze's cells) with a PD controller and Gaussian action noise, cut into
episodes at every success, stored with Minari under our own id ``dydiff/pointmaze/<maze>-v0``. Its
reference scores: the noise-free controller (expert) and a random policy on the evaluation env, whose
goal is one fixed cell.

Locomotion (D4RL's recipe, on gymnasium's v5 envs): one SAC run (stable-baselines3) per env, evaluated
every 5k env steps, with the policy kept every 250 steps in between. When an evaluation first reaches 1/3
of D4RL's expert return, the kept policies since the evaluation before are evaluated in order up to the
first reaching it; of those, the one whose return is nearest 1/3 is the medium policy, and the replay
buffer up to it is medium-replay; training goes on to the expert (0.9 of it, or the best evaluated by the step cap). Each
policy then collects 1M steps with sampled actions: medium, and medium-expert = both collections. Stored
under ``dydiff/mujoco/<env>/<level>-v0`` with D4RL's reference returns; the run itself (checkpointed at
every evaluation, so a build resumes) lives beside them in ``dydiff/mujoco/<env>/_sac/``.

``build_dataset`` is the builder that data.load_dataset calls when no dataset of the name is here (train.py
passes it unless --no-build-data). Also the maze picture (walls, goal, evaluation starts) that train.py's
rollout plot draws first, and the dataset command:

    python rebuild.py --env maze2d-umaze                          # build (or find) a dataset, print a summary
    python rebuild.py --import-d4rl hopper_medium_replay-v2.hdf5  # store D4RL's file (name from the file)
"""
from __future__ import annotations

import io
import json
import shutil
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

from data import (LOCOMOTION, LOCOMOTION_ENVS, MAZE2D, DatasetError, episode_buffers, import_d4rl, load_dataset,
                  local_maze_id, locomotion_ids, normalized_score)
from runs import provenance, write_atomic

GYM_IDS = {"U_MAZE": "PointMaze_UMaze-v3", "MEDIUM_MAZE": "PointMaze_Medium-v3", "LARGE_MAZE": "PointMaze_Large-v3"}

# Planner-controller constants of the D4RL maze2d data collection.
P_GAIN, D_GAIN, WAYPOINT_RADIUS, ACTION_NOISE = 10.0, 1.0, 0.1, 0.5


# -- Waypoint planner + PD controller (the D4RL maze2d data policy) --------------------------------
class WaypointController:
    """Breadth-first path over maze cells to the goal, then PD control toward cell centres.

    Waypoints are the centres of the cells along the shortest path, the last one the exact goal;
    the controller moves on to the next waypoint once within ``WAYPOINT_RADIUS`` of the current one.
    """

    def __init__(self, maze, noise_std: float = 0.0, rng: np.random.Generator | None = None):
        self.maze, self.noise_std = maze, noise_std
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.grid = np.array([[1 if c == 1 else 0 for c in row] for row in maze.maze_map])
        self.goal = None
        self.waypoints: list[np.ndarray] = []

    def cell(self, xy: np.ndarray) -> tuple[int, int]:
        return tuple(int(v) for v in self.maze.cell_xy_to_rowcol(xy))

    def plan(self, xy: np.ndarray, goal: np.ndarray) -> None:
        start, target = self.cell(xy), self.cell(goal)
        parent = {target: None}  # BFS from the goal, so following parents walks toward it
        queue = deque([target])
        while queue:
            r, c = queue.popleft()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if self.grid[nr, nc] == 0 and (nr, nc) not in parent:
                    parent[(nr, nc)] = (r, c)
                    queue.append((nr, nc))
        path, node = [], parent.get(start)
        while node is not None:
            path.append(np.asarray(self.maze.cell_rowcol_to_xy(np.array(node)), dtype=np.float64))
            node = parent[node]
        self.waypoints = path[:-1] + [np.asarray(goal, dtype=np.float64).copy()]
        self.goal = np.asarray(goal, dtype=np.float64).copy()

    def __call__(self, qpos: np.ndarray, qvel: np.ndarray, goal: np.ndarray) -> np.ndarray:
        if self.goal is None or not np.array_equal(goal, self.goal):
            self.plan(qpos, goal)
        while len(self.waypoints) > 1 and np.linalg.norm(self.waypoints[0] - qpos) < WAYPOINT_RADIUS:
            self.waypoints.pop(0)
        action = P_GAIN * (self.waypoints[0] - qpos) - D_GAIN * qvel
        if self.noise_std > 0:
            action = action + self.rng.normal(0.0, self.noise_std, size=2)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def maze_eval_env(env: str) -> gym.Env:
    """The evaluation env: one fixed goal cell (marked 'g'), the ball reset in any other free cell."""
    _, map_name, (gr, gc), steps, _ = MAZE2D[env]
    import gymnasium_robotics.envs.maze.maps as maps

    maze_map = [list(row) for row in getattr(maps, map_name)]
    maze_map[gr][gc] = "g"
    gym.register_envs(__import__("gymnasium_robotics"))
    return gym.make(GYM_IDS[map_name], maze_map=maze_map, continuing_task=True, reset_target=False,
                    max_episode_steps=steps)


def run_policy(env: gym.Env, policy, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns of ``policy(obs_dict) -> action`` over seeded episodes."""
    returns = np.zeros(episodes)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            returns[ep] += reward
            done = terminated or truncated
    return returns


def maze_reference_scores(env: str, episodes: int = 100, seed: int = 0) -> tuple[float, float]:
    """(random policy, noise-free expert controller) mean returns on the eval env."""
    eval_env = maze_eval_env(env)
    point = eval_env.unwrapped
    expert = WaypointController(point.maze)
    ref_max = run_policy(eval_env, lambda o: expert(o["observation"][:2], o["observation"][2:], o["desired_goal"]),
                         episodes, seed).mean()
    rng = np.random.default_rng(seed)
    ref_min = run_policy(eval_env, lambda o: rng.uniform(-1, 1, 2).astype(np.float32), episodes, seed).mean()
    return float(ref_min), float(ref_max)


def generate_maze_dataset(env: str, steps: int | None = None, seed: int = 0, progress: bool = True):
    """Collect one continuing run of ``steps`` noisy-controller steps, cut into episodes at every
    success, and store it with Minari under our local id. Returns the MinariDataset."""
    import gymnasium_robotics  # noqa: F401  (registers PointMaze)
    import minari
    from minari.data_collector import EpisodeBuffer
    from tqdm import tqdm

    steps = steps or MAZE2D[env][4]
    dataset_id = local_maze_id(env, steps)
    gym.register_envs(gymnasium_robotics)
    data_env = gym.make(GYM_IDS[MAZE2D[env][1]], continuing_task=True, reset_target=True, max_episode_steps=steps)
    point = data_env.unwrapped  # step the raw env: wrappers cost more than the physics here
    controller = WaypointController(point.maze, noise_std=ACTION_NOISE, rng=np.random.default_rng(seed))
    obs, _ = data_env.reset(seed=seed)

    def new_episode(first):
        return {"observation": [first["observation"]], "achieved_goal": [first["achieved_goal"]],
                "desired_goal": [first["desired_goal"]]}, [], [], []

    buffers, ep_obs, ep_act, ep_rew, ep_trunc = [], *new_episode(obs)
    for t in tqdm(range(steps), desc=f"generating {dataset_id}", disable=not progress, mininterval=1.0):
        action = controller(obs["observation"][:2], obs["observation"][2:], obs["desired_goal"])
        obs, reward, _, _, info = point.step(action)
        ep_act.append(action)
        ep_rew.append(float(reward))
        for k in ep_obs:
            ep_obs[k].append(obs[k])
        last = t == steps - 1
        if info["success"] or last:  # cut at every success (the env has already moved the goal)
            ep_trunc = [False] * (len(ep_rew) - 1) + [True]
            buffers.append(EpisodeBuffer(
                id=len(buffers), observations={k: np.asarray(v) for k, v in ep_obs.items()},
                actions=np.asarray(ep_act), rewards=ep_rew, terminations=[False] * len(ep_rew),
                truncations=ep_trunc))
            obs = {**obs, "desired_goal": point.goal.copy()}  # next episode starts with the new goal
            ep_obs, ep_act, ep_rew, ep_trunc = new_episode(obs)

    ref_min, ref_max = maze_reference_scores(env)
    eval_env = maze_eval_env(env)
    warnings.filterwarnings("ignore", message=".*author_email.*")  # a local rebuild has no contact address
    dataset = minari.create_dataset_from_buffers(
        dataset_id=dataset_id, buffer=buffers, env=data_env.spec, eval_env=eval_env.spec,
        algorithm_name="D4RL waypoint planner + PD controller, action noise 0.5",
        author="DyDiff reference implementation (local rebuild)", code_permalink="data.py",
        ref_min_score=ref_min, ref_max_score=ref_max,
        description=f"Local rebuild of {MAZE2D[env][0]}: {steps} steps, seed {seed}, episodes cut at successes; "
                    f"refs = random policy / noise-free controller, 100 episodes on the fixed-goal eval env.",
    )
    print(f"built {dataset_id}: {steps} steps, {len(buffers)} episodes, refs {ref_min:.2f}/{ref_max:.2f}")
    return dataset


# -- Locomotion: D4RL's recipe with SAC (stable-baselines3) -----------------------------------------
@dataclass
class SACBuild:
    """The sizes of a locomotion rebuild: the defaults build the real thing, the tests a tiny one."""

    max_steps: int = 300_000  # SAC's env steps at most (the cap; also the replay buffer's size: nothing is overwritten)
    eval_every: int = 5_000  # env steps between evaluations (and checkpoints)
    snapshot_every: int = 250  # env steps between the policies kept in between, evaluated once an evaluation
    # reaches the medium threshold: hopper's return climbed from 718 to 2249 within one 5k gap
    eval_episodes: int = 10  # deterministic episodes per evaluation
    learning_starts: int = 10_000  # uniform random actions first (rl-baselines3-zoo's value for MuJoCo)
    medium_fraction: float = 1 / 3  # of D4RL's expert return: the medium policy is the nearest at its first crossing
    expert_fraction: float = 0.9  # ... and the expert (else the best evaluated when max_steps is reached)
    collect_steps: int = 1_000_000  # env steps collected with each policy (D4RL: 1M)
    collect_envs: int = 10  # envs stepped together in a collection: one policy call per 10 steps
    episode_steps: int = 1_000  # the time limit of every episode (a timeout is a truncation)
    seed: int = 0


COLLECT = ("collect_steps", "collect_envs")  # the settings that do not change the SAC run
# D4RL's v2 files, beside our rebuilds in build.json: transitions, episodes (TFDS's d4rl_mujoco_* catalog) and
# mean episode return (as printed by the Decision Transformer's dataset script, run over the v2 files)
D4RL_DATA = {"hopper-medium": (1_000_000, 2187, 1422.06), "hopper-medium-replay": (402_000, 2041, 467.30),
             "walker2d-medium": (1_000_000, 1191, 2852.09), "walker2d-medium-replay": (302_000, 1093, 682.70),
             "halfcheetah-medium": (1_000_000, 1000, 4770.33), "halfcheetah-medium-replay": (202_000, 202, 3093.29)}


def d4rl_figures(env: str) -> dict:
    """D4RL's transitions, episodes, mean episode return and its normalized score for a locomotion name (None
    each where D4RL_DATA has no entry)."""
    figures = dict(zip(("transitions", "episodes", "return_mean"), D4RL_DATA.get(env, (None,) * 3)))
    _, ref_min, ref_max = LOCOMOTION_ENVS[LOCOMOTION[env][0]]
    ret = figures["return_mean"]
    return {**figures, "score": None if ret is None else float(normalized_score(ret, ref_min, ref_max))}


BUFFER = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")  # SB3's ReplayBuffer


def sac_dir(robot: str) -> Path:
    """The SAC run of one env, beside its datasets: <Minari root>/dydiff/mujoco/<robot>/_sac/."""
    from minari.storage import get_dataset_path

    return Path(get_dataset_path(f"dydiff/mujoco/{robot}")) / "_sac"


def _make(robot: str, cfg: SACBuild) -> gym.Env:
    return gym.make(LOCOMOTION_ENVS[robot][0], max_episode_steps=cfg.episode_steps)


def _evaluate(model, envs: list) -> float:
    """Mean return of the deterministic policy, one episode per env in lockstep (fixed reset seeds)."""
    obs = np.stack([env.reset(seed=10_000 + i)[0] for i, env in enumerate(envs)])
    returns, alive = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    while alive.any():
        actions, _ = model.predict(obs, deterministic=True)
        for i in np.flatnonzero(alive):
            obs[i], r, terminated, truncated, _ = envs[i].step(actions[i])
            returns[i] += r
            alive[i] = not (terminated or truncated)
    return float(returns.mean())


def read_sac_state(robot: str) -> dict | None:
    """The run's state (step, evaluations, medium/expert/best policies, CPU time), from its checkpoint."""
    path = sac_dir(robot) / "checkpoint.npz"
    if not path.exists():
        return None
    with np.load(path) as z:
        return json.loads(str(z["state"]))


@contextmanager
def as_of(model, then: tuple[int, dict]):
    """The model with the actor (the policy) and step count of an earlier snapshot, restored on exit; the
    critics stay as they are, which neither an evaluation nor a collection uses."""
    step, actor = then
    now = snapshot(model)
    model.num_timesteps = step
    model.policy.actor.load_state_dict(actor)
    try:
        yield model
    finally:
        model.num_timesteps = now[0]
        model.policy.actor.load_state_dict(now[1])


def snapshot(model) -> tuple[int, dict]:
    return model.num_timesteps, {k: v.clone() for k, v in model.policy.actor.state_dict().items()}


def nearest_third(model, kept: list, ret: float, state: dict, eval_envs: list, target: float, folder: Path) -> dict:
    """The medium policy, once the model's evaluation now (``ret``) reached ``target``: the kept policies of
    this window (the first is the one of the evaluation before, if any) are evaluated in order up to the first
    reaching it, and the one whose return is nearest ``target`` is saved as medium.zip. Returns its step and
    return; the new evaluations join state["evals"]."""
    known, tried = dict(state["evals"]), []
    for i, (step, _) in enumerate(kept):
        if i < len(kept) - 1 and step not in known:
            with as_of(model, kept[i]):
                state["evals"].append([step, _evaluate(model, eval_envs)])
            known[step] = state["evals"][-1][1]
        tried.append((abs((r := known.get(step, ret)) - target), step, r, i))
        if r >= target:
            break
    _, step, r, i = min(tried)
    with as_of(model, kept[i]):  # as it was at that step (medium.zip: that policy)
        write_atomic(folder / "medium.zip", model.save)
    return {"step": step, "return": r}


def train_sac(robot: str, cfg: SACBuild, until: str, progress: bool = True) -> dict:
    """Train SAC on the env until the ``until`` ('medium' or 'expert') policy exists, resuming from the
    run's checkpoint; a policy that exists already costs nothing. Returns the run's state."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in COLLECT}
    state = read_sac_state(robot) or {"settings": settings, "step": 0, "evals": [], "medium": None, "expert": None,
                                      "best": None, "cpu_time_s": 0.0, "resumes": []}
    folder, (gym_id, _, ref_max) = sac_dir(robot), LOCOMOTION_ENVS[robot]
    if state["settings"] != settings:
        raise DatasetError(f"{folder} holds a SAC run with other settings ({state['settings']}): delete it to start over")
    if state[until] is not None:
        return state
    import stable_baselines3
    import torch
    from stable_baselines3 import SAC
    from tqdm import tqdm

    torch.set_num_threads(1)
    env, eval_envs, t0 = _make(robot, cfg), [_make(robot, cfg) for _ in range(cfg.eval_episodes)], time.process_time()
    if state["step"] == 0:
        model = SAC("MlpPolicy", env, learning_rate=3e-4, buffer_size=cfg.max_steps, learning_starts=cfg.learning_starts,
                    batch_size=256, tau=0.005, gamma=0.99, train_freq=1, gradient_steps=1, ent_coef="auto",
                    policy_kwargs=dict(net_arch=[256, 256]), seed=cfg.seed, device="cpu")
    else:  # resume: the model, its optimizers and entropy coefficient, and the buffer, exactly as checkpointed
        with np.load(folder / "checkpoint.npz") as z:
            model = SAC.load(io.BytesIO(z["model"].tobytes()), env=env, device="cpu")
            n, rb = state["step"], model.replay_buffer
            for k in BUFFER:
                getattr(rb, k)[:n, 0] = z[k]
        rb.pos = n
        if not rb.dones[n - 1, 0]:  # the episode in progress was cut: a truncation, which SAC bootstraps as before
            rb.dones[n - 1, 0] = rb.timeouts[n - 1, 0] = 1.0
        state["resumes"].append(n)
    state["sb3"] = stable_baselines3.__version__
    bar = tqdm(total=cfg.max_steps, initial=model.num_timesteps, desc=f"SAC {gym_id} (until {until})", unit="step",
               disable=not progress, mininterval=1.0)
    step_bar = lambda local_vars, global_vars: bar.update(1) or True  # noqa: E731  (SB3's functional callback)
    while state[until] is None and model.num_timesteps < cfg.max_steps:
        # learn() in chunks to the next evaluation point: between chunks the buffer and the model agree exactly.
        # Until the medium policy exists, the policy is also kept every snapshot_every steps (in memory: a killed
        # build resumes at the last checkpoint and learns the chunk again). When an evaluation reaches 1/3 of
        # expert, the kept policies are evaluated in order up to the first that reaches it, and the medium is
        # the one of them (the policy of the evaluation before included) whose return is nearest 1/3: SAC's
        # return can jump past the threshold between two kept policies (walker2d: 1079 -> 2030 within 250
        # steps), and then a policy before the jump is the better third of expert. Keeping and evaluating
        # afterwards costs one window's evaluations; evaluating every 250 steps would cost more than training.
        end = min(model.num_timesteps + cfg.eval_every - model.num_timesteps % cfg.eval_every, cfg.max_steps)
        kept = [snapshot(model)] if state["medium"] is None and state["evals"] else []  # (the evaluation before)
        while model.num_timesteps < end:
            chunk = end - model.num_timesteps if state["medium"] else min(cfg.snapshot_every, end - model.num_timesteps)
            model.learn(chunk, reset_num_timesteps=False, callback=step_bar)
            if state["medium"] is None:
                kept.append(snapshot(model))
        step, ret = model.num_timesteps, _evaluate(model, eval_envs)
        state["step"], point = step, {"step": step, "return": ret}
        bar.set_postfix(eval_return=f"{ret:.0f}")
        if state["medium"] is None and ret >= cfg.medium_fraction * ref_max:
            state["medium"] = nearest_third(model, kept, ret, state, eval_envs, cfg.medium_fraction * ref_max, folder)
        state["evals"].append([step, ret])
        if state["best"] is None or ret > state["best"]["return"]:
            write_atomic(folder / "best.zip", model.save)
            state["best"] = point
        if state["expert"] is None and ret >= cfg.expert_fraction * ref_max:
            write_atomic(folder / "expert.zip", model.save)
            state["expert"] = point
        if step >= cfg.max_steps and state["expert"] is None:  # the cap: the best evaluated policy is the expert
            write_atomic(folder / "expert.zip", lambda tmp: shutil.copyfile(folder / "best.zip", tmp))
            state["expert"] = {**state["best"], "capped": True}
        state["cpu_time_s"] += time.process_time() - t0
        t0 = time.process_time()
        model.save(blob := io.BytesIO())
        buffer = {k: getattr(model.replay_buffer, k)[:step, 0] for k in BUFFER}
        write_atomic(folder / "checkpoint.npz", lambda tmp: np.savez(
            tmp, model=np.frombuffer(blob.getvalue(), np.uint8), state=json.dumps(state), **buffer))
    bar.close()
    if state["medium"] is None:  # (the expert always exists by the cap)
        raise DatasetError(f"SAC on {gym_id} reached at best {state['best']['return']:.0f} in {cfg.max_steps} env steps, "
                           f"below the medium threshold {cfg.medium_fraction * ref_max:.0f}: delete {folder} and "
                           f"rebuild with another seed")
    return state


def _replay(robot: str, steps: int) -> dict:
    """The replay buffer's first ``steps`` transitions (time order: one env), as flat arrays."""
    with np.load(sac_dir(robot) / "checkpoint.npz") as z:
        b = {k: z[k][:steps] for k in BUFFER}
    # all three envs act in [-1, 1], where SB3's scaled actions are the env's own
    return {"obs": b["observations"], "next_obs": b["next_observations"], "actions": b["actions"],
            "rewards": b["rewards"], "terminals": b["dones"] * (1 - b["timeouts"]), "timeouts": b["timeouts"]}


def _collect(robot: str, which: str, cfg: SACBuild, state: dict, progress: bool) -> dict:
    """cfg.collect_steps env steps of the medium or expert policy with sampled actions, as flat arrays in
    episode order (cached beside the run); the episodes still running at the end are truncated."""
    path, policy = sac_dir(robot) / f"collect_{which}.npz", state[which]
    if path.exists():
        with np.load(path) as z:
            if (int(z["steps"]), int(z["policy_step"])) == (cfg.collect_steps, policy["step"]):
                return {k: z[k] for k in z.files if k not in ("steps", "policy_step")}
    import torch
    from stable_baselines3 import SAC
    from tqdm import tqdm

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed + (1 if which == "medium" else 2))  # the sampled actions
    model = SAC.load(sac_dir(robot) / f"{which}.zip", device="cpu")
    envs = [_make(robot, cfg) for _ in range(cfg.collect_envs)]
    obs = np.stack([env.reset(seed=cfg.seed * 1000 + (100 if which == "expert" else 0) + i)[0]
                    for i, env in enumerate(envs)])
    live = [{"obs": [], "next_obs": [], "actions": [], "rewards": [], "terminals": [], "timeouts": []} for _ in envs]
    out, steps = {k: [] for k in live[0]}, 0

    def finish(i):  # an episode ended (or the collection did): its arrays go out
        for key in out:
            out[key].append(np.asarray(live[i][key]))
            live[i][key] = []

    bar = tqdm(total=cfg.collect_steps, desc=f"collecting {which} {LOCOMOTION_ENVS[robot][0]}", unit="step",
               disable=not progress, mininterval=1.0)
    while steps < cfg.collect_steps:
        k = min(len(envs), cfg.collect_steps - steps)  # the last round steps only the envs still needed
        actions, _ = model.predict(obs[:k], deterministic=False)
        for i in range(k):
            nxt, r, terminated, truncated, _ = envs[i].step(actions[i])
            for key, v in zip(live[i], (obs[i].copy(), nxt, actions[i], r, terminated, truncated and not terminated)):
                live[i][key].append(v)
            obs[i] = envs[i].reset()[0] if terminated or truncated else nxt
            if terminated or truncated:
                finish(i)
        steps += k
        bar.update(k)
    bar.close()
    for i in range(len(envs)):
        if live[i]["rewards"]:  # still running when the collection ended: cut, a truncation
            live[i]["timeouts"][-1] = True
            finish(i)
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    write_atomic(path, lambda tmp: np.savez(tmp, steps=cfg.collect_steps, policy_step=policy["step"], **arrays))
    return arrays


def generate_locomotion_dataset(env: str, cfg: SACBuild | None = None, progress: bool = True):
    """Build (or find) the local rebuild of a locomotion name, training and collecting only what it needs
    (medium-replay: SAC to the medium point; medium: + the medium collection; medium-expert: SAC to the
    expert and both collections). Returns the MinariDataset."""
    import minari

    cfg, (robot, level), dataset_id, t0 = cfg or SACBuild(), LOCOMOTION[env], locomotion_ids(env)[1], time.process_time()
    if dataset_id in minari.list_local_datasets():
        return minari.load_dataset(dataset_id)
    # the code that builds it, read now: the tree may change while SAC trains
    made_by = {k: v for k, v in provenance().items() if k in ("commit", "dirty", "changes_digest")}
    gym_id, ref_min, ref_max = LOCOMOTION_ENVS[robot]
    state = train_sac(robot, cfg, "expert" if level == "medium-expert" else "medium", progress)
    if level == "medium-replay":
        policies, arrays = ["medium"], _replay(robot, state["medium"]["step"])
        what = (f"the replay buffer up to the medium policy: all {state['medium']['step']} env steps of training, the "
                f"first {cfg.learning_starts} with uniform random actions")
    else:
        policies = ["medium", "expert"] if level == "medium-expert" else ["medium"]
        parts = [_collect(robot, which, cfg, state, progress) for which in policies]
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        what = (f"{cfg.collect_steps} env steps of the {' and the '.join(policies)} policy with sampled actions"
                + (", episodes of both" if len(parts) == 2 else ""))
    buffers = episode_buffers(**arrays)
    score = lambda ret: float(normalized_score(ret, ref_min, ref_max))  # noqa: E731
    taken = "; ".join(f"{w} policy at env step {state[w]['step']}{' (the best by the cap)' * state[w].get('capped', False)}"
                      f", {cfg.eval_episodes}-episode return {state[w]['return']:.1f} (score {score(state[w]['return']):.1f})"
                      for w in policies)
    sac = f"SAC (stable-baselines3 {state['sb3']}, seed {cfg.seed})"
    warnings.filterwarnings("ignore", message=".*author_email.*")  # a local rebuild has no contact address
    spec = _make(robot, cfg).spec
    dataset = minari.create_dataset_from_buffers(
        dataset_id=dataset_id, buffer=buffers, env=spec, eval_env=spec, algorithm_name=f"{sac}: {what}",
        author="DyDiff reference implementation (local rebuild)", code_permalink="rebuild.py",
        ref_min_score=ref_min, ref_max_score=ref_max,
        description=f"Local rebuild of D4RL's {env}-v2 recipe on {gym_id} (D4RL used the mujoco-py env): {sac}, "
                    f"256x256 networks, lr 3e-4, batch 256, one update per env step, {cfg.episode_steps}-step "
                    f"episodes; {what}. {taken}. Refs: D4RL's random and expert returns.")
    n, returns = len(arrays["rewards"]), [float(np.sum(b.rewards)) for b in buffers]
    numbers = {"transitions": n, "episodes": len(buffers), "terminations": int(arrays["terminals"].sum()),
               "cpu_time_s": time.process_time() - t0, "sac_cpu_time_s": state["cpu_time_s"],
               "data_return_mean": float(np.mean(returns)), "data_score": score(np.mean(returns)),
               "policies": {w: {**state[w], "score": score(state[w]["return"])} for w in policies},
               "d4rl": {**d4rl_figures(env), "ref_min": ref_min, "ref_max": ref_max},
               "made_by": made_by}
    report = sac_dir(robot) / "build.json"
    everything = json.loads(report.read_text()) if report.exists() else {}
    everything[dataset_id] = numbers
    write_atomic(report, lambda tmp: tmp.write_text(json.dumps(everything, indent=2)))
    print(f"built {dataset_id}: {n} transitions, {len(buffers)} episodes; {taken}; CPU time {numbers['cpu_time_s']:.0f} s "
          f"for this build (SAC's {state['cpu_time_s']:.0f} s in all); numbers in {report}")
    return dataset


def build_dataset(env: str, steps: int | None = None):
    """The builder data.load_dataset calls for a D4RL name whose dataset is not here: the maze planner's
    rebuild (``steps``: its size) or the locomotion SAC rebuild. Returns the MinariDataset."""
    return generate_maze_dataset(env, steps) if env in MAZE2D else generate_locomotion_dataset(env)


# -- Pictures: the maze, its goal and where evaluation episodes start ------------------------------
def draw_maze(ax, env: str) -> None:
    """Walls of a maze2d eval env in dark grey, the cells where evaluation episodes start in light green,
    and the goal with its success circle (radius 0.45) in gold."""
    from matplotlib.patches import Circle, Rectangle

    _, map_name, goal_cell, _, _ = MAZE2D[env]
    maze = maze_eval_env(env).unwrapped.maze
    size, label = maze.maze_size_scaling, "evaluation starts"
    for i, row in enumerate(maze.maze_map):
        for j, cell in enumerate(row):
            x, y = maze.cell_rowcol_to_xy(np.array([i, j]))
            if cell == 1:
                ax.add_patch(Rectangle((x - size / 2, y - size / 2), size, size, color="0.25"))
            elif (i, j) != tuple(goal_cell):
                ax.add_patch(Rectangle((x - size / 2, y - size / 2), size, size, color="#e3f3e0", zorder=0,
                                       label=label))
                label = None  # one legend entry for all start cells
    gx, gy = maze.cell_rowcol_to_xy(np.array(goal_cell))
    ax.add_patch(Circle((gx, gy), 0.45, color="gold", alpha=0.6, zorder=1, label="goal (success radius 0.45)"))
    ax.plot(gx, gy, "*", color="darkgoldenrod", ms=12, zorder=5)


if __name__ == "__main__":
    import tyro

    @dataclass
    class Args:
        env: str | None = None
        """D4RL-style dataset name (maze2d-umaze/-medium/-large, hopper-medium, ...; default maze2d-umaze)"""
        dataset_id: str | None = None
        """any Minari dataset id, instead of --env"""
        steps: int | None = None
        """maze2d only: size of a local rebuild (default: as D4RL, 1M/2M/4M steps)"""
        build: bool = True
        """build a missing dataset locally (maze2d: minutes; a locomotion build is SAC for about an hour per env on a CPU core)"""
        import_d4rl: str | None = None
        """store this D4RL hdf5 file (e.g. hopper_medium_replay-v2.hdf5) with Minari; --env names it if its file name does not"""

    args = tyro.cli(Args)
    try:
        if args.import_d4rl is not None:
            args.dataset_id = import_d4rl(args.import_d4rl, args.env)
        d = load_dataset(args.env or "maze2d-umaze", args.dataset_id, args.steps,
                         build=build_dataset if args.build else None)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    lengths = d.episode_ends - d.episode_starts
    print(f"episode length mean {lengths.mean():.1f} (min {lengths.min()}, max {lengths.max()}); "
          f"reward sum {d.rewards.sum():.0f}; refs {d.ref_min}/{d.ref_max}; cache {d.cache_dir}")
