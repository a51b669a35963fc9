"""The Tune trainables of a study's three phases, and the stage runner they share.

    behavior phase   one trial per behaviour key:  behavior
    q phase          one trial per Q key:          support → q
    policy phase     one trial per grid point:     energy (cep/mse) → evaluation
                     one per baseline trial:       iql → evaluation

Every stage goes through `run_stage`: reuse the stored artifact, or compute it (in this process, or on
Ray Train workers with `train_workers ≥ 1`) with checkpoints in a work directory it resumes from, then store
it and record the execution. The energy stage stores a snapshot at every evaluation step as it trains (from
rank 0, straight into the store), so a retried or data-parallel stage keeps every snapshot it reached; the
evaluation stage then evaluates each snapshot once, persisting each evaluation as it finishes.

Each trainable receives the study and its phase's trials typed (`tune.with_parameters`), computed once by the
driver, and finds its own by its hyperparameters (the search space). Trials talk to the driver through `tune.report` events (stage start/done, evaluation, fatal). A failure a
retry cannot fix (bad config or data, a non-finite loss) is reported as `fatal` once and ends the trial;
the driver then stops the study. Anything else (a lost node, a crashed worker) raises and Tune retries."""
from __future__ import annotations

import functools
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from ray import tune

from ..algos import checkpoint
from ..algos.iql import train_iql
from ..algos.qgpo.policy import analytic_options
from ..algos.qgpo.stages import (SINGLE, generate_support, load_behavior, load_q, load_support, train_behavior,
                                 train_energy, train_q)
from ..data import datasets
from ..core.guidance import VALUE_METHODS
from ..data.transitions import Transitions
from .pool import EvalPool, policy_payload
from .store import ArtifactStore
from .study import EVAL_SEED_OFFSET, StudyConfig, Trial, dataset_file, hyper_id
from .train import PERMANENT, run_data_parallel

log = logging.getLogger("cepdist")


# ---------------------------------------------------------------- data (cached per process)
@functools.lru_cache(maxsize=2)
def load_data(task_name: str, data_root: str | None) -> tuple[Transitions, float]:
    """A task's transitions (raw rewards: Q's config holds the reward rule) and the dataset's own score."""
    arr, task = datasets.load_arrays(task_name, root=Path(data_root) if data_root else None)
    return datasets.to_transitions(arr, task.episode_length), datasets.dataset_score(arr, task)


def fetch(store_uri: str, key: str, name: str = "artifact.pt") -> dict:
    with tempfile.TemporaryDirectory() as d:
        return checkpoint.load(ArtifactStore(store_uri).get_file(key, Path(d) / "a.pt", name))


# ---------------------------------------------------------------- one trial's context
class Context:
    def __init__(self, study: StudyConfig, trial: Trial, run_id: str):
        self.study, self.trial, self.run_id = study, trial, run_id
        self.store = ArtifactStore(study.store)
        self.device = torch.device("cuda" if study.use_gpu and torch.cuda.is_available() else "cpu")
        self.stage = "setup"

    def event(self, **kw):
        tune.report({**kw, "stage": self.stage})

    def data(self, device=None) -> Transitions:
        return load_data(self.trial.task, self.study.data_root)[0].to(device or self.device)

    def workdir(self, key: str) -> Path:
        """Where an in-progress stage checkpoints: inside a local store (an interrupted stage resumes from
        it), otherwise a temporary directory."""
        if "://" not in self.store.uri:
            d = Path(self.store.uri) / key / "work"
        else:
            d = Path(tempfile.mkdtemp(prefix=f"cepdist-{key}-"))
        d.mkdir(parents=True, exist_ok=True)
        return d


StageFn = Callable[..., None]        # stage(parallel, ckpt_path, callback, device)


def run_stage(ctx: Context, stage: str, fn: StageFn, data_parallel: bool = True) -> None:
    """Compute and store one stage's artifact unless it is stored already."""
    ctx.stage = stage
    key = ctx.trial.keys[stage]
    if ctx.store.exists(key):
        return
    with ctx.store.lease(key, on_wait=lambda: ctx.event(event="waiting")) as mine:
        if mine:                              # else another study computed it while we waited
            _compute(ctx, stage, key, fn, data_parallel)


def _compute(ctx: Context, stage: str, key: str, fn: StageFn, data_parallel: bool):
    study = ctx.study
    ctx.event(event="start")
    t0, cpu0, loop_cpu = time.perf_counter(), time.process_time(), {}
    wd = ctx.workdir(key)
    if data_parallel and study.train_workers >= 1:
        path = run_data_parallel(fn, workers=study.train_workers, ckpt_file=f"{stage}.pt", name=key,
                                 storage_path=study.store.rstrip("/") + "/_ray_train", use_gpu=study.use_gpu,
                                 cpus_per_worker=study.train_worker_cpus, max_failures=study.max_failures, out=wd)
    else:
        if study.train_workers == 0:
            torch.set_num_threads(max(1, int(study.trial_cpus)))
        path = wd / f"{stage}.pt"

        def progress(name, step, metrics, saved):       # share done → the progress line; CPU → the record
            total = metrics.get(f"{name}/total_steps")
            loop_cpu["seconds"] = metrics.get(f"{name}/cpu_seconds", loop_cpu.get("seconds"))
            if total:
                ctx.event(event="progress", fraction=step / total)
        fn(SINGLE, path, progress, ctx.device)
    ctx.store.put_file(key, path)
    seconds = time.perf_counter() - t0
    # compute, in the trial's process: its CPU time for the stage, or more where the stage's training loop
    # resumed and carried the CPU seconds of its earlier runs in its checkpoint (not known for Ray Train workers)
    cpu = None
    if not (data_parallel and study.train_workers >= 1):
        cpu = max(time.process_time() - cpu0, loop_cpu.get("seconds") or 0.0)
    ctx.store.record_execution(key, {"stage": stage, "run": ctx.run_id, "trial": ctx.trial.label, "seconds": seconds,
                                     "cpu_seconds": cpu, "dataset": ctx.trial.data})
    ctx.event(event="done", seconds=seconds)


def keep_metrics(store_uri: str, key: str, total: int, snapshot_every: int = 0):
    """A stage callback (rank 0) that stores the logged metrics at the last step and, every
    `snapshot_every` steps, a snapshot of the checkpoint with its metrics."""
    def cb(stage, step, metrics, saved):
        if saved is None:
            return
        store = ArtifactStore(store_uri)
        if snapshot_every and step % snapshot_every == 0 and step != total:
            store.put_file(key, saved, f"step-{step}.pt")
            store.put_json(key, metrics, f"step-{step}.json")
        elif step == total:
            store.put_json(key, metrics, f"step-{step}.json")
    return cb


def _chain(*callbacks):
    """One stage callback that calls each given one (None skipped) in order."""
    cbs = [c for c in callbacks if c is not None]

    def call(*args):
        for c in cbs:
            c(*args)
    return call


# ---------------------------------------------------------------- the stages as the trials run them
def behavior_stage(ctx: Context):
    cfg = ctx.trial.config
    data_of = functools.partial(load_data, ctx.trial.task, ctx.study.data_root)

    def fn(parallel, ckpt_path, callback, device):
        data = data_of()[0].to(device)
        train_behavior(cfg.behavior, data.obs, data.actions, seed=cfg.seed, ckpt_path=ckpt_path,
                       callback=callback, parallel=parallel)
    run_stage(ctx, "behavior", fn)


def support_stage(ctx: Context):
    cfg, keys = ctx.trial.config, ctx.trial.keys
    behavior = load_behavior(fetch(ctx.study.store, keys["behavior"])).to(ctx.device)

    def fn(parallel, ckpt_path, callback, device):
        generate_support(cfg.support, behavior, ctx.data(device), seed=cfg.seed, ckpt_path=ckpt_path)
    run_stage(ctx, "support", fn, data_parallel=False)


def q_stage(ctx: Context):
    cfg, keys, uri = ctx.trial.config, ctx.trial.keys, ctx.study.store
    data_of = functools.partial(load_data, ctx.trial.task, ctx.study.data_root)

    def fn(parallel, ckpt_path, callback, device):
        support = load_support(fetch(uri, keys["support"])).to(device)
        keep = keep_metrics(uri, keys["q"], cfg.q.steps) if parallel.rank == 0 else None
        train_q(cfg.q, data_of()[0].to(device), support, seed=cfg.seed, ckpt_path=ckpt_path,
                callback=_chain(callback, keep), parallel=parallel)
    run_stage(ctx, "q", fn)


def energy_stage(ctx: Context):
    cfg, keys, uri, every = ctx.trial.config, ctx.trial.keys, ctx.study.store, ctx.study.eval_every
    data_of = functools.partial(load_data, ctx.trial.task, ctx.study.data_root)

    def fn(parallel, ckpt_path, callback, device):
        behavior = load_behavior(fetch(uri, keys["behavior"]))
        support = load_support(fetch(uri, keys["support"])).to(device)
        keep = keep_metrics(uri, keys["energy"], cfg.energy.steps, every) if parallel.rank == 0 else None
        train_energy(cfg.energy, load_q(fetch(uri, keys["q"])), support, data_of()[0].to(device),
                     behavior.schedule, behavior=behavior, seed=cfg.seed, ckpt_path=ckpt_path,
                     callback=_chain(callback, keep), parallel=parallel)
    run_stage(ctx, "energy", fn)


def iql_stage(ctx: Context, cfg=None):
    """Offline IQL: QGPO studies' baseline (the trial's config), EDIS's pre-training (its `iql` section)."""
    cfg, key, uri = cfg or ctx.trial.config, ctx.trial.keys["iql"], ctx.study.store
    data_of = functools.partial(load_data, ctx.trial.task, ctx.study.data_root)

    def fn(parallel, ckpt_path, callback, device):
        keep = keep_metrics(uri, key, cfg.steps) if parallel.rank == 0 else None
        train_iql(cfg, data_of()[0].to(device), seed=ctx.trial.seed, ckpt_path=ckpt_path,
                  callback=_chain(callback, keep), parallel=parallel)
    run_stage(ctx, "iql", fn)


def evaluation_stage(ctx: Context, work: Callable[[Context, str], None] | None = None):
    """Evaluate the policy at each of the trial's evaluation steps that has no stored evaluation yet (or run
    `work(ctx, key)`, e.g. EDIS's online loop, which evaluates as it goes), unless result.json marks it done;
    one trial at a time holds the key's lease."""
    ctx.stage = "evaluation"
    key = ctx.trial.keys["evaluation"]
    if ctx.store.exists(key, "result.json"):
        return
    with ctx.store.lease(key, done="result.json", on_wait=lambda: ctx.event(event="waiting")) as mine:
        if mine:
            (work or _evaluate)(ctx, key)


def _evaluate(ctx: Context, key: str):
    t, store, uri = ctx.trial, ctx.store, ctx.study.store
    history: list[dict] = store.get_json(key, "history.json") if store.exists(key, "history.json") else []
    todo = [s for s in t.eval_steps if s not in {h["step"] for h in history}]
    if not todo:
        _finish_evaluation(ctx, history)
        return
    ctx.event(event="start")
    dataset_score = load_data(t.task, ctx.study.data_root)[1]
    baseline = t.algorithm != "qgpo"
    behavior = None if baseline else fetch(uri, t.keys["behavior"])
    q_metrics = {} if baseline else store.get_json(t.keys["q"], f"step-{t.config.q.steps}.json")
    pool = EvalPool(ctx.study.eval_actors)
    try:
        for step in todo:
            if baseline:
                payload = {"iql": fetch(uri, t.keys["iql"])}
                metrics = store.get_json(t.keys["iql"], f"step-{step}.json")
            elif t.method in VALUE_METHODS:
                analytic = analytic_options(t.config.energy, load_behavior(behavior),
                                            load_data(t.task, ctx.study.data_root)[0], t.seed)
                payload = policy_payload(behavior, t.method, t.config.sampler, q=fetch(uri, t.keys["q"]),
                                         beta=t.beta, analytic=analytic, temperature=t.config.temperature)
                metrics = {}
            else:
                final = step == t.config.energy.steps
                energy = fetch(uri, t.keys["energy"], "artifact.pt" if final else f"step-{step}.pt")
                payload = policy_payload(behavior, t.method, t.config.sampler, energy=energy,
                                         temperature=t.config.temperature)
                metrics = store.get_json(t.keys["energy"], f"step-{step}.json")
            t0 = time.perf_counter()
            # one lockstep pass over both episode sets: the first n_val episodes (their own reset seeds) are
            # for selecting hyperparameters such as w, the rest are the test episodes that are reported
            n_val = ctx.study.validation_episodes
            res = pool.evaluate(payload, t.task, t.scales, n_val + ctx.study.eval_episodes, seed=EVAL_SEED_OFFSET + t.seed,
                                max_steps=t.max_steps)
            seconds = time.perf_counter() - t0
            sets = {name: {"returns": res.returns[:, part].tolist(), "scores": res.normalized[:, part].tolist(),
                           "lengths": res.lengths[:, part].tolist()}
                    for name, part in (("validation", slice(0, n_val)), ("test", slice(n_val, None)))}
            entry = {"step": step, "sets": sets, "dataset_score": dataset_score, "seconds": seconds,
                     "env_steps_per_s": res.env_steps / max(seconds, 1e-9),
                     "diagnostics": {**{k: v for k, v in q_metrics.items() if "/" not in k},
                                     **{k: v for k, v in metrics.items() if "/" not in k}}}
            history = sorted([h for h in history if h["step"] != step] + [entry], key=lambda h: h["step"])
            store.put_json(key, history, "history.json")      # persisted as it happens
            ctx.event(event="evaluation", **evaluation_metrics(t, entry))
    finally:
        pool.close()
    _finish_evaluation(ctx, history)


def _finish_evaluation(ctx: Context, history: list[dict]):
    key = ctx.trial.keys["evaluation"]
    ctx.store.put_json(key, {"trial": ctx.trial.hyper, "scales": list(ctx.trial.scales), "history": history})
    seconds = sum(h["seconds"] for h in history)
    ctx.store.record_execution(key, {"stage": "evaluation", "run": ctx.run_id, "trial": ctx.trial.label,
                                     "seconds": seconds})
    ctx.event(event="done", seconds=seconds)


def evaluation_metrics(trial: Trial, entry: dict) -> dict:
    """An evaluation as MLflow metrics: per-scale normalised score and raw return on the test episodes, and
    the validation score (for browsing; the results table has the scale and the episode set as columns),
    the dataset's score, the stage diagnostics."""
    out = {"step": entry["step"], "dataset_score": entry["dataset_score"], "eval_seconds": entry["seconds"],
           "eval_env_steps_per_s": entry["env_steps_per_s"], **entry["diagnostics"]}
    test, val = entry["sets"]["test"], entry["sets"]["validation"]
    for i, w in enumerate(trial.scales):
        out[f"score_w{w:g}"] = float(np.nanmean(test["scores"][i]))
        out[f"return_w{w:g}"] = float(np.nanmean(test["returns"][i]))
        if len(val["scores"][i]):
            out[f"val_score_w{w:g}"] = float(np.nanmean(val["scores"][i]))
    return out


# ---------------------------------------------------------------- the Tune trainables
def _run(config: dict, study: StudyConfig, units: dict[str, Trial], run_id: str, stages):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ctx = Context(study, units[hyper_id(config["trial"])], run_id)
    try:
        now = dataset_file(study, ctx.trial.task)
        if now["sha256"] != ctx.trial.data["sha256"]:
            raise ValueError(f"{now['path']}: the dataset changed after the study computed its keys "
                             f"(sha256 {ctx.trial.data['sha256']} → {now['sha256']}); run the study again")
        for stage in stages:
            stage(ctx)
    except PERMANENT as e:                    # a retry cannot fix it: report once, end the trial
        ctx.event(event="fatal", cause=f"{type(e).__name__}: {e}")


def behavior_phase(config: dict, study: StudyConfig, units: dict[str, Trial], run_id: str):
    _run(config, study, units, run_id, (behavior_stage,))


def q_phase(config: dict, study: StudyConfig, units: dict[str, Trial], run_id: str):
    _run(config, study, units, run_id, (support_stage, q_stage))


def policy_phase(config: dict, study: StudyConfig, units: dict[str, Trial], run_id: str):
    method = config["trial"]["method"]
    first = {"iql": (iql_stage,)}.get(method, () if method in VALUE_METHODS else (energy_stage,))
    _run(config, study, units, run_id, (*first, evaluation_stage))
