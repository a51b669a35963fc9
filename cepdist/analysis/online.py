"""The report of an offline-to-online (EDIS) study from its results table: per task, the offline agent, plain
fine-tuning and EDIS at the last online step with 95% bootstrap CIs over seeds, the paired per-seed
difference EDIS − plain, the wall time of each part, and learning curves (score against online step)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .plots import _plt, _save
from .stats import _cell, bootstrap_ci

PARTS = ("seconds_offline_iql", "seconds_offline_model", "seconds_env", "seconds_update", "seconds_model",
         "seconds_energies", "seconds_generate", "seconds_evaluate")


def online_table(df: pd.DataFrame, seed: int = 0, n_boot: int = 10_000) -> pd.DataFrame:
    rows = []
    for task, g in df.groupby("task"):
        last = g.online_step.max()
        offline = g[g.online_step == 0].groupby("seed")["score"].mean()     # the same agent in both arms
        rec = {"task": task, "online_steps": int(last), "dataset_score": float(g.dataset_score.mean())}
        for name, s in [("offline", offline)] + [(arm, g[(g.method == arm) & (g.online_step == last)]
                                                  .set_index("seed")["score"].sort_index()) for arm in ("plain", "edis")]:
            lo, hi = bootstrap_ci(s.to_numpy(), n_boot, seed=seed) if len(s) else (np.nan, np.nan)
            rec.update({f"{name}_mean": float(s.mean()) if len(s) else np.nan, f"{name}_lo": lo, f"{name}_hi": hi,
                        f"{name}_n": len(s)})
        e = g[(g.method == "edis") & (g.online_step == last)].set_index("seed")["score"]
        p = g[(g.method == "plain") & (g.online_step == last)].set_index("seed")["score"]
        d = (e - p).dropna().to_numpy()
        lo, hi = bootstrap_ci(d, n_boot, seed=seed) if len(d) else (np.nan, np.nan)
        rec.update({"diff_mean": float(d.mean()) if len(d) else np.nan, "diff_lo": lo, "diff_hi": hi})
        for arm in ("plain", "edis"):
            ga = g[(g.method == arm) & (g.online_step == last)]
            for part in PARTS:
                rec[f"{arm}_{part}"] = float(ga[part].mean()) if len(ga) and part in ga else np.nan
        rows.append(rec)
    return pd.DataFrame(rows)


def render(tt: pd.DataFrame) -> str:
    head = ["task", "online steps", "dataset", "offline IQL", "plain fine-tuning", "EDIS", "EDIS − plain, paired", "n"]
    md = ["Normalised score ×100 on the test episodes: mean over seeds [95% bootstrap CI]; offline IQL is the agent "
          "both arms start from (online step 0); the others at the last online step. A method that loses says so here.",
          "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in tt.iterrows():
        md.append("| " + " | ".join([r.task, str(r.online_steps), f"{r.dataset_score:.1f}",
                                     _cell(r.offline_mean, r.offline_lo, r.offline_hi),
                                     _cell(r.plain_mean, r.plain_lo, r.plain_hi), _cell(r.edis_mean, r.edis_lo, r.edis_hi),
                                     _cell(r.diff_mean, r.diff_lo, r.diff_hi), str(r.edis_n or r.plain_n)]) + " |")
    md += ["", "Wall time per trial (minutes, mean over seeds):", "",
           "| task | arm | " + " | ".join(p.removeprefix("seconds_").replace("_", " ") for p in PARTS) + " |",
           "|---|---|" + "---|" * len(PARTS)]
    for _, r in tt.iterrows():
        for arm in ("plain", "edis"):
            md.append(f"| {r.task} | {arm} | " + " | ".join("–" if np.isnan(r[f'{arm}_{p}']) else f"{r[f'{arm}_{p}'] / 60:.1f}"
                                                          for p in PARTS) + " |")
    return "\n".join(md) + "\n"


def learning_curves(df: pd.DataFrame, out: Path, seed: int = 0) -> list[Path]:
    plt = _plt()
    tasks = sorted(df.task.unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (arm, g) in enumerate(df[df.task == task].groupby("method")):
            steps = sorted(g.online_step.unique())
            m, lo, hi = [], [], []
            for st in steps:
                s = g[g.online_step == st].groupby("seed")["score"].mean().to_numpy()
                m.append(s.mean())
                b = bootstrap_ci(s, seed=seed)
                lo.append(b[0]); hi.append(b[1])
            ax.plot(steps, m, "o-", color=f"C{i}", label="EDIS" if arm == "edis" else "plain fine-tuning")
            ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.15)
        ax.axhline(float(df[df.task == task].dataset_score.mean()), color="gray", ls=":", label="dataset")
        ax.set_title(task); ax.set_xlabel("online environment steps"); ax.grid(alpha=0.3)
        ax.set_ylabel("normalised score (95% CI over seeds)")
        ax.legend(fontsize=7)
    return _save(fig, out / "online_learning_curves")


def build(df: pd.DataFrame, results: Path, out: Path, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tt = online_table(df, seed)
    tt.to_csv(out / "table.csv", index=False)
    md = render(tt)
    (out / "table.md").write_text(md)
    figs = learning_curves(df, out, seed)
    lines = [f"# Offline-to-online study `{', '.join(sorted(df.study.unique()))}`", "",
             f"Results table: `{results}`; {df.task.nunique()} task(s), {df.seed.nunique()} seed(s), arms "
             f"{', '.join(sorted(df.method.unique()))}.", "", md, ""]
    lines += [f"![{f.stem}]({f.name}) ([PDF]({f.stem}.pdf))" for f in figs if f.suffix == ".png"]
    (out / "index.md").write_text("\n".join(lines) + "\n")
    return out / "index.md"
