"""Where along the sampler does fφ's guidance act, and does guiding only at small t help?

For one trial's behaviour model and fφ (e.g. a study's stage artifacts): (1) at S dataset states, per network
call of the policy's sampler, the mean norm of the guidance term σt·‖∇a fφ‖ (w = 1) against that of the
behaviour's own ε; (2) the guided policy scored on real episodes at each w with guidance at every call and
with guidance only at calls where t ≤ each `--t-max`, every variant on the same reset seeds and sampler noise,
paired against w = 0.

    python benchmarks/guidance_path.py --task hopper-medium-local --data-root DIR \\
        --behavior STORE/behavior-…/artifact.pt --energy STORE/energy-…/artifact.pt \\
        [--scales 0.1,0.3,1 --t-max 0.1,0.3 --episodes 50 --out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cepdist.algos.qgpo.policy import GuidedPolicy
from cepdist.algos.qgpo.stages import load_behavior, load_energy, load_q
from cepdist.core.guidance import EnergyGuidance
from cepdist.data import datasets
from cepdist.data.tasks import get_task
from cepdist.distributed.presets import LOGSNR_15
from cepdist.envs.evaluation import evaluate


class PathGuidance(EnergyGuidance):
    """fφ's guidance switched off at calls with t > t_max; records σt·‖∇fφ‖ and ‖ε‖ per call when asked."""

    def __init__(self, energy, t_max: float | None = None):
        super().__init__(energy)
        self.t_max, self.log = t_max, None

    def guided(self, behavior, x, conds_k, pc, k, plan, w, s):
        if self.log is not None:            # a measuring pass: guidance everywhere, its size recorded
            g = self.energy.grad_action(x, pc[k])
            self.log.append({"t": plan.times[k], "guidance": float((plan.sigmas[k] * g).norm(dim=-1).mean()),
                             "eps": float(behavior.trunk(x, conds_k).norm(dim=-1).mean())})
        elif self.t_max is not None and plan.times[k] > self.t_max:
            return -behavior.trunk(x, conds_k)
        return super().guided(behavior, x, conds_k, pc, k, plan, w, s)

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--behavior", required=True, help="a behaviour stage artifact")
    ap.add_argument("--energy", required=True, help="an energy stage artifact")
    ap.add_argument("--q", help="a Q stage artifact: also the cosine between ∇a fφ and ∇a Q̄ at w = 0 samples")
    ap.add_argument("--states", type=int, default=512)
    ap.add_argument("--scales", default="0.1,0.3,1")
    ap.add_argument("--t-max", default="0.1,0.3", help="guidance only at calls with t ≤ each of these")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=50_000, help="reset seed base (the study uses 10_000 + seed)")
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/guidance_path-TASK.json)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task(a.task)
    data, _ = datasets.load(task.name, root=Path(a.data_root))
    behavior, energy = load_behavior(a.behavior), load_energy(a.energy)
    g = torch.Generator().manual_seed(0)
    S = data.obs[torch.randperm(len(data), generator=g)[:a.states]]

    pol = GuidedPolicy(behavior, "cep", energy=energy, seed=0, solver=LOGSNR_15)
    pol.guidance = PathGuidance(energy)
    pol.guidance.log = []
    with torch.no_grad():
        pol(S, w=1.0)
    path = pol.guidance.log
    print("per call (t: σt·‖∇fφ‖ / ‖ε‖): " + "  ".join(f"{p['t']:.3f}: {p['guidance']:.2f}/{p['eps']:.2f}"
                                                      for p in path), flush=True)

    cosines = {}
    if a.q:
        q = load_q(a.q).requires_grad_(False)
        with torch.no_grad():
            a0 = pol(S, w=0.0)[:, None, :].clone()                          # [S, 1, d]
        gq = torch.autograd.grad(q.min(a0.requires_grad_(True), S).sum(), a0)[0]
        for t in (1e-3, 0.01, 0.05):
            tt = torch.full((len(S), 1), t)
            at = a0.detach().requires_grad_(True)
            gf = torch.autograd.grad(energy(at, tt, S[:, None, :]).sum(), at)[0]
            cosines[str(t)] = float(torch.nn.functional.cosine_similarity(gf, gq, dim=-1).mean())
        print("cos(∇fφ at t, ∇Q̄) at w = 0 samples: " + "  ".join(f"t={t}: {c:+.2f}" for t, c in cosines.items()),
              flush=True)

    scales = [float(x) for x in a.scales.split(",")]
    rows = []
    for t_max in [None] + [float(x) for x in a.t_max.split(",")]:
        pol.guidance = PathGuidance(energy, t_max)
        t0 = time.perf_counter()
        res = evaluate(pol, task, [0.0] + scales, a.episodes, seed=a.seed)
        base = res.normalized[0]
        for k, w in enumerate(scales, start=1):
            sc = res.normalized[k]
            d = sc - base
            row = {"t_max": t_max, "w": w, "score": float(sc.mean()), "se": float(sc.std() / np.sqrt(len(sc))),
                   "w0": float(base.mean()), "diff": float(d.mean()), "diff_se": float(d.std(ddof=1) / np.sqrt(len(d))),
                   "scores": sc.tolist(), "w0_scores": base.tolist()}
            rows.append(row)
            print(f"t_max={t_max}  w={w:g}: {row['score']:.1f} ± {row['se']:.1f} (w = 0: {row['w0']:.1f}), paired "
                  f"{row['diff']:+.1f} ± {row['diff_se']:.1f}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    out = Path(a.out or Path(__file__).parent / "results" / f"guidance_path-{task.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "path": path, "cosines": cosines, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
