"""The `cepdist` command line."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np


def _toy(args):
    from . import toy
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
    from . import datasets
    from .tasks import TASKS, get_task
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
        from .generate import generate
        task = get_task(args.task)
        out = Path(args.out) if args.out else datasets.local_path(task, Path(args.root) if args.root else None)
        generate(task.name, out, args.n, args.seed, args.policy_dir, args.n_envs)
        info = datasets.summarize(datasets.read_hdf5(out, task), task, out)
        print(json.dumps(info))


def build_parser() -> argparse.ArgumentParser:
    from .guidance import METHODS
    from .toy import BETAS, DATASETS, PRESETS
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        {"toy": _toy, "data": _data}[args.group](args)
    except (ValueError, KeyError) as e:       # bad input: a clear message, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"cepdist: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
