"""Local rebuilds of the datasets that cannot be downloaded here, made the way their authors made them.

maze2d (D4RL's recipe, as Minari's D4RL/pointmaze sets): one continuing run of a waypoint planner
(breadth-first search over the maze's cells) with a PD controller and Gaussian action noise, cut into
episodes at every success, stored with Minari under our own id ``dydiff/pointmaze/<maze>-v0``. Its
reference scores: the noise-free controller (expert) and a random policy on the evaluation env, whose
goal is one fixed cell. data.open_minari calls ``generate_maze_dataset`` when neither a local nor a
downloadable dataset exists.

Also the maze picture (walls, goal, evaluation starts) that train.py's rollout plot draws first.
"""
from __future__ import annotations

import warnings
from collections import deque

import gymnasium as gym
import numpy as np

from data import MAZE2D, local_maze_id

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


