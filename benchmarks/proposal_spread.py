"""How do the behaviour model's proposals at dataset states compare with the agent that generated the data?

For S dataset states: N proposals from the behaviour model (w = 0, the given sampler) and N from the agent
(its own action distribution), plus 64 more agent samples as a reference cloud. Prints and writes, per
source: the per-dimension spread of a state's proposals, Q̄ over them (mean, max, spread within a state), the
distance of each proposal (and of Q̄'s pick) to its nearest agent sample, the share at the action bounds,
and the correlation of Q̄ with that distance (positive: Q̄ prefers proposals off the agent's support).
Needs the agent of a *-medium-local task (`$CEPDIST_POLICY_DIR`).

    python benchmarks/proposal_spread.py --data-root DIR --behavior STORE/behavior-…/artifact.pt \\
        --q STORE/q-…/artifact.pt [--solver-steps 15 --solver-spacing logSNR --out FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cepdist.algos.qgpo.config import SolverConfig
from cepdist.algos.qgpo.policy import GuidedPolicy
from cepdist.algos.qgpo.stages import load_behavior, load_q
from cepdist.data import datasets
from cepdist.data.tasks import get_task
from q_selection import data_agent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--behavior", required=True)
    ap.add_argument("--q", required=True)
    ap.add_argument("--policy-dir", help="agents folder (default $CEPDIST_POLICY_DIR)")
    ap.add_argument("--states", type=int, default=512)
    ap.add_argument("--n", type=int, default=16, help="proposals per state and source")
    ap.add_argument("--solver-steps", type=int, default=15)
    ap.add_argument("--solver-spacing", default="time_uniform", choices=("time_uniform", "logSNR"))
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/proposal_spread-TASK-SPACING-STEPS.json)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task(a.task)
    data, _ = datasets.load(task.name, root=Path(a.data_root))
    agent = data_agent(task, a.policy_dir, 0)
    q = load_q(a.q).requires_grad_(False)
    solver = SolverConfig(steps=a.solver_steps, spacing=a.solver_spacing)
    pol = GuidedPolicy(load_behavior(a.behavior), "cep", seed=0, solver=solver)
    s = data.obs[torch.randint(len(data), (a.states,), generator=torch.Generator().manual_seed(7))]
    S = len(s)

    def from_agent(m):
        return torch.as_tensor(agent(s.repeat_interleave(m, 0).numpy()), dtype=torch.float32).view(S, m, -1)

    sources = {"agent": from_agent(a.n), "model": pol(s, w=0.0, n=a.n)}
    cloud = from_agent(64)
    out = {"task": a.task, "behavior": a.behavior, "q": a.q, "solver": vars(solver), "states": S, "n": a.n}
    for name, P in sources.items():
        with torch.no_grad():
            qq = q.min(P, s)
        pick = qq.argmax(1)
        d_all = torch.cdist(P, cloud).min(-1).values                    # [S, n] to the nearest agent sample
        out[name] = {"spread_per_dim": P.std(1).mean(0).tolist(), "q_mean": qq.mean().item(),
                     "q_max_mean": qq.max(1).values.mean().item(), "q_spread_in_state": qq.std(1).mean().item(),
                     "nn_dist_all": d_all.mean().item(), "nn_dist_pick": d_all[torch.arange(S), pick].mean().item(),
                     "frac_bound_all": (P.abs() > 0.95).float().mean().item(),
                     "frac_bound_pick": (P[torch.arange(S), pick].abs() > 0.95).float().mean().item(),
                     "corr_q_vs_dist": torch.corrcoef(torch.stack([qq.flatten(), d_all.flatten()]))[0, 1].item()}
        print(name, {k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 3)
                     for k, v in out[name].items()}, flush=True)
    path = Path(a.out or Path(__file__).parent / "results"
                / f"proposal_spread-{a.task}-{a.solver_spacing}-{a.solver_steps}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
