"""QGPO stages: behaviour model → support actions → critic (twin Q + energy model) → guided policy.

Each stage is a function of its config and its inputs that returns its artifact (modules / tensors) and,
given a checkpoint path, writes a torch.load(weights_only=True)-safe checkpoint that carries the config,
resuming from it when it already exists. Nothing here knows about Ray, MLflow or dataset files."""
from __future__ import annotations

import copy
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import checkpoint
from .config import BehaviorConfig, CriticConfig, QGPOConfig, SolverConfig, SupportConfig, from_dict, to_dict
from .critic import in_support_target, polyak, q_loss
from .data import Transitions, preprocess_rewards
from .diffusion import VPSchedule, denoising_loss
from .guidance import Guidance, check_method, energy_loss, guided_sample, make_guidance
from .loop import Callback, Loop, resume_state
from .nets import EnergyNet, ScoreNet, TwinQ
from .solver import make_plan

log = logging.getLogger("cepdist")


@dataclass
class Parallel:
    """Data parallelism as the stages see it: this worker's rank, the number of workers, and a wrapper
    that makes a module synchronise its gradients (DDP). The global batch is split across workers."""
    rank: int = 0
    world_size: int = 1
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = staticmethod(lambda m: m)

    def local_batch(self, batch_size: int, what: str) -> int:
        if batch_size % self.world_size:
            raise ValueError(f"{what}={batch_size} is not divisible by the {self.world_size} workers")
        return batch_size // self.world_size


SINGLE = Parallel()


def seed_generator(seed: int, stage: str, device, rank: int = 0) -> torch.Generator:
    """A generator per (seed, stage, worker rank): independent, reproducible streams."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + sum(map(ord, stage)) * 7919 + rank * 104_729) % (2**63))
    return g


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return nullcontext()


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one op for all parameters; CPU and CUDA in current torch)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def plan_for(schedule: VPSchedule, cfg: SolverConfig):
    return make_plan(schedule, cfg.steps, cfg.order, cfg.method, cfg.spacing)


# ---------------------------------------------------------------- behaviour model
def build_behavior(cfg: BehaviorConfig, state_dim: int, action_dim: int, seed: int = 0) -> ScoreNet:
    torch.manual_seed(seed)
    return ScoreNet(action_dim, state_dim, cfg.widths, cfg.embed_dim)


def train_behavior(cfg: BehaviorConfig, obs: torch.Tensor | None, actions: torch.Tensor, *, seed: int = 0,
                   schedule: VPSchedule | None = None, ckpt_path: Path | None = None,
                   callback: Callback | None = None, parallel: Parallel = SINGLE) -> ScoreNet:
    """Fit εθ(a_t, s, t) to the dataset's actions (or unconditional points when obs is None).

    With `parallel`, each worker draws batch_size/world_size rows from its own stream and the wrapped
    model averages gradients, so the global batch is the same for any number of workers."""
    schedule = schedule or VPSchedule()
    device = actions.device
    state_dim = 0 if obs is None else obs.shape[1]
    local_bs = parallel.local_batch(cfg.batch_size, "behavior.batch_size")
    model = build_behavior(cfg, state_dim, actions.shape[1], seed).to(device)
    opt = adam(model.parameters(), cfg.lr)
    meta = {"kind": "behavior", "config": to_dict(cfg), "seed": seed,
            "state_dim": state_dim, "action_dim": actions.shape[1]}
    gen = seed_generator(seed, "behavior", device, parallel.rank)
    start = 0
    ck = resume_state(ckpt_path, meta["config"])
    if ck is not None:
        model.load_state_dict(ck["model"]); opt.load_state_dict(ck["optimizer"])
        if parallel.rank == 0:
            gen.set_state(ck["rng"])
        else:                         # other ranks: a fresh stream for the remaining steps
            gen = seed_generator(seed + ck["step"], "behavior", device, parallel.rank)
        start = ck["step"]
        log.info("behavior: resuming from %s at step %d", ckpt_path, start)
    net = parallel.wrap(model)

    def snapshot(step):
        return {**meta, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": gen.get_state()}

    loop = Loop("behavior", cfg.steps, ("loss",), device, cfg.log_every, cfg.ckpt_every, ckpt_path,
                snapshot, callback, start)
    n = actions.shape[0]
    amp = _autocast(cfg.precision, device)
    model.train()
    for _ in range(start, cfg.steps):
        idx = torch.randint(n, (local_bs,), device=device, generator=gen)
        with amp:
            loss = denoising_loss(net, actions[idx], None if obs is None else obs[idx], schedule, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loop.record(0, loss)
        loop.end_step()
    model.eval()
    return model


def load_behavior(path_or_ck) -> ScoreNet:
    """A behaviour model from a checkpoint file or its loaded dict."""
    ck = path_or_ck if isinstance(path_or_ck, dict) else checkpoint.load(path_or_ck)
    model = build_behavior(from_dict(BehaviorConfig, ck["config"]), ck["state_dim"], ck["action_dim"])
    model.load_state_dict(ck["model"])
    return model.eval()


# ---------------------------------------------------------------- support actions
@dataclass
class SupportSet:
    """M behaviour samples for every distinct state. obs_index / next_index map transitions to rows."""
    actions: torch.Tensor      # [U, M, a_dim]
    obs_index: torch.Tensor    # [N] long
    next_index: torch.Tensor   # [N] long

    def at_obs(self, idx):
        return self.actions[self.obs_index[idx]]

    def at_next(self, idx):
        return self.actions[self.next_index[idx]]


def state_table(data: Transitions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct states to sample at: every obs, plus each next_obs that is not the following obs.

    Sampling s'_i once as s_{i+1} (same state, same distribution) halves the reference's 2·N·M cost."""
    n = len(data)
    same = torch.zeros(n, dtype=torch.bool, device=data.obs.device)
    if n > 1:
        same[:-1] = (data.next_obs[:-1] == data.obs[1:]).all(-1)
    extra = (~same).nonzero().squeeze(-1)
    table = torch.cat([data.obs, data.next_obs[extra]])
    next_index = torch.arange(1, n + 1, device=data.obs.device)
    next_index[extra] = n + torch.arange(len(extra), device=data.obs.device)
    return table, torch.arange(n, device=data.obs.device), next_index


def generate_support(cfg: SupportConfig, behavior: ScoreNet, data: Transitions, *, seed: int = 0,
                     schedule: VPSchedule | None = None, ckpt_path: Path | None = None) -> SupportSet:
    """M unguided behaviour samples per state (DPM-Solver++, the evaluation solver), drawn once."""
    schedule = schedule or VPSchedule()
    meta_cfg = to_dict(cfg)
    if ckpt_path is not None and Path(ckpt_path).is_file():
        ck = resume_state(ckpt_path, meta_cfg)
        return SupportSet(ck["actions"].to(data.obs.device), ck["obs_index"].to(data.obs.device),
                          ck["next_index"].to(data.obs.device))
    table, obs_index, next_index = state_table(data)
    plan = plan_for(schedule, cfg.solver)
    gen = seed_generator(seed, "support", data.obs.device)
    out = torch.empty(table.shape[0], cfg.M, behavior.action_dim, device=data.obs.device)
    t0, last = time.perf_counter(), time.perf_counter()
    for i in range(0, table.shape[0], cfg.batch_states):
        out[i:i + cfg.batch_states] = guided_sample(behavior, plan, table[i:i + cfg.batch_states], cfg.M,
                                                    generator=gen)
        if time.perf_counter() - last > 10 or i + cfg.batch_states >= table.shape[0]:
            done = min(i + cfg.batch_states, table.shape[0])
            rate = done * cfg.M / (time.perf_counter() - t0)
            log.info("support %d/%d states | %.0f samples/s, ETA %.0fs", done, table.shape[0], rate,
                     (table.shape[0] - done) * cfg.M / rate)
            last = time.perf_counter()
    sup = SupportSet(out, obs_index, next_index)
    if ckpt_path is not None:
        checkpoint.save(ckpt_path, kind="support", config=meta_cfg, seed=seed, actions=out.cpu(),
                        obs_index=obs_index.cpu(), next_index=next_index.cpu())
    return sup


# ---------------------------------------------------------------- critic
@dataclass
class Critic:
    q: TwinQ
    q_target: TwinQ
    energy: EnergyNet | None       # None for the dps method
    beta: float


def build_critic(cfg: CriticConfig, state_dim: int, action_dim: int, seed: int = 0) -> Critic:
    torch.manual_seed(seed + 1)
    q = TwinQ(action_dim, state_dim, cfg.q_hidden)
    energy = EnergyNet(action_dim, state_dim, cfg.f_hidden) if cfg.method != "dps" else None
    return Critic(q, copy.deepcopy(q).requires_grad_(False), energy, cfg.beta)


def train_critic(cfg: CriticConfig, data: Transitions, support: SupportSet, *, seed: int = 0,
                 schedule: VPSchedule | None = None, ckpt_path: Path | None = None,
                 callback: Callback | None = None, parallel: Parallel = SINGLE) -> Critic:
    """Interleaved in-support softmax Q-learning (first steps·q_fraction iterations) and fφ training on
    labels β·Q̄ over each state's support set (continuing on the frozen target Q afterwards)."""
    check_method(cfg.method)
    schedule = schedule or VPSchedule()
    device = data.obs.device
    critic = build_critic(cfg, data.state_dim, data.action_dim, seed)
    critic.q.to(device); critic.q_target.to(device)
    opt_q = adam(critic.q.parameters(), cfg.lr_q)
    opt_f = None
    if critic.energy is not None:
        critic.energy.to(device)
        opt_f = adam(critic.energy.parameters(), cfg.lr_f)
    local_bs = parallel.local_batch(cfg.batch_size, "critic.batch_size")
    gen = seed_generator(seed, "critic", device, parallel.rank)
    meta = {"kind": "critic", "config": to_dict(cfg), "seed": seed, "state_dim": data.state_dim,
            "action_dim": data.action_dim}
    start = 0
    ck = resume_state(ckpt_path, meta["config"])
    if ck is not None:
        critic.q.load_state_dict(ck["q"]); critic.q_target.load_state_dict(ck["q_target"])
        opt_q.load_state_dict(ck["opt_q"])
        if opt_f is not None:
            critic.energy.load_state_dict(ck["energy"]); opt_f.load_state_dict(ck["opt_f"])
        if parallel.rank == 0:
            gen.set_state(ck["rng"])
        else:
            gen = seed_generator(seed + ck["step"], "critic", device, parallel.rank)
        start = ck["step"]
        log.info("critic: resuming from %s at step %d", ckpt_path, start)
    q_net = parallel.wrap(critic.q)
    f_net = parallel.wrap(critic.energy) if critic.energy is not None else None

    def snapshot(step):
        d = {**meta, "step": step, "q": critic.q.state_dict(), "q_target": critic.q_target.state_dict(),
             "opt_q": opt_q.state_dict(), "rng": gen.get_state()}
        if opt_f is not None:
            d.update(energy=critic.energy.state_dict(), opt_f=opt_f.state_dict())
        return d

    names = ("q_loss", "f_loss", "q_mean", "q_std", "target_mean")
    loop = Loop("critic", cfg.steps, names, device, cfg.log_every, cfg.ckpt_every, ckpt_path, snapshot,
                callback, start)
    n, q_steps, beta_q = len(data), cfg.q_steps, cfg.beta_q
    for it in range(start, cfg.steps):
        idx = torch.randint(n, (local_bs,), device=device, generator=gen)
        s = data.obs[idx]
        if it < q_steps:
            y = in_support_target(critic.q_target, support.at_next(idx), data.next_obs[idx], data.rewards[idx],
                                  data.terminals[idx], cfg.gamma, beta_q)
            lq = q_loss(q_net, data.actions[idx], s, y)
            opt_q.zero_grad(set_to_none=True)
            lq.backward()
            opt_q.step()
            polyak(critic.q_target, critic.q, cfg.tau)
            loop.record(0, lq)
            loop.record(4, y.mean())
        if opt_f is not None:
            sup = support.at_obs(idx)
            with torch.no_grad():
                qs = critic.q_target.min(sup, s)                   # labels from the target Q̄
            lf = energy_loss(cfg.method, f_net, sup, s, cfg.beta * qs, schedule, gen)
            opt_f.zero_grad(set_to_none=True)
            lf.backward()
            opt_f.step()
            loop.record(1, lf)
            loop.record(2, qs.mean())
            loop.record(3, qs.std())
        loop.end_step()
    return critic


def load_critic(path_or_ck) -> Critic:
    """A critic from a checkpoint file or its loaded dict."""
    ck = path_or_ck if isinstance(path_or_ck, dict) else checkpoint.load(path_or_ck)
    cfg = from_dict(CriticConfig, ck["config"])
    critic = build_critic(cfg, ck["state_dim"], ck["action_dim"])
    critic.q.load_state_dict(ck["q"]); critic.q_target.load_state_dict(ck["q_target"])
    if critic.energy is not None:
        critic.energy.load_state_dict(ck["energy"])
    return critic


# ---------------------------------------------------------------- guided policy
class GuidedPolicy:
    """state batch → actions, for any guidance scale w (a float, or one per state) and solver settings."""

    def __init__(self, behavior: ScoreNet, critic: Critic | None, method: str = "cep",
                 solver: SolverConfig | None = None, schedule: VPSchedule | None = None, seed: int = 0):
        self.behavior = behavior.eval()
        self.schedule = schedule or VPSchedule()
        self.solver = solver or SolverConfig()
        self.method = check_method(method)
        self.guidance: Guidance | None = None
        if critic is not None:
            q = critic.q_target
            beta = critic.beta
            self.guidance = make_guidance(method, critic.energy,
                                          value=lambda a, s: beta * q.min(a, s))
        self.device = next(behavior.parameters()).device
        self.generator = seed_generator(seed, "policy", self.device)
        self._plans = {}

    def plan(self, solver: SolverConfig):
        key = (solver.steps, solver.order, solver.method, solver.spacing)
        if key not in self._plans:
            self._plans[key] = plan_for(self.schedule, solver)
        return self._plans[key]

    def __call__(self, states, w=1.0, n: int = 1, solver: SolverConfig | None = None,
                 x_init: torch.Tensor | None = None) -> torch.Tensor:
        states = torch.as_tensor(np.asarray(states) if not torch.is_tensor(states) else states,
                                 dtype=torch.float32, device=self.device)
        if torch.is_tensor(w) or isinstance(w, (list, tuple, np.ndarray)):
            w = torch.as_tensor(w, dtype=torch.float32, device=self.device).view(-1, 1, 1)
            if self.guidance is None and not bool((w == 0).all()):
                raise ValueError("guidance scale w ≠ 0 needs a critic")
            w = 0.0 if self.guidance is None else w      # a behaviour-only policy: per-state zeros
        elif w != 0 and self.guidance is None:
            raise ValueError("guidance scale w ≠ 0 needs a critic")
        a = guided_sample(self.behavior, self.plan(solver or self.solver), states, n, self.guidance, w,
                          generator=self.generator, x_init=x_init)
        return a[:, 0] if n == 1 else a


# ---------------------------------------------------------------- the whole pipeline
def run_qgpo(cfg: QGPOConfig, data: Transitions, out_dir: Path | None = None,
             callback: Callback | None = None) -> GuidedPolicy:
    """All stages in order on one process; with out_dir, every stage checkpoints there and resumes."""
    data = preprocess_rewards(data, cfg.reward)
    schedule = VPSchedule(cfg.beta_min, cfg.beta_max)
    path = (lambda name: Path(out_dir) / name) if out_dir is not None else (lambda name: None)
    behavior = train_behavior(cfg.behavior, data.obs, data.actions, seed=cfg.seed, schedule=schedule,
                              ckpt_path=path("behavior.pt"), callback=callback)
    support = generate_support(cfg.support, behavior, data, seed=cfg.seed, schedule=schedule,
                               ckpt_path=path("support.pt"))
    critic = train_critic(cfg.critic, data, support, seed=cfg.seed, schedule=schedule,
                          ckpt_path=path("critic.pt"), callback=callback)
    return GuidedPolicy(behavior, critic, cfg.critic.method, cfg.sampler, schedule, cfg.seed)
