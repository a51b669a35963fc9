#!/usr/bin/env python
"""Run an EDIS offline-to-online study on Ray: `cepdist edis run` with the same flags.

    python sweeps/edis.py --preset smoke                   # minutes on 2 CPU cores, no network
    python sweeps/edis.py --preset local                   # hopper-medium-local, 3 seeds, EDIS vs plain fine-tuning
    python sweeps/edis.py --preset paper --mlflow-uri http://127.0.0.1:5000 --store s3://bucket/cepdist

Re-running the same command resumes: stored stages are reused, an interrupted online phase continues from its
checkpoint (agent, replay buffer, energies) without losing an online step.
"""
import sys

from cepdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["edis", "run", *sys.argv[1:]]))
