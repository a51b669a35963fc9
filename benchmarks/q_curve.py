"""How many Q steps does the critic need? Trains the `local` preset's Q stage (or `--steps`, `--tau`, `--lr`,
`--seed`) on a stored support set and, at every checkpoint, samples the exact target π(a|s) ∝ p(a|s)·exp(β·Q̄)
(`q_selection.py`: N proposals per state, one resampled with weights softmax(β·Q̄)) on the same episodes.
With `--proposal agent` the proposals come from the agent that generated the *-medium-local file, as it acted
there, so the curve measures the critic alone: the score of β = 0 is the data's policy, and a β > 0 above it
means Q̄ ranks the data's own actions rightly. Prints one line per checkpoint (steps, Q̄'s mean target, the
score per β, CPU minutes) and writes JSON.

    python benchmarks/q_curve.py --task halfcheetah-medium-local --support STORE/support-…/artifact.pt \\
        --behavior STORE/behavior-…/artifact.pt --steps 36000 --ckpt-every 6000 [--proposal agent]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from q_selection import Resampling, data_agent

from cepdist.algos.qgpo.config import SolverConfig
from cepdist.algos.qgpo.policy import load_policy
from cepdist.algos.qgpo.stages import load_q, load_support, train_q
from cepdist.data import datasets
from cepdist.data.tasks import get_task
from cepdist.distributed.presets import preset
from cepdist.envs.evaluation import evaluate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="halfcheetah-medium-local")
    ap.add_argument("--support", required=True, help="a support stage artifact (the Q stage's input)")
    ap.add_argument("--behavior", required=True, help="its behaviour stage artifact (proposals, or the sampler's "
                                                      "device and action size with --proposal agent)")
    ap.add_argument("--data-root", help="where the task's HDF5 file is (default: the D4RL cache)")
    ap.add_argument("--steps", type=int, default=36_000)
    ap.add_argument("--ckpt-every", type=int, default=6_000, help="Q steps between measurements")
    ap.add_argument("--tau", type=float, help="Polyak rate of the target network (default: the preset's)")
    ap.add_argument("--lr", type=float, help="Q learning rate (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0, help="the Q stage's seed")
    ap.add_argument("--betas", default="3,30")
    ap.add_argument("--n", type=int, default=16, help="proposals per state")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--eval-seed", type=int, default=0, help="episodes' reset seeds start at 50 000 + this")
    ap.add_argument("--proposal", choices=("agent", "behavior"), default="agent")
    ap.add_argument("--policy-dir", help="agents folder for --proposal agent (default $CEPDIST_POLICY_DIR)")
    ap.add_argument("--work", help="checkpoint folder (default: a folder beside --out)")
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/q_curve-TASK.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task(args.task)
    over = {k: v for k, v in (("tau", args.tau), ("lr", args.lr)) if v is not None}
    cfg = dataclasses.replace(preset("local").base.q, reward=task.reward, steps=args.steps,
                              ckpt_every=args.ckpt_every, **over)
    betas = [0.0] + [float(b) for b in args.betas.split(",")]
    out = Path(args.out or Path(__file__).parent / "results" / f"q_curve-{args.task}.json")
    work = Path(args.work or out.with_suffix(""))
    work.mkdir(parents=True, exist_ok=True)
    data, _ = datasets.load(task.name, root=Path(args.data_root) if args.data_root else None)
    support = load_support(args.support)
    behavior = load_policy(args.behavior, "cep", seed=args.eval_seed, solver=SolverConfig(steps=15, spacing="logSNR"))
    # resumed (the checkpoint in --work continues): keep the rows measured before
    rows: list[dict] = json.loads(out.read_text())["rows"] if out.exists() and (work / "q.pt").exists() else []
    cpu0 = time.process_time()
    eval_cpu = [0.0]

    def score(q, beta: float) -> np.ndarray:
        agent = data_agent(task, args.policy_dir, args.eval_seed) if args.proposal == "agent" else None
        pol = Resampling(behavior, q, args.n, args.eval_seed, agent)      # a fresh stream per β: same draws
        return evaluate(pol, task, [beta], args.episodes, seed=50_000 + args.eval_seed).normalized[0]

    def measure(stage, step, metrics, saved):
        if saved is None:
            return
        e0 = time.process_time()
        q = load_q(saved).requires_grad_(False)
        row = {"step": step, "q_cpu_minutes": (e0 - cpu0 - eval_cpu[0]) / 60,
               "target_mean": metrics.get("target_mean")}
        for b in betas if not rows else betas[1:]:        # β = 0 does not depend on Q̄: measured once
            sc = score(q, b)
            row[f"beta_{b:g}"] = {"score": float(sc.mean()), "se": float(sc.std() / np.sqrt(len(sc))),
                                  "scores": sc.tolist()}
        rows.append(row)
        eval_cpu[0] += time.process_time() - e0
        print(f"Q step {step}: Q̄ target mean {row['target_mean']:.1f} | "
              + " | ".join(f"β={k[5:]} {v['score']:.1f} ± {v['se']:.1f}" for k, v in row.items()
                           if k.startswith("beta_"))
              + f" | Q {row['q_cpu_minutes']:.1f} CPU-min", flush=True)
        out.write_text(json.dumps({"task": args.task, "support": args.support, "behavior": args.behavior,
                                   "q": dataclasses.asdict(cfg), "seed": args.seed, "proposal": args.proposal,
                                   "n": args.n, "episodes": args.episodes, "eval_seed": args.eval_seed,
                                   "rows": rows}, indent=1))

    train_q(cfg, data, support, seed=args.seed, ckpt_path=work / "q.pt", callback=measure)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
