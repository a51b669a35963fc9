"""QGPO's stages: behaviour model → support actions → Q → energy model. The guided policy is in policy.py.

Each stage is a function of its config and its inputs that returns its artifact and, given a checkpoint
path, writes a torch.load(weights_only=True)-safe checkpoint carrying its config, resuming from it when it
already exists. `run_qgpo` (one process) and the Ray trials call these same functions with the same
configs; the noise schedule travels with the behaviour model (its config and checkpoint), the reward rule
with Q's config. Nothing here knows about Ray, MLflow or dataset files.

Q is trained once per (support set, reward rule, Q settings) and the energy model afterwards on the frozen
final Q̄. The reference interleaves the two in one 1M-iteration loop (Q for the first 500k); there fφ's
second half already trains on a frozen Q, and its first half fits labels from a Q that is still moving and
is discarded. Splitting them gives every energy model (any β, method or size) the same converged labels
and lets one Q serve a whole β × method sweep."""
from __future__ import annotations

import copy
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...config import from_dict, to_dict
from ...core.diffusion import VPSchedule, denoising_loss
from ...core import analytic
from ...core.guidance import ENERGY_METHODS, energy_loss, guided_sample
from ...core.nets import EnergyNet, ScoreNet, TwinQ, TwinQEnsemble
from ...core.qlearning import in_support_target, polyak, q_loss
from ...core.solver import make_plan
from ...data.transitions import Transitions, preprocess_rewards
from .. import checkpoint
from ..loop import Callback, Loop, resume_state
from .config import BehaviorConfig, EnergyConfig, QConfig, ScheduleConfig, SolverConfig, SupportConfig

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


def native_bf16_cpu() -> bool | None:
    """Whether this CPU does bf16 matmuls natively (AVX-512 BF16 or AMX); None where /proc/cpuinfo is missing.
    Without them torch emulates bf16 and autocast runs 20–40× slower than fp32 (README, benchmarks/core.py)."""
    try:
        flags = next((l.split(":", 1)[1].split() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("flags")), [])
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast(precision: str, device: torch.device, key: str):
    """The context a training update runs in: bf16 autocast (fp32 master weights) or none."""
    if precision == "bf16":
        if device.type == "cpu" and native_bf16_cpu() is False:
            log.warning("%s: bf16 on a CPU without AVX-512 BF16 or AMX is emulated, 20–40× slower than fp32; "
                        "set %s: fp32 on this machine (its results get their own stage key)", key, key)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"{key} must be 'fp32' or 'bf16', got {precision!r}")
    return nullcontext()


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one op for all parameters; CPU and CUDA in current torch)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def lr_scheduler(opt: torch.optim.Optimizer, kind: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """constant, or cosine decay from the configured rate to 0 at the last step; its state is checkpointed
    with the optimizer's (a resumed run continues the same curve)."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {kind!r}")


def make_schedule(cfg: ScheduleConfig) -> VPSchedule:
    return VPSchedule(cfg.beta_min, cfg.beta_max)


def plan_for(schedule: VPSchedule, cfg: SolverConfig):
    return make_plan(schedule, cfg.steps, cfg.order, cfg.method, cfg.spacing, grid=cfg.grid, update=cfg.update)


def _resume(stage: str, ckpt_path: Path | None, meta: dict, modules: dict[str, torch.nn.Module], opt,
            seed: int, device, parallel: Parallel, sched=None
            ) -> tuple[torch.Generator, int, Callable[[int], dict], float]:
    """The stage's random stream and first step — restored from its checkpoint when one exists (rank 0
    continues its stream; other ranks draw a fresh one for the remaining steps) —, its snapshot function and
    the CPU seconds already spent on it (the Loop's `cpu_before`)."""
    gen, start, cpu = seed_generator(seed, stage, device, parallel.rank), 0, 0.0
    ck = resume_state(ckpt_path, meta["config"])
    if ck is not None:
        for name, m in modules.items():
            m.load_state_dict(ck[name])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None:
            sched.load_state_dict(ck["lr_scheduler"])
        start, cpu = ck["step"], float(ck.get("cpu_seconds", 0.0))
        if parallel.rank == 0:
            gen.set_state(ck["rng"])
        else:
            gen = seed_generator(seed + start, stage, device, parallel.rank)
        log.info("%s: resuming from %s at step %d", stage, ckpt_path, start)

    def snapshot(step):
        return {**meta, "step": step, **{n: m.state_dict() for n, m in modules.items()},
                "optimizer": opt.state_dict(), "rng": gen.get_state(),
                **({} if sched is None else {"lr_scheduler": sched.state_dict()})}
    return gen, start, snapshot, cpu


# ---------------------------------------------------------------- behaviour model
def build_behavior(cfg: BehaviorConfig, state_dim: int, action_dim: int, seed: int = 0) -> ScoreNet:
    """The score network with its noise schedule attached (`.schedule`): everything downstream that
    noises or samples actions uses the schedule the behaviour model was trained under."""
    torch.manual_seed(seed)
    net = ScoreNet(action_dim, state_dim, cfg.widths, cfg.embed_dim)
    net.schedule = make_schedule(cfg.schedule)
    return net


def train_behavior(cfg: BehaviorConfig, obs: torch.Tensor | None, actions: torch.Tensor, *, seed: int = 0,
                   ckpt_path: Path | None = None, callback: Callback | None = None,
                   parallel: Parallel = SINGLE, init: ScoreNet | None = None) -> ScoreNet:
    """Fit εθ(a_t, s, t) to the dataset's actions (or unconditional points when obs is None); `init`: start
    from these weights (a warm start) instead of a fresh initialisation.

    With `parallel`, each worker draws batch_size/world_size rows from its own stream and the wrapped
    model averages gradients, so the global batch is the same for any number of workers."""
    device = actions.device
    state_dim = 0 if obs is None else obs.shape[1]
    norm = state_norm(obs) if cfg.obs_norm and obs is not None else None
    if norm is not None:
        obs = (obs - norm["mean"].to(obs)) / norm["std"].to(obs)
    local_bs = parallel.local_batch(cfg.batch_size, "behavior.batch_size")
    model = build_behavior(cfg, state_dim, actions.shape[1], seed).to(device)
    if init is not None:
        model.load_state_dict(init.state_dict())
        if norm is not None:            # init takes raw states (folded): unfold it to train on standardised ones
            model.embed.fold_state_norm(-norm["mean"] / norm["std"], 1 / norm["std"])
    schedule = model.schedule
    opt = adam(model.parameters(), cfg.lr)
    sched = lr_scheduler(opt, cfg.lr_schedule, cfg.steps)
    # the moving average samples; it starts as a copy and its decay warms up as min(ema, (1+i)/(10+i)) so
    # that short runs are not dominated by the initial weights
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None
    meta = {"kind": "behavior", "config": to_dict(cfg), "seed": seed,
            "state_dim": state_dim, "action_dim": actions.shape[1], **({} if norm is None else {"obs_norm": norm})}
    modules = {"model": model, **({"ema": ema} if ema is not None else {})}
    gen, start, snapshot, cpu = _resume("behavior", ckpt_path, meta, modules, opt, seed, device, parallel, sched)
    net = parallel.wrap(model)

    loop = Loop("behavior", cfg.steps, ("loss",), device, cfg.log_every, cfg.ckpt_every, ckpt_path,
                snapshot, callback, start, cpu)
    n = actions.shape[0]
    amp = _autocast(cfg.precision, device, "behavior.precision")
    model.train()
    for _ in range(start, cfg.steps):
        idx = torch.randint(n, (local_bs,), device=device, generator=gen)
        with amp:
            loss = denoising_loss(net, actions[idx], None if obs is None else obs[idx], schedule, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            i = loop.step
            polyak(ema, model, 1.0 - min(cfg.ema, (1 + i) / (10 + i)))
        loop.record(0, loss)
        loop.end_step()
    out = model if ema is None else ema
    if norm is not None:
        out.embed.fold_state_norm(norm["mean"], norm["std"])
    out.schedule = schedule
    return out.eval()


def state_norm(obs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-dimension mean and standard deviation of the states (on CPU, in float64 so that every worker and
    device gets the same numbers); a constant dimension keeps scale 1 instead of dividing by zero."""
    o = obs.detach().to("cpu", torch.float64)
    std = o.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return {"mean": o.mean(0).float(), "std": std.float()}


def _load(path_or_ck) -> dict:
    return path_or_ck if isinstance(path_or_ck, dict) else checkpoint.load(path_or_ck)


def load_behavior(path_or_ck) -> ScoreNet:
    """A behaviour model (with its schedule) from a checkpoint file or its loaded dict: its moving average
    of the weights when it kept one."""
    ck = _load(path_or_ck)
    model = build_behavior(from_dict(BehaviorConfig, ck["config"]), ck["state_dim"], ck["action_dim"])
    model.load_state_dict(ck["ema"] if "ema" in ck else ck["model"])      # the weights that sample
    if "obs_norm" in ck:                                                   # trained on standardised states
        model.embed.fold_state_norm(ck["obs_norm"]["mean"], ck["obs_norm"]["std"])
    return model.eval()


# ---------------------------------------------------------------- support actions
@dataclass
class SupportSet:
    """K behaviour samples for every distinct state. obs_index / next_index map transitions to rows."""
    actions: torch.Tensor      # [U, K, a_dim]
    obs_index: torch.Tensor    # [N] long
    next_index: torch.Tensor   # [N] long

    def at_obs(self, idx):
        return self.actions[self.obs_index[idx]]

    def at_next(self, idx):
        return self.actions[self.next_index[idx]]

    def to(self, device) -> "SupportSet":
        return SupportSet(self.actions.to(device), self.obs_index.to(device), self.next_index.to(device))


def state_table(data: Transitions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct states to sample at: every obs, plus each next_obs that is not the following obs.

    Sampling s'_i once as s_{i+1} (same state, same distribution) halves the reference's 2·N·K cost."""
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
                     ckpt_path: Path | None = None) -> SupportSet:
    """K unguided behaviour samples per state (DPM-Solver++ under the behaviour's schedule), drawn once."""
    if cfg.K is None:
        raise ValueError("support.K is not set (None means the task's default, which only a study resolves)")
    meta_cfg = to_dict(cfg)
    device = data.obs.device
    if ckpt_path is not None and Path(ckpt_path).is_file():
        return load_support(resume_state(ckpt_path, meta_cfg)).to(device)
    table, obs_index, next_index = state_table(data)
    plan = plan_for(behavior.schedule, cfg.solver)
    gen = seed_generator(seed, "support", device)
    out = torch.empty(table.shape[0], cfg.K, behavior.action_dim, device=device)
    t0, last = time.perf_counter(), time.perf_counter()
    for i in range(0, table.shape[0], cfg.batch_states):
        out[i:i + cfg.batch_states] = guided_sample(behavior, plan, table[i:i + cfg.batch_states], cfg.K,
                                                    generator=gen)
        if time.perf_counter() - last > 10 or i + cfg.batch_states >= table.shape[0]:
            done = min(i + cfg.batch_states, table.shape[0])
            rate = done * cfg.K / (time.perf_counter() - t0)
            log.info("support %d/%d states | %.0f samples/s, ETA %.0fs", done, table.shape[0], rate,
                     (table.shape[0] - done) * cfg.K / rate)
            last = time.perf_counter()
    sup = SupportSet(out, obs_index, next_index)
    if ckpt_path is not None:
        checkpoint.save(ckpt_path, kind="support", config=meta_cfg, seed=seed, actions=out.cpu(),
                        obs_index=obs_index.cpu(), next_index=next_index.cpu(),
                        schedule=[behavior.schedule.beta_min, behavior.schedule.beta_max])
    return sup


def load_support(path_or_ck) -> SupportSet:
    ck = _load(path_or_ck)
    return SupportSet(ck["actions"], ck["obs_index"], ck["next_index"])


# ---------------------------------------------------------------- Q (in-support softmax Q-learning)
def build_q(cfg: QConfig, state_dim: int, action_dim: int, seed: int = 0) -> tuple[TwinQ, TwinQ]:
    torch.manual_seed(seed + 1)
    q = (TwinQ(action_dim, state_dim, cfg.hidden) if cfg.members == 1
         else TwinQEnsemble(action_dim, state_dim, cfg.hidden, cfg.members))
    return q, copy.deepcopy(q).requires_grad_(False)


def train_q(cfg: QConfig, data: Transitions, support: SupportSet, *, seed: int = 0,
            ckpt_path: Path | None = None, callback: Callback | None = None,
            parallel: Parallel = SINGLE) -> TwinQ:
    """Twin Q on y = r + γ(1 − d)·Σ softmax(βQ·Q̄(s', â'))·Q̄(s', â') over the support actions at s', with
    rewards preprocessed by cfg.reward (cfg.members twins, each on its own target). Returns the target network
    Q̄ (what the energy model and DPS use; with members > 1 its value is the min over them all)."""
    if cfg.reward is None:
        raise ValueError("q.reward is not set (None means the task's rule, which only a study resolves)")
    data = preprocess_rewards(data, cfg.reward)
    device = data.obs.device
    q, q_target = (m.to(device) for m in build_q(cfg, data.state_dim, data.action_dim, seed))
    opt = adam(q.parameters(), cfg.lr)
    local_bs = parallel.local_batch(cfg.batch_size, "q.batch_size")
    meta = {"kind": "q", "config": to_dict(cfg), "seed": seed, "state_dim": data.state_dim,
            "action_dim": data.action_dim}
    gen, start, snapshot, cpu = _resume("q", ckpt_path, meta, {"q": q, "q_target": q_target}, opt, seed, device,
                                        parallel)
    q_net = parallel.wrap(q)

    loop = Loop("q", cfg.steps, ("q_loss", "target_mean"), device, cfg.log_every, cfg.ckpt_every,
                ckpt_path, snapshot, callback, start, cpu)
    n = len(data)
    amp = _autocast(cfg.precision, device, "q.precision")
    for _ in range(start, cfg.steps):
        idx = torch.randint(n, (local_bs,), device=device, generator=gen)
        with amp:
            y = in_support_target(q_target, support.at_next(idx), data.next_obs[idx], data.rewards[idx],
                                  data.terminals[idx], cfg.gamma, cfg.beta_q)
            lq = q_loss(q_net, data.actions[idx], data.obs[idx], y)
        opt.zero_grad(set_to_none=True)
        lq.backward()
        opt.step()
        polyak(q_target, q, cfg.tau)
        loop.record(0, lq)
        loop.record(1, y.mean())
        loop.end_step()
    return q_target


def load_q(path_or_ck) -> TwinQ:
    """The target twin Q̄ from a Q checkpoint file or its loaded dict."""
    ck = _load(path_or_ck)
    _, q_target = build_q(from_dict(QConfig, ck["config"]), ck["state_dim"], ck["action_dim"])
    q_target.load_state_dict(ck["q_target"])
    return q_target


# ---------------------------------------------------------------- energy model fφ
def build_energy(cfg: EnergyConfig, state_dim: int, action_dim: int, seed: int = 0) -> EnergyNet:
    torch.manual_seed(seed + 2)
    return EnergyNet(action_dim, state_dim, cfg.hidden)


def iso_table(behavior: ScoreNet, data: Transitions, seed: int = 0, rows: int = 4096):
    """AEPO's isotropic posterior-variance factor 1 − E‖εθ‖²/d per t, from `rows` dataset transitions."""
    gen = seed_generator(seed, "iso_table", data.obs.device)
    idx = torch.randint(len(data), (min(rows, len(data)),), device=data.obs.device, generator=gen)
    s = data.obs[idx]
    return analytic.isotropic_table(lambda x, t: -behavior(x, t, s), data.actions[idx], behavior.schedule,
                                    generator=gen)


def max_variance(actions: torch.Tensor) -> float:
    """The largest variance of the data's actions along any direction: the cap on AEPO's (and DPS's)
    posterior covariance (core/analytic.py `posterior`)."""
    return float(torch.linalg.eigvalsh(torch.cov(actions.reshape(-1, actions.shape[-1]).T.double())).max())


def aepo_target(cfg: EnergyConfig, behavior: ScoreNet, q: TwinQ, s: torch.Tensor, max_var: float, bounds: tuple,
                table=None):
    """(a_t [G, K, d], t [G, 1]) → Êt(s, a_t) [G, K]: AEPO's regression target for states s [G, s_dim],
    clipped to `bounds` (β·Q̄'s range on the batch's clean actions)."""
    schedule = behavior.schedule

    def target(at, t):
        alpha, sigma = schedule.alpha(t)[..., None], schedule.sigma(t)[..., None]     # [G, 1, 1]
        iso = analytic.interpolate(table, t)[..., None] if cfg.covariance == "isotropic" else None
        E, _ = analytic.log_expectation(lambda x: -behavior(x, t, s[:, None, :]), lambda a, ss: cfg.beta * q.min(a, ss),
                                        at, s, alpha, sigma, cfg.covariance, cfg.order, iso, max_var, bounds)
        return E
    return target


def train_energy(cfg: EnergyConfig, q: TwinQ, support: SupportSet, data: Transitions, schedule: VPSchedule, *,
                 behavior: ScoreNet | None = None, seed: int = 0, ckpt_path: Path | None = None,
                 callback: Callback | None = None, parallel: Parallel = SINGLE) -> EnergyNet:
    """fφ on the frozen Q̄ with t on [1e-3, 1] of the behaviour's schedule drawn as cfg.t_sampling says: cep
    on the K support actions of each state (one t per state, labels softmax β·Q̄), mse regressing β·Q̄(s, a0),
    aepo regressing AEPO's target Êt(s, a_t) (which needs the behaviour model); see EnergyConfig.actions for
    the clean actions."""
    if cfg.method not in ENERGY_METHODS:
        raise ValueError(f"energy.method {cfg.method!r} trains no energy model (it guides with β·Q̄ directly); "
                         f"the energy stage takes one of {', '.join(ENERGY_METHODS)}")
    if cfg.method == "aepo" and behavior is None:
        raise ValueError("energy.method 'aepo' needs the behaviour model (its target uses εθ's posterior)")
    device = data.obs.device
    energy = build_energy(cfg, data.state_dim, data.action_dim, seed).to(device)
    q = q.to(device).requires_grad_(False)
    if behavior is not None:
        behavior = behavior.to(device).requires_grad_(False)
    opt = adam(energy.parameters(), cfg.lr)
    sched = lr_scheduler(opt, cfg.lr_schedule, cfg.steps)
    local_bs = parallel.local_batch(cfg.batch_size, "energy.batch_size")
    config = {**to_dict(cfg), "schedule": [schedule.beta_min, schedule.beta_max]}
    meta = {"kind": "energy", "config": config, "seed": seed, "state_dim": data.state_dim,
            "action_dim": data.action_dim}
    gen, start, snapshot, cpu = _resume("energy", ckpt_path, meta, {"energy": energy}, opt, seed, device, parallel,
                                        sched)
    aepo = cfg.method == "aepo"
    table = iso_table(behavior, data, seed) if aepo and cfg.covariance == "isotropic" else None
    max_var = max_variance(data.actions) if aepo else None
    f_net = parallel.wrap(energy)
    amp = _autocast(cfg.precision, device, "energy.precision")
    on_support = cfg.train_actions() == "support"

    loop = Loop("energy", cfg.steps, ("energy_loss", "q_mean", "q_std"), device, cfg.log_every,
                cfg.ckpt_every, ckpt_path, snapshot, callback, start, cpu)
    n = len(data)
    for _ in range(start, cfg.steps):
        idx = torch.randint(n, (local_bs,), device=device, generator=gen)
        s = data.obs[idx]
        a0 = support.at_obs(idx) if on_support else data.actions[idx][:, None, :]      # [G, K or 1, d]
        with torch.no_grad():
            qs = q.min(a0, s)
        target = cfg.beta * qs
        if aepo:
            target = aepo_target(cfg, behavior, q, s, max_var, (target.min(), target.max()), table)
        with amp:
            lf = energy_loss(cfg.method, f_net, a0, s, target, schedule, gen, cfg.t_sampling)
        opt.zero_grad(set_to_none=True)
        lf.backward()
        opt.step()
        sched.step()
        loop.record(0, lf)
        loop.record(1, qs.mean())
        loop.record(2, qs.std())
        loop.end_step()
    energy.eval()
    return energy


def load_energy(path_or_ck) -> EnergyNet:
    ck = _load(path_or_ck)
    cfg = {k: v for k, v in ck["config"].items() if k != "schedule"}
    energy = build_energy(from_dict(EnergyConfig, cfg), ck["state_dim"], ck["action_dim"])
    energy.load_state_dict(ck["energy"])
    return energy.eval()
