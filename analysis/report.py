#!/usr/bin/env python
"""Build a study's report from its MLflow runs: the tidy results frame (Parquet), the results table
(Markdown, LaTeX, CSV) with per-domain aggregates, every scale against w = 0 beside the dataset's own
score, the critic's losses and Q statistics, sensitivity figures, the task × scale heat map, learning
curves (PNG + PDF), and an index.md linking them.

    python analysis/report.py --experiment smoke --out results/smoke/report
    python analysis/report.py --experiment paper --tracking-uri http://127.0.0.1:5000 --out report/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cepdist import analysis, plots  # noqa: E402
from cepdist.tracking import DEFAULT_URI  # noqa: E402


def build(experiment: str, tracking_uri: str, out: Path, fixed_scale: float | None = None, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    df = analysis.frame_from_mlflow(experiment, tracking_uri)
    df.to_parquet(out / "results.parquet", index=False)
    scales = sorted(df.scale.unique())
    if fixed_scale is None:
        fixed_scale = 1.0 if 1.0 in scales else max(scales)
    elif fixed_scale not in scales:
        raise ValueError(f"--fixed-scale {fixed_scale:g} was not evaluated; scales: {', '.join(f'{s:g}' for s in scales)}")
    tt = analysis.task_table(df, fixed_scale, seed=seed)
    dt = pd_concat([analysis.domain_table(df, rule, fixed_scale, seed=seed) for rule in ("fixed", "best")])
    md, tex = analysis.render(tt, dt, fixed_scale)
    (out / "table.md").write_text(md)
    (out / "table.tex").write_text(tex)
    tt.to_csv(out / "table.csv", index=False)
    dt.to_csv(out / "domains.csv", index=False)
    st = analysis.scale_table(df, seed=seed)
    st.to_csv(out / "scales.csv", index=False)
    diag = analysis.diagnostics_from_mlflow(experiment, tracking_uri)
    diag.to_csv(out / "critic.csv", index=False)
    figs = plots.sensitivity(df, out, seed) + plots.heatmap(df, out) + plots.learning_curves(df, out, seed) \
        + plots.q_statistics(diag, out)
    lines = [f"# Study `{experiment}`", "", f"Tracking URI: `{tracking_uri}`; {df.run_id.nunique()} runs, "
             f"{df.task.nunique()} task(s), {df.seed.nunique()} seed(s), scales {', '.join(f'{s:g}' for s in scales)}.",
             "", "## Results table", "", md, "", "## Every guidance scale against the behaviour model (w = 0)", "",
             analysis.render_scale_table(st), "",
             "Files: [table.md](table.md), [table.tex](table.tex), [table.csv](table.csv), [scales.csv](scales.csv), "
             "[domains.csv](domains.csv), [critic.csv](critic.csv) (losses and Q statistics per evaluation), "
             "[results.parquet](results.parquet) (the tidy frame).", "", "## Figures", ""]
    for f in figs:
        if f.suffix == ".png":
            lines += [f"### {f.stem.replace('_', ' ')}", "", f"![{f.stem}]({f.name}) ([PDF]({f.stem}.pdf))", ""]
    (out / "index.md").write_text("\n".join(lines))
    return out / "index.md"


def pd_concat(frames):
    import pandas as pd
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="the study name (its MLflow experiment)")
    p.add_argument("--tracking-uri", default=DEFAULT_URI)
    p.add_argument("--out", required=True)
    p.add_argument("--fixed-scale", type=float, help="the fixed-w selection rule (default 1, the exact tilt)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    a = p.parse_args(argv)
    try:
        index = build(a.experiment, a.tracking_uri, Path(a.out), a.fixed_scale, a.seed)
    except ValueError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
