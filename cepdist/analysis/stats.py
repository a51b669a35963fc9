"""From a study's results table to the tables of a paper: per-task means with bootstrap
confidence intervals over seeds, two selection rules for the guidance scale, and per-domain aggregates
(mean and interquartile mean) with stratified-bootstrap intervals. Published QGPO numbers stand beside D4RL
tasks and never beside locally generated ones. Every bootstrap takes a seed."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import trim_mean

from ..data.tasks import TASKS

KEYS = ["task", "seed", "beta", "K", "steps", "method", "scale", "step"]
# AEPO is rebuilt from its paper's abstract (../shared/reference/aepo.md): every table says so
METHOD_LABELS = {"aepo": "AEPO (reconstructed)", "aepo-analytic": "AEPO-analytic (reconstructed)"}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)
HYPER = ["beta", "K", "steps", "method"]
DIAGNOSTICS = ["q_mean", "q_std", "target_mean", "q_loss", "energy_loss"]

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
def load_results(path) -> pd.DataFrame:
    """A study's results table (results.parquet, written by the study): one row per task, seed,
    hyperparameters, method, guidance scale, evaluation step and episode set."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no results table at {path}; run the study first (`cepdist study run`)")
    df = pd.read_parquet(path)
    # the order in which hyperparameter settings first appear is the study's grid order (first = default)
    df["setting_rank"] = df.groupby(HYPER, sort=False).ngroup()
    missing = [c for c in KEYS + ["score", "dataset_score"] if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a cepdist results table (missing columns {', '.join(missing)})")
    if df.empty:
        raise ValueError(f"{path}: the results table has no rows")
    return df.sort_values(KEYS).reset_index(drop=True)


def diagnostics(df: pd.DataFrame) -> pd.DataFrame:
    """Q's and the energy model's training statistics per trial and evaluation step."""
    cols = [c for c in DIAGNOSTICS if c in df.columns]
    return df.drop_duplicates(KEYS[:6] + ["step"])[KEYS[:6] + ["step"] + cols].reset_index(drop=True)


def health_table(diag: pd.DataFrame) -> pd.DataFrame:
    """Per task and setting, at the last evaluation (mean over seeds): Q̄ over the support actions, Q's target
    mean and loss, the energy loss beside log K (what an fφ that learned nothing scores), and whether every
    logged statistic of every seed and step is finite."""
    cols = [c for c in DIAGNOSTICS if c in diag.columns]
    if diag.empty or not cols:
        return pd.DataFrame()
    setting = [k for k in KEYS[:6] if k != "seed"]
    last = diag[diag.step == diag.groupby(KEYS[:6]).step.transform("max")]
    out = last.groupby(setting, as_index=False)[cols].mean()
    finite = diag.groupby(setting)[cols].apply(lambda g: bool(np.isfinite(g.to_numpy(dtype=float)).all()))
    out["all_finite"] = [bool(finite.loc[tuple(r)]) for r in out[setting].itertuples(index=False)]
    out["n_seeds"] = last.groupby(setting).seed.nunique().to_numpy()
    out["log_K"] = np.log(out.K.astype(float))
    return out


def render_health_table(ht: pd.DataFrame) -> str:
    md = ["Q and fφ at the last evaluation, mean over seeds: Q̄ over the support actions of fφ's training batches "
          "(mean and sd), Q's target mean and TD loss, fφ's contrastive loss (at log K it learned nothing); "
          "'finite': every statistic of every seed and evaluation.", "",
          "| task | β | K | n | Q̄ mean | Q̄ sd | target mean | Q loss | energy loss (log K) | finite |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    g = lambda r, c: f"{getattr(r, c):.3g}" if c in ht.columns and pd.notna(getattr(r, c)) else "–"
    for r in ht.itertuples():
        md.append(f"| {r.task} | {r.beta:g} | {r.K} | {r.n_seeds} | {g(r, 'q_mean')} | {g(r, 'q_std')} | {g(r, 'target_mean')} | "
                  f"{g(r, 'q_loss')} | {g(r, 'energy_loss')} ({r.log_K:.3f}) | {'yes' if r.all_finite else 'NO'} |")
    return "\n".join(md)


def final(df: pd.DataFrame, episode_set: str = "test") -> pd.DataFrame:
    """The last evaluation of every trial on one episode set: `test` (reported) or `validation` (for
    selecting hyperparameters). A frame without the column is all test episodes."""
    if "episode_set" in df.columns:
        df = df[df.episode_set == episode_set]
    elif episode_set != "test":
        df = df.iloc[:0]
    last = df.groupby(["task", "seed", "beta", "K", "steps", "method"])["step"].transform("max")
    return df[df.step == last]


def validation_choice(v: pd.DataFrame) -> float | None:
    """The guidance scale with the best mean validation score over seeds (None without validation rows)."""
    return float(v.groupby("scale")["score"].mean().idxmax()) if len(v) else None


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
    """Per task (and hyperparameter setting): mean, 95% CI over seeds, number of seeds on the test episodes,
    under three selection rules: a fixed guidance scale, the per-task scale chosen on the validation episodes,
    and the per-task best scale on the test episodes themselves (optimistic)."""
    f, v = final(df), final(df, "validation")
    rows = []
    for keys, g in f.groupby(["task"] + HYPER):
        best = float(g.groupby("scale")["score"].mean().idxmax())
        rec = dict(zip(["task"] + HYPER, keys))
        gv = v.merge(pd.DataFrame([rec]), on=["task"] + HYPER)
        w_val = validation_choice(gv)
        for rule, w in (("fixed", fixed_scale), ("validation", w_val), ("best", best)):
            s = g[g.scale == w].sort_values("seed")["score"].to_numpy() if w is not None else np.zeros(0)
            lo, hi = bootstrap_ci(s, n_boot, seed=seed) if len(s) else (np.nan, np.nan)
            rec.update({f"{rule}_scale": w, f"{rule}_mean": float(np.mean(s)) if len(s) else np.nan,
                        f"{rule}_lo": lo, f"{rule}_hi": hi, f"{rule}_n": len(s)})
        pub = published(rec["task"])
        rec["published"] = pub[0] if pub else np.nan
        rec["published_std"] = pub[1] if pub else np.nan
        rows.append(rec)
    return pd.DataFrame(rows)


def scale_table(df: pd.DataFrame, seed: int = 0, n_boot: int = 10_000) -> pd.DataFrame:
    """Per task (and setting), at the last evaluation: mean and 95% CI over seeds for every guidance scale,
    the dataset's own score, and the best w > 0 against w = 0 (the behaviour model alone): whether its CI
    lies above w = 0's, and the paired per-seed difference with its CI (episodes share resets and sampler
    noise across scales, so the pairing is exact)."""
    f = final(df)
    rows = []
    for keys, g in f.groupby(["task"] + HYPER):
        rec = dict(zip(["task"] + HYPER, keys))
        rec["dataset"] = float(g["dataset_score"].mean()) if "dataset_score" in g else np.nan
        per = {}
        for w, gw in g.groupby("scale"):
            sc = gw.sort_values("seed").set_index("seed")["score"]
            per[float(w)] = sc
            lo, hi = bootstrap_ci(sc.to_numpy(), n_boot, seed=seed)
            rec.update({f"w{w:g}_mean": float(sc.mean()), f"w{w:g}_lo": lo, f"w{w:g}_hi": hi, f"w{w:g}_n": len(sc)})
        positive = [w for w in per if w > 0]
        if 0.0 in per and positive:
            best = max(positive, key=lambda w: per[w].mean())
            d = (per[best] - per[0.0]).dropna().to_numpy()
            lo, hi = bootstrap_ci(d, n_boot, seed=seed)
            rec.update({"best_w": best, "diff_mean": float(d.mean()), "diff_lo": lo, "diff_hi": hi,
                        "beats_w0": bool(rec[f"w{best:g}_lo"] > rec["w0_hi"])})
        rows.append(rec)
    return pd.DataFrame(rows)


def render_scale_table(st: pd.DataFrame) -> str:
    """Markdown of scale_table."""
    scales = sorted({float(c[1:-5]) for c in st.columns if c.startswith("w") and c.endswith("_mean")})
    head = ["task", "dataset"] + [f"w = {w:g}" + (" (behaviour)" if w == 0 else "") for w in scales] + \
        ["n", "best w > 0 − (w = 0), paired", "CIs separate"]
    md = ["Normalised score ×100 at the last evaluation: mean over seeds [95% bootstrap CI over seeds]; "
          "'dataset': the behaviour dataset's own mean episode score.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in st.iterrows():
        cells = [r.task, "–" if np.isnan(r.dataset) else f"{r.dataset:.1f}"]
        cells += [_cell(r[f"w{w:g}_mean"], r[f"w{w:g}_lo"], r[f"w{w:g}_hi"]) for w in scales]
        cells.append(str(int(r[f"w{scales[0]:g}_n"])))
        if "best_w" in r and not pd.isna(r.get("best_w")):
            cells += [f"w = {r.best_w:g}: {_cell(r.diff_mean, r.diff_lo, r.diff_hi)}", "yes" if r.beats_w0 else "no"]
        else:
            cells += ["–", "–"]
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def domain_table(df: pd.DataFrame, scale_rule: str, fixed_scale: float, seed: int = 0) -> pd.DataFrame:
    """Per domain: mean and IQM over tasks with stratified-bootstrap 95% intervals (default hyperparameters:
    the first value of each in the frame's order)."""
    f, v = final(df), final(df, "validation")
    rows = []
    for (dom, hp), g in f.assign(domain=f.task.map(domain)).groupby(["domain", f[HYPER].astype(str).agg("/".join, axis=1)]):
        scores = {}
        for task, gt in g.groupby("task"):
            if scale_rule == "fixed":
                w = fixed_scale
            elif scale_rule == "validation":
                w = validation_choice(v[(v.task == task) & (v[HYPER].astype(str).agg("/".join, axis=1) == hp)])
            else:
                w = float(gt.groupby("scale")["score"].mean().idxmax())
            if w is None:
                continue
            scores[task] = gt[gt.scale == w].sort_values("seed")["score"].to_numpy()
        scores = {t: s for t, s in scores.items() if len(s)}
        if not scores:
            continue
        m = stratified_bootstrap(scores, "mean", seed=seed)
        q = stratified_bootstrap(scores, "iqm", seed=seed)
        rows.append({"domain": dom, "setting": hp, "rule": scale_rule, "tasks": len(scores), "mean": m[0],
                     "mean_lo": m[1], "mean_hi": m[2], "iqm": q[0], "iqm_lo": q[1], "iqm_hi": q[2]})
    return pd.DataFrame(rows)


SUMMARY_COLUMNS = ["task", "rule", "w", "n_seeds", "score_mean", "ci_low", "ci_high", "dataset_score", "diff_low",
                   "diff_high"]


def summary_table(df: pd.DataFrame, fixed_scale: float, seed: int = 0, n_boot: int = 10_000) -> pd.DataFrame:
    """Per task, one row per rule, scores on the test episodes at the last evaluation: `behaviour` (w = 0),
    `fixed` (one w for every task) — both in the study's first hyperparameter setting — and `validation` (the
    setting and w with the best mean validation score). diff_*: the 95% interval of the paired per-seed
    difference against w = 0 of the same setting (empty for the behaviour row)."""
    f, v = final(df), final(df, "validation")
    first = df.iloc[0][HYPER].to_dict() if "setting_rank" not in df else \
        df.sort_values("setting_rank").iloc[0][HYPER].to_dict()
    rows = []
    for task, g in f.groupby("task", sort=True):
        gv = v[v.task == task]
        choices = [("behaviour", first, 0.0), ("fixed", first, fixed_scale)]
        if len(gv):
            m = gv.groupby(HYPER + ["scale"])["score"].mean()
            *hp, w = m.idxmax()
            choices.append(("validation", dict(zip(HYPER, hp)), float(w)))
        for rule, hp, w in choices:
            gs = g.merge(pd.DataFrame([hp]), on=HYPER)
            s = gs[gs.scale == w].set_index("seed")["score"].sort_index()
            if not len(s):
                continue
            lo, hi = bootstrap_ci(s.to_numpy(), n_boot, seed=seed)
            dlo = dhi = np.nan
            if rule != "behaviour":
                base = gs[gs.scale == 0.0].set_index("seed")["score"]
                d = (s - base).dropna().to_numpy()
                dlo, dhi = bootstrap_ci(d, n_boot, seed=seed) if len(d) else (np.nan, np.nan)
            rows.append({"task": task, "rule": rule, "w": w, "n_seeds": len(s), "score_mean": float(s.mean()),
                         "ci_low": lo, "ci_high": hi, "dataset_score": float(gs["dataset_score"].mean()),
                         "diff_low": dlo, "diff_high": dhi})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def split_baselines(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(QGPO's rows, the offline baselines' rows) of a results table."""
    if "algorithm" not in df.columns:
        return df, df.iloc[:0]
    return df[df.algorithm == "qgpo"].copy(), df[df.algorithm != "qgpo"].copy()


def baseline_table(df: pd.DataFrame, seed: int = 0, n_boot: int = 10_000) -> pd.DataFrame:
    """Per task and baseline algorithm, on the test episodes at its last evaluation: mean, 95% CI over seeds,
    and QGPO's validation-selected policy against it: its mean and the paired per-seed difference
    (QGPO − baseline) with its 95% interval (same data, seeds and test episodes)."""
    qgpo, base = split_baselines(df)
    sm = summary_table(qgpo, 1.0, seed, n_boot) if len(qgpo) else pd.DataFrame(columns=SUMMARY_COLUMNS)
    fq, fb = final(qgpo), final(base)
    rows = []
    for (task, algo), g in fb.groupby(["task", "method"]):
        s = g.set_index("seed")["score"].sort_index()
        lo, hi = bootstrap_ci(s.to_numpy(), n_boot, seed=seed)
        rec = {"task": task, "algorithm": algo, "n_seeds": len(s), "score_mean": float(s.mean()), "ci_low": lo,
               "ci_high": hi, "compute_seconds": float(g["compute_seconds"].mean()),
               "qgpo_mean": np.nan, "qgpo_compute_seconds": np.nan, "diff_mean": np.nan, "diff_low": np.nan,
               "diff_high": np.nan}
        v = sm[(sm.task == task) & (sm.rule == "validation")]
        if len(v):
            # the validation-selected QGPO policy: the setting and w with the best mean validation score
            val = final(qgpo, "validation")
            m = val[val.task == task].groupby(HYPER + ["scale"])["score"].mean()
            *hp, w = m.idxmax()
            q = fq[(fq.task == task) & (fq.scale == w)].merge(pd.DataFrame([dict(zip(HYPER, hp))]), on=HYPER)
            qs = q.set_index("seed")["score"].sort_index()
            d = (qs - s).dropna().to_numpy()
            dlo, dhi = bootstrap_ci(d, n_boot, seed=seed) if len(d) else (np.nan, np.nan)
            rec.update({"qgpo_mean": float(qs.mean()), "qgpo_compute_seconds": float(q["compute_seconds"].mean()),
                        "diff_mean": float(d.mean()) if len(d) else np.nan, "diff_low": dlo, "diff_high": dhi})
        rows.append(rec)
    return pd.DataFrame(rows)


def render_baseline_table(bt: pd.DataFrame) -> str:
    head = ["task", "baseline", "n", "baseline score", "its compute", "QGPO (w chosen on validation)",
            "QGPO compute", "QGPO − baseline, paired"]
    md = ["Offline baselines trained in the same study (same data, seeds and test episodes), normalised score ×100 "
          "at their last evaluation: mean [95% bootstrap CI over seeds]; compute in minutes per trial.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in bt.iterrows():
        md.append("| " + " | ".join([r.task, r.algorithm.upper(), str(r.n_seeds), _cell(r.score_mean, r.ci_low, r.ci_high),
                                     f"{r.compute_seconds / 60:.1f}", _cell(r.qgpo_mean, np.nan, np.nan),
                                     "–" if np.isnan(r.qgpo_compute_seconds) else f"{r.qgpo_compute_seconds / 60:.1f}",
                                     _cell(r.diff_mean, r.diff_low, r.diff_high)]) + " |")
    return "\n".join(md) + "\n"


def _cell(m, lo, hi):
    return "–" if np.isnan(m) else (f"{m:.1f} [{lo:.1f}, {hi:.1f}]" if not np.isnan(lo) else f"{m:.1f}")


def render(tt: pd.DataFrame, dt: pd.DataFrame, fixed_scale: float) -> tuple[str, str]:
    """(Markdown, LaTeX) of the results table and the domain aggregates."""
    head = ["task", "β", "K", "steps", "method", f"fixed w = {fixed_scale:g}", "n", "w chosen on validation",
            "w (val)", "best w on test (optimistic)", "w*", "QGPO (paper)"]
    body = []
    for _, r in tt.iterrows():
        pub = "–" if np.isnan(r.published) else f"{r.published:.1f} ± {r.published_std:.1f}"
        body.append([r.task, f"{r.beta:g}", str(r.K), str(r.steps), method_label(r.method),
                     _cell(r.fixed_mean, r.fixed_lo, r.fixed_hi), str(r.fixed_n),
                     _cell(r.validation_mean, r.validation_lo, r.validation_hi),
                     "–" if pd.isna(r.validation_scale) else f"{r.validation_scale:g}",
                     _cell(r.best_mean, r.best_lo, r.best_hi), f"{r.best_scale:g}", pub])
    note = ("Normalised score ×100 on the test episodes at the last evaluation: mean over seeds [95% bootstrap CI "
            f"over seeds]. 'fixed': w = {fixed_scale:g} for every task; 'validation': the per-task w with the best "
            "mean score on the validation episodes (other resets), reported on the test episodes; 'best': the "
            "per-task best w on the test episodes themselves, selected on the metric it reports (optimistic). Published numbers only for D4RL tasks; *-local tasks are "
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
    tex = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{" + "l" * 5 + "r" * 7 + "}", r"\toprule",
           " & ".join(esc(h) for h in head) + r" \\", r"\midrule"]
    tex += [" & ".join(esc(c) for c in b) + r" \\" for b in body]
    tex += [r"\bottomrule", r"\end{tabular}", r"\caption{" + esc(note) + "}", r"\end{table}"]
    return "\n".join(md) + "\n", "\n".join(tex) + "\n"
