"""IQL (Kostrikov et al. 2021), the base learner of EDIS and an offline baseline: an expectile value V(s),
twin Q on r + γ(1 − d)·V(s'), and a Gaussian policy by advantage-weighted regression on the dataset's actions.

`train_iql` is a stage like QGPO's: a function of its typed config and the transitions that returns its
artifact and, given a checkpoint path, checkpoints and resumes. Settings are the paper's locomotion ones
(expectile 0.7, temperature 3, τ 0.005, γ 0.99, Adam 3e-4, batch 256, the actor's rate on a cosine decay,
rewards scaled by 1000 / (max − min episode return); AntMaze: expectile 0.9, temperature 10, r − 1)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import to_dict
from ..core.nets import GaussianActor, StateValue, TwinQ
from ..core.qlearning import awr_loss, expectile_loss, polyak, q_loss
from ..data.transitions import Transitions, preprocess_rewards
from .loop import Callback, Loop
from .qgpo.stages import SINGLE, Parallel, _resume, adam, lr_scheduler


@dataclass
class IQLConfig:
    hidden: tuple[int, ...] = (256, 256)
    steps: int = 1_000_000
    batch_size: int = 256
    lr: float = 3e-4
    actor_lr_schedule: str = "cosine"        # the paper's locomotion setting
    expectile: float = 0.7
    temperature: float = 3.0
    max_weight: float = 100.0
    gamma: float = 0.99
    tau: float = 0.005
    reward: str | None = "locomotion"        # locomotion | antmaze | none; None → the task's (studies)
    log_every: int = 1000
    ckpt_every: int = 50_000


class IQLAgent(torch.nn.Module):
    """The trained networks; called on a state batch it returns the deterministic actions (policy means)."""

    def __init__(self, cfg: IQLConfig, state_dim: int, action_dim: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.actor = GaussianActor(state_dim, action_dim, cfg.hidden)
        self.q = TwinQ(action_dim, state_dim, cfg.hidden)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.v = StateValue(state_dim, cfg.hidden)

    @torch.no_grad()
    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.actor.mean(states)


def train_iql(cfg: IQLConfig, data: Transitions, *, seed: int = 0, ckpt_path: Path | None = None,
              callback: Callback | None = None, parallel: Parallel = SINGLE) -> IQLAgent:
    """Offline IQL on the transitions (rewards preprocessed by cfg.reward)."""
    if cfg.reward is None:
        raise ValueError("iql.reward is not set (None means the task's rule, which only a study resolves)")
    data = preprocess_rewards(data, cfg.reward)
    device = data.obs.device
    agent = IQLAgent(cfg, data.state_dim, data.action_dim, seed).to(device)
    critic_opt = adam([*agent.q.parameters(), *agent.v.parameters()], cfg.lr)
    actor_opt = adam(agent.actor.parameters(), cfg.lr)
    sched = lr_scheduler(actor_opt, cfg.actor_lr_schedule, cfg.steps)
    local_bs = parallel.local_batch(cfg.batch_size, "iql.batch_size")
    meta = {"kind": "iql", "config": to_dict(cfg), "seed": seed, "state_dim": data.state_dim,
            "action_dim": data.action_dim}
    # one optimizer state in the checkpoint: the actor's (with its schedule) and the critic's side by side
    both = _Pair(critic_opt, actor_opt)
    gen, start, snapshot = _resume("iql", ckpt_path, meta, {"agent": agent}, both, seed, device, parallel, sched)
    q_net, v_net, actor = parallel.wrap(agent.q), parallel.wrap(agent.v), parallel.wrap(agent.actor)

    loop = Loop("iql", cfg.steps, ("v_loss", "q_loss", "actor_loss", "adv_mean"), device, cfg.log_every,
                cfg.ckpt_every, ckpt_path, snapshot, callback, start)
    n = len(data)
    for _ in range(start, cfg.steps):
        idx = torch.randint(n, (local_bs,), device=device, generator=gen)
        s, a = data.obs[idx], data.actions[idx]
        with torch.no_grad():
            q_sa = agent.q_target.min(a, s)
            v_next = agent.v(data.next_obs[idx])
        v = v_net(s)
        lv = expectile_loss(q_sa - v, cfg.expectile)
        y = data.rewards[idx] + cfg.gamma * (1.0 - data.terminals[idx]) * v_next
        lq = q_loss(q_net, a, s, y)
        critic_opt.zero_grad(set_to_none=True)
        (lv + lq).backward()
        critic_opt.step()
        adv = q_sa - v.detach()
        la = awr_loss(actor(s, a), adv, cfg.temperature, cfg.max_weight)
        actor_opt.zero_grad(set_to_none=True)
        la.backward()
        actor_opt.step()
        sched.step()
        polyak(agent.q_target, agent.q, cfg.tau)
        for i, x in enumerate((lv, lq, la, adv.mean())):
            loop.record(i, x)
        loop.end_step()
    return agent.eval()


class _Pair:
    """Two optimizers checkpointed as one state dict."""

    def __init__(self, critic, actor):
        self.critic, self.actor = critic, actor

    def state_dict(self):
        return {"critic": self.critic.state_dict(), "actor": self.actor.state_dict()}

    def load_state_dict(self, sd):
        self.critic.load_state_dict(sd["critic"])
        self.actor.load_state_dict(sd["actor"])
