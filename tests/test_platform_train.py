"""The `paper` path on this 2-core machine: a study whose stages train on 2 Ray Train workers (DDP) with
intermediate evaluations, a worker killed mid-stage, and an infeasible request refused up front.
(Its own module: it starts its own 2-CPU local Ray.)"""
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray

from cepdist.distributed.driver import run_study
from cepdist.distributed.store import ArtifactStore
from cepdist.distributed.study import load_study, trials
from cepdist.distributed.tracking import MLflowTracker
from test_platform import tiny_study

pytestmark = pytest.mark.slow


def train_worker_pids() -> list[int]:
    """Processes of Ray Train workers on this machine (Ray names them in their command line)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"RayTrainWorker" in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def test_an_infeasible_request_is_refused_before_anything_starts(local_ray, tmp_path):
    study = tiny_study(tmp_path, "infeasible", seeds=(0,), train_workers=2, train_worker_cpus=1.0)
    with pytest.raises(ValueError, match=r"infeasible resources: one trial needs 3\.01 CPU \(trial 0\.01 \+ "
                                         r"2 Ray Train worker\(s\) × 1 \+ 1 evaluation actor\(s\) × 1\) .* "
                                         r"the cluster has 2 CPU"):
        run_study(study, tmp_path / "out")
    assert ArtifactStore(study.store).executions() == []
    assert not (tmp_path / "data").exists()             # refused before the dataset was even generated


def test_two_train_workers_with_intermediate_evaluations_survive_a_killed_worker(local_ray, tmp_path):
    study = load_study(tiny_study(tmp_path, "paperpath", seeds=(0,), train_workers=2, train_worker_cpus=0.45,
                                  eval_every=200),
                       # 600 steps between the first snapshot and the end: a window the watcher cannot miss under load
                       {"base": {"energy": {"steps": 800, "log_every": 100}}})
    store = ArtifactStore(study.store)
    root = Path(study.store)
    killed = []

    def kill_a_worker_mid_energy_stage():
        # the keys include the dataset's fingerprint, known once the study has generated it: watch the store
        deadline = time.time() + 300
        while time.time() < deadline:
            snaps = list(root.glob("energy-*/step-200.pt"))
            if snaps and not (snaps[0].parent / "artifact.pt").exists():
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.05)
    th = threading.Thread(target=kill_a_worker_mid_energy_stage, daemon=True)
    th.start()
    summary = run_study(study, tmp_path / "out")
    th.join()
    (t,) = trials(study)
    assert killed, "no Ray Train worker was killed mid-stage"
    assert summary["executions"] == {"behavior": 1, "support": 1, "q": 1, "energy": 1, "evaluation": 1}
    # the learning curve is complete: every intermediate evaluation in the table and in MLflow, once
    res = pd.read_parquet(summary["results_table"])
    res = res[res.episode_set == "test"]
    assert sorted(res.step.unique()) == [200, 400, 600, 800]
    assert len(res) == 4 * len(study.scales)
    tr = MLflowTracker(study.mlflow_uri, study.name)
    (run,) = tr.client.search_runs([tr.experiment_id])
    assert run.info.status == "FINISHED"
    for w in study.scales:
        hist = tr.client.get_metric_history(run.info.run_id, f"score_w{w:g}")
        assert sorted(m.step for m in hist) == [200, 400, 600, 800]
        mine = res[res.scale == w].set_index("step").score
        assert all(abs(m.value - mine[m.step]) < 1e-9 for m in hist)
    ck = store.get_json(t.keys["energy"], "step-800.json")
    assert set(ck) >= {"energy_loss", "q_mean", "q_std"}
