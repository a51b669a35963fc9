"""Figures of a study, from the tidy results frame: sensitivity to each swept hyperparameter (with 95% CI
bands over seeds), a task × guidance-scale heat map, and learning curves. PNG and PDF each."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .stats import bootstrap_ci, final, method_label


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> list[Path]:
    out = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    for p in out:
        fig.savefig(p, dpi=130, bbox_inches="tight")
    _plt().close(fig)
    return out


def _band(g: pd.DataFrame, x: str, seed: int):
    xs, m, lo, hi = [], [], [], []
    for xv, gx in g.groupby(x):
        per_seed = gx.groupby("seed")["score"].mean().to_numpy()
        xs.append(xv); m.append(per_seed.mean())
        l, h = bootstrap_ci(per_seed, 2000, seed=seed)
        lo.append(l if not np.isnan(l) else per_seed.mean()); hi.append(h if not np.isnan(h) else per_seed.mean())
    return np.array(xs), np.array(m), np.array(lo), np.array(hi)


def sensitivity(df: pd.DataFrame, out: Path, seed: int = 0) -> list[Path]:
    """Score against each hyperparameter that takes more than one value (scale: all of them; β, K, steps:
    at each trial's best scale), one line per task (and guidance method, when several) with its 95% CI band
    over seeds."""
    plt = _plt()
    f = final(df)
    best = f.loc[f.groupby(["task", "seed", "beta", "K", "steps", "method"])["score"].idxmax()]
    files = []
    for h, src, label in (("scale", f, "guidance scale w"), ("beta", best, "β (CEP temperature)"),
                          ("K", best, "K support actions"), ("steps", best, "solver steps")):
        if f[h].nunique() < 2 and h != "scale":
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        by_method = src["method"].nunique() > 1
        for i, ((task, method), g) in enumerate(src.groupby(["task", "method"])):
            xs, m, lo, hi = _band(g, h, seed)
            ax.plot(xs, m, "o-", color=f"C{i}", label=f"{task} ({method_label(method)})" if by_method else task)
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.2)
        ax.set_xlabel(label); ax.set_ylabel("normalised score (mean, 95% CI over seeds)")
        if h == "beta":
            ax.set_xscale("log")
        ax.legend(fontsize=7); ax.grid(alpha=0.3)
        ax.set_title(f"Sensitivity to {label}" + ("" if h == "scale" else " (best w per trial)"))
        files += _save(fig, out / f"sensitivity_{h}")
    return files


def heatmap(df: pd.DataFrame, out: Path) -> list[Path]:
    plt = _plt()
    f = final(df)
    piv = f.groupby(["task", "scale"])["score"].mean().unstack("scale")
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * piv.shape[1], 1.0 + 0.45 * piv.shape[0]))
    im = ax.imshow(piv.to_numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(piv.shape[1]), [f"{c:g}" for c in piv.columns])
    ax.set_yticks(range(piv.shape[0]), piv.index)
    for i in range(piv.shape[0]):
        for j in range(piv.shape[1]):
            v = piv.iat[i, j]
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < np.nanmean(piv.values) else "k",
                        fontsize=8)
    ax.set_xlabel("guidance scale w"); ax.set_title("Normalised score (mean over seeds and settings)")
    fig.colorbar(im, ax=ax)
    return _save(fig, out / "heatmap_task_scale")


def _test(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.episode_set == "test"] if "episode_set" in df.columns else df


def time_to_quality(df: pd.DataFrame, out: Path, baselines: pd.DataFrame | None = None) -> list[Path]:
    """Test score against the cumulative training compute behind the evaluated policy, per task: one line per
    guidance scale through the evaluation steps (means over seeds and settings); each offline baseline of the
    study as a star at its compute and score."""
    df = _test(df)
    baselines = _test(baselines) if baselines is not None and len(baselines) else None
    if "compute_seconds" not in df.columns or df.compute_seconds.isna().all():
        return []
    plt = _plt()
    tasks = sorted(df.task.unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (w, gw) in enumerate(df[df.task == task].groupby("scale")):
            m = gw.groupby("step")[["compute_seconds", "score"]].mean()
            ax.plot(m.compute_seconds / 60, m.score, "o-", color=f"C{i}",
                    label=f"w = {w:g}" + (" (behaviour)" if w == 0 else ""))
        if baselines is not None:
            for algo, gb in baselines[baselines.task == task].groupby("method"):
                last = gb[gb.step == gb.step.max()]
                ax.plot(last.compute_seconds.mean() / 60, last.score.mean(), "k*", markersize=11, label=algo.upper())
        ax.set_title(task); ax.set_xlabel("training compute (minutes)"); ax.grid(alpha=0.3)
        ax.set_ylabel("normalised score (test episodes)")
        ax.legend(fontsize=7)
    return _save(fig, out / "time_to_quality")


def learning_curves(df: pd.DataFrame, out: Path, seed: int = 0) -> list[Path]:
    plt = _plt()
    df = _test(df)
    tasks = sorted(df.task.unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        g = df[df.task == task]
        for i, (w, gw) in enumerate(g.groupby("scale")):
            xs, m, lo, hi = _band(gw, "step", seed)
            ax.plot(xs, m, "-", color=f"C{i}", label=f"w = {w:g}" + (" (behaviour)" if w == 0 else ""))
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
        ax.set_title(task); ax.set_xlabel("training step (energy; dps: Q)"); ax.grid(alpha=0.3)
        ax.set_ylabel("normalised score (95% CI over seeds)")
        ax.legend(fontsize=7)
    return _save(fig, out / "learning_curves")


def q_statistics(diag: pd.DataFrame, out: Path) -> list[Path]:
    """Q and the energy model at every evaluation, per task (mean over seeds, thin lines per seed): the frozen
    Q̄ over the support actions (mean, ± its std across them), Q's final target mean and loss, and the energy
    loss. A diverged Q shows as a mean or target far from the reward scale; an energy loss stuck at log K as
    an energy model that learned nothing."""
    plt = _plt()
    diag = diag.dropna(subset=["q_mean"])
    tasks = sorted(diag.task.unique())
    if not tasks:
        return []
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.5 * len(tasks), 6.5), squeeze=False)
    for j, task in enumerate(tasks):
        g = diag[diag.task == task].sort_values("step")
        ax = axes[0, j]
        for seed, gs in g.groupby("seed"):
            ax.plot(gs.step, gs.q_mean, color="C0", alpha=0.3, lw=0.8)
        m = g.groupby("step")[["q_mean", "q_std", "target_mean"]].mean()
        ax.plot(m.index, m.q_mean, "o-", color="C0", label="Q̄ over support actions (mean)")
        ax.fill_between(m.index, m.q_mean - m.q_std, m.q_mean + m.q_std, color="C0", alpha=0.15, label="± std")
        if m.target_mean.notna().any():
            ax.plot(m.index, m.target_mean, "s--", color="C3", label="Q target (mean)")
        ax.set_title(task); ax.set_xlabel("training step (energy; dps: Q)"); ax.grid(alpha=0.3); ax.legend(fontsize=7)
        ax = axes[1, j]
        for name, c in (("q_loss", "C3"), ("energy_loss", "C2")):
            mm = g.groupby("step")[name].mean().dropna()
            if len(mm):
                ax.plot(mm.index, mm.values, "o-", color=c, label=name.replace("_", " "))
        K = g["K"].iloc[0]
        ax.axhline(np.log(K), color="C2", ls=":", lw=1, label="log K (uniform CEP)")
        ax.set_xlabel("training step (energy; dps: Q)"); ax.set_yscale("log"); ax.grid(alpha=0.3); ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("Q (preprocessed reward units)")
    axes[1, 0].set_ylabel("training loss (last log interval)")
    return _save(fig, out / "q_statistics")
