"""D4RL-layout evaluation environments: AntMaze on gymnasium-robotics in D4RL's frame, ant-v2's 111-d view."""
import numpy as np
import pytest

from cepdist.data.tasks import get_task
from cepdist.envs.environments import make_env
from cepdist.envs.evaluation import evaluate
from test_evaluation import tiny_policy

# D4RL's evaluation mazes (0 free, 1 wall; start at row 1, col 1) and goal cells: cell (i, j) lies at
# x = 4·(j − 1), y = 4·(i − 1) in D4RL's frame
MAZES = {
    "antmaze-umaze-v2": (["11111", "10001", "11101", "10001", "11111"], (3, 1)),
    "antmaze-medium-play-v2": (["11111111", "10011001", "10010001", "11000111", "10010001", "10100101",
                                "10001001", "11111111"], (6, 6)),
    "antmaze-large-diverse-v0": (["111111111111", "100001000001", "101101010101", "100000010001",
                                  "101111011101", "100101000001", "110101010111", "100100010001",
                                  "111111111111"], (7, 9)),
}


@pytest.mark.parametrize("name", sorted(MAZES))
def test_antmaze_frame_walls_goal_and_reward(name):
    rows, goal_cell = MAZES[name]
    env = make_env(get_task(name))
    obs, info = env.reset(seed=3)
    assert obs.shape == (29,) and env.observation_space.shape == (29,)
    assert np.abs(obs[:2]).max() <= 0.1 + 1e-9                      # D4RL start: the origin, ±0.1 noise
    gx, gy = 4 * (goal_cell[1] - 1), 4 * (goal_cell[0] - 1)
    assert gx <= info["goal"][0] <= gx + 1.5 and gy <= info["goal"][1] <= gy + 1.5
    for i, row in enumerate(rows):                                    # the simulated maze, seen from D4RL's frame
        for j, c in enumerate(row):
            assert env.is_wall((4 * (j - 1), 4 * (i - 1))) == (c == "1"), (name, i, j)
    obs, r, term, trunc, _ = env.step(np.zeros(8))
    assert r == 0.0 and not term
    env.set_xy(info["goal"] + [0.3, -0.3])                            # within 0.5 of the goal: success ends it
    obs, r, term, trunc, _ = env.step(np.zeros(8))
    assert np.linalg.norm(obs[:2] - info["goal"]) <= 0.5 and r == 1.0 and term
    env.close()


def test_antmaze_reset_is_seeded():
    env = make_env(get_task("antmaze-umaze-v2"))
    a, ia = env.reset(seed=7)
    b, ib = env.reset(seed=7)
    c, _ = env.reset(seed=8)
    assert np.array_equal(a, b) and np.array_equal(ia["goal"], ib["goal"]) and not np.array_equal(a, c)


def test_ant_v2_observation_layout():
    env = make_env(get_task("ant-medium-v2"))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (111,) and np.all(obs[27:] == 0) and np.any(obs[:27] != 0)
    obs, r, *_ = env.step(env.action_space.sample())
    assert obs.shape == (111,) and np.isfinite(r)


def test_evaluation_runs_on_antmaze():
    policy, task = tiny_policy(task="antmaze-umaze-v2")
    res = evaluate(policy, task, [1.0, 2.0], episodes=2, seed=0, max_steps=20)
    assert res.returns.shape == (2, 2) and set(np.unique(res.returns)) <= {0.0, 1.0}
    assert np.all(res.lengths == 20)


def test_locomotion_tasks_run_on_the_models_their_d4rl_data_came_from():
    """D4RL's walker2d data was collected with one foot's friction 0.9 (gymnasium's Walker2d-v5 sets both to
    1.9); hopper's and halfcheetah's v5 models equal the v2-era ones. Read from the simulated model."""
    import gymnasium as gym
    import mujoco

    def physics(env):
        m = env.unwrapped.model
        names = [mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_GEOM, i) for i in range(m.ngeom)]
        return dict(zip(names, m.geom_friction[:, 0].round(3))), m.body_mass.round(6).tolist(), \
            m.dof_damping.round(6).tolist(), m.actuator_gear[:, 0].tolist(), m.opt.timestep
    for task, v2_era in (("walker2d-medium-v2", "Walker2d-v4"), ("walker2d-medium-local", "Walker2d-v4"),
                         ("hopper-medium-v2", "Hopper-v4"), ("halfcheetah-medium-v2", "HalfCheetah-v4")):
        ours, ref = physics(make_env(get_task(task))), physics(gym.make(v2_era))
        assert ours == ref, (task, ours[0], ref[0])
    friction = physics(make_env(get_task("walker2d-medium-v2")))[0]
    assert (friction["foot_geom"], friction["foot_left_geom"]) == (0.9, 1.9)
