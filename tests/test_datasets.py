"""Datasets: D4RL-layout files built here, Minari layout, validation errors, download, the data CLI."""
import dataclasses
import functools
import http.server
import json
import threading

import h5py
import numpy as np
import pytest

from cepdist.data import datasets
from cepdist.cli import main
from cepdist.data.datasets import DatasetError
from cepdist.data.tasks import TASKS, get_task


def write_d4rl(path, obs, act, rew, term, tout=None, next_obs=None, dtype=np.float32, extra=None):
    with h5py.File(path, "w") as f:
        f["observations"] = obs.astype(dtype)
        f["actions"] = act.astype(dtype)
        f["rewards"] = rew.astype(dtype)
        f["terminals"] = term.astype(bool)
        if tout is not None:
            f["timeouts"] = tout.astype(bool)
        if next_obs is not None:
            f["next_observations"] = next_obs.astype(dtype)
        f["infos/qpos"] = np.zeros((len(obs), 6))
        f["metadata/algorithm"] = "test"
        for k, v in (extra or {}).items():
            f[k] = v
    return path


def episodes(lengths, ends_by, obs_dim=11, act_dim=3, seed=0):
    """Concatenated episodes; ends_by[i] ∈ {'terminal', 'timeout', 'open'} says how episode i ends."""
    rng = np.random.default_rng(seed)
    obs, nxt, act, rew, term, tout = [], [], [], [], [], []
    for L, how in zip(lengths, ends_by):
        s = rng.standard_normal((L + 1, obs_dim))
        obs.append(s[:-1]); nxt.append(s[1:])
        act.append(rng.uniform(-1, 1, (L, act_dim))); rew.append(rng.uniform(0, 2, L))
        t, o = np.zeros(L, bool), np.zeros(L, bool)
        if how == "terminal":
            t[-1] = True
        elif how == "timeout":
            o[-1] = True
        term.append(t); tout.append(o)
    return [np.concatenate(x) for x in (obs, act, rew, term, tout, nxt)]


def test_registry_covers_every_task_and_scores_once():
    names = set(TASKS)
    for env in ("halfcheetah", "hopper", "walker2d", "ant"):
        for lvl in ("random", "medium", "expert", "medium-replay", "full-replay", "medium-expert"):
            assert f"{env}-{lvl}-v2" in names
    for d in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"):
        assert f"antmaze-{d}-v0" in names and f"antmaze-{d}-v2" in names
    t = get_task("hopper-medium-v2")
    assert t.url.endswith("/gym_mujoco_v2/hopper_medium-v2.hdf5") and t.K == 16 and t.env_id == "Hopper-v5"
    assert get_task("hopper-medium-replay-v2").url.endswith("hopper_medium_replay-v2.hdf5")
    assert np.isclose(t.normalized_score(3234.3), 100) and np.isclose(t.normalized_score(-20.272305), 0)
    am = get_task("antmaze-large-diverse-v2")
    assert am.K == 32 and am.reward == "antmaze" and am.guidance_scales == (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    assert am.url.endswith("Ant_maze_hardest-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5")
    assert get_task("antmaze-umaze-v2").episode_length == 700
    local = get_task("hopper-medium-local")
    assert local.local and local.url is None and local.ref_max == t.ref_max
    with pytest.raises(KeyError, match="did you mean hopper-medium-v2"):
        get_task("hoper-medium-v2")


def test_float32_file_with_next_observations(tmp_path):
    obs, act, rew, term, tout, nxt = episodes([5, 4, 6], ["terminal", "timeout", "open"])
    p = write_d4rl(tmp_path / "a.hdf5", obs, act, rew, term, tout, nxt)
    d, task = datasets.load("hopper-medium-v2", path=p)
    # D4RL's q-learning view: rows 0..N-2, minus the timeout row (index 8)
    keep = [i for i in range(len(obs) - 1) if not tout[i]]
    assert len(d) == len(keep) == 13
    assert np.allclose(d.next_obs.numpy(), nxt[keep]) and np.allclose(d.obs.numpy(), obs[keep])
    assert d.terminals.numpy().tolist() == term[keep].astype(float).tolist()
    assert d.terminals.sum() == 1                    # the timeout is not terminal


def test_float64_replay_file_without_next_observations(tmp_path):
    obs, act, rew, term, tout, _ = episodes([3, 4, 5], ["timeout", "terminal", "timeout"])
    p = write_d4rl(tmp_path / "r.hdf5", obs, act, rew, term, tout, None, dtype=np.float64)
    d, _ = datasets.load("hopper-medium-replay-v2", path=p)
    keep = [i for i in range(len(obs) - 1) if not tout[i]]
    assert d.obs.dtype.is_floating_point and str(d.obs.dtype) == "torch.float32"
    assert np.allclose(d.next_obs.numpy(), obs[np.array(keep) + 1])   # s' is the following row
    # the terminal row (index 6) keeps a successor that is another episode's state, but stops bootstrapping
    assert d.terminals.numpy()[keep.index(6)] == 1
    ends = d.ends.numpy()
    assert ends[keep.index(6)] and ends[-1]


def test_info_json_against_independent_computation(tmp_path):
    obs, act, rew, term, tout, nxt = episodes([5, 4, 6, 3], ["terminal", "timeout", "timeout", "open"])
    p = write_d4rl(tmp_path / "i.hdf5", obs, act, rew, term, tout, nxt)
    import contextlib, io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["data", "info", "--path", str(p), "--task", "walker2d-medium-v2", "--json"]) == 2
    # walker2d expects obs 17: this file has 11 → rejected; hopper matches
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["data", "info", "hopper-medium-v2", "--path", str(p), "--json"]) == 0
    info = json.loads(buf.getvalue())
    rets = [rew[0:5].sum(), rew[5:9].sum(), rew[9:15].sum()]      # the open last episode is not complete
    assert info["episodes"] == 3 and info["terminals"] == 1
    assert info["obs_dim"] == 11 and info["act_dim"] == 3
    assert np.isclose(info["mean_return"], np.mean(rets))
    assert np.isclose(info["dataset_score"], 100 * (np.mean(rets) + 20.272305) / (3234.3 + 20.272305))
    assert info["transitions"] == len(obs) - 1 - 2                # two timeout rows dropped


@pytest.mark.parametrize("case,match", [
    ("missing", r"missing key\(s\) rewards"),
    ("length", r"key 'actions' has 9 rows but observations has 10"),
    ("nan", r"key 'rewards' has NaN/inf values \(first at row 3\)"),
    ("dims", r"key 'observations' has dimension 5, but task hopper-medium-v2 \(Hopper-v5\) expects 11"),
    ("empty", r"empty dataset"),
    ("nothdf5", r"not a readable HDF5 file"),
    ("rewards2d", r"key 'rewards' has shape \(10, 1\), expected 1-D of N"),
    ("intactions", r"key 'actions' has dtype int64, expected floating point"),
    ("range", r"key 'actions' has 1 of 10 rows \(10.00%\) outside the action range \[-1, 1\] of Hopper-v5 "
              r"\(max \|a\| = 1.5\)"),
    ("nextwidth", r"key 'next_observations' has dimension 7, expected 11 \(as observations\)"),
    ("strings", r"key 'actions' has dtype \|S3, expected floating point"),
    ("group", r"key 'actions' is an HDF5 group, expected a dataset"),
    ("flags", r"key 'terminals' must hold 0/1 flags, found \[0.0, 2.0\]"),
])
def test_malformed_files_raise_naming_file_and_key(tmp_path, case, match):
    p = tmp_path / f"{case}.hdf5"
    obs, act, rew, term, tout, nxt = episodes([10], ["timeout"])
    if case == "missing":
        with h5py.File(p, "w") as f:
            f["observations"], f["actions"], f["terminals"] = obs, act, term
    elif case == "length":
        write_d4rl(p, obs, act[:9], rew, term, tout)
    elif case == "nan":
        rew[3] = np.nan
        write_d4rl(p, obs, act, rew, term, tout)
    elif case == "dims":
        write_d4rl(p, obs[:, :5], act, rew, term, tout)
    elif case == "empty":
        write_d4rl(p, obs[:0], act[:0], rew[:0], term[:0], tout[:0])
    elif case in ("rewards2d", "nextwidth", "range"):
        rew, nxt = (rew[:, None], nxt) if case == "rewards2d" else (rew, nxt[:, :7] if case == "nextwidth" else nxt)
        if case == "range":
            act[4, 1] = 1.5
        write_d4rl(p, obs, act, rew, term, tout, next_obs=nxt)
    elif case in ("intactions", "strings", "group", "flags"):
        with h5py.File(p, "w") as f:
            f["observations"], f["rewards"], f["timeouts"] = obs.astype(np.float32), rew, tout
            f["terminals"] = np.where(np.arange(len(obs)) == 9, 2.0, 0.0) if case == "flags" else term
            if case == "intactions":
                f["actions"] = np.ones(act.shape, dtype=np.int64)
            elif case == "strings":
                f["actions"] = np.array([[b"abc"] * 3] * len(obs))
            elif case == "group":
                f.create_group("actions")["x"] = act
            else:
                f["actions"] = act.astype(np.float32)
    else:
        p.write_bytes(b"not an hdf5 file")
    with pytest.raises(DatasetError, match=match) as e:
        datasets.load("hopper-medium-v2", path=p)
    assert str(p) in str(e.value)


def test_missing_cached_file_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match=r"cepdist data download hopper-expert-v2"):
        datasets.load("hopper-expert-v2", root=tmp_path)
    with pytest.raises(DatasetError, match=r"cepdist data generate --task hopper-expert-local"):
        datasets.load("hopper-expert-local", root=tmp_path)


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield served, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_download_verifies_then_renames(tmp_path, http_dir):
    served, base = http_dir
    obs, act, rew, term, tout, nxt = episodes([10, 10], ["timeout", "terminal"])
    write_d4rl(served / "hopper_medium-v2.hdf5", obs, act, rew, term, tout, nxt)
    (served / "corrupt.hdf5").write_bytes(b"\x89HDF\r\n garbage")
    cache = tmp_path / "cache"
    task = dataclasses.replace(get_task("hopper-medium-v2"), url=f"{base}/hopper_medium-v2.hdf5")
    path = datasets.download(task, cache)
    assert path == cache / "hopper_medium-v2.hdf5" and len(datasets.read_hdf5(path, task)["rewards"]) == 20
    bad = dataclasses.replace(task, url=f"{base}/corrupt.hdf5")
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        datasets.download(bad, tmp_path / "c2")
    assert list((tmp_path / "c2").iterdir()) == []             # nothing partial left behind
    gone = dataclasses.replace(task, url=f"{base}/nothere.hdf5")
    with pytest.raises(DatasetError, match=r"put it at .*c3/nothere.hdf5.*D4RL_DATASET_DIR"):
        datasets.download(gone, tmp_path / "c3")
    assert list((tmp_path / "c3").iterdir()) == []


def test_minari_layout(tmp_path, monkeypatch):
    """Episodes in Minari's layout: observations have one more row than actions."""
    root = tmp_path / "minari"
    f = datasets.minari_file("mujoco/hopper/medium-v0", root)
    f.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    eps = [(4, "term"), (3, "trunc")]
    with h5py.File(f, "w") as h:
        for i, (T, how) in enumerate(eps):
            g = h.create_group(f"episode_{i}")
            g["observations"] = rng.standard_normal((T + 1, 11))
            g["actions"] = rng.uniform(-1, 1, (T, 3))
            g["rewards"] = np.arange(T, dtype=float)
            g["terminations"] = np.arange(T) == T - 1 if how == "term" else np.zeros(T, bool)
            g["truncations"] = np.arange(T) == T - 1 if how == "trunc" else np.zeros(T, bool)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    arr = datasets.read_minari("mujoco/hopper/medium-v0")
    d = datasets.minari_to_transitions(arr)
    assert len(d) == 7
    with h5py.File(f) as h:
        o0 = h["episode_0/observations"][()]
    assert np.allclose(d.obs[:4].numpy(), o0[:4]) and np.allclose(d.next_obs[:4].numpy(), o0[1:])
    assert d.terminals.numpy().tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert d.ends.numpy().tolist() == [False, False, False, True, False, False, True]
    with pytest.raises(DatasetError, match="not found"):
        datasets.read_minari("mujoco/hopper/expert-v0")
