"""IQL, the base learner of EDIS: its losses against their definitions, and its policy on a bandit whose
better action is known per state."""
import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from cepdist.algos.iql import IQLConfig, train_iql
from cepdist.core.qlearning import awr_loss, expectile_loss
from helpers import Stop, bandit_dataset, stop_at


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9])
def test_expectile_loss_is_minimised_by_the_expectile(tau):
    x = torch.from_numpy(np.random.default_rng(0).gamma(2.0, 1.0, 20_000))
    # the τ-expectile e solves τ·E(x − e)₊ = (1 − τ)·E(e − x)₊
    e = brentq(lambda c: tau * np.clip(x.numpy() - c, 0, None).mean() - (1 - tau) * np.clip(c - x.numpy(), 0, None).mean(),
               0, 20)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([c], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = expectile_loss(x - c, tau)
        loss.backward()
        return loss
    opt.step(closure)
    assert c.item() == pytest.approx(e, abs=1e-4)
    if tau == 0.5:
        assert c.item() == pytest.approx(float(x.mean()), abs=1e-4)


def test_awr_loss_weights():
    lp, adv = torch.tensor([-1.0, -2.0]), torch.tensor([0.0, 10.0])
    assert float(awr_loss(lp, adv, 1.0, 100.0)) == pytest.approx(-(1 * -1.0 + 100 * -2.0) / 2)


def test_iql_prefers_the_better_mode_per_state(tmp_path):
    """On the two-mode bandit, behaviour cloning averages the modes (mean action ≈ 0); IQL's policy moves to
    the rewarded mode of each state, and a run interrupted and resumed ends where an uninterrupted one does."""
    data, g = bandit_dataset(4000)
    cfg = IQLConfig(hidden=(64, 64), steps=1500, batch_size=256, lr=1e-3, reward="none", gamma=0.0,
                    log_every=250, ckpt_every=500)
    agent = train_iql(cfg, data, seed=0)
    s = torch.rand(512, 2) * 2 - 1
    a = agent(s)
    good = torch.where(s[:, :1] > 0, 0.6, -0.6).expand(-1, 2)
    assert float(((a - good) ** 2).sum(-1).mean()) < 0.1      # BC's mean (≈0) would be 0.72 away
    with pytest.raises(Stop):
        train_iql(cfg, data, seed=0, ckpt_path=tmp_path / "iql.pt", callback=stop_at(1000))
    resumed = train_iql(cfg, data, seed=0, ckpt_path=tmp_path / "iql.pt")
    flat = lambda m: torch.cat([p.flatten() for p in m.parameters()])
    assert torch.allclose(flat(resumed), flat(agent))
