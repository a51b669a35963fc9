"""Offline datasets: D4RL HDF5 files (read, download, validate), Minari datasets, summaries.

Everything ends in `cepdist.data.Transitions`, the format every stage consumes. Validation happens on
load, before any training, and every error names the file and the key."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import h5py
import numpy as np

from .transitions import Transitions, episode_returns
from .tasks import Task, get_task

log = logging.getLogger("cepdist")
REQUIRED = ("observations", "actions", "rewards", "terminals")
# the one schema of a dataset, whatever its source: key → (dtype family, number of dimensions)
SCHEMA = {"observations": ("float", 2), "actions": ("float", 2), "next_observations": ("float", 2),
          "rewards": ("float", 1), "terminals": ("flag", 1), "timeouts": ("flag", 1)}
# every task's action space is [-1, 1]; data beyond it by more than float rounding was not collected there
ACTION_TOLERANCE = 1e-3


class DatasetError(ValueError):
    pass


def d4rl_dir() -> Path:
    return Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets")).expanduser()


def minari_dir() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets")).expanduser()


# ---------------------------------------------------------------- reading and validation
def read_hdf5(path: Path, task: Task | None = None) -> dict[str, np.ndarray]:
    """The top-level arrays of a D4RL-layout file, validated (keys, lengths, finiteness, dimensions)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        missing = [k for k in REQUIRED if k not in f]
        if missing:
            raise DatasetError(f"{path}: missing key(s) {', '.join(missing)}; a D4RL file has "
                               f"{', '.join(REQUIRED)} (+ timeouts, next_observations)")
        for k in SCHEMA:
            if k in f and not isinstance(f[k], h5py.Dataset):
                raise DatasetError(f"{path}: key {k!r} is an HDF5 {type(f[k]).__name__.lower()}, expected a dataset")
        arrays = {k: f[k][()] for k in SCHEMA if k in f}
    return validate_arrays(arrays, task, str(path))


def validate_arrays(arrays: dict[str, np.ndarray], task: Task | None, source: str) -> dict[str, np.ndarray]:
    """Check arrays against SCHEMA (dtype family, dimensions, rows), finiteness, the task's widths and its
    action range; every error names the source, the key, what was found and what was expected."""
    path = source
    n = len(arrays["observations"])
    if n == 0:
        raise DatasetError(f"{path}: empty dataset (observations has 0 rows)")
    for k, v in arrays.items():
        kind, ndim = SCHEMA[k]
        ok = np.issubdtype(v.dtype, np.floating) if kind == "float" else \
            (v.dtype == bool or np.issubdtype(v.dtype, np.number))
        if not ok:
            raise DatasetError(f"{path}: key {k!r} has dtype {v.dtype}, expected "
                               + ("floating point" if kind == "float" else "bool or 0/1 numbers"))
        if v.ndim != ndim:
            want = "1-D of N" if ndim == 1 else "2-D (N × dim)"
            raise DatasetError(f"{path}: key {k!r} has shape {v.shape}, expected {want}")
        if len(v) != n:
            raise DatasetError(f"{path}: key {k!r} has {len(v)} rows but observations has {n}")
        if kind == "flag" and v.dtype != bool and not np.isin(v, (0, 1)).all():
            raise DatasetError(f"{path}: key {k!r} must hold 0/1 flags, found {np.unique(v)[:5].tolist()}")
    if "next_observations" in arrays and arrays["next_observations"].shape[1] != arrays["observations"].shape[1]:
        raise DatasetError(f"{path}: key 'next_observations' has dimension {arrays['next_observations'].shape[1]}, "
                           f"expected {arrays['observations'].shape[1]} (as observations)")
    for k in ("observations", "actions", "rewards", "next_observations"):
        if k in arrays and not np.isfinite(arrays[k]).all():
            bad = int(np.flatnonzero(~np.isfinite(arrays[k]).reshape(n, -1).all(1))[0])
            raise DatasetError(f"{path}: key {k!r} has NaN/inf values (first at row {bad})")
    if task is not None:
        for k, want in (("observations", task.obs_dim), ("actions", task.act_dim)):
            if arrays[k].shape[1] != want:
                raise DatasetError(f"{path}: key {k!r} has dimension {arrays[k].shape[1]}, but task "
                                   f"{task.name} ({task.env_id}) expects {want}")
        outside = np.abs(arrays["actions"]) > 1 + ACTION_TOLERANCE
        if outside.any():
            raise DatasetError(f"{path}: key 'actions' has {int(outside.any(1).sum())} of {n} rows "
                               f"({outside.any(1).mean():.2%}) outside the action range [-1, 1] of {task.env_id} "
                               f"(max |a| = {np.abs(arrays['actions']).max():.3g})")
        if task.env_id.startswith("Ant-") and np.any(arrays["observations"][:, 27:]):
            log.warning("%s: observation dims 27-110 (contact forces) are not all zero; the evaluation "
                        "environment supplies zeros there as D4RL's mujoco 2.0 files have (cepdist/envs.py)", path)
    return arrays


def to_transitions(arr: dict[str, np.ndarray], max_episode_steps: int | None = None) -> Transitions:
    """D4RL's q-learning view: pairs (s_i, s_{i+1}) for i < N−1 (next_observations[i] when present),
    transitions that end by timeout are dropped (their successor is another episode's first state), and
    only `terminals` stop bootstrapping. Without `timeouts`, an episode times out after max_episode_steps.
    `ends` marks the last kept transition of each episode (terminal, or next state not the following obs)."""
    obs = arr["observations"]
    n = len(obs)
    term = arr["terminals"].astype(bool)
    if "timeouts" in arr:
        tout = arr["timeouts"].astype(bool)
    else:
        tout = np.zeros(n, bool)
        if max_episode_steps:
            step = 0
            for i in range(n):              # episode counter as D4RL keeps it: reset at terminal or timeout
                tout[i] = step == max_episode_steps - 1
                step = 0 if (term[i] or tout[i]) else step + 1
    nxt = arr.get("next_observations")
    keep = ~tout[: n - 1]
    idx = np.flatnonzero(keep)
    next_obs = (nxt[:n - 1] if nxt is not None else obs[1:])[idx]
    o, terms = obs[idx], term[idx]
    ends = np.ones(len(idx), bool)
    if len(idx) > 1:
        ends[:-1] = terms[:-1] | (np.abs(o[1:] - next_obs[:-1]).max(1) > 1e-6)
    return Transitions.from_numpy(o, arr["actions"][idx], arr["rewards"][idx], next_obs, terms, ends)


def episode_ends(arr: dict[str, np.ndarray]) -> np.ndarray:
    term = arr["terminals"].astype(bool)
    return term | arr.get("timeouts", np.zeros_like(term)).astype(bool)


def dataset_score(arr: dict[str, np.ndarray], task: Task) -> float:
    """The dataset's own normalised score: mean return over its complete episodes (terminal or timeout)."""
    rets = episode_returns(arr["rewards"], episode_ends(arr))
    return float(task.normalized_score(rets.mean())) if len(rets) else float("nan")


def summarize(arr: dict[str, np.ndarray], task: Task, path: Path | str = "") -> dict:
    """Counts, mean episode return and the dataset's own normalised score."""
    term = arr["terminals"].astype(bool)
    rets = episode_returns(arr["rewards"], episode_ends(arr))
    mean = float(rets.mean()) if len(rets) else float("nan")
    return {"task": task.name, "path": str(path), "transitions": len(to_transitions(arr, task.episode_length)),
            "rows": int(len(term)), "episodes": int(len(rets)), "terminals": int(term.sum()),
            "obs_dim": int(arr["observations"].shape[1]), "act_dim": int(arr["actions"].shape[1]),
            "mean_return": mean, "dataset_score": float(task.normalized_score(mean)),
            "dtype": str(arr["observations"].dtype)}


# ---------------------------------------------------------------- D4RL cache and download
def local_path(task: Task, root: Path | None = None) -> Path:
    return Path(root or d4rl_dir()) / task.filename


def fingerprint(path: Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits), cached beside it in `<file>.sha256.json` under its
    size and modification time, so a rerun costs a stat; a read-only location just recomputes."""
    path = Path(path)
    st = path.stat()
    cache = path.with_name(path.name + ".sha256.json")
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        c = json.loads(cache.read_text())
        if {k: c.get(k) for k in stamp} == stamp:
            return c["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    try:
        cache.write_text(json.dumps({**stamp, "sha256": digest}))
    except OSError:
        pass
    return digest


def download(task: Task, root: Path | None = None, timeout: float = 60.0) -> Path:
    """Fetch a task's original file into the cache: to a temporary file, verified as a readable HDF5 with
    the required keys, then renamed atomically. A partial or corrupt file is never left under the name."""
    dest = local_path(task, root)
    if dest.is_file():
        return dest
    if task.url is None:
        raise DatasetError(f"{task.name} is generated locally (`cepdist data generate`), not downloaded")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        log.info("downloading %s → %s", task.url, dest)
        try:
            with urllib.request.urlopen(task.url, timeout=timeout) as r, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(r, out, length=1 << 20)
        except (urllib.error.URLError, OSError) as e:
            raise DatasetError(f"could not download {task.name} from {task.url} ({e}). Without network access, "
                               f"fetch that file elsewhere and put it at {dest} (or set D4RL_DATASET_DIR "
                               f"to the folder that holds {dest.name})") from None
        read_hdf5(Path(tmp), task)                  # verify before it can be used
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def load(task_name: str, path: str | Path | None = None, root: Path | None = None,
         allow_download: bool = False) -> tuple[Transitions, Task]:
    """Transitions of a task, from an explicit file or the D4RL cache (downloading only when allowed)."""
    arr, task = load_arrays(task_name, path, root, allow_download)
    return to_transitions(arr, task.episode_length), task


def load_arrays(task_name: str, path: str | Path | None = None, root: Path | None = None,
                allow_download: bool = False) -> tuple[dict[str, np.ndarray], Task]:
    """The validated arrays of a task's file (see `load`)."""
    task = get_task(task_name)
    if path is None:
        path = local_path(task, root)
        if not path.is_file():
            if allow_download and task.url:
                path = download(task, root)
            else:
                how = (f"`cepdist data download {task.name}`" if task.url
                       else f"`cepdist data generate --task {task.name}`")
                raise DatasetError(f"{task.name}: no file at {path}; get it with {how}, or pass an explicit path")
    return read_hdf5(Path(path), task), task


# ---------------------------------------------------------------- Minari
def minari_file(dataset_id: str, root: Path | None = None) -> Path:
    return Path(root or minari_dir()) / dataset_id / "data" / "main_data.hdf5"


def read_minari(dataset_id: str, root: Path | None = None) -> dict[str, np.ndarray]:
    """A Minari dataset in the cache as D4RL-layout arrays: each episode_<i> holds observations (T+1 rows),
    actions, rewards, terminations, truncations (T rows)."""
    path = minari_file(dataset_id, root)
    if not path.is_file():
        raise DatasetError(f"Minari dataset {dataset_id!r} not found at {path} (MINARI_DATASETS_PATH={minari_dir()})")
    cols = {k: [] for k in ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")}
    with h5py.File(path, "r") as f:
        eps = sorted((k for k in f if k.startswith("episode_")), key=lambda k: int(k.split("_")[1]))
        if not eps:
            raise DatasetError(f"{path}: no episode_<i> groups")
        for k in eps:
            g = f[k]
            missing = [m for m in ("observations", "actions", "rewards", "terminations", "truncations") if m not in g]
            if missing:
                raise DatasetError(f"{path}: {k} is missing {', '.join(missing)}")
            o, T = g["observations"][()], len(g["actions"])
            if len(o) != T + 1:
                raise DatasetError(f"{path}: {k}/observations has {len(o)} rows, expected actions+1 = {T + 1}")
            cols["observations"].append(o[:-1]); cols["next_observations"].append(o[1:])
            cols["actions"].append(g["actions"][()]); cols["rewards"].append(g["rewards"][()])
            cols["terminals"].append(g["terminations"][()].astype(bool))
            cols["timeouts"].append(g["truncations"][()].astype(bool))
    return validate_arrays({k: np.concatenate(v) for k, v in cols.items()}, None, str(path))


def minari_to_transitions(arr: dict[str, np.ndarray]) -> Transitions:
    """Minari stores next states explicitly, so no transition is dropped: truncations only end episodes."""
    term = arr["terminals"]
    ends = term | arr["timeouts"]
    ends[-1] = True
    return Transitions.from_numpy(arr["observations"], arr["actions"], arr["rewards"],
                                  arr["next_observations"], term, ends)


def minari_metadata(dataset_id: str, root: Path | None = None) -> dict:
    p = Path(root or minari_dir()) / dataset_id / "metadata.json"
    return json.loads(p.read_text()) if p.is_file() else {}

