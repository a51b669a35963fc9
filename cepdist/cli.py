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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if args.group == "toy":
        _toy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
