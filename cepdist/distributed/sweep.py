"""Staged QGPO studies on Ray Tune.

A study is a set of trials, each a (task, seed, β, K, solver steps, guidance method) with all guidance
scales evaluated together. Stages depend on subsets of that config, and each stage's artifact is stored
once under a key derived from exactly what it depends on:

    behaviour model   ← task, dataset, seed, behaviour config
    support actions   ← behaviour key, K, solver
    critic            ← support key, critic config (β, method, ...)
    results           ← critic key, guidance scales, evaluation settings

Stage 1 is one Tune run over the distinct behaviour keys; stage 2 one Tune run over the trials, each
reusing the stored behaviour model and the support/critic artifacts it finds. Re-running a study (after an
interruption, or with more scales or seeds) recomputes nothing that is stored; a failed trial is retried
by Tune. Each trial has one MLflow run (keyed, so a retry continues it), written by the driver."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import QGPOConfig, from_dict, replace, to_dict
from ..store import ArtifactStore, stage_key
from ..tasks import get_task
from ..tracking import DEFAULT_URI, MLflowTracker

log = logging.getLogger("cepdist")


@dataclass
class StudyConfig:
    name: str = "cepdist"
    tasks: tuple[str, ...] = ("hopper-medium-local",)
    seeds: tuple[int, ...] = (0,)
    betas: tuple[float, ...] = (3.0,)
    Ks: tuple[int, ...] = (0,)                    # 0 → the task's default (16 locomotion, 32 AntMaze)
    solver_steps: tuple[int, ...] = (15,)
    methods: tuple[str, ...] = ("cep",)
    scales: tuple[float, ...] = ()                # () → the task's guidance-scale list
    mode: str = "grid"                            # grid | sensitivity (one hyperparameter at a time)
    base: QGPOConfig = field(default_factory=QGPOConfig)
    eval_episodes: int = 10
    eval_every: int = 0                           # critic steps between evaluations (0: only at the end)
    eval_max_steps: int = 0                       # 0 → the task's episode length
    eval_actors: int = 2                          # 0: evaluate inside the trial process (one machine)
    train_workers: int = 0                        # 0: train inside the trial; ≥ 1: Ray Train workers
    use_gpu: bool = False
    trial_cpus: float = 1.0
    dataset_rows: int = 0                         # rows to generate for missing *-local datasets (0 → 1M)
    data_root: str = ""                           # dataset cache ("" → D4RL_DATASET_DIR / ~/.d4rl/datasets)
    policy_dir: str = ""                          # agents for generating *-local datasets
    store: str = "runs/store"                     # artifact store: a directory or s3://, gs://
    mlflow_uri: str = DEFAULT_URI
    max_failures: int = 2
    max_concurrent: int = 0                       # 0 → as many as resources allow


# ---------------------------------------------------------------- trials and their keys
def _sensitivity(study: StudyConfig) -> list[dict]:
    """Defaults (first value of each list), then every other value of one hyperparameter at a time."""
    axes = {"beta": study.betas, "K": study.Ks, "steps": study.solver_steps, "method": study.methods}
    default = {k: v[0] for k, v in axes.items()}
    out = [default]
    for k, vals in axes.items():
        out += [{**default, k: v} for v in vals[1:]]
    return out


def trial_specs(study: StudyConfig) -> list[dict]:
    """Every trial with its stage keys; the order is deterministic."""
    combos = ([dict(zip(("beta", "K", "steps", "method"), c)) for c in
               itertools.product(study.betas, study.Ks, study.solver_steps, study.methods)]
              if study.mode == "grid" else _sensitivity(study))
    if study.mode not in ("grid", "sensitivity"):
        raise ValueError(f"study mode must be 'grid' or 'sensitivity', got {study.mode!r}")
    specs = []
    for task_name, seed, c in itertools.product(study.tasks, study.seeds, combos):
        task = get_task(task_name)
        K = c["K"] or task.M
        cfg = replace(study.base, **{"seed": seed, "reward": task.reward, "support.M": K,
                                     "support.solver.steps": c["steps"], "sampler.steps": c["steps"],
                                     "critic.beta": c["beta"], "critic.method": c["method"]})
        if study.eval_every:
            cfg = replace(cfg, **{"critic.ckpt_every": study.eval_every})
        scales = list(study.scales or task.guidance_scales)
        data_id = {"task": task.name, "rows": study.dataset_rows if task.local else 0}
        bkey = stage_key("behavior", {"data": data_id, "seed": seed, "cfg": to_dict(cfg.behavior),
                                      "schedule": [cfg.beta_min, cfg.beta_max]})
        skey = stage_key("support", {"behavior": bkey, "cfg": to_dict(cfg.support)})
        ccfg = to_dict(cfg.critic)
        ccfg.pop("log_every")
        ckey = stage_key("critic", {"support": skey, "reward": cfg.reward, "cfg": ccfg})
        rkey = stage_key("result", {"critic": ckey, "scales": scales, "sampler": to_dict(cfg.sampler),
                                    "episodes": study.eval_episodes, "max_steps": study.eval_max_steps,
                                    "eval_every": study.eval_every})
        specs.append({"task": task.name, "seed": seed, **c, "K": K, "scales": scales, "config": to_dict(cfg),
                      "keys": {"behavior": bkey, "support": skey, "critic": ckey, "result": rkey}})
    return specs


# ---------------------------------------------------------------- data
def ensure_datasets(study: StudyConfig):
    """Generate the missing *-local datasets before anything else runs; D4RL files must be present."""
    from .. import datasets
    from ..generate import generate
    from ..tasks import get_task
    root = Path(study.data_root) if study.data_root else None
    for name in study.tasks:
        task = get_task(name)
        path = datasets.local_path(task, root)
        if path.is_file():
            datasets.read_hdf5(path, task)                 # validate now, before any long work
            continue
        if not task.local:
            raise datasets.DatasetError(f"{task.name}: no file at {path}; `cepdist data download {task.name}` "
                                        "or put the original file there")
        log.info("study: generating %s (%d rows) → %s", task.name, study.dataset_rows or 1_000_000, path)
        generate(task.name, path, study.dataset_rows or 1_000_000, seed=0, policy_root=study.policy_dir or None)


def _load_data(study: dict, task_name: str, device):
    from .. import datasets
    from ..data import preprocess_rewards
    root = Path(study["data_root"]) if study["data_root"] else None
    arr, task = datasets.load_arrays(task_name, root=root)
    data = datasets.to_transitions(arr, task.episode_length)
    return preprocess_rewards(data, task.reward).to(device), task, datasets.behaviour_score(arr, task)


# ---------------------------------------------------------------- stage execution (inside trials)
def _device(study: dict):
    import torch
    return torch.device("cuda" if study["use_gpu"] and torch.cuda.is_available() else "cpu")


def _run_stage(study: dict, stage, key: str, ckpt_file: str, workdir: Path):
    """Run a stage function in this process or on Ray Train workers; return the checkpoint file."""
    if study["train_workers"] >= 1:
        from .train import run_data_parallel
        return run_data_parallel(stage, workers=study["train_workers"], ckpt_file=ckpt_file, name=key,
                                 storage_path=study["store"].rstrip("/") + "/_ray_train",
                                 use_gpu=study["use_gpu"], max_failures=study["max_failures"], out=workdir)
    from ..qgpo import SINGLE
    path = workdir / ckpt_file
    stage(SINGLE, path, None, _device(study))
    return path


def _workdir(store: ArtifactStore, key: str) -> Path:
    """Where an in-progress stage checkpoints: inside a local store (so an interrupted stage resumes),
    otherwise a temporary directory."""
    if "://" not in store.uri:
        d = Path(store.uri) / key / "work"
    else:
        d = Path(tempfile.mkdtemp(prefix=f"cepdist-{key}-"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _trial_logging():
    """Trials run in worker processes: show the stages' progress lines (rate, ETA) in the driver's output."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def behavior_trial(config: dict):
    """Tune trainable of stage 1: the behaviour model of one (task, dataset, seed, config), once."""
    from ray import tune
    _trial_logging()
    from ..qgpo import train_behavior
    spec, study = config["spec"], config["study"]
    store = ArtifactStore(study["store"])
    key = spec["keys"]["behavior"]
    if not store.exists(key):
        cfg = from_dict(QGPOConfig, spec["config"])
        t0 = time.perf_counter()

        def stage(parallel, ckpt_path, callback, device):
            data, _, _ = _load_data(study, spec["task"], device)
            train_behavior(cfg.behavior, data.obs, data.actions, seed=cfg.seed, ckpt_path=ckpt_path,
                           callback=callback, parallel=parallel)
        path = _run_stage(study, stage, key, "behavior.pt", _workdir(store, key))
        store.put_file(key, path)
        store.record_execution(key, {"stage": "behavior", "run": study["run_id"],
                                     "seconds": time.perf_counter() - t0})
    tune.report({"done": 1, "behavior_key": key})


def _fetch(store: ArtifactStore, key: str) -> dict:
    from .. import checkpoint
    with tempfile.TemporaryDirectory() as d:
        return checkpoint.load(store.get_file(key, Path(d) / "a.pt"))


def critic_trial(config: dict):
    """Tune trainable of stage 2: support actions, critic and evaluation of one trial (all scales)."""
    import torch
    from ray import tune
    from .. import checkpoint
    from ..qgpo import SupportSet, generate_support, load_behavior, train_critic
    from .pool import EvalPool, policy_payload
    _trial_logging()
    spec, study = config["spec"], config["study"]
    keys = spec["keys"]
    store = ArtifactStore(study["store"])
    if store.exists(keys["result"], "result.json"):          # finished before (resumed study): replay it
        res = store.get_json(keys["result"])
        for h in res["history"]:
            tune.report(h)
        return
    cfg = from_dict(QGPOConfig, spec["config"])
    device = _device(study)
    if study["train_workers"] == 0:
        torch.set_num_threads(max(1, int(study["trial_cpus"])))
    behavior_ck = _fetch(store, keys["behavior"])
    data, task, dataset_score = _load_data(study, spec["task"], device)
    dataset = {"dataset_score": dataset_score}                 # reported beside every evaluation

    if store.exists(keys["support"]):
        sup_ck = _fetch(store, keys["support"])
    else:
        t0 = time.perf_counter()
        wd = _workdir(store, keys["support"])
        generate_support(cfg.support, load_behavior(behavior_ck).to(device), data, seed=cfg.seed,
                         ckpt_path=wd / "support.pt")
        store.put_file(keys["support"], wd / "support.pt")
        store.record_execution(keys["support"], {"stage": "support", "run": study["run_id"],
                                                 "seconds": time.perf_counter() - t0})
        sup_ck = checkpoint.load(wd / "support.pt")
    support = SupportSet(sup_ck["actions"].to(device), sup_ck["obs_index"].to(device), sup_ck["next_index"].to(device))

    pool = EvalPool(study["eval_actors"])
    episodes, max_steps = study["eval_episodes"], study["eval_max_steps"] or None
    # evaluations are stored as they happen: a retried trial (resuming its critic from the last checkpoint)
    # keeps the learning curve of the attempt that failed
    history: list[dict] = (store.get_json(keys["result"], "history.json")
                           if store.exists(keys["result"], "history.json") else [])
    for h in history:
        tune.report(h)

    eval_seconds = [0.0]

    def evaluate(critic_ck, step, extra) -> dict:
        t0 = time.perf_counter()
        res = pool.evaluate(policy_payload(behavior_ck, critic_ck, spec["method"], to_dict(cfg.sampler)),
                            task.name, spec["scales"], episodes, seed=10_000 + cfg.seed, max_steps=max_steps)
        seconds = time.perf_counter() - t0
        eval_seconds[0] += seconds
        m = {"critic_step": step, **res.summary(), **extra, **dataset, "eval_seconds": seconds,
             "eval_env_steps_per_s": res.env_steps / max(seconds, 1e-9),
             "returns": res.returns.tolist()}
        history[:] = sorted([h for h in history if h["critic_step"] != step] + [m], key=lambda h: h["critic_step"])
        store.put_json(keys["result"], history, name="history.json")
        tune.report(m)
        return m

    try:
        if store.exists(keys["critic"]):
            critic_ck = _fetch(store, keys["critic"])
            evaluate(critic_ck, cfg.critic.steps, {})
        else:
            t0 = time.perf_counter()
            wd = _workdir(store, keys["critic"])
            is_eval_step = lambda step: bool(study["eval_every"]) and step % study["eval_every"] == 0 \
                and step != cfg.critic.steps
            partial = wd / "critic.pt"
            if partial.is_file():     # resuming: the failed attempt may have died inside this step's evaluation
                ck = checkpoint.load(partial)
                if is_eval_step(ck["step"]) and all(h["critic_step"] != ck["step"] for h in history):
                    evaluate(ck, ck["step"], {})

            last_log: dict = {}           # the final evaluation carries the last logged losses and Q statistics

            def on_log(stage_name, step, metrics, saved):
                last_log.clear(); last_log.update(metrics)
                if saved is not None and is_eval_step(step):
                    evaluate(checkpoint.load(saved), step, metrics)

            def stage(parallel, ckpt_path, callback, dev):
                def cb(*a):
                    if callback is not None:
                        callback(*a)
                    if parallel.rank == 0:
                        on_log(*a)
                train_critic(cfg.critic, data, support, seed=cfg.seed, ckpt_path=ckpt_path, callback=cb,
                             parallel=parallel)
            path = _run_stage(study, stage, keys["critic"], "critic.pt", wd)
            store.put_file(keys["critic"], path)
            store.record_execution(keys["critic"], {"stage": "critic", "run": study["run_id"],   # evaluations excluded
                                                    "seconds": time.perf_counter() - t0 - eval_seconds[0]})
            critic_ck = checkpoint.load(path)
            evaluate(critic_ck, cfg.critic.steps, last_log)
        store.put_json(keys["result"], {"spec": {k: v for k, v in spec.items() if k != "config"},
                                        "history": history})
        store.record_execution(keys["result"], {"stage": "evaluation", "run": study["run_id"],
                                                "seconds": eval_seconds[0]})
    finally:
        pool.close()


# ---------------------------------------------------------------- MLflow on the driver
def mlflow_callback(uri: str, experiment: str):
    from ray.tune import Callback

    class MLflowTrials(Callback):
        """One MLflow run per trial key (a retried trial continues its run); batched metrics."""

        def __init__(self):
            self.tracker = MLflowTracker(uri, experiment)
            self.runs: dict[str, str] = {}

        def _run(self, trial) -> str:
            spec = trial.config["spec"]
            key = spec["keys"]["result"]
            if key not in self.runs:
                name = f"{spec['task']} s{spec['seed']} β{spec['beta']:g} K{spec['K']} n{spec['steps']} {spec['method']}"
                params = {**{k: spec[k] for k in ("task", "seed", "beta", "K", "steps", "method")},
                          "scales": spec["scales"], "config": spec["config"]}
                tags = {f"key_{k}": v for k, v in spec["keys"].items()}
                tags["study"] = experiment
                self.runs[key] = self.tracker.start(key, name, params, tags)
            return self.runs[key]

        def on_trial_result(self, iteration, trials, trial, result, **info):
            metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and not k.startswith(("time_", "timestamp", "training_iteration", "done", "pid"))
                       and k not in ("iterations_since_restore", "timesteps_total", "episodes_total")}
            self.tracker.log_metrics(self._run(trial), metrics, int(result.get("critic_step", 0)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.tracker.finish(self._run(trial), "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.tracker.set_tags(self._run(trial), {"last_error": "trial failed (Tune retries it)"})

    return MLflowTrials()


# ---------------------------------------------------------------- the driver
def run_study(study: StudyConfig, out: Path | None = None) -> dict:
    """Run (or resume) a study; returns paths of the results table and the counts of stage executions."""
    import ray
    from ray import tune
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    out = Path(out or Path("results") / study.name)
    out.mkdir(parents=True, exist_ok=True)
    ensure_datasets(study)
    specs = trial_specs(study)
    sd = dataclasses.asdict(study)
    sd["base"] = to_dict(study.base)
    if "://" not in study.store:
        sd["store"] = str(Path(study.store).resolve())
    if study.data_root:
        sd["data_root"] = str(Path(study.data_root).resolve())
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    storage = sd["store"].rstrip("/") + "/_tune"     # sd["store"] is absolute (or a URI) here
    store = ArtifactStore(sd["store"])
    sd["run_id"] = uuid.uuid4().hex                   # tags this invocation's stage executions
    t0 = time.perf_counter()

    def tuner(fn, items, name, resources, callbacks=()):
        return tune.Tuner(
            tune.with_resources(fn, resources),
            param_space={"spec": tune.grid_search(items), "study": sd},
            tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent or None),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=list(callbacks),
                                      failure_config=tune.FailureConfig(max_failures=study.max_failures),
                                      verbose=1)).fit()

    # the trial itself trains when train_workers == 0; otherwise it only drives Ray Train workers
    train_res = ({"CPU": study.trial_cpus, "GPU": 1 if study.use_gpu else 0} if study.train_workers == 0
                 else {"CPU": 0.01})
    unique = list({s["keys"]["behavior"]: s for s in specs}.values())
    log.info("study %s: %d trials, %d behaviour models", study.name, len(specs), len(unique))
    r1 = tuner(behavior_trial, unique, f"{study.name}-{_digest(unique)}-behavior", train_res)
    if r1.errors:
        raise RuntimeError(f"behaviour stage failed: {r1.errors[0]}")
    _check_complete(store, [s["keys"]["behavior"] for s in unique], "artifact.pt", "behaviour")
    t1 = time.perf_counter()
    pg = tune.PlacementGroupFactory([train_res] + [{"CPU": 1}] * study.eval_actors)
    r2 = tuner(critic_trial, specs, f"{study.name}-{_digest(specs)}-critic", pg,
               [mlflow_callback(study.mlflow_uri, study.name)])
    if r2.errors:
        raise RuntimeError(f"{len(r2.errors)} trial(s) failed after retries: {r2.errors[0]}")
    _check_complete(store, [s["keys"]["result"] for s in specs], "result.json", "trial")
    table = write_results(store, specs, out)
    summary = {"trials": len(specs), "results_table": str(table), "store": sd["store"],
               "mlflow": f"mlflow ui --backend-store-uri {study.mlflow_uri}",
               "executions": _count([e for e in store.executions() if e.get("run") == sd["run_id"]]),
               "seconds": {"behavior": t1 - t0, "critic_and_eval": time.perf_counter() - t1},
               "stage_seconds": stage_seconds(store, specs)}
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    return summary


class StudyInterrupted(RuntimeError):
    pass


def _check_complete(store: ArtifactStore, keys: list[str], name: str, what: str):
    """Tune returns normally when interrupted (Ctrl-C, SIGTERM): stop here rather than start the next
    phase on missing artifacts. Everything finished so far is in the store; rerunning resumes."""
    missing = [k for k in dict.fromkeys(keys) if not store.exists(k, name)]
    if missing:
        raise StudyInterrupted(f"study interrupted: {len(missing)} {what} artifact(s) not finished "
                               f"(first: {missing[0]}); run the same command again to resume")


def _digest(items) -> str:
    import hashlib
    return hashlib.sha256(json.dumps([i["keys"] for i in items], sort_keys=True).encode()).hexdigest()[:8]


def stage_seconds(store: ArtifactStore, specs: list[dict]) -> dict[str, dict[str, float]]:
    """Per stage, over this study's artifacts (whichever invocation computed them): count, mean and total
    seconds of compute (a stage resumed from a checkpoint counts the resumed part only)."""
    mine = {k for s in specs for k in s["keys"].values()}
    per: dict[str, list[float]] = {}
    for e in store.executions():
        if e.get("key") in mine and "seconds" in e:
            per.setdefault(e["stage"], []).append(float(e["seconds"]))
    return {st: {"n": len(v), "mean": sum(v) / len(v), "total": sum(v)} for st, v in per.items()}


def _count(execs: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in execs:
        out[e.get("stage", "?")] = out.get(e.get("stage", "?"), 0) + 1
    return out


def write_results(store: ArtifactStore, specs: list[dict], out: Path) -> Path:
    """One row per (trial, guidance scale, evaluation step): the tidy table the analysis starts from."""
    import csv
    rows = []
    for s in specs:
        res = store.get_json(s["keys"]["result"])
        for h in res["history"]:
            for i, w in enumerate(s["scales"]):
                rets = np.asarray(h["returns"][i], dtype=float)
                rows.append({"task": s["task"], "seed": s["seed"], "beta": s["beta"], "K": s["K"],
                             "steps": s["steps"], "method": s["method"], "scale": w,
                             "critic_step": h["critic_step"], "score": h[f"score_w{w:g}"],
                             "score_se": h[f"score_w{w:g}_se"], "return_mean": float(np.nanmean(rets)),
                             "episodes": int(np.sum(~np.isnan(rets))), "result_key": s["keys"]["result"]})
    path = out / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(); w.writerows(rows)
    return path
