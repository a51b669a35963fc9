"""The Ray platform on real Ray: a multi-node cluster on one machine (head + 2 nodes), a node removed
mid-study, an interrupted and resumed study, Ray Train data parallelism, and cluster.yaml validation."""
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from cepdist.algos.qgpo.config import (BehaviorConfig, EnergyConfig, QConfig, QGPOConfig, SolverConfig,
                                       SupportConfig)
from cepdist.distributed.driver import run_study
from cepdist.distributed.store import ArtifactStore
from cepdist.distributed.study import StudyConfig, trials
from cepdist.distributed.tracking import MLflowTracker

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_study(tmp: Path, name: str, seeds=(0, 1), betas=(3.0,), **over) -> StudyConfig:
    """A study of seconds: hopper-random-local (3000 rows), tiny networks, evaluations every 20 energy steps."""
    fields = dict(name=name, tasks=("hopper-random-local",), seeds=seeds, betas=betas, Ks=(4,), solver_steps=(3,),
                  scales=(0.0, 2.0), dataset_rows=3000, eval_episodes=2, eval_max_steps=15, eval_every=20,
                  eval_actors=1, trial_cpus=1, max_failures=3, store=str(tmp / "store"),
                  mlflow_uri=f"sqlite:///{tmp}/mlflow.db", data_root=str(tmp / "data"))
    return StudyConfig(
        **{**fields, **over},
        base=QGPOConfig(behavior=BehaviorConfig(widths=(16, 8, 4), steps=40, batch_size=64, log_every=20, ckpt_every=20),
                        support=SupportConfig(K=None, batch_states=4096, solver=SolverConfig(steps=3)),
                        q=QConfig(hidden=(16,), steps=30, batch_size=32, reward=None, log_every=10, ckpt_every=10),
                        energy=EnergyConfig(hidden=(16,), steps=40, batch_size=32, log_every=20, ckpt_every=20),
                        sampler=SolverConfig(steps=3)))


def check_complete(study: StudyConfig, summary: dict):
    """Every trial has its result (all scales, every evaluation step) and exactly one MLflow run."""
    import pandas as pd
    ts = trials(study)
    store = ArtifactStore(study.store)
    steps = list(range(study.eval_every, study.base.energy.steps + 1, study.eval_every))
    table = pd.read_parquet(summary["results_table"])
    assert set(table.episode_set) == {"test", "validation"}
    assert len(table) == 2 * len(ts) * len(study.scales) * len(steps)
    table = table[table.episode_set == "test"]
    assert sorted(table.step.unique()) == steps
    tr = MLflowTracker(study.mlflow_uri, study.name)
    runs = tr.client.search_runs([tr.experiment_id], max_results=1000)
    keys = [r.data.tags["cepdist_key"] for r in runs]
    assert sorted(keys) == sorted(t.keys["evaluation"] for t in ts)     # one run per trial, no duplicates
    for r in runs:
        assert r.data.tags["key_q"].startswith("q-") and r.info.status == "FINISHED"
        hist = tr.client.get_metric_history(r.info.run_id, "score_w2")
        assert sorted(m.step for m in hist) == steps                   # each step logged once
        assert "config.energy.beta" in r.data.params
    for t in ts:
        assert all(store.exists(k) for s, k in t.keys.items() if s != "evaluation")


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def lose_mlflow_ends(study):
    """What a driver killed between the store's write and its MLflow callbacks leaves: one trial's run still
    RUNNING, another's run missing."""
    tr = MLflowTracker(study.mlflow_uri, study.name)
    first, second = tr.client.search_runs([tr.experiment_id])[:2]
    tr.client.update_run(first.info.run_id, status="RUNNING")
    tr.client.delete_run(second.info.run_id)


def test_study_on_three_nodes(cluster, tmp_path):
    """A study spread over three nodes; a second run computes nothing but completes the MLflow runs that a
    killed driver left unfinished."""
    study = tiny_study(tmp_path, "multinode", seeds=(0, 1, 2))
    summary = run_study(study, tmp_path / "out")
    check_complete(study, summary)
    assert summary["executions"] == {"behavior": 3, "support": 3, "q": 3, "energy": 3, "evaluation": 3}
    used = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(used) == 3
    lose_mlflow_ends(study)
    again = run_study(study, tmp_path / "out")
    assert again["executions"] == {}
    check_complete(study, again)


def test_a_non_default_noise_schedule_reaches_every_stage(cluster, tmp_path):
    """behavior.schedule.beta_max = 10: the behaviour model trains, the support actions are sampled, the energy
    model trains and the policy evaluates under that schedule (read back from the checkpoints), and the
    results differ from the default schedule's."""
    from cepdist.algos.qgpo.policy import load_policy
    from cepdist.distributed.study import load_study
    from cepdist.distributed.trials import fetch
    default = tiny_study(tmp_path, "schedule-default", seeds=(0,))
    other = load_study(default, {"name": "schedule-10", "base": {"behavior": {"schedule": {"beta_max": 10.0}}}})
    res = {s.name: pd.read_parquet(run_study(s, tmp_path / s.name)["results_table"]) for s in (default, other)}
    (t0,), (t1,) = trials(default), trials(other)
    store = default.store
    behavior = fetch(store, t1.keys["behavior"])
    assert behavior["config"]["schedule"] == {"beta_min": 0.1, "beta_max": 10.0}
    assert fetch(store, t1.keys["support"])["schedule"] == [0.1, 10.0]
    assert fetch(store, t1.keys["energy"])["config"]["schedule"] == [0.1, 10.0]
    policy = load_policy(behavior, "cep", energy=fetch(store, t1.keys["energy"]))
    assert (policy.schedule.beta_min, policy.schedule.beta_max) == (0.1, 10.0)
    assert fetch(store, t0.keys["support"])["schedule"] == [0.1, 20.0]
    a0, a1 = (fetch(store, t.keys["support"])["actions"] for t in (t0, t1))
    assert a0.shape == a1.shape and not np.allclose(a0.numpy(), a1.numpy())
    r0, r1 = (res[s.name].sort_values(["step", "scale", "episode_set"])["return"].to_numpy() for s in (default, other))
    assert not np.allclose(r0, r1)


def test_guidance_methods_share_behaviour_support_and_q(cluster, tmp_path):
    """--methods cep aepo aepo-analytic --algorithms qgpo iql: one behaviour, support and Q stage; an energy
    stage for each of cep and aepo (the aepo one regressed onto its analytic target); the IQL baseline on the
    same data, seed and episodes; every method in the table, IQL's rows as algorithm `iql`, and the report's
    tables (QGPO's without IQL's rows, a baseline table beside them)."""
    from cepdist.algos.iql import IQLConfig
    from cepdist.analysis.report import build
    from cepdist.distributed.trials import fetch
    methods = ("cep", "aepo", "aepo-analytic")
    study = tiny_study(tmp_path, "methods", seeds=(0,), methods=methods, algorithms=("qgpo", "iql"),
                       iql=IQLConfig(hidden=(16,), steps=40, batch_size=32, reward=None, log_every=20, ckpt_every=20))
    summary = run_study(study, tmp_path / "out")
    assert summary["executions"] == {"behavior": 1, "support": 1, "q": 1, "energy": 2, "iql": 1, "evaluation": 4}
    table = pd.read_parquet(summary["results_table"])
    assert set(table.method) == set(methods) | {"iql"}
    assert table.score.notna().all()
    iql = table[table.algorithm == "iql"]
    assert set(iql.method) == {"iql"} and set(iql.scale) == {0.0} and set(iql.step) == {40}
    assert set(iql.episode_set) == {"test", "validation"} and (iql.compute_seconds > 0).all()
    ts = {t.method: t for t in trials(study)}
    assert len({t.keys["q"] for t in ts.values() if "q" in t.keys}) == 1
    assert set(ts["iql"].keys) == {"iql", "evaluation"}
    assert fetch(study.store, ts["iql"].keys["iql"])["config"]["reward"] == "locomotion"   # the task's rule
    energy = fetch(study.store, ts["aepo"].keys["energy"])
    assert energy["config"]["method"] == "aepo" and energy["config"]["actions"] is None
    assert "energy" not in ts["aepo-analytic"].keys
    build(summary["results_table"], tmp_path / "report")
    md = (tmp_path / "report" / "table.md").read_text()
    assert "AEPO (reconstructed)" in md and "AEPO-analytic (reconstructed)" in md and "| cep |" in md
    assert "iql" not in md.lower()
    assert "## Offline baselines" in (tmp_path / "report" / "index.md").read_text()
    bt = pd.read_csv(tmp_path / "report" / "baselines.csv")
    assert list(bt.algorithm) == ["iql"] and bt.n_seeds.tolist() == [1]


def test_study_survives_the_loss_of_a_node(cluster, tmp_path):
    c, nodes = cluster
    study = tiny_study(tmp_path, "nodefail", seeds=(0, 1, 2, 3))
    store = ArtifactStore(study.store)
    killed = []

    def kill_when_busy():
        deadline = time.time() + 600
        while time.time() < deadline:
            if any(e.get("stage") == "q" for e in store.executions()):
                c.remove_node(nodes[1])
                killed.append(time.time())
                return
            time.sleep(0.2)
    th = threading.Thread(target=kill_when_busy, daemon=True)
    th.start()
    summary = run_study(study, tmp_path / "out")
    th.join()
    assert killed, "the node was never removed"
    check_complete(study, summary)
    nodes[1] = c.add_node(num_cpus=2)          # leave the cluster as it was for later tests


def logged_behavior_stage(cfg, n_rows, log_file, die_at=None, marker=None):
    """A behaviour stage on the bandit dataset that appends "step loss" lines (rank 0) to log_file; with
    die_at, worker rank 1 kills its own process once at that step (marker records that it happened)."""
    def stage(parallel, ckpt_path, callback, device):
        from cepdist.algos.qgpo.stages import train_behavior
        from helpers import bandit_dataset
        data, _ = bandit_dataset(n_rows)

        def cb(st, step, m, saved):
            callback(st, step, m, saved)
            if parallel.rank == 0:
                with open(log_file, "a") as f:
                    f.write(f"{step} {m['loss']}\n")
            if die_at is not None and parallel.rank == 1 and step == die_at and not marker.exists():
                marker.write_text("x")
                os._exit(1)                      # the worker process dies, no clean shutdown
        train_behavior(cfg, data.obs, data.actions, seed=0, ckpt_path=ckpt_path, callback=cb, parallel=parallel)
    return stage


def test_two_workers_give_the_loss_curve_of_one(tmp_path):
    """Ray Train DDP at the same global batch: the loss curves agree within noise."""
    import torch
    from cepdist.distributed.train import run_data_parallel
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "tests")}})
    cfg = BehaviorConfig(widths=(64, 32, 16), steps=120, batch_size=256, lr=1e-3, log_every=20, ckpt_every=60)
    curves = {}
    for workers in (1, 2):
        log_file = tmp_path / f"loss{workers}.txt"
        stage = logged_behavior_stage(cfg, 4000, log_file)
        ck = run_data_parallel(stage, workers=workers, ckpt_file="behavior.pt", name=f"ddp{workers}",
                               storage_path=str(tmp_path / "ray"), out=tmp_path / f"w{workers}")
        assert torch.load(ck, weights_only=True)["step"] == 120
        curves[workers] = np.loadtxt(log_file)[:, 1]
    ray.shutdown()
    one, two = curves[1], curves[2]
    assert len(one) == len(two) == 6
    assert one[-1] < 0.7 * one[0] and two[-1] < 0.7 * two[0]          # both learn
    assert np.all(np.abs(one[1:] - two[1:]) < 0.15 * one[1:]), (one, two)


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t.get("resources", {}).get("GPU", 0) > 0 for t in types.values())
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"] + cfg.get("head_setup_commands", []))


def test_ray_train_resumes_from_the_last_checkpoint_after_a_worker_dies(tmp_path):
    """A worker process dies once at step 70; Ray Train restarts the group, which resumes from its last
    registered checkpoint (not from 0) and finishes."""
    import torch
    from cepdist.distributed.train import run_data_parallel
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "tests")}})
    cfg = BehaviorConfig(widths=(32, 16, 8), steps=100, batch_size=128, lr=1e-3, log_every=10, ckpt_every=30)
    marker, log_file = tmp_path / "died", tmp_path / "steps.txt"
    stage = logged_behavior_stage(cfg, 2000, log_file, die_at=70, marker=marker)
    ck = run_data_parallel(stage, workers=2, ckpt_file="behavior.pt", name="restart", max_failures=2,
                           storage_path=str(tmp_path / "ray"), out=tmp_path / "out")
    ray.shutdown()
    assert marker.exists()
    assert torch.load(ck, weights_only=True)["step"] == 100
    steps = [int(line.split()[0]) for line in log_file.read_text().splitlines()]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    # resumed from a reported checkpoint (step 30 or 60: the controller registers reports asynchronously, so
    # the newest it knows of when the worker dies may lag by one), never from scratch
    resumed_from = steps[restart] - cfg.log_every
    assert resumed_from in (30, 60), steps
    assert steps[-1] == 100 and 10 not in steps[restart:]


def test_edis_study_arms_share_offline_iql(cluster, tmp_path):
    """An EDIS study (edis and plain arms, one seed): one offline IQL stage shared by both arms (and keyed as a
    QGPO study's IQL baseline on the same data and settings), one transition model for the edis arm, one online
    stage per arm with evaluations at online steps 0, 300 and 600 in the table (`phase`, `online_step`) and in
    one FINISHED MLflow run per arm; the report; a second run computes nothing but completes MLflow runs a
    killed driver left unfinished."""
    import dataclasses as dc
    from cepdist.analysis.report import build
    from cepdist.distributed import edis
    from cepdist.distributed.presets import edis_preset
    base = edis_preset("smoke")
    study = dc.replace(base, name="edis", seeds=(0,), store=str(tmp_path / "store"), data_root=str(tmp_path / "data"),
                       mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", dataset_rows=3000, eval_max_steps=30)
    summary = run_study(study, tmp_path / "out")
    assert summary["executions"] == {"iql": 1, "model": 1, "evaluation": 2}
    table = pd.read_parquet(summary["results_table"])
    assert sorted(zip(table.method, table.online_step)) == [("edis", 0), ("edis", 300), ("edis", 600),
                                                            ("plain", 0), ("plain", 300), ("plain", 600)]
    assert set(table[table.online_step == 0].phase) == {"offline"} and set(table[table.online_step > 0].phase) == {"online"}
    # both arms start from the same offline agent, evaluated on the same episodes
    assert table[table.online_step == 0].score.nunique() == 1
    assert (table.compute_seconds > 0).all() and table.score.notna().all()
    ts = edis.trials(study)
    assert len({t.keys["iql"] for t in ts}) == 1 and "model" not in ts[1].keys
    qgpo = tiny_study(tmp_path, "q", seeds=(0,), algorithms=("iql",), iql=study.base.iql, dataset_rows=3000)
    assert trials(qgpo)[0].keys["iql"] == ts[0].keys["iql"]
    tr = MLflowTracker(study.mlflow_uri, study.name)
    runs = tr.client.search_runs([tr.experiment_id])
    assert sorted(r.data.tags["cepdist_key"] for r in runs) == sorted(t.keys["evaluation"] for t in ts)
    for r in runs:
        assert r.info.status == "FINISHED"
        assert sorted(m.step for m in tr.client.get_metric_history(r.info.run_id, "score_w0")) == [0, 300, 600]
    index = build(summary["results_table"], tmp_path / "report")
    assert "EDIS − plain" in index.read_text() and (tmp_path / "report" / "online_learning_curves.png").is_file()
    lose_mlflow_ends(study)
    again = run_study(study, tmp_path / "out")
    assert again["executions"] == {}
    runs = tr.client.search_runs([tr.experiment_id])
    assert sorted(r.data.tags["cepdist_key"] for r in runs) == sorted(t.keys["evaluation"] for t in ts)
    for r in runs:
        assert r.info.status == "FINISHED"
        assert sorted(m.step for m in tr.client.get_metric_history(r.info.run_id, "score_w0")) == [0, 300, 600]
