"""Behaviour-model levers at equal compute: the w = 0 score each behaviour configuration reaches per minute
of training, on one task and seed, without the rest of the pipeline. Scores use the `local` preset's sampler
(15 log-SNR steps since it moved off the reference grid; results before that used 15 time-uniform steps).

Each variant is a partial BehaviorConfig (YAML mapping name → settings, merged over the `local` preset's
behaviour config). The variant trains in one process on one thread; every `--eval-every` steps its
checkpoint (its moving average when it keeps one) is evaluated unguided on `--episodes` test episodes
(reset seeds disjoint from training's). Checkpoints and results persist under --out-dir, so an interrupted
run resumes and a longer one reuses what is done. Prints one line per evaluation and a table at the end;
writes benchmarks/results/behavior_levers-<task>-s<seed>.json.

    python benchmarks/behavior_levers.py --task hopper-medium-local --variants benchmarks/levers/behavior.yaml \\
        --only ref ref-ema --episodes 10
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from cepdist.algos.qgpo.config import BehaviorConfig
from cepdist.algos.qgpo.policy import GuidedPolicy
from cepdist.algos.qgpo.stages import load_behavior, train_behavior
from cepdist.config import from_dict, merge, to_dict
from cepdist.data import datasets
from cepdist.data.tasks import get_task
from cepdist.distributed.presets import preset
from cepdist.envs.evaluation import evaluate
from cepdist.envs.generate import ensure_datasets

log = logging.getLogger("cepdist")
EVAL_SEED = 20_000          # test episodes' reset seeds: disjoint from the study's (10_000 + seed)
SAMPLER = preset("local").base.sampler      # w = 0 as the study's policy samples it


def run_variant(name: str, cfg: BehaviorConfig, task_name: str, seed: int, data, episodes: int, eval_every: int,
                out_dir: Path, rows: list[dict]) -> list[dict]:
    task = get_task(task_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt, res_path = out_dir / "behavior.pt", out_dir / "evaluations.json"
    done = json.loads(res_path.read_text()) if res_path.is_file() else []
    if done and done[0]["config"] != to_dict(cfg):
        raise ValueError(f"{out_dir} holds variant {name!r} under another config; remove it or rename the variant")
    have = {d["step"] for d in done}
    clock = {"train": done[-1]["train_seconds"] if done else 0.0, "t0": time.perf_counter()}

    def callback(stage, step, metrics, saved):
        if saved is None or step in have:
            return
        train_s = clock["train"] + time.perf_counter() - clock["t0"]
        policy = GuidedPolicy(load_behavior(saved), "cep", seed=seed, solver=SAMPLER)
        t0 = time.perf_counter()
        res = evaluate(policy, task, [0.0], episodes, seed=EVAL_SEED + seed)
        scores = res.normalized[0]
        entry = {"variant": name, "config": to_dict(cfg), "step": step, "train_seconds": train_s,
                 "score": float(np.mean(scores)), "score_se": float(np.std(scores) / np.sqrt(len(scores))),
                 "scores": scores.tolist(), "loss": metrics.get("loss"), "eval_seconds": time.perf_counter() - t0,
                 "sampler": to_dict(SAMPLER)}
        done.append(entry)
        res_path.write_text(json.dumps(done, indent=1))
        log.info("%s step %d: %.1f ± %.1f after %.1f min of training (loss %.3f)", name, step, entry["score"],
                 entry["score_se"], train_s / 60, entry["loss"] or float("nan"))
        clock["train"], clock["t0"] = train_s, time.perf_counter()     # evaluation is not training compute

    run_cfg = from_dict(BehaviorConfig, {**to_dict(cfg), "ckpt_every": eval_every, "log_every": eval_every})
    if not done or done[-1]["step"] < cfg.steps:
        train_behavior(run_cfg, data.obs, data.actions, seed=seed, ckpt_path=ckpt, callback=callback)
    rows.extend(done)
    return done


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", required=True, help="YAML: variant name → partial behaviour config")
    ap.add_argument("--only", nargs="*", help="run only these variants (default: all)")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--evals", type=int, default=4, help="evaluations per variant, evenly spaced in steps")
    ap.add_argument("--data-root", default=os.environ.get("CEPDIST_DATA_ROOT"))
    ap.add_argument("--rows", type=int, default=50_000, help="rows of a generated *-local dataset")
    ap.add_argument("--out-dir", default="runs/behavior_levers")
    ap.add_argument("--out")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    variants = yaml.safe_load(Path(a.variants).read_text())
    unknown = set(a.only or []) - set(variants)
    if unknown:
        raise SystemExit(f"--only names variants not in {a.variants}: {sorted(unknown)}")
    base = to_dict(preset("local").base.behavior)
    cfgs = {n: from_dict(BehaviorConfig, merge(base, v or {})) for n, v in variants.items()
            if not a.only or n in a.only}
    ensure_datasets([a.task], a.data_root, a.rows, os.environ.get("CEPDIST_POLICY_DIR"))
    arr, task = datasets.load_arrays(a.task, root=Path(a.data_root) if a.data_root else None)
    data = datasets.to_transitions(arr, task.episode_length)
    dataset_score = datasets.dataset_score(arr, task)
    rows: list[dict] = []
    for name, cfg in cfgs.items():
        run_variant(name, cfg, a.task, a.seed, data, a.episodes, max(1, cfg.steps // a.evals),
                    Path(a.out_dir) / a.task / f"s{a.seed}" / name, rows)
    print(f"\n{a.task} seed {a.seed}: w = 0 test score ({a.episodes} episodes) by training compute; "
          f"dataset score {dataset_score:.1f}")
    for name in cfgs:
        line = [f"{r['train_seconds'] / 60:.1f}m:{r['score']:.1f}" for r in rows if r["variant"] == name]
        print(f"{name:>16s}  " + "  ".join(line))
    out = Path(a.out or Path(__file__).parent / "results" / f"behavior_levers-{a.task}-s{a.seed}.json")
    old = json.loads(out.read_text())["evaluations"] if out.is_file() else []
    keep = [r for r in old if r["variant"] not in cfgs] + rows
    out.write_text(json.dumps({"task": a.task, "seed": a.seed, "dataset_score": dataset_score,
                               "episodes": a.episodes, "evaluations": keep}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
