"""Analysis: statistics against known values, selection rules, rendering, and a report built end to end
from the results table of a real (small) study, whose numbers MLflow holds too."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cepdist.analysis import stats as analysis

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_interval_covers_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    draws, n, mu = 400, 20, 50.0
    hits = 0
    for i in range(draws):
        lo, hi = analysis.bootstrap_ci(rng.normal(mu, 10.0, n), n_boot=2000, seed=i)
        hits += lo <= mu <= hi
    # percentile intervals run slightly below nominal at n = 20
    assert 0.88 <= hits / draws <= 0.98, hits / draws


def test_bootstrap_is_reproducible_given_a_seed():
    x = np.random.default_rng(0).normal(size=10)
    assert analysis.bootstrap_ci(x, seed=3) == analysis.bootstrap_ci(x, seed=3)
    assert analysis.bootstrap_ci(x, seed=3) != analysis.bootstrap_ci(x, seed=4)
    assert np.isnan(analysis.bootstrap_ci([1.0])[0])
    s = {"a": np.arange(5.0), "b": np.arange(5.0) * 2}
    assert analysis.stratified_bootstrap(s, seed=1) == analysis.stratified_bootstrap(s, seed=1)


def test_stratified_bootstrap_and_iqm():
    assert np.isclose(analysis.iqm(np.arange(8.0)), np.mean([2, 3, 4, 5]))
    scores = {"a": np.array([10.0, 10.0, 10.0]), "b": np.array([0.0, 20.0, 40.0])}
    m, lo, hi = analysis.stratified_bootstrap(scores, "mean", seed=0)
    assert np.isclose(m, (10 + 20) / 2)
    # task a is constant: all the spread comes from b's seeds, halved by the average over two tasks
    assert (10 + 0) / 2 <= lo < m < hi <= (10 + 40) / 2
    const = {"a": np.full(4, 3.0), "b": np.full(4, 5.0)}
    assert analysis.stratified_bootstrap(const, "iqm", seed=0) == (4.0, 4.0, 4.0)


def synthetic_frame():
    """Two tasks × 3 seeds × scales {0, 1, 3}, evaluated at steps 10 and 20 on test and validation episodes;
    known scores. On validation, hopper-medium-v2 prefers w = 1 and hopper-medium-local w = 3 (the opposite
    of their test-episode optima)."""
    rows = []
    true = {("hopper-medium-v2", 0.0): 40, ("hopper-medium-v2", 1.0): 60, ("hopper-medium-v2", 3.0): 70,
            ("hopper-medium-local", 0.0): 30, ("hopper-medium-local", 1.0): 55, ("hopper-medium-local", 3.0): 45}
    val = {("hopper-medium-v2", 1.0): 75, ("hopper-medium-local", 3.0): 65}
    for (task, w), mu in true.items():
        for seed, d in zip(range(3), (-3.0, 0.0, 3.0)):
            for step in (10, 20):
                for episode_set, m in (("test", mu), ("validation", val.get((task, w), mu))):
                    rows.append({"task": task, "seed": seed, "beta": 3.0, "K": 16, "steps": 15, "method": "cep",
                                 "scale": w, "step": step, "episode_set": episode_set, "score": m + d - (20 - step),
                                 "return": 0.0, "dataset_score": 33.0})
    return pd.DataFrame(rows)


def test_table_selection_rules_and_rendering():
    df = synthetic_frame()
    assert (analysis.final(df).step == 20).all()
    tt = analysis.task_table(df, fixed_scale=1.0, seed=0).set_index("task")
    assert np.isclose(tt.loc["hopper-medium-v2", "fixed_mean"], 60) and tt.loc["hopper-medium-v2", "best_scale"] == 3
    assert np.isclose(tt.loc["hopper-medium-local", "best_mean"], 55) and tt.loc["hopper-medium-local", "best_scale"] == 1
    assert tt.loc["hopper-medium-v2", "fixed_n"] == 3
    assert tt.loc["hopper-medium-v2", "published"] == 98.0 and np.isnan(tt.loc["hopper-medium-local", "published"])
    lo, hi = tt.loc["hopper-medium-v2", ["fixed_lo", "fixed_hi"]]
    assert 57 <= lo < 60 < hi <= 63
    dt = analysis.domain_table(df, "best", 1.0, seed=0)
    assert len(dt) == 1 and np.isclose(dt.iloc[0]["mean"], (70 + 55) / 2)
    md, tex = analysis.render(analysis.task_table(df, 1.0), dt, 1.0)
    assert "| hopper-medium-v2 |" in md and "98.0 ± 2.6" in md
    local_row = next(l for l in md.splitlines() if l.startswith("| hopper-medium-local"))
    assert local_row.rstrip().endswith("| – |")                  # no published number for a local task
    assert "selected on the metric it reports" in md and r"\begin{tabular}" in tex and "98.0 $\\pm$ 2.6" in tex
    # w chosen on the validation episodes, reported on the test episodes
    assert tt.loc["hopper-medium-v2", "validation_scale"] == 1 and np.isclose(tt.loc["hopper-medium-v2", "validation_mean"], 60)
    assert tt.loc["hopper-medium-local", "validation_scale"] == 3 and np.isclose(tt.loc["hopper-medium-local", "validation_mean"], 45)
    sm = analysis.summary_table(df, fixed_scale=1.0, seed=0).set_index(["task", "rule"])
    assert list(sm.reset_index().columns) == ["task", "rule", "w", "n_seeds", "score_mean", "ci_low", "ci_high",
                                              "dataset_score", "diff_low", "diff_high"]
    r = sm.loc[("hopper-medium-local", "validation")]
    assert (r.w, r.n_seeds, r.score_mean, r.diff_low, r.diff_high) == (3.0, 3, 45.0, 15.0, 15.0)
    b = sm.loc[("hopper-medium-v2", "behaviour")]
    assert (b.w, b.score_mean, b.dataset_score) == (0.0, 40.0, 33.0) and np.isnan(b.diff_low)
    assert sm.loc[("hopper-medium-v2", "fixed")].score_mean == 60.0


def test_every_scale_against_the_behaviour_model():
    df = synthetic_frame().assign(dataset_score=lambda d: np.where(d.task == "hopper-medium-v2", 44.0, 33.0))
    st = analysis.scale_table(df, seed=0).set_index("task")
    r = st.loc["hopper-medium-v2"]
    assert (r.w0_mean, r.w1_mean, r.w3_mean, r.w0_n, r.dataset) == (40, 60, 70, 3, 44.0)
    assert r.best_w == 3 and r.diff_mean == 30 and (r.diff_lo, r.diff_hi) == (30, 30) and r.beats_w0
    assert 37 <= r.w0_lo < 40 < r.w0_hi <= 43
    # overlapping intervals: the best w > 0 is 1 point better on every seed, but its CI overlaps w = 0's
    close = df.copy()
    loc = close.task == "hopper-medium-local"
    close.loc[loc & (close.scale == 1.0), "score"] -= 24          # 31 ± 3 against 30 ± 3
    close.loc[loc & (close.scale == 3.0), "score"] -= 16          # 29 ± 3
    r = analysis.scale_table(close, seed=0).set_index("task").loc["hopper-medium-local"]
    assert r.best_w == 1 and np.isclose(r.diff_mean, 1) and not r.beats_w0
    md = analysis.render_scale_table(st.reset_index())
    assert "| hopper-medium-v2 | 44.0 | 40.0 [" in md and "w = 3: 30.0 [30.0, 30.0] | yes |" in md


@pytest.mark.slow
def test_report_end_to_end_from_a_platform_study(tmp_path, caplog):
    import logging
    import re
    import ray
    from cepdist.distributed.driver import run_study
    from cepdist.distributed.tracking import MLflowTracker
    from test_platform import tiny_study
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    study = tiny_study(tmp_path, "report-e2e", seeds=(0, 1))
    with caplog.at_level(logging.INFO, logger="cepdist"):
        summary = run_study(study, tmp_path / "out")
    ray.shutdown()
    # one progress line per finished unit: count, the running stages (share done, pace), an ETA
    lines = [r.getMessage() for r in caplog.records]
    # the start line says which Ray instance runs it (ray.init may join one the user did not mean)
    assert any(re.match(r"study report-e2e: 2 trials \| Ray [\d.]+:\d+ \(2 CPU, 0 GPU, 1 node\(s\)\) \| store ", l)
               for l in lines), lines
    assert any(re.fullmatch(r"\[behavior phase\] 1/2 done \| running: .+ \| ETA .+ \| .+ elapsed", l)
               for l in lines), lines
    assert "[policy phase] 2/2 done | running: – | ETA 0m00s" in "\n".join(lines), lines
    res = pd.read_parquet(summary["results_table"])
    # the tidy table: one row per trial × scale × evaluation step × episode set; the scale a column
    assert len(res) == 2 * len(study.scales) * 2 * 2 and set(res.scale) == set(study.scales)
    assert {"task", "seed", "beta", "K", "steps", "method", "scale", "step", "episode_set", "score", "return",
            "episodes", "dataset_score"} <= set(res.columns)
    assert (res.episodes == study.eval_episodes).all()
    val = res[res.episode_set == "validation"].set_index(["seed", "scale", "step"]).score
    res = res[res.episode_set == "test"]
    assert not np.allclose(val.sort_index().values, res.set_index(["seed", "scale", "step"]).score.sort_index().values)
    # MLflow holds the same numbers, for browsing
    tr = MLflowTracker(study.mlflow_uri, study.name)
    for run in tr.client.search_runs([tr.experiment_id]):
        seed = int(run.data.params["seed"])
        assert run.info.status == "FINISHED"
        for w in study.scales:
            hist = {m.step: m.value for m in tr.client.get_metric_history(run.info.run_id, f"score_w{w:g}")}
            mine = res[(res.seed == seed) & (res.scale == w)].set_index("step").score
            assert sorted(hist) == sorted(mine.index) and np.allclose([hist[s] for s in mine.index], mine.values)
    r = subprocess.run([sys.executable, str(ROOT / "analysis" / "report.py"), "--results", summary["results_table"],
                        "--out", str(tmp_path / "report")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "report"
    for name in ("index.md", "table.md", "table.tex", "table.csv", "domains.csv", "summary.csv",
                 "heatmap_task_scale.png", "heatmap_task_scale.pdf", "learning_curves.png",
                 "sensitivity_scale.png", "sensitivity_scale.pdf", "scales.csv", "critic.csv", "q_statistics.png"):
        assert (out / name).is_file(), name
    tt = pd.read_csv(out / "table.csv")
    last = res[res.step == res.step.max()]
    assert np.isclose(tt.fixed_mean.iloc[0], last[last.scale == 2.0].score.mean())   # w = 1 absent → max scale
    assert "learning_curves.png" in (out / "index.md").read_text()
    # the dataset's own score, as `cepdist data info` computes it from the file
    from cepdist.data import datasets
    from cepdist.data.tasks import get_task
    task = get_task(study.tasks[0])
    info = datasets.summarize(datasets.read_hdf5(datasets.local_path(task, Path(study.data_root))), task)
    assert np.allclose(res.dataset_score, info["dataset_score"], rtol=1e-4)
    # Q and energy statistics at every evaluation, including the last
    diag = pd.read_csv(out / "critic.csv")
    assert sorted(diag.step.unique()) == sorted(res.step.unique())
    assert np.isfinite(diag[["q_mean", "q_std", "energy_loss", "q_loss", "target_mean"]].to_numpy()).all()
    # ... summarised per task in the index (mean over seeds at the last evaluation, beside log K), with the
    # study's wall time from its study.json
    index = (out / "index.md").read_text()
    final_q = diag[diag.step == diag.step.max()].q_mean.mean()
    assert f"| hopper-random-local | 3 | 4 | 2 | {final_q:.3g} |" in index and "(1.386) | yes |" in index, index
    assert f"Wall time {summary['wall_seconds'] / 3600:.2f} h over 1 invocation(s) (finished" in index, index
    sp = study.base.sampler                  # the policy sampler, which the table has no column for
    assert f"Policy sampler: {sp.steps} steps, {sp.spacing}, order {sp.order}; temperature 1." in index, index
    bad = subprocess.run([sys.executable, "-m", "cepdist", "report", "--study", "nope"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no results table at results/nope/results.parquet" in bad.stderr
