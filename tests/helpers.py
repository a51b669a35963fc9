"""Small datasets built in the tests, with known optimal behaviour."""
import numpy as np

from cepdist.data.transitions import Transitions


def bandit_dataset(n=4000, seed=0):
    """Contextual bandit (one-step episodes): state s ∈ U[-1,1]², the behaviour picks one of two modes
    a = ±(0.6, 0.6)+0.1·N(0, I) with equal probability; reward = 1 − ‖a − g(s)‖² with g(s) = (0.6, 0.6)
    when s₀ > 0 else −(0.6, 0.6). The good mode is known per state."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    sign = rng.choice([-1.0, 1.0], size=(n, 1))
    a = (sign * 0.6 + 0.1 * rng.standard_normal((n, 2))).astype(np.float32)
    g = np.where(s[:, :1] > 0, 0.6, -0.6)
    r = 1.0 - ((a - g) ** 2).sum(1)
    ones = np.ones(n)
    return Transitions.from_numpy(s, a, r, rng.uniform(-1, 1, size=(n, 2)), ones, ones), g


class Stop(Exception):
    """Raised by `stop_at` to interrupt a training loop from its callback."""


def stop_at(step: int):
    """A stage callback that interrupts the run at `step` (after that step's checkpoint is written)."""
    def callback(stage, s, metrics, ckpt):
        if s == step:
            raise Stop
    return callback
