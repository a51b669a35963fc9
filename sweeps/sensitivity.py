#!/usr/bin/env python
"""Sensitivity study: vary one hyperparameter at a time around the defaults (the first value of each list).

    python sweeps/sensitivity.py --preset smoke --betas 3 1 10 --Ks 8 4 16 --steps 5 10
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from d4rl_all import main  # noqa: E402

if __name__ == "__main__":
    main(mode="sensitivity")
