"""Studies run through the command line, each on a fresh local Ray: an interrupted study run again (finished
stages reused, results complete), and a failure a retry cannot fix (one line, no retry).
(Its own module: it must not share a machine-wide Ray cluster with the multi-node tests.)"""
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import yaml

from cepdist.config import to_dict
from cepdist.distributed.driver import run_study
from cepdist.distributed.store import ArtifactStore
from test_platform import ROOT, check_complete, tiny_study

pytestmark = pytest.mark.slow


def test_interrupted_study_resumes_without_recomputing(tmp_path):
    """A study killed mid-way, then run again: finished stages are reused, results are complete."""
    if ray.is_initialized():
        ray.shutdown()
    study = tiny_study(tmp_path, "resume", seeds=(0, 1), betas=(1.0, 3.0))      # 4 trials
    cfg = to_dict(study)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(ROOT / "sweeps" / "d4rl_all.py"), "--config", str(tmp_path / "study.yaml"),
           "--out", str(tmp_path / "out")]
    env = {**os.environ, "RAY_ADDRESS": "local"}      # a fresh local instance, whatever else runs
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    store = ArtifactStore(study.store)
    deadline = time.time() + 240
    while time.time() < deadline and sum(e.get("stage") == "evaluation" for e in store.executions()) < 2:
        time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    # the killed study's own Ray processes only (its session), never other Ray work on the machine
    subprocess.run(["pkill", "-9", "-s", str(p.pid)], capture_output=True)
    first = store.executions()
    done_results = {e["key"] for e in first if e.get("stage") == "evaluation"}
    assert 2 <= len(done_results) < 4, "the interruption should fall in the middle of the study"
    summary = run_study(study, tmp_path / "out2")
    ray.shutdown()
    check_complete(study, summary)
    # the study's wall time adds the killed invocation's (last rewritten within 10 s) to this one's
    killed, resumed = summary["invocations"]
    assert killed["outcome"] == "running" and resumed["outcome"] == "finished", summary["invocations"]
    assert summary["wall_seconds"] == killed["seconds"] + resumed["seconds"] >= summary["seconds"]
    again = summary["executions"]
    # behaviour models (one per seed) and finished trials are not recomputed
    assert again.get("behavior", 0) == 2 - sum(e.get("stage") == "behavior" for e in first)
    assert again.get("evaluation", 0) == 4 - len(done_results)
    total = {}
    for e in store.executions():
        total[e["key"]] = total.get(e["key"], 0) + 1
    assert all(n == 1 for k, n in total.items() if not k.startswith("evaluation-")), total


def test_a_deterministic_failure_stops_the_study_at_the_first_attempt_with_one_line(tmp_path):
    """A non-finite loss (behaviour lr 1000 in a partial YAML) is not retried: rc 1, one line naming the
    stage, the trial and the cause, no traceback; nothing is stored for that stage."""
    study = tiny_study(tmp_path, "fatal", seeds=(0,))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**to_dict(study), "base": {"behavior": {"lr": 1000}}}))
    r = subprocess.run([sys.executable, "-m", "cepdist", "study", "run", "--config", str(tmp_path / "study.yaml"),
                        "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "RAY_ADDRESS": "local"}, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cepdist: study failed: behavior stage of trial hopper-random-local s0") and \
        "NonFiniteLossError: behavior: non-finite loss" in last, out
    assert "Traceback" not in out and "retrying" not in out, out
    assert len(out.splitlines()) < 15, out
    assert ArtifactStore(study.store).executions() == []
    # the diverged behaviour stage is recorded: its trial's MLflow run is FAILED with the cause
    from cepdist.distributed.tracking import MLflowTracker
    tr = MLflowTracker(study.mlflow_uri, study.name)
    (run,) = tr.client.search_runs([tr.experiment_id])
    assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags["failure"]


def test_two_studies_at_once_on_one_store_compute_each_stage_once(tmp_path):
    """Two studies started together on one store (each with its own Ray and MLflow): every stage key is
    executed once, the other study waits for it, and both get the same results."""
    import pandas as pd
    procs = []
    for name in ("conc-a", "conc-b"):
        study = tiny_study(tmp_path, name, seeds=(0,))
        cfg = {**to_dict(study), "mlflow_uri": f"sqlite:///{tmp_path}/{name}.db"}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen([sys.executable, "-m", "cepdist", "study", "run", "--config",
                                       str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)],
                                      cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": "local"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(outs)
    counts = {}
    for e in ArtifactStore(study.store).executions():
        counts[e["key"]] = counts.get(e["key"], 0) + 1
    assert len(counts) == 5 and set(counts.values()) == {1}, counts
    a, b = (pd.read_parquet(tmp_path / n / "results.parquet") for n in ("conc-a", "conc-b"))
    assert a.drop(columns="study").equals(b.drop(columns="study"))


def test_ctrl_c_in_the_behaviour_phase_never_starts_the_next_phase(tmp_path):
    """SIGINT while the behaviour phase runs: the driver records it, Tune stops gracefully, no later phase
    starts (even if the running trials finish meanwhile), and the study exits 130 with the resume hint."""
    study = tiny_study(tmp_path, "sigint", seeds=(0, 1))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(to_dict(study)))
    p = subprocess.Popen([sys.executable, "-m", "cepdist", "study", "run", "--config", str(tmp_path / "study.yaml"),
                          "--out", str(tmp_path / "out")], cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": "local"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "[behavior phase] 2 to run" in line:
            time.sleep(2)
            p.send_signal(signal.SIGINT)
            break
    lines += p.stdout.readlines()
    p.wait(timeout=120)
    out = "".join(lines)
    subprocess.run(["pkill", "-9", "-s", str(p.pid)], capture_output=True)     # this study's own leftovers only
    assert p.returncode == 130, out
    assert "study interrupted by SIGINT in the behavior phase; run the same command again to resume" in out
    assert "[q phase]" not in out and "Traceback" not in out, out
    # the invocation is on record as interrupted, with its wall time
    from cepdist.distributed.driver import study_ident
    from cepdist.distributed.study import trials
    (inv,) = ArtifactStore(study.store).invocations(study_ident(study.name, trials(study)))
    assert inv["outcome"] == "interrupted" and inv["seconds"] > 2, inv


def test_a_study_started_beside_another_cepdist_copy_stops_before_any_stage(tmp_path):
    """Ray puts the driver's working directory first on its workers' sys.path: a study started from a
    directory that holds another cepdist/ (an old checkout) would run that copy's stage code under the
    driver's keys. It stops at once with an error naming the copy; from a clean directory the check passes."""
    study = tiny_study(tmp_path, "stale", seeds=(0,))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(to_dict(study)))
    stale = tmp_path / "checkout"
    (stale / "cepdist").mkdir(parents=True)
    (stale / "cepdist" / "__init__.py").write_text('"""an old copy"""\n')
    cmd = [sys.executable, str(ROOT / "sweeps" / "d4rl_all.py"), "--config", str(tmp_path / "study.yaml"),
           "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=stale, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": "local"},
                       timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("cepdist: error: Ray workers on node") and \
        f"import cepdist from {stale / 'cepdist'}" in last and "working directory" in last, r.stdout + r.stderr
    assert ArtifactStore(study.store).executions() == []
    from cepdist.distributed.driver import check_worker_code
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, log_to_driver=False)
    try:
        check_worker_code(ray.nodes())              # this test's own directory holds no other copy
    finally:
        ray.shutdown()
