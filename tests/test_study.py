"""Study definition without Ray: deep config merges, the grid, stage keys shared across trials, the plan."""
import json
import subprocess
import sys

import pytest

from cepdist.config import to_dict
from cepdist.distributed.presets import preset
from cepdist.distributed.study import StudyConfig, load_study, plan, trials


def test_a_partial_yaml_section_keeps_every_other_preset_setting():
    smoke = preset("smoke")
    s = load_study(smoke, {"base": {"energy": {"beta": 10}}}, {"seeds": [3]})
    assert s.base.energy.beta == 10.0 and isinstance(s.base.energy.beta, float)
    assert s.seeds == (3,)
    d, ref = to_dict(s), to_dict(smoke)
    d["base"]["energy"]["beta"], d["seeds"] = ref["base"]["energy"]["beta"], ref["seeds"]
    assert d == ref                                    # nothing else moved (e.g. energy.steps stays 300)
    with pytest.raises(ValueError, match=r"base\.energy\.betta"):
        load_study(smoke, {"base": {"energy": {"betta": 1}}})
    with pytest.raises(ValueError, match="must be a mapping"):
        load_study(smoke, ["seeds"])


def test_q_is_shared_across_beta_and_method_and_energy_is_per_trial():
    s = load_study(preset("smoke"), {"betas": [1, 3], "Ks": [4, 8], "methods": ["cep", "mse"]})
    ts = trials(s)
    assert len(ts) == 2 * 2 * 2 * 2                     # seeds × β × K × method
    per_seed = [t for t in ts if t.seed == 0]
    assert len({t.keys["behavior"] for t in per_seed}) == 1
    assert len({t.keys["support"] for t in per_seed}) == 2    # one per K
    assert len({t.keys["q"] for t in per_seed}) == 2          # Q depends on neither β nor the method
    assert len({t.keys["energy"] for t in per_seed}) == 8
    # settings that change no result are not in the keys; the schedule is, and it reaches every stage
    quiet = load_study(s, {"base": {"q": {"log_every": 7}, "energy": {"ckpt_every": 3}}})
    assert [t.keys for t in trials(quiet)] == [t.keys for t in ts]
    other = trials(load_study(s, {"base": {"behavior": {"schedule": {"beta_max": 10}}}}))
    assert all(a.keys[k] != b.keys[k] for a, b in zip(ts, other) for k in a.keys)
    # the policy's temperature changes only what is evaluated: every trained stage is reused
    cold = trials(load_study(s, {"base": {"temperature": 0.5}}))
    assert all((a.keys[k] != b.keys[k]) == (k == "evaluation") for a, b in zip(ts, cold) for k in a.keys)
    with pytest.raises(ValueError, match=r"temperature.*> 0"):
        load_study(s, {"base": {"temperature": 0.0}})


def test_a_per_task_section_changes_only_that_tasks_config_and_keys():
    s = load_study(preset("smoke"), {"tasks": ["hopper-random-local", "hopper-medium-local"]})
    wide = load_study(s, {"per_task": {"hopper-medium-local": {"behavior": {"widths": [128, 64, 32]}}}})
    for a, b in zip(trials(s), trials(wide)):
        assert (a.task, a.seed) == (b.task, b.seed)
        changed = a.task == "hopper-medium-local"
        assert b.config.behavior.widths == ((128, 64, 32) if changed else (64, 32, 16))
        assert b.config.behavior.steps == a.config.behavior.steps             # the rest of the section stays
        assert all((a.keys[k] != b.keys[k]) == changed for k in a.keys)       # the whole chain downstream moves
    assert to_dict(wide)["per_task"] == {"hopper-medium-local": {"behavior": {"widths": [128, 64, 32]}}}


def test_grid_axes_default_to_the_base_config_and_task_defaults():
    s = StudyConfig(tasks=("hopper-medium-local", "antmaze-umaze-v2"), seeds=(0,))
    ts = trials(s)
    assert [(t.task, t.K, t.config.q.reward, t.beta, t.method, t.steps) for t in ts] == [
        ("hopper-medium-local", 16, "locomotion", 3.0, "cep", 15), ("antmaze-umaze-v2", 32, "antmaze", 3.0, "cep", 15)]
    dps = trials(load_study(s, {"methods": ["dps"], "tasks": ["hopper-medium-local"]}))[0]
    assert "energy" not in dps.keys and dps.eval_steps == (dps.config.q.steps,)
    sens = trials(load_study(s, {"mode": "sensitivity", "tasks": ["hopper-medium-local"], "betas": [3, 1, 10],
                                 "Ks": [8, 4]}))
    assert [(t.beta, t.K) for t in sens] == [(3, 8), (1, 8), (10, 8), (3, 4)]


def test_study_plan_lists_keys_and_stored_stages_without_ray(tmp_path):
    code = ("import sys; from cepdist.cli import main; "
            f"rc = main(['study', 'plan', '--preset', 'smoke', '--betas', '1', '3', '--store', r'{tmp_path}', '--json']); "
            "assert 'ray' not in sys.modules, 'plan started Ray'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["counts"] == {"behavior": 2, "support": 2, "q": 2, "energy": 4, "iql": 0, "evaluation": 4}
    assert p["stored"] == dict.fromkeys(p["counts"], 0) and len(p["trials"]) == 4
    assert p == plan(load_study(preset("smoke"), {"betas": [1, 3], "store": str(tmp_path)}))
    table = subprocess.run([sys.executable, "-m", "cepdist", "study", "plan", "--preset", "smoke", "--store",
                            str(tmp_path)], capture_output=True, text=True)
    assert table.returncode == 0 and "energy" in table.stdout and "hopper-random-local" in table.stdout


def test_bad_study_input_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {energy: {beta: [}\n")
    r = subprocess.run([sys.executable, "-m", "cepdist", "study", "plan", "--config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "cepdist", "study", "plan", "--tasks", "hopper-medum-v2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean hopper-medium-v2" in r.stderr


def test_a_replaced_dataset_file_gives_new_keys(tmp_path):
    """Every key includes the dataset file's fingerprint (cached beside it by size and mtime); the plan shows
    it; replacing the file under the same task name changes every stage key."""
    from cepdist.data import datasets
    from cepdist.envs.generate import generate
    study = load_study(preset("smoke"), {"data_root": str(tmp_path), "store": str(tmp_path / "store"), "seeds": [0]})
    p0 = plan(study)
    assert p0["datasets"]["hopper-random-local"]["sha256"] is None
    path = tmp_path / "hopper-random-local.hdf5"
    generate("hopper-random-local", path, 300, seed=0)
    (t1,) = trials(study)
    assert t1.data == {"path": str(path), "sha256": datasets.fingerprint(path)}
    assert (tmp_path / "hopper-random-local.hdf5.sha256.json").is_file()      # cached for the next run
    assert plan(study)["datasets"]["hopper-random-local"]["sha256"] == t1.data["sha256"]
    generate("hopper-random-local", path, 300, seed=1)                          # same task, other contents
    (t2,) = trials(study)
    assert t2.data["sha256"] != t1.data["sha256"]
    assert all(t1.keys[k] != t2.keys[k] for k in t1.keys)


@pytest.mark.parametrize("layer,message", [
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"seeds": -2}, "config key seeds: expected a list, got -2"),
    ({"Ks": [-8]}, "Ks must be a non-empty list of integers ≥ 2"),
    ({"scales": [1, "x"]}, r"config key scales\[1\]: expected a number, got 'x'"),
    ({"base": {"behavior": {"lr": "fast"}}}, "config key base.behavior.lr: expected a number"),
    ({"base": {"q": {"gamma": 2}, "behavior": {"lr": -1}}}, r"base.behavior.lr must be > 0; base.q.gamma must be in"),
    ({"base": {"energy": {"beta": 10}}, "betas": [1, 3]}, "base.energy.beta is set per trial by the study's `betas`"),
    ({"base": {"sampler": {"steps": 3}}}, "base.sampler.steps is set per trial by the study's `solver_steps`.*--steps"),
    ({"base": {"seed": 4}}, "base.seed is set per trial by the study.s `seeds`"),
    ({"base": {"energy": {"beta": 2}}, "betas": [1, 3]}, "set `betas:` or --betas instead"),
    ({"per_task": {"hopper-random-local": {}}}, "per_task.hopper-random-local: not one of the study's tasks"),
    ({"per_task": {"hopper-medium-local": {"behavior": {"widthz": [8]}}}},
     r"unknown config key\(s\) per_task.hopper-medium-local.behavior.widthz"),
    ({"per_task": {"hopper-medium-local": {"behavior": {"lr": 0}}}}, "per_task.hopper-medium-local.behavior.lr must be > 0"),
    ({"per_task": {"hopper-medium-local": {"energy": {"beta": 3}}}},
     "per_task.hopper-medium-local.energy.beta: set per trial by the study's `betas`"),
    ({"per_task": ["hopper-medium-local"]}, "config key per_task: expected a mapping"),
])
def test_the_config_validator_names_the_key_and_what_is_allowed(layer, message):
    with pytest.raises(ValueError, match=message):
        load_study(preset("local"), layer)


def test_numbers_written_as_strings_and_full_dumps_are_accepted():
    s = load_study(preset("smoke"), {"base": {"behavior": {"lr": "1e3"}}})      # YAML 1.1 reads 1e3 as a string
    assert s.base.behavior.lr == 1000.0
    local = preset("local")
    assert load_study(local, to_dict(local)) == local        # a dumped study runs again unchanged


def test_yaml_errors_name_the_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [0, 1]\nbase:\n  energy: {beta: [}\n")
    r = subprocess.run([sys.executable, "-m", "cepdist", "study", "plan", "--config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"{bad}:3:" in r.stderr and "Traceback" not in r.stderr
    top = tmp_path / "list.yaml"
    top.write_text("- seeds\n")
    r = subprocess.run([sys.executable, "-m", "cepdist", "study", "plan", "--config", str(top)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "expected a mapping of StudyConfig fields, got list" in r.stderr


def test_a_malformed_dataset_stops_the_study_before_ray_starts(tmp_path):
    """rewards stored as (N, 1) (which would broadcast the critic target to [B, B]): one line naming the file
    and the key, exit code 2, no traceback, nothing stored, Ray never started."""
    import h5py
    from cepdist.envs.generate import generate
    data = tmp_path / "data"
    path = generate("hopper-random-local", data / "hopper-random-local.hdf5", 300, seed=0)
    with h5py.File(path, "a") as f:
        r = f["rewards"][()]
        del f["rewards"]
        f["rewards"] = r[:, None]
    code = ("import sys; from cepdist.cli import main; "
            f"rc = main(['study', 'run', '--preset', 'smoke', '--data-root', r'{data}', '--store', r'{tmp_path / 'store'}',"
            f" '--mlflow-uri', 'sqlite:///{tmp_path}/m.db', '--out', r'{tmp_path / 'out'}']); "
            "assert 'ray' not in sys.modules or not __import__('ray').is_initialized(); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"cepdist: error: {path}: key 'rewards' has shape (300, 1), expected 1-D of N"
    assert str(path) in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_an_unusable_store_is_refused_before_training(tmp_path):
    """A store that cannot be created or written, or that has too little free space, is an error before any
    stage runs (a location under a regular file stands in for a read-only one: root may write anywhere)."""
    from cepdist.distributed.store import ArtifactStore
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=f"store {tmp_path / 'afile' / 'store'} cannot be created"):
        ArtifactStore(tmp_path / "afile" / "store")
    with pytest.raises(ValueError, match="MiB free; at least"):
        ArtifactStore(tmp_path / "ok").check_writable(min_free_bytes=1 << 62)
    ArtifactStore(tmp_path / "ok").check_writable()
    assert not list((tmp_path / "ok").glob(".probe-*"))


def test_progress_eta_comes_from_the_running_stages_pace(caplog):
    """Units still to start share the slots at the running stages' mean pace; at a phase's tail the slowest
    running unit decides. A resumed unit's earlier share is not counted as speed (only its pace is). Once units
    have finished, their pace (every stage of a unit, e.g. support then Q) bounds the ETA from below."""
    import logging
    import types
    from cepdist.distributed import driver
    units = [types.SimpleNamespace(hyper={"i": i}) for i in range(5)]
    events, _ = driver.callbacks("behavior", units, None, [], None)
    events.t0 -= 600
    unit = lambda f, rate: {"stage": "behavior", "f": f, "t": 0.0, "rate": rate}
    # 50% at 0.05%/s (600 s left), 20% at 0.02%/s (2400 s left), one just started: 2100 s a unit on average
    events.running = {"a": unit(0.5, 0.5 / 600), "b": unit(0.2, 0.2 / 600), "c": unit(None, None)}
    with caplog.at_level(logging.INFO, logger="cepdist"):
        events._progress(force=True)                      # (600 + 2400 + 2100 + 2 × 2100) / 3 slots
        events.running.pop("c")
        events.done = 3
        events._progress(force=True)                      # nothing left to start: the slower one, 2400 s
        events.done = 1
        events._progress(force=True)        # finished units' pace, 4 × 600 s (their every stage), if slower
        events.running["b"]["rate"] = 0.2 / 60
        events._progress(force=True)                       # 4 × 600 s, not the running stages' 240 s
    assert [r.getMessage() for r in caplog.records] == [
        "[behavior phase] 0/5 done | running: behavior ×3 (50% 20%, 3.5%/min) | ETA 51m40s | 10m00s elapsed",
        "[behavior phase] 3/5 done | running: behavior ×2 (50% 20%, 3.5%/min) | ETA 40m00s | 10m00s elapsed",
        "[behavior phase] 1/5 done | running: behavior ×2 (50% 20%, 3.5%/min) | ETA 40m00s | 10m00s elapsed",
        "[behavior phase] 1/5 done | running: behavior ×2 (50% 20%, 12.5%/min) | ETA 40m00s | 10m00s elapsed"]
