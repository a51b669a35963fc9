"""The D4RL-layout generator on real gymnasium MuJoCo environments and real pretrained agents."""
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from cepdist.data import datasets
from cepdist.envs.generate import generate, policy_dir
from cepdist.data.tasks import get_task

ZOO = Path(os.environ.get("CEPDIST_POLICY_DIR", Path(__file__).resolve().parents[1].parent / "shared/policies/rl-zoo"))


def test_random_level_layout_and_determinism(tmp_path):
    a = generate("hopper-random-local", tmp_path / "a.hdf5", n_rows=400, seed=3, n_envs=2)
    b = generate("hopper-random-local", tmp_path / "b.hdf5", n_rows=400, seed=3, n_envs=2)
    c = generate("hopper-random-local", tmp_path / "c.hdf5", n_rows=400, seed=4, n_envs=2)
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations",
                  "infos/qpos", "infos/qvel"):
            assert len(fa[k]) == 400
            assert np.array_equal(fa[k][()], fb[k][()])
        assert not np.array_equal(fa["actions"][()], fc["actions"][()])
        assert fa["infos/qpos"].shape == (400, 6) and fa["infos/qvel"].shape == (400, 6)
        assert fa["metadata/task"][()] == b"hopper-random-local"
        # random Hopper falls within a few dozen steps: terminals end episodes, next obs continue within one
        term = fa["terminals"][()]
        assert term.sum() >= 5
        obs, nxt = fa["observations"][()], fa["next_observations"][()]
        ends = term | fa["timeouts"][()]
        inside = np.flatnonzero(~ends[:-1])
        assert np.allclose(nxt[inside], obs[inside + 1])
    arr = datasets.read_hdf5(a, get_task("hopper-random-local"))
    info = datasets.summarize(arr, get_task("hopper-random-local"))
    assert -5 < info["dataset_score"] < 10            # a random policy scores near 0


def test_generator_refuses_d4rl_names_and_missing_policies(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="generated datasets are registered as"):
        generate("hopper-medium-v2", tmp_path / "x.hdf5", n_rows=10)
    monkeypatch.delenv("CEPDIST_POLICY_DIR", raising=False)
    with pytest.raises(ValueError, match="CEPDIST_POLICY_DIR"):
        generate("hopper-expert-local", tmp_path / "x.hdf5", n_rows=10)
    with pytest.raises(ValueError, match="does not exist"):
        policy_dir(tmp_path / "nope")
    assert not (tmp_path / "x.hdf5").exists()


@pytest.mark.skipif(not ZOO.is_dir(), reason="pretrained agents not available (set CEPDIST_POLICY_DIR)")
@pytest.mark.parametrize("task,lo,hi", [("hopper-expert-local", 80, 120), ("halfcheetah-medium-local", 20, 60)])
def test_agent_levels_reach_their_scores(tmp_path, task, lo, hi):
    """TQC is an expert (≈100 normalised on Hopper); ARS with action noise 0.2 is a medium HalfCheetah (≈34)."""
    p = generate(task, tmp_path / "d.hdf5", n_rows=2000, seed=0, policy_root=ZOO, n_envs=2)
    info = datasets.summarize(datasets.read_hdf5(p, get_task(task)), get_task(task))
    assert info["episodes"] >= 1
    assert lo < info["dataset_score"] < hi, info


def test_generated_walker_data_records_its_model_and_stale_files_are_refused(tmp_path):
    """Generated walker2d data is rolled out on the D4RL-era model, recorded in the file; a file made under
    another model (e.g. before this fix) is refused before a study starts, with the command that fixes it."""
    from cepdist.envs.generate import ensure_datasets
    from cepdist.data.datasets import DatasetError
    task = get_task("walker2d-random-local")
    path = datasets.local_path(task, tmp_path)
    ensure_datasets([task.name], str(tmp_path), rows=300)
    with h5py.File(path, "r") as f:
        assert f["metadata/model"][()].decode() == "walker2d.xml"
    ensure_datasets([task.name], str(tmp_path))                       # valid: nothing to do
    with h5py.File(path, "a") as f:
        del f["metadata/model"]
    with pytest.raises(DatasetError, match=r"generated under the 'default' model.*cepdist data generate --task "
                                           r"walker2d-random-local"):
        ensure_datasets([task.name], str(tmp_path))


@pytest.mark.skipif(not ZOO.is_dir(), reason="pretrained agents not available (set CEPDIST_POLICY_DIR)")
def test_medium_data_varies_at_a_state_reproducibly_and_an_old_recipe_is_refused(tmp_path):
    """Medium hopper samples SAC's own action distribution (D4RL's way): at one state the agent's actions
    differ, the same seed gives the same file, and a file of the old deterministic recipe is refused."""
    import torch
    from cepdist.data.datasets import DatasetError
    from cepdist.envs.environments import make_env
    from cepdist.envs.generate import AgentPolicy, ensure_datasets, recipe
    task = get_task("hopper-medium-local")
    env = make_env(task)
    obs = env.reset(seed=0)[0][None].repeat(64, 0)
    torch.manual_seed(0)
    acts = AgentPolicy("sac", "hopper", ZOO, env.action_space, env.observation_space, stochastic=True)(obs)
    assert 0.05 < acts.std(0).mean() < 0.5                     # varies at one state, still a policy
    a = generate(task.name, tmp_path / "a.hdf5", n_rows=300, seed=1, policy_root=ZOO, n_envs=2)
    b = generate(task.name, tmp_path / "b.hdf5", n_rows=300, seed=1, policy_root=ZOO, n_envs=2)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert np.array_equal(fa["actions"][()], fb["actions"][()])
        assert fa["metadata/policies"][()].decode() == recipe("hopper", "medium") == \
            "sac(noise=0.0,share=1.0,stochastic)"
    path = datasets.local_path(task, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(a, path)
    ensure_datasets([task.name], str(tmp_path), policy_dir=str(ZOO))     # current recipe: accepted
    with h5py.File(path, "a") as f:
        del f["metadata/policies"]
        f["metadata/policies"] = "sac(noise=0.0,share=1.0)"                # the deterministic recipe
    with pytest.raises(DatasetError, match=r"generated from 'sac\(noise=0.0,share=1.0\)'.*regenerate it"):
        ensure_datasets([task.name], str(tmp_path), policy_dir=str(ZOO))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_agent_files_load_through_a_restricted_unpickler(tmp_path):
    """A crafted vecnormalize.pkl or a crafted entry of an SB3 zip (which SB3 would hand to cloudpickle) is
    refused before anything in it runs, naming the file and what it tried to load."""
    import base64
    import json
    import pickle
    import zipfile
    from cepdist.envs.generate import RestrictedUnpickler, load_agent
    with pytest.raises(ValueError, match=r"evil\.pkl: refuses to load (posix|os)\.system"):
        RestrictedUnpickler(pickle.dumps(_Evil()), str(tmp_path / "evil.pkl")).load()
    arr = np.arange(3.0)
    assert np.array_equal(RestrictedUnpickler(pickle.dumps({"a": arr}), "ok").load()["a"], arr)
    if not ZOO.is_dir():
        pytest.skip("pretrained agents not available (set CEPDIST_POLICY_DIR)")
    src = ZOO / "sac" / "Hopper-v3_1" / "Hopper-v3.zip"
    bad = tmp_path / "Hopper-v3.zip"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.namelist():
            blob = zin.read(item)
            if item == "data":
                data = json.loads(blob)
                data["ep_info_buffer"][":serialized:"] = base64.b64encode(pickle.dumps(_Evil())).decode()
                blob = json.dumps(data).encode()
            zout.writestr(item, blob)
    from stable_baselines3 import SAC
    with pytest.raises(ValueError, match=r"Hopper-v3\.zip \(ep_info_buffer\): refuses to load (posix|os)\.system"):
        load_agent(SAC, bad, {"lr_schedule": lambda _: 0.0, "replay_buffer_class": None})
