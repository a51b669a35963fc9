"""D4RL-layout offline datasets generated locally from rollouts of real agents in gymnasium MuJoCo.

Behaviour policies: uniform random actions, or a Stable-Baselines3 agent file (SAC, TQC, PPO, A2C, ARS,
TRPO), with the agent's `vecnormalize.pkl` observation statistics where it has them, and optional Gaussian
action noise. Levels are composed the way D4RL composed its own: random, medium (an agent at roughly a
third to a half of expert return), expert, medium-expert (medium + expert concatenated) and a replay-like
level (a mix of weaker agents and noise). The tasks are registered as `<env>-<level>-local`: comparable in
kind to D4RL, never mistaken for it."""
from __future__ import annotations

import base64
import contextlib
import fcntl
import importlib
import io
import json
import logging
import os
import pickle
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ..data.datasets import DatasetError, local_path, read_hdf5
from ..data.tasks import Task, get_task
from .environments import make_env, model_file

log = logging.getLogger("cepdist")
ALGOS = {"sac": ("stable_baselines3", "SAC"), "tqc": ("sb3_contrib", "TQC"), "ppo": ("stable_baselines3", "PPO"),
         "a2c": ("stable_baselines3", "A2C"), "ars": ("sb3_contrib", "ARS"), "trpo": ("sb3_contrib", "TRPO")}
ZOO_ENV = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}


@dataclass(frozen=True)
class Source:
    """One behaviour policy: 'random' or an agent algorithm, for a share of rows. `stochastic` samples the
    agent's own action distribution, as D4RL sampled its SAC agents (action = mean + std·ε), instead of its
    mean; `noise` adds Gaussian action noise of that std (for agents without a distribution of their own)."""
    policy: str
    noise: float = 0.0
    share: float = 1.0
    stochastic: bool = False

    def describe(self) -> str:
        return f"{self.policy}(noise={self.noise},share={self.share}{',stochastic' if self.stochastic else ''})"


# level → sources per environment (agents chosen by their measured scores; see the policies' README). Medium
# data must vary at a state, as D4RL's does: a deterministic agent leaves in-support methods (QGPO, IQL) no
# action to prefer. Measured on 3 episodes (D4RL-normalised score; per-dimension action std at one state):
# hopper sac stochastic 35.6, 0.13 (deterministic 34.3, 0); halfcheetah ars + noise 0.2: 34.1, 0.2 (ars alone
# 41.9, 0; ppo's own distribution 48.4 but only 0.05; sac's 73.5, too strong for medium)
MEDIUM = {"halfcheetah": Source("ars", noise=0.2), "hopper": Source("sac", stochastic=True),
          "walker2d": Source("sac", noise=0.5)}
EXPERT = Source("tqc")


def level_sources(env: str, level: str) -> list[list[Source]]:
    """Parts concatenated in order; each part is a list of sources mixed by share."""
    if level == "random":
        return [[Source("random")]]
    if level == "medium":
        return [[MEDIUM[env]]]
    if level == "expert":
        return [[EXPERT]]
    if level == "medium-expert":
        return [[MEDIUM[env]], [EXPERT]]
    if level == "medium-replay":
        return [[Source("random", share=0.2), Source("a2c", 0.3, 0.3), Source(MEDIUM[env].policy, 0.6, 0.5)]]
    raise ValueError(f"unknown level {level!r}; expected random, medium, expert, medium-expert, medium-replay")


def env_level(task: Task) -> tuple[str, str]:
    """("hopper", "medium-expert") for hopper-medium-expert-local."""
    env, level = task.name.removesuffix("-local").split("-", 1)
    return env, level


def recipe(env: str, level: str) -> str:
    """The sources of a level as recorded in a generated file's metadata (a changed recipe is a stale file)."""
    return "; ".join(s.describe() for p in level_sources(env, level) for s in p)


def policy_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The agents' folder: an explicit path, else $CEPDIST_POLICY_DIR. Never assumed to exist."""
    p = explicit or os.environ.get("CEPDIST_POLICY_DIR")
    if not p:
        raise ValueError("no policy directory: pass --policy-dir or set CEPDIST_POLICY_DIR to a folder laid out "
                         "as <algo>/<Env>-v3_1/<Env>-v3.zip (the RL Zoo layout)")
    p = Path(p).expanduser()
    if not p.is_dir():
        raise ValueError(f"policy directory {p} does not exist")
    return p


# The trust boundary for agent files: their pickled parts (vecnormalize.pkl, the cloudpickled entries of an
# SB3 zip's "data") may name only classes from these packages plus numpy's array reconstructors; anything else
# — a function such as os.system or builtins.eval, a code object — is refused before it is called.
SAFE_CLASS_MODULES = ("stable_baselines3.", "sb3_contrib.", "gymnasium.spaces.", "torch.nn.modules.", "torch.optim.",
                      "collections")
SAFE_GLOBALS = {("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("numpy.random._pickle", "__randomstate_ctor"),
                ("numpy.random._pickle", "__bit_generator_ctor"), ("numpy.random._mt19937", "MT19937"),
                ("numpy.random.mtrand", "RandomState"), ("torch", "float32"), ("builtins", "dict"),
                ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"), ("builtins", "float"),
                ("builtins", "int"), ("builtins", "bool"), ("builtins", "str")}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only SAFE_GLOBALS and classes of SAFE_CLASS_MODULES (`gym` is read as `gymnasium`)."""

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module, name):
        if module == "gym" or module.startswith("gym."):
            module = "gymnasium" + module[3:]
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(SAFE_CLASS_MODULES):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        raise ValueError(f"{self.source}: refuses to load {module}.{name} (an agent file may contain only data and "
                         "the classes of a policy and its normaliser)")


def load_agent(model_cls, archive: Path, custom_objects: dict):
    """An SB3 model whose cloudpickled entries all go through RestrictedUnpickler first (SB3 then unpickles
    nothing itself; its .pth files load with weights_only)."""
    with zipfile.ZipFile(archive) as z:
        data = json.loads(z.read("data"))
    objects = dict(custom_objects)
    for key, v in data.items():
        if isinstance(v, dict) and ":serialized:" in v and key not in objects:
            objects[key] = RestrictedUnpickler(base64.b64decode(v[":serialized:"]), f"{archive} ({key})").load()
    return model_cls.load(archive, device="cpu", custom_objects=objects)


class AgentPolicy:
    """An SB3 agent (+ observation normalisation): its mean action, or a sample of its action distribution
    (`stochastic`; drawn from torch's global generator, which `rollouts` seeds)."""

    def __init__(self, algo: str, env: str, root: Path, action_space, observation_space, stochastic: bool = False):
        if algo not in ALGOS:
            raise ValueError(f"unknown agent algorithm {algo!r}; expected one of {', '.join(ALGOS)}")
        zoo = ZOO_ENV[env]
        folder = root / algo / f"{zoo}-v3_1"
        archive = folder / f"{zoo}-v3.zip"
        if not archive.is_file():
            raise ValueError(f"agent file not found: {archive}")
        mod, cls = ALGOS[algo]
        model_cls = getattr(importlib.import_module(mod), cls)
        self.model = load_agent(model_cls, archive, {
            "observation_space": observation_space, "action_space": action_space, "learning_rate": 0.0,
            "lr_schedule": lambda _: 0.0, "delta_std_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0,
            "replay_buffer_class": None, "weights": None})    # ARS's training-time copy of the policy's parameters
        self.norm = None
        vn = folder / f"{zoo}-v3" / "vecnormalize.pkl"
        if vn.is_file():
            v = RestrictedUnpickler(vn.read_bytes(), str(vn)).load()
            self.norm = (v.obs_rms.mean, np.sqrt(v.obs_rms.var + v.epsilon), v.clip_obs)
        self.name = f"{algo}:{archive}"
        self.stochastic = stochastic

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if self.norm is not None:
            mean, std, clip = self.norm
            obs = np.clip((obs - mean) / std, -clip, clip)
        a, _ = self.model.predict(obs.astype(np.float32), deterministic=not self.stochastic)
        return a


def rollouts(task: Task, source: Source, n_rows: int, seed: int, root: Path | None, n_envs: int = 8,
             progress=None) -> dict[str, np.ndarray]:
    """Complete episodes (the last one cut at n_rows) of one behaviour policy, in D4RL's row layout."""
    envs = [make_env(task) for _ in range(n_envs)]
    space = envs[0].action_space
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)                                   # the agents' own sampling
    policy = None if source.policy == "random" else AgentPolicy(
        source.policy, env_level(task)[0], policy_dir(root), space, envs[0].observation_space,
        source.stochastic)
    obs = np.stack([e.reset(seed=seed * 10_000 + i)[0] for i, e in enumerate(envs)])
    bufs = [[] for _ in envs]
    out: list[tuple] = []
    rows = 0
    while rows < n_rows:
        if policy is None:
            act = rng.uniform(space.low, space.high, size=(n_envs, space.shape[0]))
        else:
            act = policy(obs)
            if source.noise > 0:
                act = act + source.noise * rng.standard_normal(act.shape)
        act = np.clip(act, space.low, space.high)
        for i, e in enumerate(envs):
            qpos, qvel = e.unwrapped.data.qpos.copy(), e.unwrapped.data.qvel.copy()
            o2, r, term, trunc, _ = e.step(act[i])
            bufs[i].append((obs[i].copy(), act[i], r, term, trunc, o2, qpos, qvel))
            if term or trunc:
                out.append(bufs[i]); rows += len(bufs[i]); bufs[i] = []
                if progress:
                    progress(min(rows, n_rows))
                o2, _ = e.reset()
            obs[i] = o2
    for e in envs:
        e.close()
    flat = [row for ep in out for row in ep][:n_rows]
    cols = list(zip(*flat))
    return {"observations": np.array(cols[0], np.float32), "actions": np.array(cols[1], np.float32),
            "rewards": np.array(cols[2], np.float32), "terminals": np.array(cols[3], bool),
            "timeouts": np.array(cols[4], bool), "next_observations": np.array(cols[5], np.float32),
            "infos/qpos": np.array(cols[6], np.float32), "infos/qvel": np.array(cols[7], np.float32)}


def generate(task_name: str, out: Path, n_rows: int = 1_000_000, seed: int = 0, policy_root=None,
             n_envs: int = 8) -> Path:
    """Write a `<env>-<level>-local` dataset as a D4RL-layout HDF5 file (atomically)."""
    task = get_task(task_name)
    if not task.local:
        raise ValueError(f"{task.name} is a D4RL task; generated datasets are registered as <env>-<level>-local")
    env, level = env_level(task)
    parts = level_sources(env, level)
    if any(s.policy != "random" for p in parts for s in p):
        policy_dir(policy_root)                               # fail before any rollout
    chunks, t0 = [], time.perf_counter()
    total = n_rows * len(parts)
    done = [0]
    last = [t0]

    def progress(k):
        now = time.perf_counter()
        if now - last[0] > 10:
            rate = (done[0] + k) / (now - t0)
            log.info("generate %s: %d/%d rows | %.0f transitions/s, ETA %.0fs", task.name, done[0] + k, total,
                     rate, (total - done[0] - k) / max(rate, 1e-9))
            last[0] = now

    for pi, part in enumerate(parts):
        counts = np.floor(np.array([s.share for s in part]) / sum(s.share for s in part) * n_rows).astype(int)
        counts[-1] = n_rows - counts[:-1].sum()
        for si, (src, k) in enumerate(zip(part, counts)):
            chunks.append(rollouts(task, src, int(k), seed * 100 + pi * 10 + si, policy_root, n_envs, progress))
            done[0] += int(k)
    data = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.part")
    with h5py.File(tmp, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v, compression="gzip", compression_opts=1)
        md = f.create_group("metadata")
        md["algorithm"] = "cepdist-generate"
        md["task"] = task.name
        md["env_id"] = task.env_id
        md["model"] = Path(model_file(task) or "default").name
        md["seed"] = seed
        md["policies"] = recipe(env, level)
    os.replace(tmp, out)
    el = time.perf_counter() - t0
    log.info("generate %s: %d rows in %.0fs (%.0f transitions/s) → %s", task.name, len(data["rewards"]), el,
             len(data["rewards"]) / el, out)
    return out


def ensure_datasets(tasks, root: str | None = None, rows: int | None = None, policy_dir: str | None = None,
                    generate_missing: bool = True) -> list[str]:
    """Validate every task's file now, before any long work; generate missing *-local datasets (rows per
    part, default 1M) unless `generate_missing` is False. A missing D4RL file, or a generated file made under
    other dynamics than the task's evaluation environment, is an error that says how to get the right one.
    Returns the tasks whose files are still missing."""
    missing = []
    for name in tasks:
        task = get_task(name)
        path = local_path(task, Path(root) if root else None)
        if not generate_missing:
            if path.is_file() or not task.local:
                _ensure(task, path, rows, policy_dir)
            else:
                missing.append(name)
            continue
        with _exclusive(path):        # concurrent studies: one generates, the others wait and then read it
            _ensure(task, path, rows, policy_dir)
    return missing


@contextlib.contextmanager
def _exclusive(path: Path):
    """An advisory lock on `<path>.lock` (released by the OS if its holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure(task: Task, path: Path, rows: int | None, policy_dir: str | None):
    """Validate the task's file, or generate it (local tasks) or say how to get it."""
    if path.is_file():
        read_hdf5(path, task)
        if task.local:
            with h5py.File(path, "r") as f:
                found = f["metadata/model"][()].decode() if "metadata/model" in f else "default"
                sources = f["metadata/policies"][()].decode() if "metadata/policies" in f else "unrecorded"
            expected = Path(model_file(task) or "default").name
            regenerate = f"regenerate it: `cepdist data generate --task {task.name}`"
            if found != expected:
                raise DatasetError(f"{path}: generated under the {found!r} model, but {task.name} runs on "
                                   f"{expected!r}; {regenerate}")
            want = recipe(*env_level(task))
            if sources != want:
                raise DatasetError(f"{path}: generated from {sources!r}, but {task.name} is now generated from "
                                   f"{want!r}; {regenerate}")
        return
    if not task.local:
        raise DatasetError(f"{task.name}: no file at {path}; `cepdist data download {task.name}` "
                           "or put the original file there")
    log.info("generating %s (%d rows) → %s", task.name, rows or 1_000_000, path)
    generate(task.name, path, rows or 1_000_000, seed=0, policy_root=policy_dir)
