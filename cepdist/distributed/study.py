"""What a study is: its typed config, its trials and the stage keys they share, its plan.

A study is a grid over tasks × seeds × β × K × solver steps × guidance method; each trial evaluates all
guidance scales together. Offline baselines (`algorithms: [qgpo, iql]`) add one trial per task and seed on the
same data and evaluation episodes. Stages depend on subsets of a trial's config, and each stage's artifact is
stored once under a key derived from exactly what it depends on (settings that change no result, such as
log intervals, are left out):

    behavior    ← dataset (task and the SHA-256 of its file), seed, behaviour config (with its noise schedule)
    support     ← behavior key, K, solver
    q           ← support key, Q config (with the reward rule)
    energy      ← q key, energy config (method, β, ...), snapshot interval     (none for dps)
    evaluation  ← energy key (dps: q key and β), guidance scales, sampler, episodes
    iql         ← dataset, seed, IQL config (with the reward rule)          (the IQL baseline)
    evaluation  ← iql key, episodes

Nothing here starts Ray: `plan` lists the trials, keys and what is stored already."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..algos.iql import IQLConfig
from ..algos.qgpo.config import KEY_NEUTRAL, NOT_IN_KEY, QGPOConfig
from ..config import Errors, from_dict, merge, replace, to_dict
from ..data.datasets import fingerprint, local_path
from ..data.tasks import get_task
from .store import ArtifactStore, stage_key
from .tracking import DEFAULT_URI

log = logging.getLogger("cepdist")

STAGES = ("behavior", "support", "q", "energy", "iql", "evaluation")
HYPER = ("task", "seed", "beta", "K", "steps", "method")      # what the search space holds per trial
ALGORITHMS = ("qgpo", "iql")
BASELINE = {"beta": 0.0, "K": 0, "steps": 0}                 # a baseline trial's QGPO axes (none apply)
# a trial's evaluation episodes reset from seed EVAL_SEED_OFFSET + its seed: validation episodes first, then test
EVAL_SEED_OFFSET = 10_000


@dataclass
class StudyConfig:
    name: str = "cepdist"
    tasks: tuple[str, ...] = ("hopper-medium-local",)
    seeds: tuple[int, ...] = (0,)
    # grid axes; None → the base config's value (K: base.support.K, and None there → the task's default)
    betas: tuple[float, ...] | None = None
    Ks: tuple[int, ...] | None = None
    solver_steps: tuple[int, ...] | None = None    # support and evaluation solver steps together
    methods: tuple[str, ...] | None = None
    scales: tuple[float, ...] | None = None        # None → the task's guidance-scale list
    mode: str = "grid"                             # grid | sensitivity (one hyperparameter at a time)
    algorithms: tuple[str, ...] = ("qgpo",)        # qgpo (the grid) and offline baselines: iql
    iql: IQLConfig = field(default_factory=lambda: IQLConfig(reward=None))
    base: QGPOConfig = field(default_factory=lambda: QGPOConfig(
        support=dataclasses.replace(QGPOConfig().support, K=None), q=dataclasses.replace(QGPOConfig().q, reward=None)))
    # task → a partial `base` section merged over `base` for that task's trials (e.g. a wider behaviour model
    # for one task); its stage keys follow from the merged config like any other setting
    per_task: dict[str, Any] = field(default_factory=dict)
    eval_episodes: int = 10                        # test episodes per guidance scale (the reported scores)
    val_episodes: int | None = None                # validation episodes per scale, other resets (None → eval_episodes)
    eval_every: int = 0                            # energy steps between evaluations (0: only at the end)
    eval_max_steps: int | None = None              # None → the task's episode length
    eval_actors: int = 2                           # 0: evaluate inside the trial process (one machine)
    train_workers: int = 0                         # 0: train inside the trial; ≥ 1: Ray Train workers
    train_worker_cpus: float = 1.0                 # CPUs reserved per Ray Train worker
    use_gpu: bool = False
    trial_cpus: float = 1.0
    dataset_rows: int | None = None                # rows to generate for missing *-local datasets (None → 1M)
    data_root: str | None = None                   # dataset cache (None → D4RL_DATASET_DIR / ~/.d4rl/datasets)
    policy_dir: str | None = None                  # agents for generating *-local datasets
    store: str = "runs/store"                      # artifact store: a directory or s3://, gs://
    mlflow_uri: str = DEFAULT_URI
    max_failures: int = 2                          # retries of a trial after node loss or a worker crash
    max_concurrent: int | None = None              # None → as many as resources allow

    @property
    def validation_episodes(self) -> int:
        return self.eval_episodes if self.val_episodes is None else self.val_episodes

    def base_for(self, task: str) -> QGPOConfig:
        """The base config of one task's trials: `base` with the task's `per_task` section merged over it."""
        over = self.per_task.get(task)
        if not over:
            return self.base
        return from_dict(QGPOConfig, merge(to_dict(self.base), over), where=f"per_task.{task}.")

    def axes(self) -> dict[str, tuple]:
        b = self.base
        return {"beta": self.betas or (b.energy.beta,), "K": self.Ks or (b.support.K,),
                "steps": self.solver_steps or (b.sampler.steps,), "method": self.methods or (b.energy.method,)}


# base-config values that the grid sets per trial → the study field that sets them
GRID_SETS = {("seed",): "seeds", ("support", "K"): "Ks", ("support", "solver", "steps"): "solver_steps",
             ("sampler", "steps"): "solver_steps", ("energy", "beta"): "betas", ("energy", "method"): "methods"}


def load_study(preset: StudyConfig, *layers: dict[str, Any] | None) -> StudyConfig:
    """preset + YAML + flags, merged deeply in that order (a partial section changes only its keys), then
    validated: types, ranges, and no base value that the grid would silently override (a layer that sets,
    e.g., base.energy.beta to a value outside `betas` is an error naming `betas`)."""
    def at(d, path):
        for p in ("base",) + path:
            d = d.get(p) if isinstance(d, dict) else None
        return d

    d, changed = to_dict(preset), set()
    for layer in layers:
        if layer is not None and not isinstance(layer, dict):
            raise ValueError(f"a study config must be a mapping of StudyConfig fields, got {type(layer).__name__}")
        new = merge(d, layer)
        changed |= {path for path in GRID_SETS if at(layer, path) is not None and at(new, path) != at(d, path)}
        d = new
    study = validate(from_dict(StudyConfig, d))
    for path in sorted(changed):               # a base value set by a layer that no trial would use
        axis = GRID_SETS[path]
        if getattr(study, axis) is not None and at(d, path) not in getattr(study, axis):
            flag = "--" + {"solver_steps": "steps"}.get(axis, axis).replace("_", "-")
            raise ValueError(f"base.{'.'.join(path)} is set per trial by the study's `{axis}` "
                             f"({list(getattr(study, axis))}); set `{axis}:` or {flag} instead")
    return study


def validate(study: StudyConfig) -> StudyConfig:
    """The study's ranges (its field types were checked on load); one error listing every violation."""
    from ..algos.qgpo.config import check
    from ..core.guidance import METHODS
    errors = Errors()
    need = errors.need
    need(len(study.tasks) > 0, "tasks", "a non-empty list")
    for t in study.tasks:
        get_task(t)
    need(len(study.seeds) > 0 and min(study.seeds) >= 0, "seeds", "a non-empty list of integers ≥ 0")
    for axis, ok, allowed in (("Ks", lambda k: k >= 2, "integers ≥ 2"), ("betas", lambda b: b > 0, "numbers > 0"),
                              ("solver_steps", lambda n: n >= 1, "integers ≥ 1"),
                              ("methods", lambda m: m in METHODS, f"some of {', '.join(METHODS)}"),
                              ("scales", lambda w: w >= 0, "numbers ≥ 0")):
        v = getattr(study, axis)
        need(v is None or (len(v) > 0 and all(ok(x) for x in v)), axis, f"a non-empty list of {allowed} (or unset)")
    need(study.mode in ("grid", "sensitivity"), "mode", "'grid' or 'sensitivity'")
    need(len(study.algorithms) > 0 and set(study.algorithms) <= set(ALGORITHMS), "algorithms",
         f"a non-empty list of {', '.join(ALGORITHMS)}")
    i = study.iql
    need(i.steps >= 1 and i.batch_size >= 1 and i.lr > 0, "iql.steps, iql.batch_size and iql.lr", "≥ 1, ≥ 1 and > 0")
    need(0 < i.expectile < 1, "iql.expectile", "in (0, 1)")
    need(study.eval_episodes >= 1, "eval_episodes", "≥ 1")
    need(study.validation_episodes >= 0, "val_episodes", "≥ 0")
    need(study.eval_every >= 0, "eval_every", "≥ 0 (0: evaluate at the end only)")
    need(study.eval_max_steps is None or study.eval_max_steps >= 1, "eval_max_steps", "≥ 1 (or unset)")
    need(study.eval_actors >= 0 and study.train_workers >= 0, "eval_actors and train_workers", "≥ 0")
    need(study.train_worker_cpus > 0 and study.trial_cpus > 0, "train_worker_cpus and trial_cpus", "> 0")
    need(study.dataset_rows is None or study.dataset_rows >= 1, "dataset_rows", "≥ 1 (or unset)")
    need(study.max_failures >= 0, "max_failures", "≥ 0")
    need(study.max_concurrent is None or study.max_concurrent >= 1, "max_concurrent", "≥ 1 (or unset)")
    errors += check(study.base, "base.")
    for task, over in study.per_task.items():
        if task not in study.tasks:
            errors.append(f"per_task.{task}: not one of the study's tasks ({', '.join(study.tasks)})")
            continue
        if not isinstance(over, dict):
            errors.append(f"per_task.{task}: expected a mapping of base-config sections, got {type(over).__name__}")
            continue
        for path, axis in GRID_SETS.items():
            node = over
            for p in path:
                node = node.get(p) if isinstance(node, dict) else None
            if node is not None:
                errors.append(f"per_task.{task}.{'.'.join(path)}: set per trial by the study's `{axis}`, not per task")
        try:
            errors += check(study.base_for(task), f"per_task.{task}.")
        except ValueError as e:               # an unknown key or a wrong type inside the section
            errors.append(str(e))
    if errors:
        raise ValueError("invalid study config: " + "; ".join(errors))
    return study


# ---------------------------------------------------------------- trials and their keys
@dataclass(frozen=True)
class Trial:
    task: str
    seed: int
    beta: float
    K: int
    steps: int
    method: str
    scales: tuple[float, ...]
    max_steps: int                   # evaluation episode cap
    eval_steps: tuple[int, ...]      # training steps of the policy's last stage evaluated (energy; q for dps)
    config: QGPOConfig | IQLConfig
    keys: dict[str, str]             # stage → key (no "energy" for dps)
    data: dict[str, Any]             # the dataset file: path and sha256 (None while it does not exist)
    algorithm: str = "qgpo"

    @property
    def hyper(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in HYPER}

    @property
    def label(self) -> str:
        if self.algorithm != "qgpo":
            return f"{self.task} s{self.seed} {self.algorithm}"
        return f"{self.task} s{self.seed} β{self.beta:g} K{self.K} n{self.steps} {self.method}"


def hyper_id(hyper: dict[str, Any]) -> str:
    """A trial's identity within a study: its hyperparameters, canonically serialised."""
    return json.dumps(hyper, sort_keys=True)


def _key_cfg(cfg) -> dict:
    neutral = KEY_NEUTRAL.get(type(cfg).__name__, {})
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_KEY and not (k in neutral and v == neutral[k])}


def dataset_file(study: StudyConfig, task_name: str) -> dict[str, Any]:
    """Where a task's dataset lives for this study and its content fingerprint (None while it is missing)."""
    path = local_path(get_task(task_name), Path(study.data_root) if study.data_root else None)
    return {"path": str(path), "sha256": fingerprint(path) if path.is_file() else None}


def make_trial(study: StudyConfig, hyper: dict[str, Any], data: dict[str, Any] | None = None) -> Trial:
    """The typed trial of one point of the grid, with its resolved config and stage keys. The dataset's
    fingerprint is part of every key: a replaced file gives new keys."""
    from ..core.guidance import VALUE_METHODS
    task = get_task(hyper["task"])
    data = data or dataset_file(study, task.name)
    if hyper["method"] in ALGORITHMS:
        return _baseline_trial(study, hyper, task, data)
    seed, K = int(hyper["seed"]), hyper["K"] or task.K
    b = study.base_for(task.name)
    cfg = replace(b, **{"seed": seed, "support.K": K, "support.solver.steps": hyper["steps"],
                        "sampler.steps": hyper["steps"], "energy.beta": float(hyper["beta"]),
                        "energy.method": hyper["method"], "q.reward": b.q.reward or task.reward})
    if study.eval_every:                       # a checkpoint (and snapshot) at every evaluation step
        cfg = replace(cfg, **{"energy.ckpt_every": study.eval_every})
    scales = tuple(float(w) for w in (study.scales or task.guidance_scales))
    max_steps = study.eval_max_steps or task.episode_length
    keys = {"behavior": stage_key("behavior", {"data": _data_id(study, task, data), "seed": seed, "cfg": _key_cfg(cfg.behavior)})}
    keys["support"] = stage_key("support", {"behavior": keys["behavior"], "seed": seed, "cfg": _key_cfg(cfg.support)})
    keys["q"] = stage_key("q", {"support": keys["support"], "seed": seed, "cfg": _key_cfg(cfg.q)})
    if cfg.energy.method in VALUE_METHODS:
        policy = {"q": keys["q"], "beta": cfg.energy.beta,
                  **({"order": cfg.energy.order, "covariance": cfg.energy.covariance}
                     if cfg.energy.method == "aepo-analytic" else {})}
    else:
        keys["energy"] = stage_key("energy", {"q": keys["q"], "seed": seed, "cfg": _key_cfg(cfg.energy),
                                              "snapshot_every": study.eval_every})
        policy = {"energy": keys["energy"]}
    keys["evaluation"] = stage_key("evaluation", {**policy, "method": cfg.energy.method, "scales": scales,
                                                  "sampler": to_dict(cfg.sampler), "temperature": cfg.temperature,
                                                  "episodes": study.eval_episodes,
                                                  "val_episodes": study.validation_episodes,
                                                  "max_steps": max_steps, "eval_every": study.eval_every})
    # evaluated at every eval_every steps of the policy's last stage (energy) and at its end; dps and
    # aepo-analytic (no energy stage) at Q's end
    value_only = cfg.energy.method in VALUE_METHODS
    total = cfg.q.steps if value_only else cfg.energy.steps
    every = 0 if value_only else study.eval_every
    eval_steps = tuple(range(every, total, every)) + (total,) if every else (total,)
    return Trial(task.name, seed, cfg.energy.beta, K, hyper["steps"], cfg.energy.method, scales, max_steps,
                 eval_steps, cfg, keys, data)


def _data_id(study: StudyConfig, task, data: dict[str, Any]) -> dict[str, Any]:
    return {"task": task.name, "rows": (study.dataset_rows or 1_000_000) if task.local else None,
            "sha256": data["sha256"]}


def _baseline_trial(study: StudyConfig, hyper: dict[str, Any], task, data: dict[str, Any]) -> Trial:
    """An offline baseline (IQL) on the study's data, seed and evaluation episodes: one stage, evaluated at
    its end (one "scale", 0, so that its rows sit in the same table)."""
    seed = int(hyper["seed"])
    cfg = replace(study.iql, reward=study.iql.reward or task.reward)
    max_steps = study.eval_max_steps or task.episode_length
    keys = {"iql": stage_key("iql", {"data": _data_id(study, task, data), "seed": seed, "cfg": _key_cfg(cfg)})}
    keys["evaluation"] = stage_key("evaluation", {"iql": keys["iql"], "episodes": study.eval_episodes,
                                                  "val_episodes": study.validation_episodes, "max_steps": max_steps})
    return Trial(task.name, seed, BASELINE["beta"], BASELINE["K"], BASELINE["steps"], hyper["method"], (0.0,),
                 max_steps, (cfg.steps,), cfg, keys, data, algorithm=hyper["method"])


def grid(study: StudyConfig) -> list[dict[str, Any]]:
    """The search space: one dict of hyperparameters per trial, in a deterministic order."""
    if study.mode not in ("grid", "sensitivity"):
        raise ValueError(f"study mode must be 'grid' or 'sensitivity', got {study.mode!r}")
    axes = study.axes()
    if study.mode == "grid":
        combos = [dict(zip(axes, c)) for c in itertools.product(*axes.values())]
    else:                                      # defaults (first values), then one hyperparameter at a time
        default = {k: v[0] for k, v in axes.items()}
        combos = [default] + [{**default, k: v} for k, vals in axes.items() for v in vals[1:]]
    out = []
    if "qgpo" in study.algorithms:
        for task, seed, c in itertools.product(study.tasks, study.seeds, combos):
            out.append({"task": task, "seed": seed, **c, "K": c["K"] or get_task(task).K})
    for algo in (a for a in study.algorithms if a != "qgpo"):
        out += [{"task": task, "seed": seed, **BASELINE, "method": algo}
                for task, seed in itertools.product(study.tasks, study.seeds)]
    return out


def trials(study: StudyConfig) -> list[Trial]:
    data = {name: dataset_file(study, name) for name in study.tasks}
    return [make_trial(study, h, data[h["task"]]) for h in grid(study)]


# ---------------------------------------------------------------- the plan
def store_path(study: StudyConfig) -> str:
    return study.store if "://" in study.store else str(Path(study.store).resolve())


def plan(study: StudyConfig) -> dict[str, Any]:
    """The trial grid, every distinct stage key with the trials that share it and whether it is stored."""
    ts = trials(study)
    store = ArtifactStore(store_path(study))
    stages: dict[str, dict] = {}
    for t in ts:
        for stage, key in t.keys.items():
            name = "result.json" if stage == "evaluation" else "artifact.pt"
            e = stages.setdefault(key, {"stage": stage, "key": key, "trials": 0, "stored": store.exists(key, name)})
            e["trials"] += 1
    counts = {s: sum(1 for e in stages.values() if e["stage"] == s) for s in STAGES}
    stored = {s: sum(1 for e in stages.values() if e["stage"] == s and e["stored"]) for s in STAGES}
    datasets = {t.task: t.data for t in ts}
    return {"study": study.name, "store": store.uri, "datasets": datasets,
            "trials": [{**t.hyper, "keys": t.keys} for t in ts],
            "stages": list(stages.values()), "counts": counts, "stored": stored}


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"study {p['study']}: {len(p['trials'])} trials; store {p['store']}", ""]
    for task, d in p["datasets"].items():
        lines.append(f"dataset {task}: {d['path']} " + (f"(sha256 {d['sha256']})" if d["sha256"] else
                     "(missing: generated or required when the study runs; the keys then include its fingerprint)"))
    lines += ["", "stage       distinct  stored  to run"]
    for s in STAGES:
        lines.append(f"{s:11s} {p['counts'][s]:8d} {p['stored'][s]:7d} {p['counts'][s] - p['stored'][s]:7d}")
    lines += ["", f"{'task':32s} {'seed':>4s} {'β':>6s} {'K':>3s} {'steps':>5s} {'method':6s}  stage keys"]
    stored = {e["key"]: e["stored"] for e in p["stages"]}
    for t in p["trials"]:
        keys = " ".join(f"{k}{'*' if stored[k] else ''}" for k in t["keys"].values())
        lines.append(f"{t['task']:32s} {t['seed']:4d} {t['beta']:6g} {t['K']:3d} {t['steps']:5d} {t['method']:6s}  {keys}")
    lines.append("\n(* stored already)")
    return "\n".join(lines)
