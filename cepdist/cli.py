"""The `cepdist` command line: studies, reports, datasets and the 2-D toy.

    cepdist study run --preset smoke            # a study on the embedded default (local Ray, sqlite MLflow)
    cepdist study plan --preset paper --json    # the trial grid, stage keys and what is stored, without Ray
    cepdist report --study smoke                # tables and figures from the study's results table
    cepdist data list | info | download | generate
    cepdist toy run | sample | data
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np


def _toy(args):
    from .algos import toy
    if args.cmd == "data":
        x, e = toy.make_dataset(args.dataset, args.n, args.seed)
        np.savez(args.out, x=x, e=e)
        print(f"wrote {args.out}: x {x.shape}, e {e.shape}")
    elif args.cmd == "sample":
        models = toy.ToyModels(args.dataset, toy.PRESETS[args.preset], Path(args.cache), args.seed)
        x = models.sample(args.method, args.beta, args.n, args.seed)
        np.save(args.out, x)
        print(f"wrote {args.out}: {x.shape[0]} samples of {args.method} guidance at beta={args.beta:g}")
    elif args.cmd == "run":
        res = toy.run_experiment(Path(args.out), args.preset, args.datasets, args.betas, args.methods,
                                 args.n_eval, Path(args.cache) if args.cache else None, args.seed)
        out = Path(res["out"])
        print((out / "toy_distances.md").read_text())
        print(f"table: {out / 'toy_distances.md'} (csv beside it); figures: {out}/toy_beta*.png")


def _data(args):
    import json
    from .data import datasets
    from .data.tasks import TASKS, get_task
    if args.cmd == "list":
        root = Path(args.root) if args.root else datasets.d4rl_dir()
        print(f"{'task':34s} {'domain':10s} {'env':20s} {'local file':10s}")
        for name, t in TASKS.items():
            have = datasets.local_path(t, root).is_file()
            print(f"{name:34s} {t.domain:10s} {t.env_id:20s} {'yes' if have else '-':10s}")
        print(f"\ncache: {root} (D4RL_DATASET_DIR); generated tasks end in -local")
    elif args.cmd == "info":
        if not (args.task or args.task_opt):
            raise ValueError("data info needs a task: `cepdist data info TASK` or `--task TASK`")
        task = get_task(args.task or args.task_opt)
        path = Path(args.path) if args.path else datasets.local_path(task, Path(args.root) if args.root else None)
        info = datasets.summarize(datasets.read_hdf5(path, task), task, path)
        if args.json:
            print(json.dumps(info))
        else:
            for k, v in info.items():
                print(f"{k:18s} {v}")
    elif args.cmd == "download":
        print(datasets.download(get_task(args.task), Path(args.root) if args.root else None))
    elif args.cmd == "generate":
        from .envs.generate import generate
        task = get_task(args.task)
        out = Path(args.out) if args.out else datasets.local_path(task, Path(args.root) if args.root else None)
        generate(task.name, out, args.n, args.seed, args.policy_dir, args.n_envs)
        info = datasets.summarize(datasets.read_hdf5(out, task), task, out)
        print(json.dumps(info))


def study_layers(args) -> list[dict]:
    """The YAML file and the flags as two config layers merged over the preset (flags last)."""
    import yaml
    from .data.tasks import LOCAL_ENVS, LOCAL_LEVELS, TASKS
    layers = []
    if args.config:
        path = Path(args.config)
        try:
            layers.append(yaml.safe_load(path.read_text()) or {})
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read it ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ValueError(f"--config {where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(layers[-1], dict):
            raise ValueError(f"--config {path}: expected a mapping of StudyConfig fields, "
                             f"got {type(layers[-1]).__name__}")
    flags = {"name": args.name, "seeds": args.seeds, "betas": args.betas, "Ks": args.Ks, "solver_steps": args.steps,
             "methods": args.methods, "scales": args.scales, "store": args.store, "mlflow_uri": args.mlflow_uri,
             "data_root": args.data_root, "policy_dir": args.policy_dir, "train_workers": args.train_workers,
             "use_gpu": args.gpu, "eval_actors": args.eval_actors, "mode": args.mode, "algorithms": args.algorithms}
    tasks = list(args.tasks or ())
    if args.all_d4rl:
        tasks += [n for n, t in TASKS.items() if not t.local]
    if args.local_tasks:
        tasks += [f"{e}-{l}-local" for e in LOCAL_ENVS for l in LOCAL_LEVELS]
    if tasks:
        flags["tasks"] = tasks
    layers.append({k: v for k, v in flags.items() if v is not None})
    return layers


def _study(args):
    import json
    from .distributed.presets import preset
    from .distributed.study import format_plan, load_study, plan
    study = load_study(preset(args.preset), *study_layers(args))
    if args.cmd == "plan":
        p = plan(study)
        print(json.dumps(p, indent=2) if args.json else format_plan(p))
        return
    return _run_study(study, args)


def _report(args):
    from .analysis.report import build
    results = Path(args.results) if args.results else Path("results") / args.study / "results.parquet"
    out = Path(args.out) if args.out else results.parent / "report"
    print(f"report: {build(results, out, args.fixed_scale, args.seed, args.summary_csv)}")


def _edis(args):
    import json
    if args.cmd == "toy":
        from .algos.edis.toy import TOY_PRESETS, write_toy
        print(write_toy(TOY_PRESETS[args.preset], Path(args.out), args.seed))
        return 0
    from .distributed.edis import load_study, plan
    from .distributed.presets import edis_preset
    layers = []
    if args.config:
        import yaml
        layers.append(yaml.safe_load(Path(args.config).read_text()) or {})
    layers.append({k: v for k, v in {"name": args.name, "tasks": args.tasks, "seeds": args.seeds, "arms": args.arms,
                                     "store": args.store, "mlflow_uri": args.mlflow_uri, "data_root": args.data_root,
                                     "policy_dir": args.policy_dir, "eval_actors": args.eval_actors}.items()
                   if v is not None})
    study = load_study(edis_preset(args.preset), *layers)
    if args.cmd == "plan":
        print(json.dumps(plan(study), indent=2))
        return 0
    return _run_study(study, args)


def _run_study(study, args) -> int:
    import ray
    from .distributed.driver import StudyFailed, StudyInterrupted, run_study
    try:
        summary = run_study(study, Path(args.out) if args.out else None, verbose=args.verbose)
    except StudyFailed as e:                  # one line: the stage, the trial, the cause
        print(f"cepdist: {e}", file=sys.stderr)
        return 1
    except (StudyInterrupted, KeyboardInterrupt) as e:
        print(f"cepdist: {e or 'interrupted; run the same command again to resume'}", file=sys.stderr)
        return 130
    finally:
        if ray.is_initialized():              # a clean shutdown: no worker stack traces on the way out
            ray.shutdown()
    ex = ", ".join(f"{k} {v}" for k, v in summary["executions"].items()) or "nothing (all stored)"
    n = len(summary["invocations"])
    print(f"study {summary['study']}: {summary['trials']} trials done in {summary['seconds']:.0f} s"
          + (f" ({summary['wall_seconds']:.0f} s over {n} invocations)" if n > 1 else "") + f"; computed: {ex}")
    print(f"results table: {summary['results_table']} ({summary['rows']} rows); summary: "
          f"{Path(summary['results_table']).parent / 'study.json'}")
    print(f"report: cepdist report --study {summary['study']}")
    print(f"browse the runs: {summary['mlflow']}")
    return 0


def add_edis_arguments(p: argparse.ArgumentParser):
    from .distributed.edis import ARMS
    from .distributed.presets import EDIS_PRESETS
    p.add_argument("--preset", default="smoke", choices=EDIS_PRESETS)
    p.add_argument("--config", help="a (partial) EDISStudyConfig as YAML, merged over the preset; flags override both")
    p.add_argument("--name", help="study name (default: the preset's)")
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--arms", nargs="+", choices=ARMS, help="edis and/or plain (IQL fine-tuning without EDIS)")
    p.add_argument("--store")
    p.add_argument("--mlflow-uri")
    p.add_argument("--data-root")
    p.add_argument("--policy-dir")
    p.add_argument("--eval-actors", type=int)
    p.add_argument("--out", help="results folder (default results/<name>)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)


def add_study_arguments(p: argparse.ArgumentParser):
    from .core.guidance import METHODS
    from .distributed.presets import PRESETS
    from .distributed.study import ALGORITHMS
    p.add_argument("--preset", default="smoke", choices=PRESETS)
    p.add_argument("--config", help="a (partial) StudyConfig as YAML, merged over the preset; flags override both")
    p.add_argument("--name", help="study name (MLflow experiment; default: the preset's)")
    p.add_argument("--tasks", nargs="+", help="task names (default: the preset's)")
    p.add_argument("--all-d4rl", action="store_true", help="every D4RL task (all levels, ant, AntMaze v0+v2)")
    p.add_argument("--local-tasks", action="store_true", help="every locally generated *-local task")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--betas", nargs="+", type=float)
    p.add_argument("--Ks", nargs="+", type=int, help="support actions per state")
    p.add_argument("--steps", nargs="+", type=int, help="solver steps (support and evaluation)")
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--scales", nargs="+", type=float, help="guidance scales (default: the task's list)")
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS,
                   help="qgpo (the grid) and offline baselines on the same data, seeds and episodes (iql)")
    p.add_argument("--mode", choices=["grid", "sensitivity"])
    p.add_argument("--store", help="artifact store: a directory or s3://… / gs://…")
    p.add_argument("--mlflow-uri", help="tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--data-root", help="dataset cache (default $D4RL_DATASET_DIR or ~/.d4rl/datasets)")
    p.add_argument("--policy-dir", help="agents for generating *-local datasets (or $CEPDIST_POLICY_DIR)")
    p.add_argument("--train-workers", type=int, help="Ray Train workers per stage (0: train inside the trial)")
    p.add_argument("--gpu", action="store_true", default=None)
    p.add_argument("--eval-actors", type=int, help="evaluation actors per trial (0: evaluate inside the trial, "
                   "sharing its CPUs; for one machine)")
    p.add_argument("--out", help="results folder (default results/<name>)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="Ray's and Tune's own output, stage progress lines")


def build_parser() -> argparse.ArgumentParser:
    from .algos.toy import BETAS, DATASETS, PRESETS
    from .core.guidance import METHODS
    p = argparse.ArgumentParser(prog="cepdist", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="group", required=True)
    t = sub.add_parser("toy", help="the paper's 2-D exact-vs-inexact guidance experiment")
    ts = t.add_subparsers(dest="cmd", required=True)
    d = ts.add_parser("data", help="write a toy dataset: arrays x (N×2) and e (N)")
    d.add_argument("--dataset", required=True, choices=DATASETS)
    d.add_argument("--n", type=int, default=100_000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    s = ts.add_parser("sample", help="write N guided samples (N×2) from the trained (cached) models")
    s.add_argument("--dataset", required=True, choices=DATASETS)
    s.add_argument("--beta", type=float, required=True)
    s.add_argument("--method", default="cep", choices=METHODS)
    s.add_argument("--n", type=int, default=5000)
    s.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    s.add_argument("--cache", default=".cepdist_cache/toy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    r = ts.add_parser("run", help="all datasets × β × methods: distance table and figures")
    r.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    r.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    r.add_argument("--betas", nargs="+", type=float, default=list(BETAS))
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    r.add_argument("--n-eval", type=int, default=5000)
    r.add_argument("--cache", default=None, help="model cache (default: OUT/cache)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="results/toy")

    st = sub.add_parser("study", help="QGPO studies on Ray: tasks × seeds × hyperparameters")
    sts = st.add_subparsers(dest="cmd", required=True)
    x = sts.add_parser("run", help="run or resume a study (stored stages are reused)")
    add_study_arguments(x)
    x = sts.add_parser("plan", help="the trial grid, stage keys and what is stored, without starting Ray")
    add_study_arguments(x)
    x.add_argument("--json", action="store_true", help="one JSON object")

    e = sub.add_parser("edis", help="EDIS offline-to-online studies on Ray: tasks × seeds × {edis, plain}")
    es = e.add_subparsers(dest="cmd", required=True)
    add_edis_arguments(es.add_parser("run", help="run or resume an EDIS study (stored stages are reused)"))
    add_edis_arguments(es.add_parser("plan", help="its trials, stage keys and what is stored (JSON)"))
    x = es.add_parser("toy", help="the exactness toy: distances to the online distribution per factor")
    x.add_argument("--preset", default="cpu", choices=("cpu", "tiny"))
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--out", default="results/edis-toy")

    r = sub.add_parser("report", help="tables and figures from a study's results table")
    r.add_argument("--study", default="smoke", help="study name: reads results/<study>/results.parquet")
    r.add_argument("--results", help="an explicit results.parquet (instead of --study's)")
    r.add_argument("--out", help="report folder (default: beside the results table, report/)")
    r.add_argument("--fixed-scale", type=float, help="the fixed-w selection rule (default 1, the exact tilt)")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.add_argument("--summary-csv", help="also write the per-task summary (behaviour/fixed/validation) here")

    d = sub.add_parser("data", help="offline datasets: D4RL, Minari, locally generated")
    ds = d.add_subparsers(dest="cmd", required=True)
    x = ds.add_parser("list", help="all tasks and which are available locally")
    x.add_argument("--root", help="dataset cache (default $D4RL_DATASET_DIR or ~/.d4rl/datasets)")
    x = ds.add_parser("info", help="summary of a task's dataset (or of an explicit file)")
    x.add_argument("task", nargs="?", help="task name (or --task)")
    x.add_argument("--task", dest="task_opt", help="task whose dimensions and reference scores apply")
    x.add_argument("--path", help="an HDF5 file in the D4RL layout (default: the task's cached file)")
    x.add_argument("--root")
    x.add_argument("--json", action="store_true", help="one JSON object")
    x = ds.add_parser("download", help="fetch a D4RL task's original file into the cache")
    x.add_argument("task")
    x.add_argument("--root")
    x = ds.add_parser("generate", help="write an <env>-<level>-local dataset from real agents' rollouts")
    x.add_argument("--task", required=True, help="e.g. hopper-medium-local")
    x.add_argument("--n", type=int, default=1_000_000, help="rows per part (medium-expert has two parts)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--policy-dir", help="agents folder (default $CEPDIST_POLICY_DIR)")
    x.add_argument("--n-envs", type=int, default=8)
    x.add_argument("--out", help="output file (default: the cache, where `data info`/training find it)")
    x.add_argument("--root")
    return p


def setup_logging(verbose: bool):
    """cepdist's own lines at INFO; other libraries' only with --verbose."""
    import warnings
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("cepdist").setLevel(logging.INFO)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("ray", "ray.tune", "ray.train", "ray.data", "mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        rc = {"toy": _toy, "data": _data, "study": _study, "edis": _edis, "report": _report}[args.group](args)
    except (ValueError, KeyError) as e:       # bad input: a clear message, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"cepdist: error: {msg}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
