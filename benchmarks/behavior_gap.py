"""How close is the behaviour model to the policy that generated its data, and what does that do to the
guidance target? For a *-medium-local task the generating agent exists, so the behaviour model can be
compared with it directly, state by state.

One behaviour configuration (the `local` preset's, with the options below) trains on one thread. At every
checkpoint it prints and records:
- `gap`: the mean over 512 dataset states of ‖mean of 32 model samples − mean of 32 agent samples‖;
  `floor` is the same between two independent agent draws (the gap of a perfect model);
- `w0`: the behaviour model's score (w = 0), 10 test episodes, with the `local` preset's sampler (rows without
  a `sampler` field predate its move from 15 time-uniform to 15 log-SNR steps);
- `target`: the score of QGPO's target policy μ·exp(β·Q̄) sampled exactly (`q_selection.py`'s resampling of
  16 behaviour samples at β), with a given critic, on the same episodes.

    python benchmarks/behavior_gap.py --data-root DIR --q STORE/q-…/artifact.pt --steps 120000 \\
        [--widths 128,64,32 --batch-size 256 --lr 1e-3 --lr-schedule constant --beta 30 --out-dir DIR]
Resumes from its checkpoint; writes benchmarks/results/behavior_gap-TASK-NAME.json.
`--measure ARTIFACT…` trains nothing and measures the gap of existing behaviour models (e.g. a study's).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from cepdist.algos.qgpo.policy import GuidedPolicy
from cepdist.algos.qgpo.stages import load_behavior, load_q, train_behavior
from cepdist.config import to_dict
from cepdist.data import datasets
from cepdist.data.tasks import get_task
from cepdist.distributed.presets import preset
from cepdist.envs.evaluation import evaluate
from q_selection import Resampling, data_agent

EVAL_SEED = 50_000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--q", required=True, help="a Q stage artifact on the same data")
    ap.add_argument("--policy-dir", help="agents folder (default $CEPDIST_POLICY_DIR)")
    ap.add_argument("--widths", default=None, help="e.g. 128,64,32 (default: the local preset's)")
    ap.add_argument("--steps", type=int, default=120_000)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr-schedule", default=None, choices=("constant", "cosine"))
    ap.add_argument("--beta", type=float, default=30.0)
    ap.add_argument("--every", type=int, default=10_000)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--name", default=None, help="label of this configuration (default from its options)")
    ap.add_argument("--out-dir", default="runs/behavior_gap")
    ap.add_argument("--measure", nargs="+", metavar="ARTIFACT",
                    help="train nothing: print the gap (and per-dimension spread) of these behaviour artifacts, "
                         "writing benchmarks/results/behavior_gap-measured-TASK.json (or --out)")
    ap.add_argument("--out", help="JSON file of --measure")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task(args.task)
    base, sampler = preset("local").base.behavior, preset("local").base.sampler   # sampled as the study samples
    cfg = dataclasses.replace(base, steps=args.steps, log_every=args.every, ckpt_every=args.every,
                              widths=tuple(int(w) for w in args.widths.split(",")) if args.widths else base.widths,
                              lr=args.lr or base.lr, lr_schedule=args.lr_schedule or base.lr_schedule,
                              batch_size=args.batch_size or base.batch_size)
    name = args.name or f"w{'-'.join(map(str, cfg.widths))}-b{cfg.batch_size}-lr{cfg.lr:g}-{cfg.lr_schedule}-{cfg.steps}"

    data, _ = datasets.load(task.name, root=Path(args.data_root))
    agent = data_agent(task, args.policy_dir, seed=0)
    q = load_q(args.q).requires_grad_(False)
    idx = torch.randint(len(data), (512,), generator=torch.Generator().manual_seed(123))
    states, m = data.obs[idx], 32

    def agent_mean():
        a = agent(states.repeat_interleave(m, 0).numpy())
        return torch.as_tensor(a, dtype=torch.float32).view(len(states), m, -1).mean(1)
    ref = agent_mean()
    floor = (ref - agent_mean()).norm(dim=-1).mean().item()

    if args.measure:
        rows = []
        for path in args.measure:
            samples = GuidedPolicy(load_behavior(path), "cep", seed=0, solver=sampler)(states, w=0.0, n=m)
            rows.append({"behavior": path, "gap": (samples.mean(1) - ref).norm(dim=-1).mean().item(),
                         "spread_per_dim": samples.std(1).mean(0).tolist()})
            print(f"{path} | gap {rows[-1]['gap']:.3f} (floor {floor:.3f}) | spread "
                  + " / ".join(f"{x:.3f}" for x in rows[-1]["spread_per_dim"]), flush=True)
        out = Path(args.out or Path(__file__).parent / "results" / f"behavior_gap-measured-{task.name}.json")
        out.write_text(json.dumps({"task": task.name, "floor": floor, "sampler": to_dict(sampler), "rows": rows},
                                  indent=1))
        print(f"wrote {out}")
        return
    out_dir = Path(args.out_dir) / f"{task.name}-{name}"
    out_dir.mkdir(parents=True, exist_ok=True)

    res_path = out_dir / "rows.json"
    rows = json.loads(res_path.read_text()) if res_path.is_file() else []
    clock = {"t0": time.perf_counter(), "off": 0.0, "base": rows[-1]["train_seconds"] if rows else 0.0}

    def callback(stage, step, metrics, saved):
        if saved is None or step in {r["step"] for r in rows}:
            return
        e0 = time.perf_counter()
        train_s = clock["base"] + e0 - clock["t0"] - clock["off"]
        pol = GuidedPolicy(load_behavior(saved), "cep", seed=0, solver=sampler)
        gap = (pol(states, w=0.0, n=m).mean(1) - ref).norm(dim=-1).mean().item()
        w0 = evaluate(pol, task, [0.0], args.episodes, seed=EVAL_SEED).normalized[0]
        tgt = evaluate(Resampling(pol, q, 16, 0), task, [args.beta], args.episodes, seed=EVAL_SEED).normalized[0]
        rows.append({"step": step, "train_seconds": train_s, "gap": gap, "floor": floor,
                     "w0": float(w0.mean()), "w0_se": float(w0.std() / len(w0) ** 0.5),
                     "target": float(tgt.mean()), "target_se": float(tgt.std() / len(tgt) ** 0.5),
                     "sampler": to_dict(sampler)})
        res_path.write_text(json.dumps(rows))
        print(f"{name} step {step} | {train_s / 60:.1f} train-min | gap {gap:.3f} (floor {floor:.3f}) | "
              f"w=0 {w0.mean():.1f} | target β={args.beta:g} {tgt.mean():.1f}", flush=True)
        clock["off"] += time.perf_counter() - e0

    train_behavior(cfg, data.obs, data.actions, seed=0, ckpt_path=out_dir / "behavior.pt", callback=callback)
    out = Path(__file__).parent / "results" / f"behavior_gap-{task.name}-{name}.json"
    out.write_text(json.dumps({"task": task.name, "config": to_dict(cfg), "q": args.q, "beta": args.beta,
                               "episodes": args.episodes, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
