"""A study's report from its results table (results.parquet): the results table (Markdown, LaTeX, CSV)
with per-domain aggregates, every scale against w = 0 beside the dataset's own score, Q's and the energy
model's statistics, sensitivity figures, the task × scale heat map, learning curves (PNG + PDF), and an
index.md linking them. `cepdist report` runs it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import plots, stats


def build(results: Path, out: Path, fixed_scale: float | None = None, seed: int = 0,
          summary_csv: Path | None = None) -> Path:
    if Path(results).is_file() and "online_step" in pd.read_parquet(results, columns=None).columns:
        from . import online                 # an offline-to-online (EDIS) study
        return online.build(pd.read_parquet(results), Path(results), out, seed)
    df_all = stats.load_results(results)
    df, baselines = stats.split_baselines(df_all)
    if df.empty:
        raise ValueError(f"{results}: no QGPO rows (only baselines: {', '.join(sorted(baselines.method.unique()))})")
    out.mkdir(parents=True, exist_ok=True)
    study = ", ".join(sorted(df.study.unique()))
    scales = sorted(df.scale.unique())
    if fixed_scale is None:
        fixed_scale = 1.0 if 1.0 in scales else max(scales)
    elif fixed_scale not in scales:
        raise ValueError(f"--fixed-scale {fixed_scale:g} was not evaluated; scales: {', '.join(f'{s:g}' for s in scales)}")
    tt = stats.task_table(df, fixed_scale, seed=seed)
    dt = pd_concat([stats.domain_table(df, rule, fixed_scale, seed=seed) for rule in ("fixed", "validation", "best")])
    md, tex = stats.render(tt, dt, fixed_scale)
    (out / "table.md").write_text(md)
    (out / "table.tex").write_text(tex)
    tt.to_csv(out / "table.csv", index=False)
    dt.to_csv(out / "domains.csv", index=False)
    sm = stats.summary_table(df, fixed_scale, seed=seed)
    sm.to_csv(out / "summary.csv", index=False)
    if summary_csv is not None:
        Path(summary_csv).parent.mkdir(parents=True, exist_ok=True)
        sm.to_csv(summary_csv, index=False)
    st = stats.scale_table(df, seed=seed)
    st.to_csv(out / "scales.csv", index=False)
    diag = stats.diagnostics(df)
    diag.to_csv(out / "critic.csv", index=False)
    ht = stats.health_table(diag)
    health_md = ["## Q and the energy model", "", stats.render_health_table(ht), ""] if len(ht) else []
    compute_md = compute_section(Path(results).parent / "study.json")
    base_md = ""
    if len(baselines):
        bt = stats.baseline_table(df_all, seed=seed)
        bt.to_csv(out / "baselines.csv", index=False)
        base_md = "\n".join(["## Offline baselines", "", stats.render_baseline_table(bt), ""])
    figs = plots.sensitivity(df, out, seed) + plots.heatmap(df, out) + plots.learning_curves(df, out, seed) \
        + plots.time_to_quality(df, out, baselines) + plots.q_statistics(diag, out)
    n_trials = df.drop_duplicates(stats.KEYS[:6]).shape[0]
    lines = [f"# Study `{study}`", "", f"Results table: `{results}`; {n_trials} trials, "
             f"{df.task.nunique()} task(s), {df.seed.nunique()} seed(s), scales {', '.join(f'{s:g}' for s in scales)}.",
             "", "## Results table", "", md, "", "## Every guidance scale against the behaviour model (w = 0)", "",
             stats.render_scale_table(st), "", *health_md, *compute_md, base_md,
             "Files: [table.md](table.md), [table.tex](table.tex), [table.csv](table.csv), [scales.csv](scales.csv), "
             "[summary.csv](summary.csv) (behaviour / fixed / validation rules per task), [domains.csv](domains.csv), [critic.csv](critic.csv) (losses and Q statistics per evaluation); the tidy results table is "
             f"`{results}`.", "", "## Figures", ""]
    for f in figs:
        if f.suffix == ".png":
            lines += [f"### {f.stem.replace('_', ' ')}", "", f"![{f.stem}]({f.name}) ([PDF]({f.stem}.pdf))", ""]
    (out / "index.md").write_text("\n".join(lines))
    return out / "index.md"


def compute_section(study_json: Path) -> list[str]:
    """The study's policy sampler and temperature, its wall time over its invocations and its compute per stage,
    from the study.json the driver writes beside the results table (absent: nothing)."""
    import json
    if not study_json.is_file():
        return []
    s = json.loads(study_json.read_text())
    lines = []
    base = s.get("config", {}).get("base")
    if base and "sampler" in base:           # policy settings that results depend on but the table has no column for
        sp = base["sampler"]
        t = base.get("temperature", 1.0)
        lines += [f"Policy sampler: {sp['steps']} steps, {sp['spacing']}, order {sp['order']}; temperature {t:g}"
                  + ("" if t == 1 else " (the starting noise scaled: colder than the behaviour model's own "
                     "distribution, so w = 0 is not an exact sample of it)") + ".", ""]
    lines += ["## Compute", ""]
    if "wall_seconds" in s:
        inv = s["invocations"]
        outcomes = ", ".join(f"{r['outcome']} {r['seconds'] / 60:.0f} min" for r in inv)
        other = sorted({r["study"] for r in inv if r.get("study", s.get("ident")) != s.get("ident")})
        reused = (f" {sum(r.get('study') in other for r in inv)} of them ran an earlier configuration "
                  f"({', '.join(other)}) that computed stages this study uses;" if other else "")
        lines += [f"Wall time {s['wall_seconds'] / 3600:.2f} h over {len(inv)} invocation(s) ({outcomes});{reused} "
                  "'running' marks an invocation whose driver was killed (its time known to within 10 s).", ""]
    if s.get("stage_seconds"):
        cpu = lambda v: f"{v['cpu_total'] / 60:.0f}" if "cpu_total" in v else "–"
        lines += ["| stage | executions | mean wall minutes | total wall minutes | total CPU minutes |",
                  "|---|---|---|---|---|"]
        lines += [f"| {st} | {v['n']} | {v['mean'] / 60:.1f} | {v['total'] / 60:.0f} | {cpu(v)} |"
                  for st, v in s["stage_seconds"].items()]
        lines += ["", "(Wall minutes inside each trial, which holds its share of the CPUs, for the run that finished "
                  "each stage; CPU minutes of the trial's process, including a training loop's interrupted runs.)",
                  ""]
    return lines


def pd_concat(frames):
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
