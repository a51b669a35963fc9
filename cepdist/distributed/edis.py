"""EDIS studies: tasks × seeds × arms {edis, plain} as Tune trials on the same platform as QGPO's studies.

Stages and their keys (the offline IQL stage is keyed exactly as a QGPO study's IQL baseline, so the two kinds
of study share it through one store):

    iql         ← dataset, seed, IQL config                         (offline pre-training, shared by both arms)
    model       ← dataset, seed, transition-model config            (EDIS's offline diffusion model)
    evaluation  ← iql key, model key (edis), EDIS config, episodes   (the online phase and its evaluations)

Phases: `offline` (one trial per iql key), then `online` (one trial per task, seed and arm: the model stage for
the edis arm, then the online loop). The online stage checkpoints its agent, buffers and energies in the
store's work folder and resumes there; each evaluation (through the evaluation pool, at online step 0 — the
offline agent — and every `eval_every` steps) is persisted to the store as it finishes."""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..algos.edis.config import EDISConfig, check as check_edis
from ..config import Errors, replace, to_dict
from ..data.tasks import get_task
from .store import ArtifactStore, stage_key
from .study import EVAL_SEED_OFFSET, _data_id, _key_cfg, dataset_file
from .tracking import DEFAULT_URI

ARMS = ("edis", "plain")
STAGES = ("iql", "model", "evaluation")
MODEL_NOT_IN_KEY = ("refresh_steps", "log_every", "ckpt_every")     # the offline model does not depend on them


@dataclass
class EDISStudyConfig:
    name: str = "edis"
    tasks: tuple[str, ...] = ("hopper-medium-local",)
    seeds: tuple[int, ...] = (0,)
    arms: tuple[str, ...] = ARMS
    base: EDISConfig = field(default_factory=lambda: EDISConfig(iql=dataclasses.replace(EDISConfig().iql, reward=None)))
    eval_episodes: int = 10
    eval_max_steps: int | None = None              # None → the task's episode length
    eval_actors: int = 2                           # 0: evaluate inside the trial process
    use_gpu: bool = False
    trial_cpus: float = 1.0
    train_workers: int = 0                         # the online loop is sequential: trained inside the trial
    train_worker_cpus: float = 1.0
    dataset_rows: int | None = None
    data_root: str | None = None
    policy_dir: str | None = None
    store: str = "runs/store"
    mlflow_uri: str = DEFAULT_URI
    max_failures: int = 2
    max_concurrent: int | None = None


def load_study(preset: EDISStudyConfig, *layers: dict[str, Any] | None) -> EDISStudyConfig:
    """preset + YAML + flags, merged deeply in that order, then validated."""
    from ..config import from_dict, merge
    d = to_dict(preset)
    for layer in layers:
        if layer is not None and not isinstance(layer, dict):
            raise ValueError(f"an EDIS study config must be a mapping of EDISStudyConfig fields, got {type(layer).__name__}")
        d = merge(d, layer)
    return validate(from_dict(EDISStudyConfig, d))


def validate(study: EDISStudyConfig) -> EDISStudyConfig:
    errors = Errors()
    need = errors.need
    need(len(study.tasks) > 0, "tasks", "a non-empty list")
    for t in study.tasks:
        get_task(t)
    need(len(study.seeds) > 0 and min(study.seeds) >= 0, "seeds", "a non-empty list of integers ≥ 0")
    need(len(study.arms) > 0 and set(study.arms) <= set(ARMS), "arms", f"a non-empty list of {', '.join(ARMS)}")
    need(study.eval_episodes >= 1, "eval_episodes", "≥ 1")
    need(study.eval_max_steps is None or study.eval_max_steps >= 1, "eval_max_steps", "≥ 1 (or unset)")
    need(study.eval_actors >= 0, "eval_actors", "≥ 0")
    need(study.train_workers == 0, "train_workers", "0 (the online loop runs inside its trial)")
    need(study.trial_cpus > 0, "trial_cpus", "> 0")
    need(study.max_failures >= 0, "max_failures", "≥ 0")
    errors += check_edis(study.base, "base.")
    if errors:
        raise ValueError("invalid EDIS study config: " + "; ".join(errors))
    return study


@dataclass(frozen=True)
class EDISTrial:
    task: str
    seed: int
    arm: str
    max_steps: int
    config: EDISConfig
    keys: dict[str, str]
    data: dict[str, Any]
    scales: tuple[float, ...] = (0.0,)     # one deterministic policy (the evaluation pool's interface)
    algorithm: str = "iql"

    @property
    def method(self) -> str:
        return self.arm

    @property
    def hyper(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, "arm": self.arm}

    @property
    def label(self) -> str:
        return f"{self.task} s{self.seed} {self.arm}"


def make_trial(study: EDISStudyConfig, hyper: dict[str, Any], data: dict[str, Any] | None = None) -> EDISTrial:
    task = get_task(hyper["task"])
    data = data or dataset_file(study, task.name)
    seed, arm = int(hyper["seed"]), hyper["arm"]
    cfg = replace(study.base, **{"seed": seed, "enabled": arm == "edis",
                                 "iql.reward": study.base.iql.reward or task.reward})
    did = _data_id(study, task, data)
    keys = {"iql": stage_key("iql", {"data": did, "seed": seed, "cfg": _key_cfg(cfg.iql)})}
    online = {"iql": keys["iql"], "enabled": cfg.enabled, "online": to_dict(cfg.online), "seed": seed}
    if cfg.enabled:
        model = {k: v for k, v in to_dict(cfg.model).items() if k not in MODEL_NOT_IN_KEY}
        keys["model"] = stage_key("model", {"data": did, "seed": seed, "cfg": model})
        online.update(model=keys["model"], refresh_steps=cfg.model.refresh_steps, energies=to_dict(cfg.energies))
    max_steps = study.eval_max_steps or task.episode_length
    keys["evaluation"] = stage_key("evaluation", {**online, "episodes": study.eval_episodes, "max_steps": max_steps})
    return EDISTrial(task.name, seed, arm, max_steps, cfg, keys, data)


def trials(study: EDISStudyConfig) -> list[EDISTrial]:
    # arms outermost: trials that run side by side then own different offline stages instead of one of them
    # waiting on the other's shared IQL lease
    data = {name: dataset_file(study, name) for name in study.tasks}
    return [make_trial(study, {"task": t, "seed": s, "arm": a}, data[t])
            for a, t, s in itertools.product(study.arms, study.tasks, study.seeds)]


# ---------------------------------------------------------------- the stages as the trials run them
def model_stage(ctx):
    from ..algos import checkpoint
    from ..algos.edis.model import pack_transition_model, train_transition_model
    from .trials import load_data, run_stage
    cfg = ctx.trial.config

    def fn(parallel, ckpt_path, callback, device):
        data = load_data(ctx.trial.task, ctx.study.data_root)[0].to(device)
        train_transition_model(cfg.model, data, seed=cfg.seed, ckpt_dir=Path(ckpt_path).parent / "factors")
        checkpoint.save(ckpt_path, **pack_transition_model(Path(ckpt_path).parent / "factors"))
    run_stage(ctx, "model", fn, data_parallel=False)


def online_stage(ctx):
    """The online loop with its evaluations; result.json marks it done."""
    from .trials import evaluation_stage
    evaluation_stage(ctx, _online)


def _online(ctx, key: str):
    import torch

    from ..algos.edis.model import load_transition_model
    from ..algos.edis.online import run_online
    from ..algos.iql import load_iql
    from .pool import EvalPool
    from .trials import fetch, load_data
    t, store, uri = ctx.trial, ctx.store, ctx.study.store
    ctx.event(event="start")
    data, dataset_score = load_data(t.task, ctx.study.data_root)
    data = data.to(ctx.device)
    agent = load_iql(fetch(uri, t.keys["iql"])).to(ctx.device)
    model = load_transition_model(t.config.model, fetch(uri, t.keys["model"])).to(ctx.device) if "model" in t.keys else None
    if ctx.study.train_workers == 0:
        torch.set_num_threads(max(1, int(ctx.study.trial_cpus)))
    history = store.get_json(key, "history.json") if store.exists(key, "history.json") else []
    pool = EvalPool(ctx.study.eval_actors)
    t0 = time.perf_counter()

    def evaluate(step: int, ag) -> dict:
        payload = {"iql": {"config": to_dict(t.config.iql), "state_dim": data.state_dim,
                           "action_dim": data.action_dim, "agent": {k: v.cpu() for k, v in ag.state_dict().items()}}}
        e0 = time.perf_counter()
        res = pool.evaluate(payload, t.task, [0.0], ctx.study.eval_episodes, seed=EVAL_SEED_OFFSET + t.seed,
                            max_steps=t.max_steps)
        entry = {"online_step": step, "scores": res.normalized[0].tolist(), "returns": res.returns[0].tolist(),
                 "lengths": res.lengths[0].tolist(), "dataset_score": dataset_score,
                 "seconds": time.perf_counter() - e0}
        history[:] = sorted([h for h in history if h["online_step"] != step] + [entry], key=lambda h: h["online_step"])
        store.put_json(key, history, "history.json")           # persisted as it happens
        metrics = evaluation_metrics(t, entry)
        ctx.event(event="evaluation", **metrics)
        return {k: v for k, v in metrics.items() if k.startswith(("score_", "return_"))}

    try:
        _, loop_history = run_online(t.config, get_task(t.task), data, agent, model, evaluate=evaluate,
                                     ckpt_dir=ctx.workdir(key), max_steps=t.max_steps)
    finally:
        pool.close()
    parts = {h["online_step"]: {k: v for k, v in h.items() if k.startswith("seconds_")} for h in loop_history}
    for h in history:
        h["parts"] = parts.get(h["online_step"], {})
    store.put_json(key, {"trial": t.hyper, "history": history})
    seconds = time.perf_counter() - t0
    store.record_execution(key, {"stage": "evaluation", "run": ctx.run_id, "trial": t.label, "seconds": seconds,
                                 "parts": parts.get(t.config.online.steps, {})})
    ctx.event(event="done", seconds=seconds)


def evaluation_metrics(t: EDISTrial, entry: dict) -> dict:
    """A stored evaluation as MLflow metrics (the agent acts unguided: scale 0)."""
    return {"step": entry["online_step"], "dataset_score": entry["dataset_score"],
            "score_w0": float(np.mean(entry["scores"])), "return_w0": float(np.mean(entry["returns"]))}


def online_phase(config: dict, study: EDISStudyConfig, units: dict, run_id: str):
    """One phase: each trial trains (or finds stored, or waits on the lease of) its offline IQL, then its model
    (edis arm), then runs the online stage; no barrier holds a core idle while the last IQL trains."""
    from .trials import _run, iql_stage
    iql = lambda ctx: iql_stage(ctx, ctx.trial.config.iql)                          # noqa: E731
    stages = (iql, model_stage, online_stage) if config["trial"]["arm"] == "edis" else (iql, online_stage)
    _run(config, study, units, run_id, stages)


PHASES = (("online", online_phase, "evaluation", "result.json"),)


# ---------------------------------------------------------------- the results table
COLUMNS = ["study", "algorithm", "method", "task", "seed", "phase", "online_step", "episode_set", "score", "score_se",
           "return", "episodes", "dataset_score", "compute_seconds", "seconds_offline_iql", "seconds_offline_model",
           "seconds_env", "seconds_update", "seconds_model", "seconds_energies", "seconds_generate",
           "seconds_evaluate", "evaluation_key"]


def write_table(store: ArtifactStore, study: str, ts: list[EDISTrial], path: Path) -> pd.DataFrame:
    """One row per task, seed, arm (`method`) and evaluation: `phase` offline (online step 0: the pre-trained
    agent) or online; compute_seconds = offline stages + the online loop's training parts so far
    (evaluation excluded); the seconds of each part beside it."""
    seconds: dict[str, float] = {}
    for e in store.executions():
        if e.get("stage") in ("iql", "model") and "seconds" in e:
            seconds[e["key"]] = seconds.get(e["key"], 0.0) + float(e["seconds"])
    rows = []
    for t in ts:
        off_iql = seconds.get(t.keys["iql"], np.nan)
        off_model = seconds.get(t.keys["model"], np.nan) if "model" in t.keys else 0.0
        for h in store.get_json(t.keys["evaluation"])["history"]:
            sc, ret = np.asarray(h["scores"], float), np.asarray(h["returns"], float)
            parts = {k: h.get("parts", {}).get(k, np.nan) for k in COLUMNS if k.startswith("seconds_") and "offline" not in k}
            train = sum(v for k, v in parts.items() if k != "seconds_evaluate" and not np.isnan(v))
            rows.append({"study": study, "algorithm": t.algorithm, "method": t.arm, "task": t.task, "seed": t.seed,
                         "phase": "offline" if h["online_step"] == 0 else "online", "online_step": h["online_step"],
                         "episode_set": "test", "score": float(sc.mean()), "score_se": float(sc.std() / np.sqrt(len(sc))),
                         "return": float(ret.mean()), "episodes": len(sc), "dataset_score": h["dataset_score"],
                         "compute_seconds": off_iql + off_model + train, "seconds_offline_iql": off_iql,
                         "seconds_offline_model": off_model, **parts, "evaluation_key": t.keys["evaluation"]})
    df = pd.DataFrame(rows, columns=COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return df


def plan(study: EDISStudyConfig) -> dict[str, Any]:
    from .study import store_path
    ts = trials(study)
    store = ArtifactStore(store_path(study))
    keys = {k: (s, store.exists(k, "result.json" if s == "evaluation" else "artifact.pt"))
            for t in ts for s, k in t.keys.items()}
    return {"study": study.name, "store": store.uri, "trials": [{**t.hyper, "keys": t.keys} for t in ts],
            "counts": {s: sum(1 for v in keys.values() if v[0] == s) for s in STAGES},
            "stored": {s: sum(1 for v in keys.values() if v[0] == s and v[1]) for s in STAGES}}

