"""Running a study: Ray, the three Tune phases, MLflow, progress lines, failures, the results table.

Each phase is one Tune run over the distinct stage keys it still has to compute (behaviour models, then
Q functions with their support sets, then one trial per grid point for the energy model and evaluation),
so a stage shared by many trials is computed once, and re-running a study computes only what is missing.
The study config reaches every trial typed (`tune.with_parameters`); the search space holds only each
trial's hyperparameters. Before anything starts, the resources one trial needs are checked against the
cluster. Output: one line per stage event and a progress line per phase; Ray's and Tune's own output only
with `verbose`."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import ray
from ray import tune
from ray.tune import Callback, Stopper

from ..config import to_dict
from ..data.datasets import d4rl_dir
from ..envs.generate import ensure_datasets
from .results import write_table
from .store import ArtifactStore
from .study import STAGES, StudyConfig, Trial, grid, hyper_id, store_path, trials, validate
from .tracking import MLflowTracker
from .trials import behavior_phase, evaluation_metrics, policy_phase, q_phase

log = logging.getLogger("cepdist")

# (phase, trainable, the stage whose distinct keys are its units, the file that marks a unit done)
PHASES = (("behavior", behavior_phase, "behavior", "artifact.pt"), ("q", q_phase, "q", "artifact.pt"),
          ("policy", policy_phase, "evaluation", "result.json"))


@dataclasses.dataclass(frozen=True)
class Kind:
    """What differs between kinds of study (QGPO's grid, EDIS's arms): validation, trials, phases, table, and
    a stored evaluation entry as MLflow metrics (with its "step")."""
    validate: Callable
    trials: Callable
    phases: tuple
    write_table: Callable
    stages: tuple
    metrics: Callable


def kind_of(study) -> Kind:
    from . import edis
    if isinstance(study, edis.EDISStudyConfig):
        return Kind(edis.validate, edis.trials, edis.PHASES, edis.write_table, edis.STAGES, edis.evaluation_metrics)
    return Kind(lambda s: grid(validate(s)), trials, PHASES, write_table, STAGES, evaluation_metrics)


class StudyInterrupted(RuntimeError):
    pass


class Interrupts:
    """SIGINT and SIGTERM recorded by the driver itself: the first asks the running Tune phase to stop
    gracefully (through Tune's SIGUSR1 handler, once Tune has installed it) and makes sure no later phase
    starts; a second one stops at once."""

    def __init__(self):
        self.signal: str | None = None
        self.previous = {}

    def __enter__(self):
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"        # ours records it, then asks Tune to stop
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, sig, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(sig).name
        log.warning("%s received: stopping after the running stages save their state (again: stop now)", self.signal)
        if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGUSR1)

    def check(self, phase: str):
        if self.signal is not None:
            raise StudyInterrupted(f"study interrupted by {self.signal} in the {phase} phase; run the same "
                                   "command again to resume")

    def __exit__(self, *exc):
        for sig, h in self.previous.items():
            signal.signal(sig, h)


class StudyFailed(RuntimeError):
    pass


# ---------------------------------------------------------------- resources
def trial_resources(study: StudyConfig, eval_actors: int) -> list[dict]:
    """The placement-group bundles of one trial: the trial itself (it trains unless Ray Train workers
    do), then one CPU per evaluation actor. Ray Train workers are requested by the trial on their own."""
    train = ({"CPU": study.trial_cpus, "GPU": 1 if study.use_gpu else 0} if study.train_workers == 0
             else {"CPU": 0.01})
    return [train] + [{"CPU": 1}] * eval_actors


def check_resources(study: StudyConfig, cluster: dict, nodes: list[dict]):
    """Refuse a study whose single trial can never be placed, naming what it needs and what exists."""
    bundles = trial_resources(study, study.eval_actors)
    workers = [{"CPU": study.train_worker_cpus, "GPU": 1 if study.use_gpu else 0}] * study.train_workers
    need_cpu = sum(b["CPU"] for b in bundles + workers)
    need_gpu = sum(b.get("GPU", 0) for b in bundles + workers)
    have_cpu, have_gpu = cluster.get("CPU", 0), cluster.get("GPU", 0)
    biggest = max((n.get("Resources", {}).get("CPU", 0) for n in nodes if n.get("Alive")), default=have_cpu)
    parts = [f"trial {bundles[0]['CPU']:g}"]
    if study.train_workers:
        parts.append(f"{study.train_workers} Ray Train worker(s) × {study.train_worker_cpus:g}")
    if study.eval_actors:
        parts.append(f"{study.eval_actors} evaluation actor(s) × 1")
    problem = None
    if need_cpu > have_cpu + 1e-9 or need_gpu > have_gpu:
        problem = (f"one trial needs {need_cpu:g} CPU ({' + '.join(parts)}) and {need_gpu:g} GPU, "
                   f"the cluster has {have_cpu:g} CPU and {have_gpu:g} GPU")
    elif max([b["CPU"] for b in bundles + workers]) > biggest + 1e-9:
        problem = f"a single bundle needs more CPUs than the largest node has ({biggest:g})"
    if problem:
        raise ValueError(f"infeasible resources: {problem}; lower --train-workers, --eval-actors, "
                         "train_worker_cpus or trial_cpus, or add nodes")


def check_worker_code(nodes: list[dict]):
    """Every node's Ray workers must run the driver's cepdist. Ray puts the driver's working directory first on
    its workers' sys.path, so a study started beside another copy of the package (an old checkout, an unpacked
    release) would train its stages with that copy's code under keys the driver computed with its own."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def probe():        # where cepdist is imported from, a digest of its sources; nested: it travels by value
        import hashlib as hl
        from pathlib import Path as P
        try:
            import cepdist as c
        except ImportError as e:
            return f"nowhere ({e})", ""
        r, h = P(c.__file__).parent, hl.sha256()
        for p in sorted(r.rglob("*.py")):
            h.update(str(p.relative_to(r)).encode() + b"\0" + p.read_bytes())
        return str(r), h.hexdigest()[:16]

    mine = probe()
    alive = [n for n in nodes if n.get("Alive")]
    remote = ray.remote(num_cpus=0, max_retries=0)(probe)
    refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in alive]
    for node, (where, digest) in zip(alive, ray.get(refs)):
        if digest != mine[1]:
            raise ValueError(
                f"Ray workers on node {node.get('NodeManagerAddress', node['NodeID'])} import cepdist from {where}, "
                f"whose code differs from the driver's ({mine[0]}). Ray puts the driver's working directory "
                f"({os.getcwd()}) first on its workers' sys.path: start the study from a directory without another "
                "cepdist/ package, or install the same cepdist on every node")


# ---------------------------------------------------------------- driver-side callbacks
def _fmt(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


def _shares(units: list[dict]) -> str:
    """' (40% 45%, 3.1%/min)': the share of their stage the running units have done, and their mean pace."""
    done = [f"{100 * u['f']:.0f}%" for u in units if u["f"] is not None]
    rates = [u["rate"] for u in units if u["rate"]]
    pace = f", {6000 * sum(rates) / len(rates):.1f}%/min" if rates else ""
    return f" ({' '.join(done)}{pace})" if done else ""


def callbacks(phase: str, units: list[Trial], study: StudyConfig, fatal: list, tracker: MLflowTracker):
    """Progress lines, fatal-failure capture and one MLflow run per trial: every evaluation in the policy
    phase; a trial that fails for good in any phase (e.g. a diverged behaviour model) is recorded FAILED with
    its cause, an interrupted one KILLED."""

    by_hyper = {hyper_id(t.hyper): t for t in units}

    def trial_of(trial) -> Trial:
        return by_hyper[hyper_id(trial.config["trial"])]

    class Events(Callback):
        def __init__(self):
            self.t0 = self.last = time.time()
            self.done, self.running, self.slots = 0, {}, 1     # slots: the most units seen running at once
            self.runs: dict[str, str] = {}
            self.logged: dict[str, set] = {}
            self.failed: set[str] = set()

        # -- MLflow: one run per trial, keyed by its evaluation key (a retry continues it)
        def _run(self, t: Trial) -> str:
            key = t.keys["evaluation"]
            if key not in self.runs:
                self.runs[key], self.logged[key] = open_run(tracker, study, t)
            return self.runs[key]

        def on_trial_result(self, iteration, trials, trial, result, **info):
            t, ev = trial_of(trial), result.get("event")
            stage = result.get("stage", "?")
            if ev == "start":
                self.running[trial.trial_id] = {"stage": stage, "f": None, "t": None, "rate": None}
            elif ev == "progress":
                u, now = self.running.setdefault(trial.trial_id, {"stage": stage, "f": None, "t": None, "rate": None}), \
                    time.time()
                if u["stage"] == stage and u["f"] is not None and now > u["t"]:
                    u["rate"] = (result["fraction"] - u["f"]) / (now - u["t"])       # share of the stage per second
                u.update(stage=stage, f=result["fraction"], t=now)
            elif ev == "waiting":
                log.info("%-10s wait  %s: another study is computing it", stage, t.label)
            elif ev == "done":
                self.running.pop(trial.trial_id, None)
                log.info("%-10s done  %s (%s)", stage, t.label, _fmt(result.get("seconds", 0)))
            elif ev == "evaluation":
                scores = ", ".join(f"w={w:g} {result[f'score_w{w:g}']:.1f}" for w in t.scales)
                log.info("evaluation %s step %d: %s", t.label, result["step"], scores)
                rid = self._run(t)
                if result["step"] not in self.logged[t.keys["evaluation"]]:
                    tracker.log_metrics(rid, evaluation_metrics_of(result), int(result["step"]))
                    self.logged[t.keys["evaluation"]].add(result["step"])
            elif ev == "fatal":
                fatal.append((stage, t.label, result["cause"]))
                self.failed.add(trial.trial_id)
                tracker.finish(self._run(t), "FAILED", f"{stage}: {result['cause']}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            self.running.pop(trial.trial_id, None)
            if phase in ("policy", "online") and trial.trial_id not in self.failed:
                tracker.finish(self._run(trial_of(trial)), "FINISHED")
            self._progress(force=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            log.warning("retrying  %s after: %s", trial_of(trial).label, _first_line(trial.error_file))

        def on_trial_error(self, iteration, trials, trial, **info):
            cause = _first_line(trial.error_file)
            fatal.append((self.running.pop(trial.trial_id, {"stage": phase})["stage"], trial_of(trial).label, cause))
            tracker.finish(self._run(trial_of(trial)), "FAILED", cause)

        def on_experiment_end(self, trials, **info):
            for trial in trials:                  # interrupted: not finished, not failed
                if trial.status not in ("TERMINATED", "ERROR") and trial.config["trial"]:
                    key = trial_of(trial).keys["evaluation"]
                    if key in self.runs:
                        tracker.finish(self.runs[key], "KILLED")

        def on_step_begin(self, iteration, trials, **info):
            self._progress()

        def _progress(self, force=False):
            now = time.time()
            if not force and now - self.last < 30:
                return
            self.last = now
            total, elapsed = len(units), now - self.t0
            run = list(self.running.values())
            self.slots = max(self.slots, len(run))
            rates = [u["rate"] for u in run if u["rate"]]
            # whole units finished so far: their pace counts every stage of a unit (support then Q), which the
            # running stage's pace does not
            eta = (total - self.done) * elapsed / self.done if self.done else None
            if rates:      # the running stages' own pace: what is left of them, then the units not started
                unit = sum(1 / r for r in rates) / len(rates)
                each = [(1 - u["f"]) / u["rate"] if u["rate"] else unit for u in run]
                pending = total - self.done - len(run)
                # units still to start share the slots; without them the slowest running one decides
                by_stage = (sum(each) + pending * unit) / self.slots if pending > 0 else max(each)
                eta = max(eta or 0.0, by_stage)
            eta = "?" if eta is None else _fmt(eta)
            stages = {}
            for u in run:
                stages.setdefault(u["stage"], []).append(u)
            running = ", ".join(f"{s} ×{len(us)}{_shares(us)}" for s, us in stages.items()) or "–"
            log.info("[%s phase] %d/%d done | running: %s | ETA %s | %s elapsed", phase, self.done, total, running,
                     eta, _fmt(elapsed))

    class StopOnFatal(Stopper):
        """Tune stopper: a failure a retry cannot fix stops the whole phase at once."""
        def __call__(self, trial_id, result):
            return result.get("event") == "fatal"

        def stop_all(self):
            return bool(fatal)

    return Events(), StopOnFatal()


def open_run(tracker: MLflowTracker, study, t: Trial) -> tuple[str, set[int]]:
    """A trial's MLflow run (an earlier attempt's, or a new one) and the evaluation steps it has logged."""
    tags = {f"key_{k}": v for k, v in t.keys.items()}
    rid = tracker.start(t.keys["evaluation"], t.label, {**t.hyper, "scales": list(t.scales),
                                                       "config": dataclasses.asdict(t.config)},
                        {**tags, "study": study.name})
    return rid, {m.step for m in tracker.client.get_metric_history(rid, "dataset_score")}


def reconcile_runs(study, ts: list[Trial], store: ArtifactStore, tracker: MLflowTracker, metrics: Callable):
    """Every trial with a stored result gets a FINISHED MLflow run with all its evaluations, also when the
    driver died between the store's write and the callbacks' (the trial is not run again on resume)."""
    runs = {r.data.tags.get("cepdist_key"): r for r in tracker.runs()}
    for t in ts:
        key = t.keys["evaluation"]
        run = runs.get(key)
        if (run is not None and run.info.status == "FINISHED") or not store.exists(key, "result.json"):
            continue
        rid, logged = open_run(tracker, study, t)
        for entry in store.get_json(key)["history"]:
            m = metrics(t, entry)
            if m["step"] not in logged:
                tracker.log_metrics(rid, evaluation_metrics_of(m), int(m["step"]))
        tracker.finish(rid, "FINISHED")


def evaluation_metrics_of(result: dict) -> dict:
    skip = {"event", "stage", "step"}
    return {k: v for k, v in result.items() if k not in skip and isinstance(v, (int, float))
            and not isinstance(v, bool) and (k.startswith(("score_w", "return_w", "val_score_w")) or k in _METRIC_NAMES)}


_METRIC_NAMES = {"dataset_score", "eval_seconds", "eval_env_steps_per_s", "q_loss", "target_mean", "energy_loss",
                 "q_mean", "q_std"}


def _first_line(error_file) -> str:
    try:
        lines = [l for l in Path(error_file).read_text().splitlines() if l.strip()]
        return lines[-1].strip()[:500] if lines else "unknown error"
    except (OSError, TypeError):
        return "unknown error"


# ---------------------------------------------------------------- the driver
def run_study(study: StudyConfig, out: Path | None = None, verbose: bool = False) -> dict:
    """Run (or resume) a study; returns the paths of its outputs and the counts of stage executions."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not verbose:                                  # Tune's experiment boxes and tables
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    study = dataclasses.replace(study, store=store_path(study),
                                data_root=str(Path(study.data_root).resolve()) if study.data_root else None)
    kind = kind_of(study)
    kind.validate(study)                             # types were checked on load; ranges before anything starts
    # the dataset files that exist are checked before Ray starts; missing *-local ones are generated later
    missing = ensure_datasets(study.tasks, study.data_root, study.dataset_rows, study.policy_dir,
                              generate_missing=False)
    ArtifactStore(study.store).check_writable()
    out = Path(out or Path("results") / study.name)
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)
    resources, nodes = ray.cluster_resources(), ray.nodes()
    check_resources(study, resources, nodes)
    check_worker_code(nodes)
    if missing:                                      # datasets to generate need a writable data root
        root = Path(study.data_root) if study.data_root else d4rl_dir()
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".probe-{uuid.uuid4().hex}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise ValueError(f"data root {root} is not writable, but {', '.join(missing)} must be generated "
                             f"there ({e.strerror})") from None
    ensure_datasets(missing, study.data_root, study.dataset_rows, study.policy_dir)
    all_trials = kind.trials(study)                  # keys include each dataset file's fingerprint
    store = ArtifactStore(study.store)
    run_id = uuid.uuid4().hex                        # tags this invocation's stage executions
    tracker = MLflowTracker(study.mlflow_uri, study.name)
    ident = study_ident(study.name, all_trials)
    earlier = wall_time(store, ident, used_executions(store, all_trials))
    # which Ray it runs on: with no RAY_ADDRESS, ray.init joins the latest `ray start` instance on this machine
    log.info("study %s: %d trials | Ray %s (%g CPU, %g GPU, %d node(s)) | store %s | MLflow %s%s", study.name,
             len(all_trials), ray.get_runtime_context().gcs_address, resources.get("CPU", 0), resources.get("GPU", 0),
             sum(n.get("Alive", False) for n in nodes),
             study.store, study.mlflow_uri,
             f" | {len(earlier['invocations'])} earlier invocation(s), {_fmt(earlier['wall_seconds'])}"
             if earlier["invocations"] else "")
    t0 = time.perf_counter()
    with invocation(store, ident, run_id), Interrupts() as interrupts:
        run_phases(study, all_trials, store, tracker, run_id, interrupts, verbose, kind.phases)
    reconcile_runs(study, all_trials, store, tracker, kind.metrics)
    df = kind.write_table(store, study.name, all_trials, out / "results.parquet")
    executions = store.executions()
    mine = [e for e in executions if e.get("run") == run_id]
    used = used_executions(store, all_trials, executions)
    summary = {"study": study.name, "ident": ident, "config": to_dict(study), "trials": len(all_trials),
               "results_table": str(out / "results.parquet"),
               "rows": len(df), "store": study.store, "mlflow": f"mlflow ui --backend-store-uri {study.mlflow_uri}",
               "executions": {s: n for s in kind.stages
                              if (n := sum(e["stage"] == s for e in mine))},
               "seconds": time.perf_counter() - t0, **wall_time(store, ident, used),
               "stage_seconds": stage_seconds(used)}
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    return summary


@contextlib.contextmanager
def invocation(store: ArtifactStore, ident: str, run_id: str, every: float = 10.0):
    """Record this invocation of the study `ident` in the store: started, seconds so far (rewritten every
    `every` s, so a killed driver's time is known within that) and outcome."""
    started, stop = time.time(), threading.Event()

    def record(outcome):
        store.record_invocation(ident, run_id, {"run": run_id, "started": started, "seconds": time.time() - started,
                                                "outcome": outcome})

    def beat():
        while not stop.wait(every):
            record("running")            # stays so only if the driver was killed
    record("running")
    t = threading.Thread(target=beat, daemon=True)
    t.start()
    outcome = "failed"
    try:
        yield
        outcome = "finished"
    except StudyInterrupted:
        outcome = "interrupted"
        raise
    finally:
        stop.set()
        t.join()
        record(outcome)


def study_ident(name: str, ts: list[Trial]) -> str:
    """A study's name and a digest of its trials' keys: invocations of this exact study, not of an earlier
    configuration under the same name."""
    return f"{name}-" + hashlib.sha256(json.dumps(sorted(t.keys["evaluation"] for t in ts)).encode()).hexdigest()[:12]


def used_executions(store: ArtifactStore, ts: list[Trial], executions: list[dict] | None = None) -> list[dict]:
    """The store's execution records of the stages these trials use (whichever invocation ran them)."""
    keys = {k for t in ts for k in t.keys.values()}
    return [e for e in (store.executions() if executions is None else executions) if e.get("key") in keys]


def wall_time(store: ArtifactStore, ident: str, used: list[dict]) -> dict:
    """The study's wall time: the sum over its invocations (this one included) and over those of every other
    configuration in the store an invocation of which computed a stage this study uses (`used`, from
    used_executions). So a study whose evaluation grid changed after its models were trained keeps their
    training time in its total; a stage shared with another study brings that study's whole time (an
    overstatement, never an understatement)."""
    runs = {e.get("run") for e in used}
    groups = {s: store.invocations(s) for s in store.studies()}
    related = {ident} | {s for s, inv in groups.items() if any(r.get("run") in runs for r in inv)}
    inv = sorted(({**r, "study": s} for s in related for r in groups.get(s, [])), key=lambda r: r.get("started", 0))
    return {"wall_seconds": sum(r["seconds"] for r in inv),
            "invocations": [{k: r[k] for k in ("started", "seconds", "outcome", "study")} for r in inv]}


def run_phases(study: StudyConfig, all_trials: list[Trial], store: ArtifactStore, tracker: MLflowTracker,
               run_id: str, interrupts: Interrupts, verbose: bool, phases=PHASES):
    """The Tune phases in order; none starts after an interrupt or a failure that cannot be retried."""
    for phase, fn, stage, done_file in phases:
        units = list({t.keys[stage]: t for t in all_trials if stage in t.keys}.values())
        todo = [t for t in units if not store.exists(t.keys[stage], done_file)]
        log.info("[%s phase] %d to run, %d stored", phase, len(todo), len(units) - len(todo))
        interrupts.check(phase)
        if not todo:
            continue
        fatal: list = []
        events, stopper = callbacks(phase, todo, study, fatal, tracker)
        digest = hashlib.sha256(json.dumps([t.keys[stage] for t in todo]).encode()).hexdigest()[:8]
        eval_actors = study.eval_actors if stage == "evaluation" else 0      # the phase that evaluates
        tune.Tuner(
            tune.with_resources(tune.with_parameters(fn, study=study, units={hyper_id(t.hyper): t for t in todo},
                                                     run_id=run_id),
                                tune.PlacementGroupFactory(trial_resources(study, eval_actors))),
            param_space={"trial": tune.grid_search([t.hyper for t in todo])},
            tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent),
            run_config=tune.RunConfig(name=f"{study.name}-{phase}-{digest}", storage_path=study.store + "/_tune",
                                      callbacks=[events], stop=stopper, verbose=1 if verbose else 0,
                                      failure_config=tune.FailureConfig(max_failures=study.max_failures))).fit()
        if fatal:
            stage_name, label, cause = fatal[0]
            raise StudyFailed(f"study failed: {stage_name} stage of trial {label}: {cause}")
        interrupts.check(phase)
        check_complete(store, phase, [t.keys[stage] for t in todo], done_file)


def check_complete(store: ArtifactStore, phase: str, keys: list[str], done_file: str):
    """Tune returns normally when interrupted (Ctrl-C, SIGTERM): stop here rather than start the next
    phase on missing artifacts. Everything finished so far is in the store; rerunning resumes."""
    keys = list(dict.fromkeys(keys))
    missing = [k for k in keys if not store.exists(k, done_file)]
    if missing:
        raise StudyInterrupted(f"study interrupted in the {phase} phase: {len(missing)} of {len(keys)} unit(s) "
                               f"not finished (first: {missing[0]}); run the same command again to resume")


def stage_seconds(used: list[dict]) -> dict[str, dict[str, float]]:
    """Per stage, over this study's execution records (`used`): count, mean and total wall seconds of the run
    that finished each (not its earlier, interrupted runs), and where every execution has it, the total CPU
    seconds (`cpu_total`; a training loop's carries its interrupted runs too)."""
    per: dict[str, list[tuple[float, float | None]]] = {}
    for e in used:
        if "seconds" in e:
            per.setdefault(e["stage"], []).append((float(e["seconds"]), e.get("cpu_seconds")))
    out = {}
    for st, v in per.items():
        wall = [w for w, _ in v]
        out[st] = {"n": len(v), "mean": sum(wall) / len(v), "total": sum(wall)}
        if all(c is not None for _, c in v):
            out[st]["cpu_total"] = sum(c for _, c in v)
    return out
