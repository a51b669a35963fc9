"""Is the guidance target any good? QGPO's policy is π(a|s) ∝ μ(a|s)·exp(β·Q̄(s, a)); the energy model only
learns to sample it. This script samples that target without any energy model: at every step it draws N
actions from the behaviour model (w = 0) and resamples one with weights softmax(β·Q̄) (self-normalised
importance resampling, exact as N → ∞), or takes the argmax of Q̄ (β = inf). β = 0 is the behaviour model
itself. If the target at the study's β scores below β = 0, no energy model or guidance scale can help: the
critic (or β) is what must change. `--proposal agent` draws the N candidates from the agent that generated a
*-medium-local dataset (its own action distribution) instead of the behaviour model: this separates a wrong
critic from a behaviour model whose tails are worse than the data's; `--proposal mixed` pools N of each and
reports how often Q̄ picks the model's (about half when it neither over- nor under-rates them).
`--solver-steps/--solver-spacing` set the behaviour sampler (the reference's 15 time-uniform steps by default).

Real MuJoCo episodes; every β runs on the same reset seeds. Prints one line per β and writes JSON.

    python benchmarks/q_selection.py --behavior STORE/behavior-…/artifact.pt --q STORE/q-…/artifact.pt \\
        [--task hopper-medium-local --betas 0,1,3,10,30,inf --n 16 --episodes 10]
    (--iql PATH instead of --q: an IQL agent's target critic; --q A,B,C: an ensemble of Q stages, its value the
    min over them (--ensemble mean: their mean), e.g. one support set's Q stage trained with several seeds)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cepdist.algos.qgpo.config import SolverConfig
from cepdist.algos.qgpo.policy import load_policy
from cepdist.algos.qgpo.stages import load_q
from cepdist.data.tasks import get_task
from cepdist.envs.evaluation import evaluate


def data_agent(task, policy_dir_=None, seed: int = 0):
    """The agent that generated a *-medium-local file, acting as it did there: its own action distribution, or
    its action plus the file's Gaussian action noise, clipped to the bounds."""
    from cepdist.envs.environments import make_env
    from cepdist.envs.generate import MEDIUM, AgentPolicy, env_level, policy_dir
    env, level = env_level(task)
    if level != "medium":
        raise SystemExit(f"{task.name}: --proposal agent/mixed needs a *-medium-local task (one agent)")
    src, e = MEDIUM[env], make_env(task)
    torch.manual_seed(seed)                                 # the agent samples from torch's global generator
    agent = AgentPolicy(src.policy, env, policy_dir(policy_dir_), e.action_space, e.observation_space,
                        stochastic=src.stochastic)
    if not src.noise:
        return agent
    rng, low, high = np.random.default_rng(seed), e.action_space.low, e.action_space.high

    def noisy(obs):
        act = agent(obs)
        return np.clip(act + src.noise * rng.standard_normal(act.shape), low, high)
    return noisy


class Ensemble:
    """Several critics as one: per action the min (pessimistic) or the mean of their Q̄ (each a min of twins)."""

    def __init__(self, critics, how: str):
        self.critics, self.reduce = critics, {"min": torch.amin, "mean": torch.mean}[how]

    def min(self, a, s):
        return self.reduce(torch.stack([c.min(a, s) for c in self.critics]), dim=0)

    def requires_grad_(self, flag: bool):
        for c in self.critics:
            c.requires_grad_(flag)
        return self


class Resampling:
    """The evaluation pool's policy interface; the scale w is β."""

    def __init__(self, behavior, q, n: int, seed: int, agent=None, temperature: float = 1.0, mixed: bool = False):
        """agent: draw the N proposals from the data's agent; with mixed, N from the model and N from the agent
        (`model_share` then counts how often a model proposal is picked)."""
        self.behavior, self.q, self.n, self.agent, self.temperature = behavior, q, n, agent, temperature
        self.mixed, self.picks, self.model_picks = mixed, 0, 0
        self.device, self.action_dim = behavior.device, behavior.action_dim
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def model_share(self) -> float:
        return self.model_picks / max(self.picks, 1)

    def _model(self, states):
        x = None
        if self.temperature != 1.0:           # a colder start: fewer proposals in the model's tails
            x = self.temperature * torch.randn(len(states), self.n, self.action_dim, generator=self.gen)
        a = self.behavior(states, w=0.0, n=self.n, x_init=x)
        return a[:, None] if a.dim() == 2 else a                       # [m, N, d]

    def _agent(self, states):
        rep = states.repeat_interleave(self.n, 0).numpy()
        return torch.as_tensor(self.agent(rep), dtype=torch.float32).view(len(states), self.n, -1)

    def __call__(self, states, w, x_init=None):
        if self.mixed:
            a = torch.cat([self._model(states), self._agent(states)], 1)
        else:
            a = self._agent(states) if self.agent is not None else self._model(states)
        with torch.no_grad():
            q = self.q.min(a, states)                               # [m, N]
        beta = w.view(-1, 1)
        greedy = torch.isinf(beta).view(-1)
        logits = torch.where(torch.isinf(beta), torch.zeros_like(q), beta * q)
        pick = torch.multinomial(torch.softmax(logits - logits.max(1, keepdim=True).values, 1), 1,
                                 generator=self.gen).view(-1)
        pick = torch.where(greedy, q.argmax(1), pick)
        if self.mixed:
            self.picks += len(pick)
            self.model_picks += int((pick < self.n).sum())
        return a[torch.arange(len(a)), pick]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--behavior", required=True, help="a behaviour stage artifact")
    crit = ap.add_mutually_exclusive_group(required=True)
    crit.add_argument("--q", help="a Q stage artifact, or several, comma-separated (an ensemble; see --ensemble)")
    crit.add_argument("--iql", help="an IQL stage artifact (its target critic; its Q is in scaled-reward units)")
    ap.add_argument("--ensemble", choices=("min", "mean"), default="min",
                    help="how several --q critics combine (min: pessimistic)")
    ap.add_argument("--betas", default="0,1,3,10,30,inf")
    ap.add_argument("--n", type=int, default=16, help="behaviour samples per state")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--solver-steps", type=int, default=15, help="behaviour sampler steps (15: the reference's)")
    ap.add_argument("--solver-spacing", default="time_uniform", choices=("time_uniform", "logSNR"),
                    help="behaviour sampler time grid (time_uniform: the reference's)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="scale of the behaviour model's starting noise (< 1: proposals nearer its modes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proposal", choices=("behavior", "agent", "mixed"), default="behavior",
                    help="where the N candidates come from (agent: the dataset's own generating agent; mixed: N "
                         "from each, reporting the share of picks that are the model's)")
    ap.add_argument("--policy-dir", help="agents folder for --proposal agent (default $CEPDIST_POLICY_DIR)")
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/q_selection-TASK.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task(args.task)
    if args.iql:
        from cepdist.algos.iql import load_iql
        q = load_iql(args.iql).q_target
    else:
        paths = args.q.split(",")
        q = load_q(paths[0]) if len(paths) == 1 else Ensemble([load_q(p) for p in paths], args.ensemble)
    betas = [float(b) for b in args.betas.split(",")]
    agent = data_agent(task, args.policy_dir, args.seed) if args.proposal in ("agent", "mixed") else None
    behavior = load_policy(args.behavior, "cep", seed=args.seed,
                           solver=SolverConfig(steps=args.solver_steps, spacing=args.solver_spacing))
    pol = Resampling(behavior, q.requires_grad_(False), args.n, args.seed, agent, args.temperature,
                     mixed=args.proposal == "mixed")
    rows = []
    for b in betas:                       # one β at a time: episodes of a greedy β end early, others would wait
        t0 = time.perf_counter()
        pol.picks = pol.model_picks = 0
        res = evaluate(pol, task, [b], args.episodes, seed=50_000 + args.seed)
        sc = res.normalized[0]
        rows.append({"beta": b, "score": float(sc.mean()), "se": float(sc.std() / np.sqrt(len(sc))),
                     "mean_length": float(np.mean(res.lengths[0])), "scores": sc.tolist()})
        share = ""
        if pol.mixed:
            rows[-1]["model_share"] = pol.model_share
            share = f"  model's share of picks {pol.model_share:.2f}"
        print(f"β={b:g}: score {sc.mean():5.1f} ± {rows[-1]['se']:.1f}  mean length {rows[-1]['mean_length']:.0f}"
              f"{share}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"q_selection-{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": args.task, "behavior": args.behavior, "critic": args.q or f"iql:{args.iql}",
                               "ensemble": args.ensemble if args.q and "," in args.q else None,
                               "n": args.n, "proposal": args.proposal,
                               "temperature": args.temperature, "solver_steps": args.solver_steps,
                               "solver_spacing": args.solver_spacing, "episodes": args.episodes, "seed": args.seed,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
