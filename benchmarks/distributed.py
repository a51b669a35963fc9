"""Platform benchmarks: evaluation throughput and sweep efficiency. Prints and writes JSON
(default benchmarks/results/distributed.json).

1. Evaluation of the guided policy (reference network sizes, HalfCheetah, 15 solver steps) on
   10 episodes × 7 guidance scales × 1000 steps: one process with every (scale, episode) in lockstep,
   against a pool of Ray actors splitting the pairs.
2. Sweep efficiency: a β(2) × K(2) × method {cep, mse} study run staged (behaviour, support and Q shared
   through the artifact store: Q once per K, an energy model per trial, all scales in one evaluation pass)
   against the same 8 trials run as independent studies (every stage per trial).

    python benchmarks/distributed.py [--quick] [--actors 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cepdist.algos.qgpo.config import (BehaviorConfig, EnergyConfig, QConfig, QGPOConfig, SolverConfig,
                                       SupportConfig)
from cepdist.algos.qgpo.policy import GuidedPolicy
from cepdist.algos.qgpo.stages import build_behavior, build_energy
from cepdist.data.tasks import get_task
from cepdist.envs.evaluation import evaluate

SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0)


def eval_benchmark(episodes: int, max_steps: int, actors: int) -> dict:
    import ray
    from cepdist.config import to_dict
    from cepdist.distributed.pool import EvalPool, policy_payload
    task = get_task("halfcheetah-medium-v2")
    beh = build_behavior(BehaviorConfig(), task.obs_dim, task.act_dim)
    energy = build_energy(EnergyConfig(), task.obs_dim, task.act_dim)
    policy = GuidedPolicy(beh, energy=energy)
    out = {"workload": f"{episodes} episodes × {len(SCALES)} scales × {max_steps} steps"}
    t = time.perf_counter()
    r = evaluate(policy, task, SCALES, episodes, seed=0, max_steps=max_steps)
    out["single_process_s"] = time.perf_counter() - t
    out["single_process_env_steps_per_s"] = r.env_steps / out["single_process_s"]
    print(f"single process ({torch.get_num_threads()} threads): {out['single_process_s']:.1f} s, "
          f"{out['single_process_env_steps_per_s']:.0f} env-steps/s")
    ray.init(num_cpus=actors, log_to_driver=False)
    pool = EvalPool(actors)
    dims = {"state_dim": task.obs_dim, "action_dim": task.act_dim}
    payload = policy_payload({"kind": "behavior", "config": to_dict(BehaviorConfig()), "model": beh.state_dict(), **dims},
                             "cep", SolverConfig(),
                             energy={"kind": "energy", "config": {**to_dict(EnergyConfig()), "schedule": [0.1, 20.0]},
                                     "energy": energy.state_dict(), **dims})
    pool.evaluate(payload, task.name, SCALES[:1], 1, max_steps=2)           # actors started and warm
    t = time.perf_counter()
    rp = pool.evaluate(payload, task.name, SCALES, episodes, seed=0, max_steps=max_steps)
    out["pool_s"] = time.perf_counter() - t
    out["pool_env_steps_per_s"] = rp.env_steps / out["pool_s"]
    out["actors"] = actors
    print(f"actor pool ({actors} actors × 1 thread): {out['pool_s']:.1f} s, {out['pool_env_steps_per_s']:.0f} env-steps/s")
    pool.close()
    ray.shutdown()
    return out


def sweep_benchmark(tmp: Path) -> dict:
    import ray
    from cepdist.distributed.driver import run_study
    from cepdist.distributed.study import StudyConfig
    base = QGPOConfig(behavior=BehaviorConfig(widths=(64, 32, 16), steps=200, batch_size=128, log_every=100,
                                              ckpt_every=200),
                      support=SupportConfig(K=None, batch_states=4096, solver=SolverConfig(steps=5)),
                      q=QConfig(hidden=(64, 64), steps=300, batch_size=64, reward=None, log_every=100, ckpt_every=300),
                      energy=EnergyConfig(hidden=(64, 64), steps=200, batch_size=64, log_every=100, ckpt_every=200),
                      sampler=SolverConfig(steps=5))
    common = dict(tasks=("hopper-random-local",), seeds=(0,), dataset_rows=5000, eval_episodes=2, eval_max_steps=50,
                  eval_actors=1, trial_cpus=1, max_concurrent=1, base=base, data_root=str(tmp / "data"),
                  scales=(0.0, 1.0, 3.0), mlflow_uri=f"sqlite:///{tmp}/mlflow.db")
    betas, Ks, methods = (1.0, 3.0), (4, 8), ("cep", "mse")
    ray.init(num_cpus=2, log_to_driver=False, logging_level="ERROR")
    t = time.perf_counter()
    staged = run_study(StudyConfig(name="staged", betas=betas, Ks=Ks, methods=methods, store=str(tmp / "staged"),
                                   **common), tmp / "out_staged")
    staged_s = time.perf_counter() - t
    t = time.perf_counter()
    indep: dict[str, int] = {}
    for b in betas:
        for k in Ks:
            for m in methods:
                name = f"indep-{b:g}-{k}-{m}"
                s = run_study(StudyConfig(name=name, betas=(b,), Ks=(k,), methods=(m,), store=str(tmp / name),
                                          **common), tmp / "out_indep")
                for st, n in s["executions"].items():
                    indep[st] = indep.get(st, 0) + n
    indep_s = time.perf_counter() - t
    ray.shutdown()
    out = {"grid": f"β {betas} × K {Ks} × method {methods}", "staged_s": staged_s,
           "staged_executions": staged["executions"], "independent_s": indep_s, "independent_executions": indep,
           "staged_over_independent": staged_s / indep_s}
    print(f"sweep staged: {staged_s:.0f} s {staged['executions']}")
    print(f"sweep independent: {indep_s:.0f} s {indep}")
    print(f"staged / independent wall time: {staged_s / indep_s:.2f}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100-step episodes instead of 1000")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed.json"))
    a = ap.parse_args()
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {}       # keep the part not re-run
    if not a.skip_eval:
        res["evaluation"] = eval_benchmark(10, 100 if a.quick else 1000, a.actors)
    if not a.skip_sweep:
        with tempfile.TemporaryDirectory() as d:
            res["sweep"] = sweep_benchmark(Path(d))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
