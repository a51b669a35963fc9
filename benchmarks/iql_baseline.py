"""An established library's IQL (d3rlpy 2.8.1) on the same data, seeds and test episodes as a cepdist study,
scored per minute of training compute, for the equal-compute comparison of the CPU study.

IQL with Kostrikov et al.'s locomotion settings (expectile 0.7, temperature 3, τ 0.005, γ 0.99, Adam 3e-4,
batch 256, rewards scaled by 1000 / (max − min episode return)), trained on one thread on the task's
dataset file (compute = this process's CPU time, which other processes do not inflate), evaluated
deterministically on the study's test episodes (reset seeds of the study's
evaluation of that seed: validation episodes first, then `--episodes` test episodes) whenever its training
compute crosses one of `--at-minutes`. Writes benchmarks/results/iql-<task>.json after every evaluation; run
again, it keeps the seeds already evaluated at every mark and redoes a partial one.

d3rlpy pins gymnasium 1.0.0, which cepdist does not use, so it is not a dependency; install it beside
cepdist in a separate environment:

    python -m venv .venv-iql && .venv-iql/bin/pip install -r requirements-cpu.txt -e . \\
        && .venv-iql/bin/pip install --no-deps d3rlpy==2.8.1 \\
        && .venv-iql/bin/pip install tqdm "gym>=0.26" click structlog colorama dataclasses-json scikit-learn
    nice .venv-iql/bin/python benchmarks/iql_baseline.py --task hopper-medium-local --data-root DIR
    python benchmarks/iql_baseline.py --compare results/local/results.parquet   # the table against a study
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cepdist.data import datasets
from cepdist.distributed.study import EVAL_SEED_OFFSET
from cepdist.envs.environments import make_env



def evaluate(iql, task, seed: int, n_val: int, episodes: int) -> list[float]:
    """Normalised scores of the study's test episodes of this seed (reset seeds after its validation ones)."""
    base = (EVAL_SEED_OFFSET + seed) * 100_003
    scores = []
    for e in range(n_val, n_val + episodes):
        env = make_env(task, task.episode_length)
        obs, ret, done = env.reset(seed=base + e)[0], 0.0, False
        while not done:
            a = iql.predict(obs[None].astype(np.float32))[0]
            obs, r, term, trunc, _ = env.step(np.clip(a, env.action_space.low, env.action_space.high))
            ret += r
            done = term or trunc
        env.close()
        scores.append(float(task.normalized_score(np.array(ret))))
    return scores


def compare(results: Path, study_table: Path) -> str:
    """Markdown: IQL at each compute mark (mean over seeds) beside the study's QGPO (w = 0 and the
    validation-selected w, test episodes, last evaluation) and its training compute per trial; IQL − QGPO paired
    per seed at the mark closest to QGPO's compute (the equal-compute comparison)."""
    import pandas as pd
    from cepdist.analysis.stats import bootstrap_ci, final, summary_table
    df = pd.read_parquet(study_table)
    df = df[df.algorithm == "qgpo"] if "algorithm" in df.columns else df
    sm = summary_table(df, 1.0)
    f = final(df)
    cell = lambda x: f"{np.mean(x):.1f} [{bootstrap_ci(x)[0]:.1f}, {bootstrap_ci(x)[1]:.1f}]"
    md = ["| task | QGPO compute (min) | QGPO w = 0 | QGPO, w chosen on validation | IQL at each mark: min → score "
          "(mean over seeds) | IQL at equal compute | IQL − QGPO (validation w), paired |",
          "|---|---|---|---|---|---|---|"]
    for path in sorted(results.glob("iql-*.json")):
        r = json.loads(path.read_text())
        g = f[f.task == r["task"]]
        if g.empty:
            continue
        ev = pd.DataFrame(r["evaluations"])
        ev["mark"] = ev.groupby("seed").cumcount()
        val = sm[(sm.task == r["task"]) & (sm.rule == "validation")].iloc[0]
        q_val = g[g.scale == val.w].set_index("seed")["score"].sort_index()
        q0 = g[g.scale == 0.0].set_index("seed")["score"].sort_index()
        qgpo_min = g.compute_seconds.mean() / 60
        marks = ev.groupby("mark")[["minutes", "score"]].mean()
        at = int((marks.minutes - qgpo_min).abs().idxmin())
        equal = ev[ev.mark == at].set_index("seed")["score"].sort_index()
        d = (equal - q_val).dropna().to_numpy()
        md.append(f"| {r['task']} | {qgpo_min:.1f} | {cell(q0.to_numpy())} | w = {val.w:g}: {cell(q_val.to_numpy())} | "
                  f"{', '.join(f'{m.minutes:.1f} → {m.score:.1f}' for m in marks.itertuples())} | "
                  f"{marks.minutes[at]:.1f} min, {len(equal)} seed(s): {cell(equal.to_numpy())} | {cell(d)} |")
    return "\n".join(md)


def main():
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "--compare":       # --compare STUDY_RESULTS_PARQUET
        print(compare(Path(__file__).parent / "results", Path(sys.argv[2])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-root")
    ap.add_argument("--at-minutes", type=float, nargs="+", default=[5.0, 10.0, 20.0, 30.0],
                    help="evaluate when the training compute reaches each of these")
    ap.add_argument("--episodes", type=int, default=50, help="test episodes (the local preset's eval_episodes)")
    ap.add_argument("--val-episodes", type=int, default=20,
                    help="the study's validation episodes (skipped: their reset seeds come first); 20 is what the "
                         "IQL results in benchmarks/results were scored after (the local preset now has 50)")
    ap.add_argument("--chunk", type=int, default=500, help="gradient steps between compute checks")
    ap.add_argument("--out")
    a = ap.parse_args()
    import d3rlpy
    torch.set_num_threads(1)
    arr, task = datasets.load_arrays(a.task, root=Path(a.data_root) if a.data_root else None)
    dataset = d3rlpy.dataset.MDPDataset(arr["observations"].astype(np.float32), arr["actions"].astype(np.float32),
                                        arr["rewards"].astype(np.float32), arr["terminals"].astype(np.float32),
                                        # an episode that terminates at its last allowed step has both flags;
                                        # d3rlpy refuses that, and termination is what bootstrapping needs
                                        timeouts=(arr["timeouts"] & ~arr["terminals"]).astype(np.float32))
    dataset_score = datasets.dataset_score(arr, task)
    out = Path(a.out or Path(__file__).parent / "results" / f"iql-{a.task}.json")
    setting = {"task": a.task, "library": f"d3rlpy {d3rlpy.__version__}", "dataset_score": dataset_score,
               "episodes": a.episodes, "val_episodes": a.val_episodes, "at_minutes": sorted(a.at_minutes)}
    rows = []
    if out.exists():                 # resume: seeds evaluated at every mark are kept, a partial one is redone
        old = json.loads(out.read_text())
        if all(old.get(k) == v for k, v in setting.items() if k != "library"):
            done = {s for s in a.seeds if sum(r["seed"] == s for r in old["evaluations"]) == len(a.at_minutes)}
            rows = [r for r in old["evaluations"] if r["seed"] in done]
            print(f"{out}: seeds {sorted(done)} already evaluated at every mark")
    for seed in a.seeds:
        if any(r["seed"] == seed for r in rows):
            continue
        d3rlpy.seed(seed)
        iql = d3rlpy.algos.IQLConfig(
            batch_size=256, gamma=0.99, actor_learning_rate=3e-4, critic_learning_rate=3e-4, tau=0.005,
            expectile=0.7, weight_temp=3.0, max_weight=100.0,
            reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0)).create(device="cpu:0")
        iql.build_with_dataset(dataset)
        compute, steps = 0.0, 0
        for target in sorted(a.at_minutes):
            while compute < target * 60:
                t0 = time.process_time()
                iql.fit(dataset, n_steps=a.chunk, n_steps_per_epoch=a.chunk, show_progress=False,
                        logger_adapter=d3rlpy.logging.NoopAdapterFactory(), save_interval=10**9)
                compute += time.process_time() - t0      # CPU time of this one-thread process: other
                #                                            processes on the machine do not inflate it
                steps += a.chunk
            scores = evaluate(iql, task, seed, a.val_episodes, a.episodes)
            rows.append({"seed": seed, "minutes": compute / 60, "steps": steps, "score": float(np.mean(scores)),
                         "scores": scores})
            print(f"{a.task} seed {seed}: IQL {np.mean(scores):.1f} after {steps} steps "
                  f"({compute / 60:.1f} min of training)", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**setting, "evaluations": sorted(rows, key=lambda r: (r["seed"], r["steps"]))},
                                      indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
