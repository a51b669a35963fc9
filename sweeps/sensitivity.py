#!/usr/bin/env python
"""Sensitivity study: vary one hyperparameter at a time around the defaults (the first value of each list).

    python sweeps/sensitivity.py --preset smoke --betas 3 1 10 --Ks 8 4 16 --steps 5 10
"""
import sys

from cepdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "run", "--mode", "sensitivity", *sys.argv[1:]]))
