"""Time to quality: the score a QGPO configuration reaches per unit of training compute, for one task and seed.

Runs a one-trial study (the preset's settings, a --config YAML merged over them; stages stored, so a rerun
or a longer run reuses what is done) through the platform, then prints, for every evaluation step, the
cumulative training compute behind the evaluated policy and its test scores (w = 0, the w chosen on the
validation episodes, every w), and the result at the budget: the last evaluation whose compute fits
--budget-minutes. Writes JSON (default benchmarks/results/time_to_quality-<task>-s<seed>.json).

    python benchmarks/time_to_quality.py --task hopper-medium-local --preset local --budget-minutes 30
    python benchmarks/time_to_quality.py --task hopper-medium-local --config lever.yaml --name lever-lr3e-4
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd
import yaml

from cepdist.distributed.driver import run_study
from cepdist.distributed.presets import PRESETS, preset
from cepdist.distributed.study import load_study


def summarise(df: pd.DataFrame, budget_s: float | None) -> dict:
    test, val = df[df.episode_set == "test"], df[df.episode_set == "validation"]
    steps = []
    for step, g in test.groupby("step"):
        scores = g.set_index("scale").score
        v = val[val.step == step]
        w_val = float(v.set_index("scale").score.idxmax()) if len(v) else None
        steps.append({"step": int(step), "compute_minutes": float(g.compute_seconds.iloc[0]) / 60,
                      "score_w0": float(scores.get(0.0, float("nan"))), "w_validation": w_val,
                      "score_validation_w": float(scores[w_val]) if w_val is not None else None,
                      "scores": {f"{w:g}": float(s) for w, s in scores.items()}})
    fit = [s for s in steps if budget_s is None or s["compute_minutes"] * 60 <= budget_s]
    return {"evaluations": steps, "at_budget": fit[-1] if fit else None,
            "dataset_score": float(test.dataset_score.iloc[0])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="local", choices=PRESETS)
    ap.add_argument("--config", help="a (partial) StudyConfig as YAML merged over the preset")
    ap.add_argument("--name", help="study name (default: ttq-<task>-s<seed>)")
    ap.add_argument("--budget-minutes", type=float, help="report the last evaluation within this compute")
    ap.add_argument("--store", default="runs/store")
    ap.add_argument("--out")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("cepdist").setLevel(logging.INFO)
    name = a.name or f"ttq-{a.task}-s{a.seed}"
    user = yaml.safe_load(Path(a.config).read_text()) if a.config else None
    base = load_study(preset(a.preset), user)
    axes = base.axes()                                   # one trial: the first value of every axis
    first = {"betas": [axes["beta"][0]], "solver_steps": [axes["steps"][0]], "methods": [axes["method"][0]],
             "Ks": [axes["K"][0]] if axes["K"][0] is not None else None}
    study = load_study(base, {"name": name, "tasks": [a.task], "seeds": [a.seed], "store": a.store, **first})
    summary = run_study(study, Path("results") / name)
    res = summarise(pd.read_parquet(summary["results_table"]), a.budget_minutes * 60 if a.budget_minutes else None)
    print(f"\n{a.task} seed {a.seed} ({name}); dataset score {res['dataset_score']:.1f}")
    print(f"{'step':>7s} {'compute':>9s} {'w=0':>7s} {'w (val)':>8s} {'score':>7s}   all w")
    for s in res["evaluations"]:
        wv = "–" if s["w_validation"] is None else f"{s['w_validation']:g}"
        sv = float("nan") if s["score_validation_w"] is None else s["score_validation_w"]
        print(f"{s['step']:7d} {s['compute_minutes']:7.1f} m {s['score_w0']:7.1f} {wv:>8s} {sv:7.1f}   "
              + ", ".join(f"{w}: {v:.1f}" for w, v in s["scores"].items()))
    if a.budget_minutes:
        b = res["at_budget"]
        print(f"within {a.budget_minutes:g} min: " + ("nothing evaluated" if b is None else
              f"step {b['step']} ({b['compute_minutes']:.1f} min): w=0 {b['score_w0']:.1f}, "
              f"w={b['w_validation']:g} (validation) {b['score_validation_w']:.1f}"))
    out = Path(a.out or Path(__file__).parent / "results" / f"time_to_quality-{a.task}-s{a.seed}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": a.task, "seed": a.seed, "study": name, "config": a.config,
                               "budget_minutes": a.budget_minutes, **res}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
