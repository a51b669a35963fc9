"""Evaluation on a pool of Ray actors. Each actor holds its own MuJoCo environments and runs its share of
the (guidance scale, episode) pairs in lockstep — one policy call per step for all of them — and the
results merge into one EvalResult. Per-pair seeding makes the result independent of the split."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import ray
import torch

from ..algos.iql import IQLPolicy, load_iql
from ..algos.qgpo.config import SolverConfig
from ..algos.qgpo.policy import load_policy
from ..data.tasks import get_task
from ..envs.evaluation import EvalResult, all_pairs, evaluate


@ray.remote
class EvalActor:
    def __init__(self, threads: int = 1):
        torch.set_num_threads(threads)

    def run(self, payload: dict, task_name: str, scales, episodes, seed, pairs, max_steps=None):
        return run_pairs(payload, task_name, scales, episodes, seed, pairs, max_steps)


def run_pairs(payload: dict, task_name: str, scales, episodes, seed, pairs=None, max_steps=None) -> EvalResult:
    """Evaluate (scale, episode) pairs (default: all) of the policy a payload describes, in this process."""
    return evaluate(policy_from_payload(payload), get_task(task_name), scales, episodes, seed, pairs, max_steps)


def policy_payload(behavior: dict, method: str, solver: SolverConfig, *, energy: dict | None = None,
                   q: dict | None = None, beta: float | None = None, analytic: dict | None = None,
                   temperature: float = 1.0) -> dict:
    """What an actor needs to rebuild the guided policy: checkpoint dicts (tensors) and settings."""
    return {"behavior": behavior, "method": method, "solver": solver, "energy": energy, "q": q, "beta": beta,
            "analytic": analytic, "temperature": temperature}


def policy_from_payload(p: dict):
    if "iql" in p:                           # the IQL baseline: {"iql": its checkpoint}
        return IQLPolicy(load_iql(p["iql"]))
    return load_policy(p["behavior"], p["method"], energy=p["energy"], q=p["q"], beta=p["beta"],
                       solver=p["solver"], analytic=p.get("analytic"), temperature=p["temperature"])


class EvalPool:
    """n actors, created once and reused for every evaluation of a trial. With n = 0 the evaluation runs
    in the calling process, on its CPUs: on one machine, where training pauses while it evaluates, a
    trial then needs no CPU of its own for evaluation."""

    def __init__(self, n_actors: int, threads_per_actor: int = 1, num_cpus: float = 1):
        self.actors = [EvalActor.options(num_cpus=num_cpus).remote(threads_per_actor) for _ in range(n_actors)]

    def evaluate(self, payload: dict, task_name: str, scales: Sequence[float], episodes: int, seed: int = 0,
                 max_steps: int | None = None) -> EvalResult:
        if not self.actors:
            return run_pairs(payload, task_name, list(scales), episodes, seed, max_steps=max_steps)
        pairs = all_pairs(len(scales), episodes)
        ref = ray.put(payload)
        shards = [pairs[i::len(self.actors)] for i in range(len(self.actors))]
        futures = [a.run.remote(ref, task_name, list(scales), episodes, seed, sh, max_steps)
                   for a, sh in zip(self.actors, shards) if sh]
        parts = ray.get(futures)
        out = EvalResult(list(map(float, scales)), np.full((len(scales), episodes), np.nan),
                         np.full((len(scales), episodes), np.nan), 0, 0.0, np.full((len(scales), episodes), np.nan))
        for p in parts:
            out = out.merge(p)
        return out

    def close(self):
        for a in self.actors:
            ray.kill(a)
        self.actors = []
