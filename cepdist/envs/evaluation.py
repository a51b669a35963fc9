"""Policy evaluation in MuJoCo: every (guidance scale, episode) pair runs in lockstep in one process, and
the policy is called once per environment step for all of them together (scales as a per-state w).

Episode e of every scale starts from the same reset seed and draws the same sampler noise (common random
numbers: paired comparisons across w), from a stream of its own, so the result of a pair does not depend
on which other pairs share the batch (or the actor). Actions are clipped to the environment's bounds."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .environments import make_env
from ..data.tasks import Task

log = logging.getLogger("cepdist")


@dataclass
class EvalResult:
    scales: list[float]
    returns: np.ndarray                  # [n_scales, episodes]; NaN where a pair was not run here
    normalized: np.ndarray               # same shape, D4RL-normalised ×100
    env_steps: int = 0
    seconds: float = 0.0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def merge(self, other: "EvalResult") -> "EvalResult":
        take = ~np.isnan(other.returns)
        r, n, L = self.returns.copy(), self.normalized.copy(), self.lengths.copy()
        r[take], n[take], L[take] = other.returns[take], other.normalized[take], other.lengths[take]
        return EvalResult(self.scales, r, n, self.env_steps + other.env_steps, max(self.seconds, other.seconds), L)

    def summary(self) -> dict[str, float]:
        """Per scale: mean and standard error of the normalised score, mean raw return (tracker metrics)."""
        out = {}
        for w, row, raw in zip(self.scales, self.normalized, self.returns):
            out[f"score_w{w:g}"] = float(np.nanmean(row))
            out[f"score_w{w:g}_se"] = float(np.nanstd(row) / np.sqrt(max(np.sum(~np.isnan(row)), 1)))
            out[f"return_w{w:g}"] = float(np.nanmean(raw))
        return out


def all_pairs(n_scales: int, episodes: int) -> list[tuple[int, int]]:
    return [(i, e) for i in range(n_scales) for e in range(episodes)]


def evaluate(policy, task: Task, scales: Sequence[float], episodes: int, seed: int = 0,
             pairs: Sequence[tuple[int, int]] | None = None, max_steps: int | None = None) -> EvalResult:
    """Run the (scale index, episode) pairs (default: all) to the end of their episodes."""
    scales = [float(w) for w in scales]
    pairs = list(pairs) if pairs is not None else all_pairs(len(scales), episodes)
    envs = [make_env(task, max_steps) for _ in pairs]
    obs = np.stack([env.reset(seed=seed * 100_003 + e)[0] for env, (_, e) in zip(envs, pairs)])
    dev = policy.device
    # common random numbers: episode e has the same reset and the same sampler noise under every scale
    gens = [torch.Generator(device=dev).manual_seed(seed * 100_003 + 7919 * e) for _, e in pairs]
    low, high = envs[0].action_space.low, envs[0].action_space.high
    w_all = torch.tensor([scales[i] for i, _ in pairs], dtype=torch.float32, device=dev)
    act_dim = policy.action_dim
    ret = np.zeros(len(pairs))
    length = np.zeros(len(pairs), dtype=int)
    active = np.ones(len(pairs), bool)
    t0, last, steps = time.perf_counter(), time.perf_counter(), 0
    while active.any():
        idx = np.flatnonzero(active)
        x0 = torch.stack([torch.randn(1, act_dim, device=dev, generator=gens[j]) for j in idx])
        a = policy(torch.as_tensor(obs[idx], dtype=torch.float32, device=dev), w=w_all[idx], x_init=x0)
        a = np.clip(a.cpu().numpy(), low, high)
        for k, j in enumerate(idx):
            o, r, term, trunc, _ = envs[j].step(a[k])
            obs[j] = o
            ret[j] += r
            length[j] += 1
            if term or trunc:
                active[j] = False
        steps += len(idx)
        if time.perf_counter() - last > 30:
            rate = steps / (time.perf_counter() - t0)
            log.info("evaluate %s: %d/%d episodes done | %.0f env-steps/s", task.name, int((~active).sum()),
                     len(pairs), rate)
            last = time.perf_counter()
    for env in envs:
        env.close()
    R = np.full((len(scales), episodes), np.nan)
    L = np.full((len(scales), episodes), np.nan)
    for (i, e), r, n in zip(pairs, ret, length):
        R[i, e], L[i, e] = r, n
    return EvalResult(scales, R, task.normalized_score(R), steps, time.perf_counter() - t0, L)
