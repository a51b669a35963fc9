#!/usr/bin/env python
"""Run a QGPO study over D4RL (or locally generated) tasks on Ray: `cepdist study run` with the same flags.

    python sweeps/d4rl_all.py --preset smoke                  # minutes on 2 CPU cores, no network
    python sweeps/d4rl_all.py --preset paper --mlflow-uri http://127.0.0.1:5000 --store s3://bucket/cepdist

Re-running the same command resumes: stored stages are not recomputed, finished trials are not re-run.
"""
import sys

from cepdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "run", *sys.argv[1:]]))
