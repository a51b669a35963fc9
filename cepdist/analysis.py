"""From a study's MLflow runs to the tables of a paper: a tidy results frame, per-task means with bootstrap
confidence intervals over seeds, two selection rules for the guidance scale, and per-domain aggregates
(mean and interquartile mean) with stratified-bootstrap intervals. Published QGPO numbers stand beside D4RL
tasks and never beside locally generated ones. Every bootstrap takes a seed."""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import trim_mean

from .tasks import TASKS

KEYS = ["task", "seed", "beta", "K", "steps", "method", "scale", "critic_step"]
HYPER = ["beta", "K", "steps", "method"]

# QGPO, paper Table 1 (normalised ×100, mean ± std); AntMaze version not stated by the authors
PUBLISHED_QGPO = {
    "halfcheetah-medium-expert": (93.5, 0.3), "hopper-medium-expert": (108.0, 2.5),
    "walker2d-medium-expert": (110.7, 0.6), "halfcheetah-medium": (54.1, 0.4), "hopper-medium": (98.0, 2.6),
    "walker2d-medium": (86.0, 0.7), "halfcheetah-medium-replay": (47.6, 1.4), "hopper-medium-replay": (96.9, 2.6),
    "walker2d-medium-replay": (84.4, 4.1), "antmaze-umaze": (96.4, 1.4), "antmaze-umaze-diverse": (74.4, 9.7),
    "antmaze-medium-play": (83.6, 4.4), "antmaze-medium-diverse": (83.8, 3.5), "antmaze-large-play": (66.6, 9.8),
    "antmaze-large-diverse": (64.8, 5.5)}


def published(task: str) -> tuple[float, float] | None:
    """The paper's number for a D4RL task name (any version); None for locally generated tasks."""
    t = TASKS.get(task)
    if t is None or t.local:
        return None
    return PUBLISHED_QGPO.get(re.sub(r"-v\d+$", "", task))


def domain(task: str) -> str:
    t = TASKS.get(task)
    return t.domain if t else "other"


# ---------------------------------------------------------------- the tidy frame
def frame_from_mlflow(experiment: str, tracking_uri: str) -> pd.DataFrame:
    """One row per (task, seed, β, K, steps, method, scale, evaluation step): score and raw return."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no MLflow experiment {experiment!r} at {tracking_uri}; found: {', '.join(names) or 'none'}")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=50_000):
        p = run.data.params
        if "scales" not in p:
            continue
        base = {"task": p["task"], "seed": int(p["seed"]), "beta": float(p["beta"]), "K": int(p["K"]),
                "steps": int(p["steps"]), "method": p["method"], "run_id": run.info.run_id}
        for w in (float(x) for x in p["scales"].strip("[]").split(",")):
            score = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"score_w{w:g}")}
            ret = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"return_w{w:g}")}
            for step, v in score.items():
                rows.append({**base, "scale": w, "critic_step": int(step), "score": v, "return": ret.get(step, np.nan)})
    if not rows:
        raise ValueError(f"experiment {experiment!r} has no evaluated trials")
    df = pd.DataFrame(rows)
    return df.sort_values(KEYS).reset_index(drop=True)


def final(df: pd.DataFrame) -> pd.DataFrame:
    """The last evaluation of every trial."""
    last = df.groupby(["task", "seed", "beta", "K", "steps", "method"])["critic_step"].transform("max")
    return df[df.critic_step == last]


# ---------------------------------------------------------------- statistics
def bootstrap_ci(x: Sequence[float], n_boot: int = 10_000, level: float = 0.95, seed: int = 0,
                 stat=np.mean) -> tuple[float, float]:
    """Percentile bootstrap interval of stat(x) (resampling the values, e.g. seeds)."""
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    vals = stat(x[idx], axis=1)
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def iqm(x, axis=None):
    """Interquartile mean: the mean of the middle 50% of the values."""
    return trim_mean(x, 0.25, axis=axis)


def stratified_bootstrap(scores: dict[str, np.ndarray], stat: str = "mean", n_boot: int = 5000,
                         level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Aggregate over tasks with seeds resampled within each task (strata). scores: task → per-seed values.
    stat 'mean' = mean of the per-task means; 'iqm' = IQM of all (task, seed) scores."""
    rng = np.random.default_rng(seed)
    tasks = sorted(scores)
    arrs = [np.asarray(scores[t], dtype=float) for t in tasks]

    def agg(samples):
        if stat == "mean":
            return np.mean([s.mean(-1) for s in samples], axis=0)
        return iqm(np.concatenate(samples, axis=-1), axis=-1)
    point = float(agg([a[None] for a in arrs])[0])
    boots = agg([a[rng.integers(0, len(a), size=(n_boot, len(a)))] for a in arrs])
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)


# ---------------------------------------------------------------- the results table
def task_table(df: pd.DataFrame, fixed_scale: float, seed: int = 0, n_boot: int = 10_000) -> pd.DataFrame:
    """Per task (and hyperparameter setting): mean, 95% CI over seeds, number of seeds, under the two
    selection rules: a fixed guidance scale, and the per-task best scale (selected on the evaluation metric)."""
    f = final(df)
    rows = []
    for keys, g in f.groupby(["task"] + HYPER):
        by_scale = g.groupby("scale")["score"]
        means = by_scale.mean()
        best = float(means.idxmax())
        rec = dict(zip(["task"] + HYPER, keys))
        for rule, w in (("fixed", fixed_scale), ("best", best)):
            s = g[g.scale == w].sort_values("seed")["score"].to_numpy()
            lo, hi = bootstrap_ci(s, n_boot, seed=seed) if len(s) else (np.nan, np.nan)
            rec.update({f"{rule}_scale": w, f"{rule}_mean": float(np.mean(s)) if len(s) else np.nan,
                        f"{rule}_lo": lo, f"{rule}_hi": hi, f"{rule}_n": len(s)})
        pub = published(rec["task"])
        rec["published"] = pub[0] if pub else np.nan
        rec["published_std"] = pub[1] if pub else np.nan
        rows.append(rec)
    return pd.DataFrame(rows)


def domain_table(df: pd.DataFrame, scale_rule: str, fixed_scale: float, seed: int = 0) -> pd.DataFrame:
    """Per domain: mean and IQM over tasks with stratified-bootstrap 95% intervals (default hyperparameters:
    the first value of each in the frame's order)."""
    f = final(df)
    rows = []
    for (dom, hp), g in f.assign(domain=f.task.map(domain)).groupby(["domain", f[HYPER].astype(str).agg("/".join, axis=1)]):
        scores = {}
        for task, gt in g.groupby("task"):
            w = fixed_scale if scale_rule == "fixed" else float(gt.groupby("scale")["score"].mean().idxmax())
            scores[task] = gt[gt.scale == w].sort_values("seed")["score"].to_numpy()
        scores = {t: s for t, s in scores.items() if len(s)}
        if not scores:
            continue
        m = stratified_bootstrap(scores, "mean", seed=seed)
        q = stratified_bootstrap(scores, "iqm", seed=seed)
        rows.append({"domain": dom, "setting": hp, "rule": scale_rule, "tasks": len(scores), "mean": m[0],
                     "mean_lo": m[1], "mean_hi": m[2], "iqm": q[0], "iqm_lo": q[1], "iqm_hi": q[2]})
    return pd.DataFrame(rows)


def _cell(m, lo, hi):
    return "–" if np.isnan(m) else (f"{m:.1f} [{lo:.1f}, {hi:.1f}]" if not np.isnan(lo) else f"{m:.1f}")


def render(tt: pd.DataFrame, dt: pd.DataFrame, fixed_scale: float) -> tuple[str, str]:
    """(Markdown, LaTeX) of the results table and the domain aggregates."""
    head = ["task", "β", "K", "steps", "method", f"fixed w = {fixed_scale:g}", "n", "best w (selected on eval)",
            "w*", "QGPO (paper)"]
    body = []
    for _, r in tt.iterrows():
        pub = "–" if np.isnan(r.published) else f"{r.published:.1f} ± {r.published_std:.1f}"
        body.append([r.task, f"{r.beta:g}", str(r.K), str(r.steps), r.method,
                     _cell(r.fixed_mean, r.fixed_lo, r.fixed_hi), str(r.fixed_n),
                     _cell(r.best_mean, r.best_lo, r.best_hi), f"{r.best_scale:g}", pub])
    note = ("Normalised score ×100 at the last evaluation: mean over seeds [95% bootstrap CI over seeds]. "
            f"'fixed': w = {fixed_scale:g} for every task; 'best': the per-task best w, selected on the "
            "evaluation metric itself (optimistic). Published numbers only for D4RL tasks; *-local tasks are "
            "generated locally and are not D4RL results.")
    md = [note, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(b) + " |" for b in body]
    if len(dt):
        md += ["", "Per domain (stratified bootstrap over seeds within tasks, 95% CI):", "",
               "| domain | setting | rule | tasks | mean | IQM |", "|---|---|---|---|---|---|"]
        md += [f"| {r.domain} | {r.setting} | {r.rule} | {r.tasks} | {_cell(r['mean'], r.mean_lo, r.mean_hi)} | "
               f"{_cell(r.iqm, r.iqm_lo, r.iqm_hi)} |" for _, r in dt.iterrows()]
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("β", r"$\beta$").replace("±", r"$\pm$") \
        .replace("–", "--").replace("w*", "$w^*$")
    tex = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{" + "l" * 5 + "r" * 5 + "}", r"\toprule",
           " & ".join(esc(h) for h in head) + r" \\", r"\midrule"]
    tex += [" & ".join(esc(c) for c in b) + r" \\" for b in body]
    tex += [r"\bottomrule", r"\end{tabular}", r"\caption{" + esc(note) + "}", r"\end{table}"]
    return "\n".join(md) + "\n", "\n".join(tex) + "\n"
