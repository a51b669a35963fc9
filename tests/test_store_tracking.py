"""Artifact store on a real local filesystem; MLflow on a real sqlite store."""
import torch

from cepdist.distributed.store import ArtifactStore, stage_key
from cepdist.distributed.tracking import MLflowTracker


def test_keys_depend_on_exactly_the_config():
    a = stage_key("behavior", {"task": "hopper", "seed": 0, "cfg": {"lr": 1e-4}})
    assert a == stage_key("behavior", {"cfg": {"lr": 1e-4}, "seed": 0, "task": "hopper"})   # order-free
    assert a != stage_key("behavior", {"task": "hopper", "seed": 1, "cfg": {"lr": 1e-4}})
    assert a.startswith("behavior-")


def test_store_round_trip_and_execution_log(tmp_path):
    st = ArtifactStore(tmp_path / "store")
    f = tmp_path / "x.pt"
    torch.save({"w": torch.arange(3)}, f)
    assert not st.exists("k1")
    st.put_file("k1", f)
    assert st.exists("k1")
    back = st.get_file("k1", tmp_path / "y.pt")
    assert torch.equal(torch.load(back, weights_only=True)["w"], torch.arange(3))
    st.put_json("k1", {"score": 1.5})
    assert st.get_json("k1") == {"score": 1.5}
    st.record_execution("k1", {"stage": "behavior"}); st.record_execution("k1")
    assert [e["key"] for e in st.executions()] == ["k1", "k1"]
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "store").rglob("*"))
    # a second store object on the same location sees the same artifacts (another process / a resumed study)
    assert ArtifactStore(str(tmp_path / "store")).exists("k1")


def test_mlflow_runs_are_keyed_and_batched(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tr = MLflowTracker(uri, "exp")
    rid = tr.start("trial-abc", "hopper seed 0", {"energy": {"beta": 3.0}, "task": "hopper"}, {"stage": "x"})
    tr.log_metrics(rid, {"score_w1": 50.0, "score_w3": 60.0}, step=10)
    tr.log_metrics(rid, {"score_w1": 55.0}, step=20)
    tr.finish(rid)
    assert MLflowTracker(uri, "exp").start("trial-abc", "again", {}, {}) == rid      # same key → same run
    run = tr.client.get_run(rid)
    assert run.data.params["energy.beta"] == "3.0" and run.data.tags["cepdist_key"] == "trial-abc"
    hist = tr.client.get_metric_history(rid, "score_w1")
    assert [(m.step, m.value) for m in hist] == [(10, 50.0), (20, 55.0)]


def test_an_interrupted_phase_stops_the_study_naming_what_is_missing(tmp_path):
    """Tune returns normally on Ctrl-C; the study must stop there instead of starting the next phase."""
    import pytest
    from cepdist.distributed.driver import StudyInterrupted, check_complete
    store = ArtifactStore(tmp_path)
    src = tmp_path / "x.pt"
    torch.save({"a": 1}, src)
    store.put_file("behavior-aaa", src)
    check_complete(store, "behavior", ["behavior-aaa", "behavior-aaa"], "artifact.pt")
    with pytest.raises(StudyInterrupted, match="behavior phase: 1 of 2 .*behavior-bbb.*again to resume"):
        check_complete(store, "behavior", ["behavior-aaa", "behavior-bbb"], "artifact.pt")


def test_concurrent_checkpoint_saves_of_one_path_never_collide(tmp_path):
    """Two writers saving the same checkpoint path at once: every save succeeds and the file is always a
    complete checkpoint (unique temporary names, atomic rename)."""
    import threading
    from cepdist.algos import checkpoint
    path, errors = tmp_path / "c.pt", []

    def writer(k):
        try:
            for i in range(40):
                checkpoint.save(path, step=i, w=torch.full((2000,), float(k)))
        except Exception as e:          # noqa: BLE001 (the test collects any failure)
            errors.append(e)
    ts = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors, errors[:1]
    assert checkpoint.load(path)["step"] == 39
    assert not list(tmp_path.glob("*.tmp"))


def test_a_stage_is_computed_under_one_lease_and_a_stale_lease_is_taken_over(tmp_path):
    import json
    import threading
    import time
    st = ArtifactStore(tmp_path / "store")
    seen = []

    def study(name):
        with st.lease("q-abc", done="result.json", poll_s=0.02) as mine:
            seen.append(mine)
            if mine:
                time.sleep(0.3)
                st.put_json("q-abc", {"done": name})
    ts = [threading.Thread(target=study, args=(i,)) for i in range(3)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert sorted(seen) == [False, False, True]                      # one computes, the others wait
    assert not (tmp_path / "store" / "q-abc" / "lease.json").exists()
    # a crashed holder's lease (not refreshed for longer than LEASE_STALE_S) is taken over at once
    (tmp_path / "store" / "q-dead").mkdir()
    (tmp_path / "store" / "q-dead" / "lease.json").write_text(json.dumps({"holder": "x", "refreshed": 0}))
    t0 = time.time()
    with st.lease("q-dead", poll_s=0.02) as mine:
        assert mine
    assert time.time() - t0 < 1


def test_a_run_that_fails_then_finishes_is_not_tagged_failed(tmp_path):
    tr = MLflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")
    rid = tr.start("trial-abc", "hopper seed 0", {}, {})
    tr.finish(rid, "FAILED", cause="NonFiniteLossError: energy loss nan")
    assert tr.client.get_run(rid).data.tags["failure"].startswith("NonFiniteLossError")
    assert tr.start("trial-abc", "retry", {}, {}) == rid         # the retry (or reconcile) reopens the same run
    tr.finish(rid, "FINISHED")
    run = tr.client.get_run(rid)
    assert run.info.status == "FINISHED" and "failure" not in run.data.tags
    assert run.data.tags["earlier_failure"].startswith("NonFiniteLossError")
    assert tr.client.search_runs([tr.experiment_id], "tags.failure != ''") == []


def test_a_lease_whose_holder_died_is_taken_over_at_once_and_a_live_ones_is_not(tmp_path):
    """A study resumed after a kill, or a trial retried after a node loss, does not wait LEASE_STALE_S for the
    lease its own crashed attempt left; a live holder's lease (or one on another host) is waited for."""
    import json
    import os
    import subprocess
    import sys
    import threading
    import time
    store = tmp_path / "store"
    crashed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from cepdist.distributed.store import ArtifactStore\n"
        f"cm = ArtifactStore({str(store)!r}).lease('q-crashed'); assert next(cm.gen); os._exit(1)")])
    assert crashed.returncode == 1
    lease = json.loads((store / "q-crashed" / "lease.json").read_text())
    assert lease["pid"] != os.getpid()
    st = ArtifactStore(store)
    t0 = time.time()
    with st.lease("q-crashed", poll_s=0.02) as mine:
        assert mine
    assert time.time() - t0 < 1
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other_host = {"holder": "elsewhere:1", "host": "elsewhere", "pid": lease["pid"]}     # a dead pid, but not ours
    try:
        for key, holder in (("q-live", {"holder": "h:live", "host": lease["host"], "pid": live.pid}),
                            ("q-other-host", other_host)):
            (store / key).mkdir()
            (store / key / "lease.json").write_text(json.dumps({**holder, "refreshed": time.time()}))
            got = []
            th = threading.Thread(target=lambda k=key: got.append(st.lease(k, poll_s=0.02).__enter__()), daemon=True)
            th.start()
            th.join(0.5)
            assert th.is_alive() and not got, key           # still waiting for the holder
            st.put_json(key, {"done": True}, name="artifact.pt")
            th.join(5)
            assert got == [False], key                       # the artifact appeared: nothing to compute
    finally:
        live.kill()


def test_a_studys_wall_time_includes_earlier_configurations_that_computed_its_stages(tmp_path):
    """An evaluation grid changed after the models were trained makes a new study identity; the invocations
    that trained them (even one that finished no stage) stay in its wall time, an unrelated study's do not."""
    from types import SimpleNamespace
    from cepdist.distributed.driver import used_executions, wall_time
    st = ArtifactStore(tmp_path / "store")
    for study, run, started, seconds in (("s-old", "r1", 1, 3600), ("s-old", "r2", 2, 120), ("s-new", "r3", 3, 900),
                                         ("other", "r4", 0, 5000)):
        st.record_invocation(study, run, {"run": run, "started": started, "seconds": seconds, "outcome": "finished"})
    st.record_execution("behavior-a", {"stage": "behavior", "run": "r1"})
    st.record_execution("evaluation-b", {"stage": "evaluation", "run": "r3"})
    st.record_execution("behavior-z", {"stage": "behavior", "run": "r4"})
    new = [SimpleNamespace(keys={"behavior": "behavior-a", "evaluation": "evaluation-b"})]
    w = wall_time(st, "s-new", used_executions(st, new))
    assert w["wall_seconds"] == 3600 + 120 + 900
    assert [(r["study"], r["seconds"]) for r in w["invocations"]] == [("s-old", 3600), ("s-old", 120), ("s-new", 900)]
    fresh = [SimpleNamespace(keys={"behavior": "behavior-q"})]
    assert wall_time(st, "s-fresh", used_executions(st, fresh))["wall_seconds"] == 0
