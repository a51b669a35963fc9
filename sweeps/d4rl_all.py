#!/usr/bin/env python
"""Run a QGPO study over D4RL (or locally generated) tasks on Ray: staged Tune sweeps, Ray Train,
actor-pool evaluation, MLflow tracking.

    python sweeps/d4rl_all.py --preset smoke                  # minutes on 2 CPU cores, no network
    python sweeps/d4rl_all.py --preset paper --mlflow-uri http://127.0.0.1:5000 --store s3://bucket/cepdist

Re-running the same command resumes: stored stages are not recomputed, finished trials are not re-run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cepdist.distributed.presets import preset  # noqa: E402
from cepdist.distributed.sweep import StudyInterrupted, run_study  # noqa: E402
from cepdist.tasks import LOCAL_ENVS, LOCAL_LEVELS, TASKS  # noqa: E402


def parse(argv=None, mode: str = "grid"):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke", choices=["smoke", "paper", "local"])
    p.add_argument("--config", help="a StudyConfig as YAML (overrides the preset; flags override both)")
    p.add_argument("--name", help="study name (MLflow experiment; default: the preset's)")
    p.add_argument("--tasks", nargs="+", help="task names (default: the preset's)")
    p.add_argument("--all-d4rl", action="store_true", help="every D4RL task (all levels, ant, AntMaze v0+v2)")
    p.add_argument("--local-tasks", action="store_true", help="every locally generated *-local task")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--betas", nargs="+", type=float)
    p.add_argument("--Ks", nargs="+", type=int)
    p.add_argument("--steps", nargs="+", type=int, help="solver steps")
    p.add_argument("--methods", nargs="+", choices=["cep", "mse", "dps"])
    p.add_argument("--scales", nargs="+", type=float, help="guidance scales (default: the task's list)")
    p.add_argument("--mode", default=mode, choices=["grid", "sensitivity"])
    p.add_argument("--store", help="artifact store: a directory or s3://… / gs://…")
    p.add_argument("--mlflow-uri", help="tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--data-root", help="dataset cache (default $D4RL_DATASET_DIR or ~/.d4rl/datasets)")
    p.add_argument("--policy-dir", help="agents for generating *-local datasets (or $CEPDIST_POLICY_DIR)")
    p.add_argument("--train-workers", type=int, help="Ray Train workers per stage (0: train inside the trial)")
    p.add_argument("--gpu", action="store_true", default=None)
    p.add_argument("--eval-actors", type=int, help="evaluation actors per trial (0: evaluate inside the trial, "
                   "sharing its CPUs; for one machine)")
    p.add_argument("--out", help="results folder (default results/<name>)")
    return p.parse_args(argv)


def study_from_args(a):
    s = preset(a.preset)
    if a.config:
        import yaml
        from cepdist.config import from_dict, to_dict
        from cepdist.distributed.sweep import StudyConfig
        d = to_dict(s)
        user = yaml.safe_load(Path(a.config).read_text()) or {}
        base = {**d.pop("base"), **user.pop("base", {})} if "base" in user else d.pop("base")
        s = from_dict(StudyConfig, {**d, **user, "base": base})
    over = {"name": a.name, "seeds": a.seeds, "betas": a.betas, "Ks": a.Ks, "solver_steps": a.steps,
            "methods": a.methods, "scales": a.scales, "store": a.store, "mlflow_uri": a.mlflow_uri,
            "data_root": a.data_root, "policy_dir": a.policy_dir, "train_workers": a.train_workers,
            "use_gpu": a.gpu, "eval_actors": a.eval_actors, "mode": a.mode}
    tasks = list(a.tasks or ())
    if a.all_d4rl:
        tasks += [n for n, t in TASKS.items() if not t.local]
    if a.local_tasks:
        tasks += [f"{e}-{l}-local" for e in LOCAL_ENVS for l in LOCAL_LEVELS]
    if tasks:
        over["tasks"] = tasks
    over = {k: (tuple(v) if isinstance(v, list) else v) for k, v in over.items() if v is not None}
    return dataclasses.replace(s, **over)


def main(argv=None, mode: str = "grid"):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    a = parse(argv, mode)
    study = study_from_args(a)
    try:
        summary = run_study(study, Path(a.out) if a.out else None)
    except StudyInterrupted as e:
        sys.exit(f"{e}")
    print(json.dumps(summary, indent=2))
    print(f"\nresults table: {summary['results_table']}")
    print(f"browse the runs: {summary['mlflow']}")


if __name__ == "__main__":
    main()
