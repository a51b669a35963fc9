"""The study's one results table: tidy Parquet, written from the stored evaluations.

One row per (task, seed, hyperparameters, method, guidance scale, evaluation step, episode set — `validation`
episodes for selecting hyperparameters, `test` episodes with other resets for reporting): the
normalised score (mean over the episodes, ×100), its standard error, the mean raw return, the episode
count, the dataset's own score, the stage diagnostics at that step, and `compute_seconds`: the training
compute behind the evaluated policy (behaviour + support + Q stage seconds, plus the energy stage's seconds
pro-rated to the evaluated step; a baseline's own stage seconds; each stage's seconds summed over its executions, a resumed stage counting
each attempt's part). The guidance scale is a column.
MLflow receives the same numbers for browsing; the report reads only this table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .store import ArtifactStore
from .study import Trial

DIAGNOSTICS = ("q_loss", "target_mean", "energy_loss", "q_mean", "q_std")
COLUMNS = ["study", "algorithm", "task", "seed", "beta", "K", "steps", "method", "scale", "step", "episode_set",
           "score", "score_se", "return", "episodes", "dataset_score", *DIAGNOSTICS, "compute_seconds",
           "evaluation_key"]


def trial_rows(study: str, trial: Trial, history: list[dict], seconds: dict[str, float]) -> list[dict]:
    """Rows of one trial; `seconds`: stage key → compute seconds."""
    upstream = sum(seconds.get(k, np.nan) for s, k in trial.keys.items() if s not in ("energy", "evaluation"))
    rows = []
    for h in history:
        energy = seconds.get(trial.keys["energy"], np.nan) * h["step"] / trial.config.energy.steps \
            if "energy" in trial.keys else 0.0
        for episode_set, ev in h["sets"].items():
            for w, sc, ret in zip(trial.scales, ev["scores"], ev["returns"]):
                sc, ret = np.asarray(sc, dtype=float), np.asarray(ret, dtype=float)
                n = int(np.sum(~np.isnan(sc)))
                if not n:                      # e.g. no validation episodes
                    continue
                rows.append({"study": study, "algorithm": trial.algorithm, **trial.hyper, "scale": float(w),
                             "step": h["step"], "episode_set": episode_set, "score": float(np.nanmean(sc)),
                             "score_se": float(np.nanstd(sc) / np.sqrt(n)), "return": float(np.nanmean(ret)),
                             "episodes": n, "dataset_score": h["dataset_score"],
                             **{d: h["diagnostics"].get(d, np.nan) for d in DIAGNOSTICS},
                             "compute_seconds": upstream + energy, "evaluation_key": trial.keys["evaluation"]})
    return rows


def write_table(store: ArtifactStore, study: str, trials: list[Trial], path: Path) -> pd.DataFrame:
    seconds: dict[str, float] = {}
    for e in store.executions():
        if e.get("stage") != "evaluation" and "seconds" in e:     # CPU seconds where recorded, else wall
            spent = e.get("cpu_seconds")
            seconds[e["key"]] = seconds.get(e["key"], 0.0) + float(e["seconds"] if spent is None else spent)
    rows = [r for t in trials for r in trial_rows(study, t, store.get_json(t.keys["evaluation"])["history"], seconds)]
    df = pd.DataFrame(rows, columns=COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return df
