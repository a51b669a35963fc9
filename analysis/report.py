#!/usr/bin/env python
"""Build a study's report from its results table: `cepdist report` with the same flags.

    python analysis/report.py --study smoke                   # reads results/smoke/results.parquet
    python analysis/report.py --results path/to/results.parquet --out report/ --fixed-scale 3
"""
import sys

from cepdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
