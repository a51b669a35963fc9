"""Does the critic rank a state's support actions right? Monte-Carlo ground truth for Q's within-state ranking,
the only part of Q that guidance uses (CEP's labels are a softmax over one state's support actions).

For `--states` dataset states: reset MuJoCo to the file's (qpos, qvel), take each of K behaviour samples a_i,
then follow the behaviour model (w = 0) for `--horizon` steps, `--reps` times; the discounted return plus
γ^H·Q̄ at the cut is Q^μ(s, a_i). Prints and writes: Spearman between Q̄(s, ·) and the Monte-Carlo values per
state (mean, median) beside the same statistic between two halves of the rollouts (the ceiling the
Monte-Carlo noise allows), the Monte-Carlo value of Q̄'s argmax over the support mean, and the Monte-Carlo spread
within a state against its standard error (how much there is to choose from at all).

    python benchmarks/q_ranking.py --task hopper-medium-local --data-root DIR \\
        --behavior STORE/behavior-…/artifact.pt --q STORE/q-…/artifact.pt [--states 64 --horizon 150 --reps 8]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy.stats import spearmanr

from cepdist.algos.qgpo.policy import load_policy
from cepdist.algos.qgpo.stages import load_q
from cepdist.data.datasets import local_path
from cepdist.data.tasks import get_task
from cepdist.envs.environments import make_env


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--data-root")
    ap.add_argument("--behavior", required=True, help="a behaviour stage artifact")
    ap.add_argument("--q", required=True, help="a Q stage artifact")
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--states", type=int, default=64)
    ap.add_argument("--horizon", type=int, default=150)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--gamma", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task(a.task)
    path = local_path(task, Path(a.data_root) if a.data_root else None)
    with h5py.File(path) as f:
        if "infos/qpos" not in f:
            raise SystemExit(f"{path}: no infos/qpos; Monte-Carlo needs the simulator state of every row")
        qpos, qvel, obs = f["infos/qpos"][()], f["infos/qvel"][()], f["observations"][()]
    q, policy = load_q(a.q), load_policy(a.behavior, "cep", seed=a.seed)
    rng = np.random.default_rng(a.seed)
    idx = rng.choice(len(obs), a.states, replace=False)
    s = torch.as_tensor(obs[idx])
    acts = policy(s, w=0.0, n=a.K).numpy()                                        # [states, K, d]
    with torch.no_grad():
        qbar = q.min(torch.as_tensor(acts), s).numpy()
    n = a.states * a.K
    envs = [make_env(task) for _ in range(n)]
    mc, t0 = np.zeros((a.reps, a.states, a.K)), time.perf_counter()
    for r in range(a.reps):
        o, alive, ret = np.zeros((n, obs.shape[1]), np.float32), np.ones(n, bool), np.zeros(n)
        for j, e in enumerate(envs):
            e.reset(seed=a.seed * 1_000_000 + r * n + j)
            e.unwrapped.set_state(qpos[idx[j // a.K]], qvel[idx[j // a.K]])
        act = acts.reshape(n, -1)
        for h in range(a.horizon):
            for j in np.flatnonzero(alive):
                o[j], rew, term, _, _ = envs[j].step(np.clip(act[j], -1, 1))
                ret[j] += a.gamma ** h * rew
                alive[j] = not term
            if not alive.any():
                break
            act = policy(torch.as_tensor(o), w=0.0).numpy()
        with torch.no_grad():
            boot = q.min(policy(torch.as_tensor(o), w=0.0)[:, None], torch.as_tensor(o))[:, 0].numpy()
        mc[r] = (ret + np.where(alive, a.gamma ** a.horizon * boot, 0.0)).reshape(a.states, a.K)
        el = time.perf_counter() - t0
        print(f"rollouts {r + 1}/{a.reps} | {el:.0f}s, ETA {el / (r + 1) * (a.reps - r - 1):.0f}s", flush=True)
    m = mc.mean(0)
    rho = np.array([spearmanr(qbar[i], m[i]).statistic for i in range(a.states)])
    best = np.argmax(qbar, 1)
    half = a.reps // 2                  # the ceiling Monte-Carlo noise allows: one half of the rollouts vs the other
    rho_half = np.array([spearmanr(mc[:half, i].mean(0), mc[half:, i].mean(0)).statistic for i in range(a.states)]) \
        if half else np.full(a.states, np.nan)
    out = {"task": a.task, "behavior": a.behavior, "q": a.q, "states": a.states, "K": a.K, "horizon": a.horizon,
           "reps": a.reps, "q_mean": float(qbar.mean()), "mc_mean": float(m.mean()),
           "q_spread": float(np.ptp(qbar, 1).mean()), "mc_spread": float(np.ptp(m, 1).mean()),
           "mc_se": float(mc.std(0, ddof=1).mean() / np.sqrt(a.reps)) if a.reps > 1 else None,
           "spearman_mean": float(np.nanmean(rho)), "spearman_median": float(np.nanmedian(rho)),
           "spearman_se": float(np.nanstd(rho, ddof=1) / np.sqrt(np.isfinite(rho).sum())),
           "spearman_split_half_mc": float(np.nanmean(rho_half)),
           "mc_gain_of_q_argmax": float(np.mean(m[np.arange(a.states), best] - m.mean(1))),
           "mc_gain_of_mc_argmax": float(np.mean(m.max(1) - m.mean(1)))}
    print(f"Q̄ {out['q_mean']:.2f} (Monte-Carlo {out['mc_mean']:.2f}, raw rewards); spread within a state: Q̄ "
          f"{out['q_spread']:.3f}, Monte-Carlo {out['mc_spread']:.3f} (se {out['mc_se']:.3f})")
    print(f"Spearman(Q̄, Monte-Carlo) within a state: mean {out['spearman_mean']:.3f} ± {out['spearman_se']:.3f}, "
          f"median {out['spearman_median']:.3f}; Monte-Carlo against itself (half the rollouts each): "
          f"{out['spearman_split_half_mc']:.3f}")
    print(f"Monte-Carlo gain over the support mean: Q̄'s argmax {out['mc_gain_of_q_argmax']:.3f}, the best "
          f"(noise-inflated) {out['mc_gain_of_mc_argmax']:.3f}")
    p = Path(a.out or Path(__file__).parent / "results" / f"q_ranking-{a.task}.json")
    p.write_text(json.dumps(out, indent=1))
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
