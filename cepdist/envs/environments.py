"""Evaluation environments that speak D4RL's observation layout and reward on today's gymnasium stack.

D4RL's own environments (mujoco-py, gym 0.24) no longer import, so each task is evaluated on its nearest
maintained environment and adapted here, in one place:

- halfcheetah / hopper / walker2d: the gymnasium v5 environments have D4RL's spaces. hopper's and
  halfcheetah's v5 models equal the v2 models D4RL's data came from; walker2d-v5 changed one foot's friction
  (0.9 → 1.9), so walker2d runs on v5 with the v2-era model file (`D4RL_MODELS`), which gymnasium still ships.
- ant: D4RL's Ant-v2 observation is 111-d = qpos[2:] (13) + qvel (14) + external contact forces (84). Under
  mujoco ≥ 2.0 (which generated the D4RL files) those contact forces read as zeros, so the adapter appends
  84 zeros to Ant-v5's 27-d contact-free observation and drops the contact cost, as Ant-v2 effectively had.
- antmaze: gymnasium-robotics' AntMaze (v4) provides the maze physics; D4RL's semantics are restored on
  top: D4RL's frame (origin at the start cell, rows growing along +y, so the map is handed over upside
  down), the fixed start and goal cells of D4RL's evaluation mazes, D4RL's goal noise, the 29-d
  observation qpos[:15] + qvel[:14], and the sparse reward 1 within 0.5 of the goal, which ends the episode
  (D4RL's evaluation environments terminate on success, so the return is 0 or 1).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium as gym
import gymnasium.envs.mujoco
import numpy as np

from ..data.tasks import Task

ANT_CONTACT_DIMS = 84
# gymnasium-robotics id → (its wall map's name, D4RL's evaluation start cell, goal cell) as (row, col)
ANTMAZE_CELLS = {
    "AntMaze_UMaze-v4": ("U_MAZE", (1, 1), (3, 1)),
    "AntMaze_Medium-v4": ("MEDIUM_MAZE", (1, 1), (6, 6)),
    "AntMaze_Large-v4": ("LARGE_MAZE", (1, 1), (7, 9)),
}
SCALING = 4.0            # D4RL's maze_size_scaling for AntMaze
# environments whose current model differs from the one D4RL's data was collected under → that model's file
D4RL_MODELS = {"Walker2d-v5": "walker2d.xml"}


def model_file(task: Task) -> str | None:
    """The MuJoCo model file a task runs on, when it is not the environment's default."""
    name = D4RL_MODELS.get(task.env_id)
    return str(Path(gymnasium.envs.mujoco.__file__).parent / "assets" / name) if name else None


def make_env(task: Task, max_steps: int | None = None):
    """The gymnasium environment for evaluating `task`, with D4RL-layout observations and rewards."""
    horizon = max_steps or task.episode_length
    if task.domain == "antmaze":
        return AntMazeD4RL(task.env_id, horizon)
    if task.env_id.startswith("Ant-"):
        env = gym.make(task.env_id, max_episode_steps=horizon, include_cfrc_ext_in_observation=False,
                       contact_cost_weight=0.0)
        return ZeroPadObs(env, ANT_CONTACT_DIMS)
    xml = model_file(task)
    return gym.make(task.env_id, max_episode_steps=horizon, **({"xml_file": xml} if xml else {}))


class ZeroPadObs(gym.ObservationWrapper):
    """Appends `extra` zeros to every observation."""

    def __init__(self, env, extra: int):
        super().__init__(env)
        self.extra = extra
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (env.observation_space.shape[0] + extra,),
                                                np.float64)

    def observation(self, obs):
        return np.concatenate([obs, np.zeros(self.extra)])


class AntMazeD4RL(gym.Env):
    """gymnasium-robotics' AntMaze with D4RL's frame, start, goal, observation and reward (see module doc)."""

    def __init__(self, env_id: str, horizon: int):
        try:
            with warnings.catch_warnings():  # its import warns about Adroit environments, unrelated here
                warnings.simplefilter("ignore")
                import gymnasium_robotics  # noqa: F401  (registers AntMaze_*)
                from gymnasium_robotics.envs.maze import maps
        except ImportError as e:
            raise ImportError("AntMaze evaluation needs gymnasium-robotics (a cepdist dependency): "
                              "pip install gymnasium-robotics") from e
        if env_id not in ANTMAZE_CELLS:
            raise ValueError(f"no D4RL maze layout for {env_id!r}; known: {sorted(ANTMAZE_CELLS)}")
        map_name, self.start, self.goal_cell = ANTMAZE_CELLS[env_id]
        walls = [list(r) for r in getattr(maps, map_name)]
        self.height, self.width = len(walls), len(walls[0])
        for cell in (self.start, self.goal_cell):
            if walls[cell[0]][cell[1]] != 0:
                raise ValueError(f"{env_id}: D4RL cell {cell} is a wall in gymnasium-robotics' {map_name}")
        flipped = walls[::-1]            # D4RL's row i lies at y = 4·i: upside down in gymnasium-robotics
        with warnings.catch_warnings():  # v4 is the version this adapter was checked against
            warnings.simplefilter("ignore", DeprecationWarning)
            self.env = gym.make(env_id, maze_map=flipped, continuing_task=False, max_episode_steps=horizon)
        self.inner = self.env.unwrapped
        self.action_space = self.env.action_space
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (29,), np.float64)
        # D4RL xy = gymnasium-robotics xy + offset (a translation; the flip makes the axes agree)
        self.offset = self.d4rl_xy(self.start) - self.gym_xy(self.start)
        self.goal = np.zeros(2)

    # cell centres in the two frames
    def d4rl_xy(self, cell) -> np.ndarray:
        return np.array([(cell[1] - self.start[1]) * SCALING, (cell[0] - self.start[0]) * SCALING])

    def gym_xy(self, cell) -> np.ndarray:
        return self.inner.maze.cell_rowcol_to_xy(np.array([self.height - 1 - cell[0], cell[1]]))

    def is_wall(self, xy_d4rl) -> bool:
        """Whether a D4RL-frame point lies in a wall block of the simulated maze."""
        i, j = self.inner.maze.cell_xy_to_rowcol(np.asarray(xy_d4rl, float) - self.offset)
        m = self.inner.maze.maze_map
        return not (0 <= i < len(m) and 0 <= j < len(m[0])) or m[i][j] == 1

    def _obs(self) -> np.ndarray:
        d = self.inner.ant_env.data
        obs = np.concatenate([d.qpos.flat[:15], d.qvel.flat[:14]]).astype(np.float64)
        obs[:2] += self.offset
        return obs

    def set_xy(self, xy_d4rl) -> np.ndarray:
        """Place the ant at a D4RL-frame position (tests, diagnostics); returns the new observation."""
        ant = self.inner.ant_env
        qpos, qvel = ant.data.qpos.copy(), ant.data.qvel.copy()
        qpos[:2] = np.asarray(xy_d4rl, float) - self.offset
        ant.set_state(qpos, qvel)
        return self._obs()

    def reset(self, *, seed: int | None = None, options=None):
        flip = lambda c: (self.height - 1 - c[0], c[1])  # noqa: E731
        self.env.reset(seed=seed, options={"reset_cell": flip(self.start), "goal_cell": flip(self.goal_cell)})
        rng = np.random.default_rng(seed)
        # D4RL: goal = cell centre + U(0, 1) + U(0, 0.5) per axis; start = init pose + U(±0.1) on qpos,
        # N(0, 0.1²) on qvel, at the start cell's centre
        self.goal = self.d4rl_xy(self.goal_cell) + rng.uniform(0, 0.25 * SCALING, 2) \
            + rng.uniform(0, 0.5, 2) * 0.25 * SCALING
        self.inner.goal = self.goal - self.offset
        ant = self.inner.ant_env
        qpos = ant.init_qpos.copy() + rng.uniform(-0.1, 0.1, ant.model.nq)
        qpos[:2] = self.gym_xy(self.start) + (qpos[:2] - ant.init_qpos[:2])
        qvel = ant.init_qvel.copy() + 0.1 * rng.standard_normal(ant.model.nv)
        ant.set_state(qpos, qvel)
        return self._obs(), {"goal": self.goal.copy()}

    def step(self, action):
        _, _, _, truncated, info = self.env.step(action)
        obs = self._obs()
        success = bool(np.linalg.norm(obs[:2] - self.goal) <= 0.5)
        info = {**info, "success": success, "goal": self.goal.copy()}
        return obs, float(success), success, bool(truncated) and not success, info

    def close(self):
        self.env.close()
