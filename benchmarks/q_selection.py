"""Is the guidance target any good? QGPO's policy is π(a|s) ∝ μ(a|s)·exp(β·Q̄(s, a)); the energy model only
learns to sample it. This script samples that target without any energy model: at every step it draws N
actions from the behaviour model (w = 0) and resamples one with weights softmax(β·Q̄) (self-normalised
importance resampling, exact as N → ∞), or takes the argmax of Q̄ (β = inf). β = 0 is the behaviour model
itself. If the target at the study's β scores below β = 0, no energy model or guidance scale can help: the
critic (or β) is what must change. `--proposal agent` draws the N candidates from the agent that generated a
*-medium-local dataset (its own action distribution) instead of the behaviour model: this separates a wrong
critic from a behaviour model whose tails are worse than the data's.

Real MuJoCo episodes; every β runs on the same reset seeds. Prints one line per β and writes JSON.

    python benchmarks/q_selection.py --behavior STORE/behavior-…/artifact.pt --q STORE/q-…/artifact.pt \\
        [--task hopper-medium-local --betas 0,1,3,10,30,inf --n 16 --episodes 10]
    (--iql PATH instead of --q: an IQL agent's target critic)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cepdist.algos.qgpo.policy import load_policy
from cepdist.algos.qgpo.stages import load_q
from cepdist.data.tasks import get_task
from cepdist.envs.evaluation import evaluate


def data_agent(task, policy_dir_=None, seed: int = 0):
    """The agent that generated a *-medium-local file, sampling as it did (its own action distribution)."""
    from cepdist.envs.environments import make_env
    from cepdist.envs.generate import MEDIUM, AgentPolicy, env_level, policy_dir
    env, level = env_level(task)
    if level != "medium" or MEDIUM[env].noise:
        raise SystemExit(f"{task.name}: needs a *-medium-local task whose agent samples its own actions "
                         "(no added action noise)")
    src, e = MEDIUM[env], make_env(task)
    torch.manual_seed(seed)                                 # the agent samples from torch's global generator
    return AgentPolicy(src.policy, env, policy_dir(policy_dir_), e.action_space, e.observation_space,
                       stochastic=src.stochastic)


class Resampling:
    """The evaluation pool's policy interface; the scale w is β."""

    def __init__(self, behavior, q, n: int, seed: int, agent=None):
        self.behavior, self.q, self.n, self.agent = behavior, q, n, agent
        self.device, self.action_dim = behavior.device, behavior.action_dim
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, states, w, x_init=None):
        if self.agent is not None:
            rep = states.repeat_interleave(self.n, 0).numpy()
            a = torch.as_tensor(self.agent(rep), dtype=torch.float32).view(len(states), self.n, -1)
        else:
            a = self.behavior(states, w=0.0, n=self.n)
            a = a[:, None] if a.dim() == 2 else a                   # [m, N, d]
        with torch.no_grad():
            q = self.q.min(a, states)                               # [m, N]
        beta = w.view(-1, 1)
        greedy = torch.isinf(beta).view(-1)
        logits = torch.where(torch.isinf(beta), torch.zeros_like(q), beta * q)
        pick = torch.multinomial(torch.softmax(logits - logits.max(1, keepdim=True).values, 1), 1,
                                 generator=self.gen).view(-1)
        pick = torch.where(greedy, q.argmax(1), pick)
        return a[torch.arange(len(a)), pick]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--behavior", required=True, help="a behaviour stage artifact")
    crit = ap.add_mutually_exclusive_group(required=True)
    crit.add_argument("--q", help="a Q stage artifact")
    crit.add_argument("--iql", help="an IQL stage artifact (its target critic; its Q is in scaled-reward units)")
    ap.add_argument("--betas", default="0,1,3,10,30,inf")
    ap.add_argument("--n", type=int, default=16, help="behaviour samples per state")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proposal", choices=("behavior", "agent"), default="behavior",
                    help="where the N candidates come from (agent: the dataset's own generating agent)")
    ap.add_argument("--policy-dir", help="agents folder for --proposal agent (default $CEPDIST_POLICY_DIR)")
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/q_selection-TASK.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task(args.task)
    if args.iql:
        from cepdist.algos.iql import load_iql
        q = load_iql(args.iql).q_target
    else:
        q = load_q(args.q)
    betas = [float(b) for b in args.betas.split(",")]
    agent = data_agent(task, args.policy_dir, args.seed) if args.proposal == "agent" else None
    pol = Resampling(load_policy(args.behavior, "cep", seed=args.seed), q.requires_grad_(False), args.n, args.seed,
                     agent)
    rows = []
    for b in betas:                       # one β at a time: episodes of a greedy β end early, others would wait
        t0 = time.perf_counter()
        res = evaluate(pol, task, [b], args.episodes, seed=50_000 + args.seed)
        sc = res.normalized[0]
        rows.append({"beta": b, "score": float(sc.mean()), "se": float(sc.std() / np.sqrt(len(sc))),
                     "mean_length": float(np.mean(res.lengths[0])), "scores": sc.tolist()})
        print(f"β={b:g}: score {sc.mean():5.1f} ± {rows[-1]['se']:.1f}  mean length {rows[-1]['mean_length']:.0f}"
              f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"q_selection-{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": args.task, "behavior": args.behavior, "critic": args.q or f"iql:{args.iql}",
                               "n": args.n, "proposal": args.proposal, "episodes": args.episodes, "seed": args.seed, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
