"""The online phase: IQL fine-tuning from the offline agent, with or without EDIS.

Every environment step is taken with an action drawn from the current policy and stored; then
`updates_per_step` IQL updates follow. Batches:
- plain fine-tuning (`enabled: false`, the baseline): uniform over offline + online replay;
- EDIS: the same until the first refresh, then (1 − share) real online transitions and `share` generated ones.
A refresh (first at `start_after` online steps, then every `refresh_every`) continues training the transition
model on offline + online replay (warm start from the current model), rebuilds the energies' contrast sets
from the `recent` online transitions and the current policy, updates the energies (warm), and replaces the
generated buffer with `generated` guided transitions.

Checkpoints (every `ckpt_every` steps, and at the end) hold the agent, its optimizers, both buffers, the
energies, the random streams, the step, the evaluation history and the time spent per part; the
transition model of each refresh is checkpointed under its own folder. A resumed run starts a fresh
episode (the environment's state is not saved) and loses no online step already stored."""
from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...config import to_dict
from ...data.tasks import Task
from ...data.transitions import FIELDS, Transitions, reward_affine
from ...envs.environments import make_env
from .. import checkpoint
from ..iql import LOSSES, IQLAgent, IQLLearner
from ..loop import NonFiniteLossError, resume_state
from ..qgpo.stages import seed_generator
from .config import EDISConfig
from .energies import Energies, contrast_sets, train_energies
from .model import TransitionModel, load_transition_model, train_transition_model

log = logging.getLogger("cepdist")

# (online step, the agent) → metrics of an evaluation (e.g. {"score": …}); supplied by the caller
Evaluate = Callable[[int, IQLAgent], dict]


class Replay:
    """A preallocated buffer of transitions (raw rewards) that fills in order."""

    def __init__(self, capacity: int, s_dim: int, a_dim: int, device="cpu"):
        z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)
        self.data = Transitions(z(capacity, s_dim), z(capacity, a_dim), z(capacity), z(capacity, s_dim), z(capacity),
                                z(capacity, dtype=torch.bool))
        self.size = 0

    def add(self, obs, action, reward, next_obs, terminal: bool, end: bool):
        i = self.size
        for f, v in zip(FIELDS, (obs, action, reward, next_obs, float(terminal), end)):
            getattr(self.data, f)[i] = torch.as_tensor(v)
        self.size += 1

    def view(self, last: int | None = None) -> Transitions:
        lo = 0 if last is None else max(0, self.size - last)
        return self.data[lo:self.size]

    def state_dict(self) -> dict:
        return {"size": self.size, **{f: getattr(self.data, f)[:self.size].clone() for f in FIELDS}}

    def load_state_dict(self, sd: dict):
        self.size = sd["size"]
        for f in FIELDS:
            getattr(self.data, f)[:self.size] = sd[f]


def run_online(cfg: EDISConfig, task: Task, offline: Transitions, agent: IQLAgent,
               model: TransitionModel | None = None, *, evaluate: Evaluate | None = None,
               ckpt_dir: Path | None = None, max_steps: int | None = None) -> tuple[IQLAgent, list[dict]]:
    """Fine-tune a copy of `agent` online on `task` for cfg.online.steps environment steps (EDIS when
    cfg.enabled, with `model` the offline-trained transition model). Evaluates at step 0 and every
    eval_every steps; returns the agent and the evaluation history (one dict per evaluation, with the
    online step, the evaluation's metrics and the cumulative seconds of each part). max_steps: caps the
    environment's episode length (tests)."""
    if cfg.enabled and model is None:
        raise ValueError("EDIS (enabled: true) needs the offline transition model")
    o, e = cfg.online, cfg.energies
    device = offline.obs.device
    agent = copy.deepcopy(agent).train()
    learner = IQLLearner(cfg.iql, agent, o.steps * o.updates_per_step, "constant")
    scale, shift = reward_affine(offline, cfg.iql.reward)
    online = Replay(o.steps, offline.state_dim, offline.action_dim, device)
    generated: Transitions | None = None
    energies = Energies(e, offline.state_dim, offline.action_dim, offline.state_dim + 2, cfg.seed).to(device) \
        if cfg.enabled else None
    gen = seed_generator(cfg.seed, "online", device)
    rng = np.random.default_rng(cfg.seed)
    history: list[dict] = []
    seconds = {"env": 0.0, "update": 0.0, "model": 0.0, "energies": 0.0, "generate": 0.0, "evaluate": 0.0}
    step, refreshes = 0, 0
    meta = {"kind": "edis-online", "config": to_dict(cfg)}
    path = None if ckpt_dir is None else Path(ckpt_dir) / "online.pt"
    ck = resume_state(path, meta["config"])
    if ck is not None:
        agent.load_state_dict(ck["agent"])
        learner.load_state_dict(ck["optimizer"])
        online.load_state_dict(ck["online"])
        generated = Transitions(*(ck["generated"][f] for f in FIELDS)) if ck["generated"] else None
        if energies is not None:
            energies.load_state_dict(ck["energies"])
        gen.set_state(ck["rng"])
        rng = np.random.default_rng(ck["np_seed"])
        step, refreshes, history, seconds = ck["step"], ck["refreshes"], ck["history"], ck["seconds"]
        if refreshes:
            model = load_transition_model(cfg.model, Path(ckpt_dir) / f"refresh-{refreshes}")
        log.info("online: resuming from %s at step %d", path, step)

    def save():
        if path is None:
            return
        checkpoint.save(path, **meta, step=step, refreshes=refreshes, agent=agent.state_dict(),
                        optimizer=learner.state_dict(), online=online.state_dict(),
                        generated={f: getattr(generated, f) for f in FIELDS} if generated is not None else {},
                        energies=energies.state_dict() if energies is not None else {}, rng=gen.get_state(),
                        np_seed=int(rng.integers(2**62)), history=history, seconds=seconds)

    @contextmanager
    def timed(part):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds[part] += time.perf_counter() - t0

    def record_eval():
        if evaluate is None:
            return
        with timed("evaluate"):
            metrics = evaluate(step, agent.eval())
        agent.train()
        history.append({"online_step": step, **metrics, **{f"seconds_{k}": v for k, v in seconds.items()}})
        log.info("online %d/%d: %s", step, o.steps, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def refresh():
        nonlocal model, generated, refreshes
        k = refreshes + 1
        real = Transitions.cat([offline, online.view()])
        with timed("model"):
            model = train_transition_model(cfg.model, real, seed=cfg.seed * 1000 + k, init=model,
                                           steps=cfg.model.refresh_steps,
                                           ckpt_dir=None if ckpt_dir is None else Path(ckpt_dir) / f"refresh-{k}")
        with timed("energies"):
            sets = contrast_sets(model, online.view(o.recent), lambda s: agent.explore(s, gen), e.pool, e.negatives, gen)
            losses = train_energies(e, energies, sets, model.schedule, gen)
        with timed("generate"):
            generated = model.generate(o.generated, energies.requires_grad_(False).guidance(e.clip), e.weights, gen)
            energies.requires_grad_(True)
        refreshes = k
        log.info("online %d: refresh %d (%s)", step, k, " ".join(f"{n}={v:.3f}" for n, v in losses.items()))

    def batch() -> tuple[torch.Tensor, ...]:
        B = cfg.iql.batch_size
        if generated is None:       # plain fine-tuning, and EDIS before its first refresh
            n_off = len(offline)
            idx = torch.randint(n_off + online.size, (B,), generator=gen, device=device)
            parts = [offline[idx[idx < n_off]], online.data[idx[idx >= n_off] - n_off]]
        else:
            n_gen = int(round(o.generated_share * B))
            parts = [online.data[torch.randint(online.size, (B - n_gen,), generator=gen, device=device)],
                     generated[torch.randint(len(generated), (n_gen,), generator=gen, device=device)]]
        b = Transitions.cat(parts)
        return b.obs, b.actions, b.rewards * scale + shift, b.next_obs, b.terminals

    env = make_env(task, max_steps)
    obs = env.reset(seed=int(rng.integers(2**31)))[0]
    acc = torch.zeros(len(LOSSES), dtype=torch.float64)
    t_log = time.perf_counter()
    try:
        if step % o.eval_every == 0 and not (history and history[-1]["online_step"] == step):
            record_eval()       # step 0, or an evaluation the interruption cut short
        while step < o.steps:
            with timed("env"):
                s = torch.as_tensor(obs, dtype=torch.float32, device=device)
                a = agent.explore(s[None], gen)[0]
                nxt, r, term, trunc, _ = env.step(a.cpu().numpy())
                online.add(s, a, float(r), torch.as_tensor(nxt, dtype=torch.float32), term, term or trunc)
                obs = env.reset(seed=int(rng.integers(2**31)))[0] if (term or trunc) else nxt
            step += 1
            # refreshes due by this step (counted, so that a resumed run redoes one an interruption cut short)
            if cfg.enabled and step >= o.start_after and refreshes < 1 + (step - o.start_after) // o.refresh_every:
                refresh()
            with timed("update"):
                for _ in range(o.updates_per_step):
                    acc += torch.stack(learner.update(*batch())).detach().double().cpu()
            if step % o.eval_every == 0 or step == o.steps:
                record_eval()
            if step % o.ckpt_every == 0 or step == o.steps:
                losses = acc / max(1, o.updates_per_step * (step % o.ckpt_every or o.ckpt_every))
                if not torch.isfinite(losses).all():
                    raise NonFiniteLossError(f"online: non-finite IQL loss before step {step}")
                acc.zero_()
                rate = o.ckpt_every / max(time.perf_counter() - t_log, 1e-9)
                t_log = time.perf_counter()
                log.info("online %d/%d (%.0f%%) %s | %.1f steps/s, ETA %s", step, o.steps, 100 * step / o.steps,
                         " ".join(f"{n}={v:.4g}" for n, v in zip(LOSSES, losses.tolist())), rate,
                         f"{(o.steps - step) / max(rate, 1e-9) / 60:.1f}m")
                save()
    except NonFiniteLossError:
        raise
    except BaseException:       # an interruption or a failure: keep every online step taken so far
        save()
        raise
    finally:
        env.close()
    return agent.eval(), history
