"""Lockstep evaluation on real MuJoCo environments."""
import numpy as np

from cepdist.algos.qgpo.config import BehaviorConfig, EnergyConfig
from cepdist.algos.qgpo.policy import GuidedPolicy
from cepdist.algos.qgpo.stages import build_behavior, build_energy
from cepdist.data.tasks import get_task
from cepdist.envs.evaluation import all_pairs, evaluate


def tiny_policy(seed=0, task="hopper-medium-local", with_energy=False):
    task = get_task(task)
    beh = build_behavior(BehaviorConfig(widths=(16, 8, 4)), task.obs_dim, task.act_dim, seed)
    energy = build_energy(EnergyConfig(hidden=(8,)), task.obs_dim, task.act_dim, seed)
    return (GuidedPolicy(beh, energy=energy), task) + ((energy,) if with_energy else ())


def test_results_do_not_depend_on_how_pairs_are_batched():
    policy, task = tiny_policy()
    full = evaluate(policy, task, [0.0, 2.0], episodes=3, seed=5, max_steps=40)
    assert full.returns.shape == (2, 3) and not np.isnan(full.returns).any()
    pairs = all_pairs(2, 3)
    a = evaluate(policy, task, [0.0, 2.0], 3, seed=5, pairs=pairs[::2], max_steps=40)
    b = evaluate(policy, task, [0.0, 2.0], 3, seed=5, pairs=pairs[1::2], max_steps=40)
    merged = a.merge(b)
    assert np.allclose(merged.returns, full.returns, atol=1e-4)
    assert full.env_steps == merged.env_steps == int(full.lengths.sum())
    assert np.allclose(full.normalized, task.normalized_score(full.returns))
    s = full.summary()
    assert set(s) == {"score_w0", "score_w0_se", "return_w0", "score_w2", "score_w2_se", "return_w2"}
    assert np.isclose(s["return_w2"], full.returns[1].mean())


def test_same_episode_seed_across_scales_starts_in_the_same_state():
    """With w = 0 twice, both scales see the same reset and the same sampler noise → identical returns."""
    policy, task = tiny_policy()
    r = evaluate(policy, task, [0.0, 0.0], episodes=2, seed=1, max_steps=30)
    assert np.allclose(r.returns[0], r.returns[1])
    assert not np.isclose(r.returns[0, 0], r.returns[0, 1])


def test_actor_pool_and_in_process_pool_match_direct_evaluation():
    import ray
    from cepdist.config import to_dict
    from cepdist.distributed.pool import EvalPool, policy_payload
    policy, task, energy = tiny_policy(with_energy=True)
    dims = {"state_dim": task.obs_dim, "action_dim": task.act_dim}
    payload = policy_payload(
        {"config": to_dict(BehaviorConfig(widths=(16, 8, 4))), "model": policy.behavior.state_dict(), **dims},
        "cep", policy.solver,
        energy={"config": {**to_dict(EnergyConfig(hidden=(8,))), "schedule": [0.1, 20.0]},
                "energy": energy.state_dict(), **dims})
    direct = evaluate(policy, task, [0.0, 2.0], episodes=3, seed=4, max_steps=25)
    local = EvalPool(0).evaluate(payload, task.name, [0.0, 2.0], 3, seed=4, max_steps=25)
    assert np.allclose(local.returns, direct.returns, atol=1e-4)
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        pool = EvalPool(2)
        remote = pool.evaluate(payload, task.name, [0.0, 2.0], 3, seed=4, max_steps=25)
        pool.close()
    finally:
        ray.shutdown()
    assert np.allclose(remote.returns, direct.returns, atol=1e-4)


def test_a_behaviour_only_policy_evaluates_at_w0_and_refuses_other_scales():
    import pytest
    policy, task = tiny_policy()
    bc = GuidedPolicy(policy.behavior)
    r = evaluate(bc, task, [0.0], episodes=2, seed=3, max_steps=20)
    assert np.allclose(r.returns, evaluate(policy, task, [0.0], episodes=2, seed=3, max_steps=20).returns, atol=1e-4)
    with pytest.raises(ValueError, match="needs a trained energy model"):
        evaluate(bc, task, [0.0, 1.0], episodes=1, seed=3, max_steps=5)
