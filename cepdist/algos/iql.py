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

from ..config import from_dict, to_dict
from ..core.nets import GaussianActor, StateValue, TwinQ
from ..core.qlearning import awr_loss, expectile_loss, polyak, q_loss
from ..data.transitions import Transitions, preprocess_rewards
from . import checkpoint
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

    @torch.no_grad()
    def explore(self, states: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Actions drawn from π(·|s) (online data collection; EDIS's policy-energy positives), clipped to [−1, 1]."""
        mean = self.actor.mean(states)
        std = self.actor.log_std.clamp(-5.0, 2.0).exp()
        return (mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)).clamp(-1.0, 1.0)


class IQLPolicy:
    """The evaluation interface of a deterministic agent (envs/evaluation.py): the mean action, whatever the
    guidance scale and initial noise the evaluator passes."""

    def __init__(self, agent: IQLAgent):
        self.agent = agent.eval()
        self.device = next(agent.parameters()).device
        self.action_dim = agent.actor.action_dim

    def __call__(self, states, w=None, x_init=None) -> torch.Tensor:
        return self.agent(torch.as_tensor(states, dtype=torch.float32, device=self.device))


class IQLLearner:
    """An agent with its optimizers: `update` takes one gradient step of all three losses on a batch of
    (preprocessed) transitions. Offline training and online fine-tuning share it."""

    def __init__(self, cfg: IQLConfig, agent: IQLAgent, steps: int, actor_lr_schedule: str,
                 parallel: Parallel = SINGLE):
        self.cfg, self.agent = cfg, agent
        self.critic_opt = adam([*agent.q.parameters(), *agent.v.parameters()], cfg.lr)
        self.actor_opt = adam(agent.actor.parameters(), cfg.lr)
        self.sched = lr_scheduler(self.actor_opt, actor_lr_schedule, steps)
        self.q_net, self.v_net, self.actor = parallel.wrap(agent.q), parallel.wrap(agent.v), parallel.wrap(agent.actor)

    def update(self, s, a, r, s2, d) -> tuple[torch.Tensor, ...]:
        """One step; returns (v_loss, q_loss, actor_loss, mean advantage) as tensors (no host sync)."""
        cfg, agent = self.cfg, self.agent
        with torch.no_grad():
            q_sa = agent.q_target.min(a, s)
            v_next = agent.v(s2)
        v = self.v_net(s)
        lv = expectile_loss(q_sa - v, cfg.expectile)
        lq = q_loss(self.q_net, a, s, r + cfg.gamma * (1.0 - d) * v_next)
        self.critic_opt.zero_grad(set_to_none=True)
        (lv + lq).backward()
        self.critic_opt.step()
        adv = q_sa - v.detach()
        la = awr_loss(self.actor(s, a), adv, cfg.temperature, cfg.max_weight)
        self.actor_opt.zero_grad(set_to_none=True)
        la.backward()
        self.actor_opt.step()
        self.sched.step()
        polyak(agent.q_target, agent.q, cfg.tau)
        return lv, lq, la, adv.mean()

    # checkpointed as one optimizer state: the critic's and the actor's (with its schedule) side by side
    def state_dict(self):
        return {"critic": self.critic_opt.state_dict(), "actor": self.actor_opt.state_dict(),
                "lr_scheduler": self.sched.state_dict()}

    def load_state_dict(self, sd):
        self.critic_opt.load_state_dict(sd["critic"])
        self.actor_opt.load_state_dict(sd["actor"])
        self.sched.load_state_dict(sd["lr_scheduler"])


LOSSES = ("v_loss", "q_loss", "actor_loss", "adv_mean")


def train_iql(cfg: IQLConfig, data: Transitions, *, seed: int = 0, ckpt_path: Path | None = None,
              callback: Callback | None = None, parallel: Parallel = SINGLE) -> IQLAgent:
    """Offline IQL on the transitions (rewards preprocessed by cfg.reward)."""
    if cfg.reward is None:
        raise ValueError("iql.reward is not set (None means the task's rule, which only a study resolves)")
    data = preprocess_rewards(data, cfg.reward)
    device = data.obs.device
    agent = IQLAgent(cfg, data.state_dim, data.action_dim, seed).to(device)
    learner = IQLLearner(cfg, agent, cfg.steps, cfg.actor_lr_schedule, parallel)
    local_bs = parallel.local_batch(cfg.batch_size, "iql.batch_size")
    meta = {"kind": "iql", "config": to_dict(cfg), "seed": seed, "state_dim": data.state_dim,
            "action_dim": data.action_dim}
    gen, start, snapshot, cpu = _resume("iql", ckpt_path, meta, {"agent": agent}, learner, seed, device, parallel)

    loop = Loop("iql", cfg.steps, LOSSES, device, cfg.log_every, cfg.ckpt_every, ckpt_path, snapshot, callback, start, cpu)
    n = len(data)
    for _ in range(start, cfg.steps):
        idx = torch.randint(n, (local_bs,), device=device, generator=gen)
        losses = learner.update(data.obs[idx], data.actions[idx], data.rewards[idx], data.next_obs[idx],
                                data.terminals[idx])
        for i, x in enumerate(losses):
            loop.record(i, x)
        loop.end_step()
    return agent.eval()


def load_iql(path_or_ck) -> IQLAgent:
    ck = path_or_ck if isinstance(path_or_ck, dict) else checkpoint.load(path_or_ck)
    agent = IQLAgent(from_dict(IQLConfig, ck["config"]), ck["state_dim"], ck["action_dim"])
    agent.load_state_dict(ck["agent"])
    return agent.eval()
