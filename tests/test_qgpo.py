"""QGPO stages end to end on a generated bandit with a known optimum; checkpoints, resume, guards."""

import numpy as np
import pytest
import torch

from cepdist.algos.loop import NonFiniteLossError
from cepdist.algos.qgpo.config import (BehaviorConfig, EnergyConfig, QConfig, QGPOConfig, ScheduleConfig,
                                       SupportConfig)
from cepdist.algos.qgpo.policy import GuidedPolicy, load_policy, run_qgpo
from cepdist.algos.qgpo.stages import generate_support, load_energy, state_table, train_behavior, train_q
from cepdist.config import dump_yaml, from_dict, load_yaml, merge, replace, to_dict
from cepdist.data.transitions import Transitions, episode_returns, preprocess_rewards
from helpers import Stop, bandit_dataset, stop_at


def small_cfg(**over) -> QGPOConfig:
    cfg = QGPOConfig(behavior=BehaviorConfig(widths=(128, 64, 32), steps=1500, batch_size=256, lr=1e-3,
                                             log_every=250, ckpt_every=500),
                     support=SupportConfig(K=16, batch_states=2048),
                     q=QConfig(hidden=(64, 64), steps=750, batch_size=128, lr=1e-3, reward="none", log_every=250,
                               ckpt_every=500),
                     energy=EnergyConfig(hidden=(64, 64), steps=1500, batch_size=128, beta=5.0, lr=1e-3,
                                         log_every=250, ckpt_every=500))
    return replace(cfg, **over)


def reward(a, s):
    g = torch.where(s[:, :1] > 0, 0.6, -0.6)
    return (1 - ((a - g) ** 2).sum(1)).mean().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("qgpo")
    data, _ = bandit_dataset()
    policy = run_qgpo(small_cfg(), data, out)
    return policy, out


@pytest.mark.slow
def test_guided_policy_beats_behaviour_cloning(trained):
    policy, _ = trained
    s = torch.tensor(np.random.default_rng(1).uniform(-1, 1, (1000, 2)), dtype=torch.float32)
    r0 = reward(policy(s, w=0.0), s)
    r3 = reward(policy(s, w=3.0), s)
    # behaviour: half the actions in the wrong mode → mean reward ≈ 0.5·0.98 + 0.5·(1 − 2·1.2²) ≈ −0.46
    assert -0.8 < r0 < -0.1
    assert r3 > 0.6                       # guidance picks the good mode for most states


@pytest.mark.slow
def test_the_policy_temperature_scales_its_starting_noise(trained):
    _, out = trained
    s = torch.tensor(np.random.default_rng(2).uniform(-1, 1, (500, 2)), dtype=torch.float32)
    z = torch.randn(len(s), 1, 2, generator=torch.Generator().manual_seed(0))
    exact = load_policy(out / "behavior.pt", "cep", seed=0)
    cold = load_policy(out / "behavior.pt", "cep", seed=0, temperature=0.4)
    assert torch.allclose(cold(s, w=0.0, x_init=z), exact(s, w=0.0, x_init=0.4 * z))
    assert not torch.allclose(cold(s, w=0.0, x_init=z), exact(s, w=0.0, x_init=z), atol=1e-2)


@pytest.mark.slow
def test_checkpoints_are_weights_only_and_reload_identically(trained):
    policy, out = trained
    for name in ("behavior.pt", "support.pt", "q.pt", "energy.pt"):
        ck = torch.load(out / name, weights_only=True)
        assert "config" in ck and ck["kind"] == name.split(".")[0]
    reloaded = load_policy(out / "behavior.pt", "cep", energy=out / "energy.pt", seed=7)
    fresh = GuidedPolicy(policy.behavior, energy=load_energy(out / "energy.pt"), seed=7)
    s = torch.rand(50, 2) * 2 - 1
    assert torch.equal(reloaded(s, w=2.0), fresh(s, w=2.0))
    # guidance scales per state in one batch equal separate calls with the same noise
    a_sep = GuidedPolicy(policy.behavior, energy=load_energy(out / "energy.pt"), seed=3)(s, w=2.0)
    a_vec = GuidedPolicy(policy.behavior, energy=load_energy(out / "energy.pt"), seed=3)(s, w=torch.full((50,), 2.0))
    assert torch.allclose(a_sep, a_vec, atol=1e-6)


def test_same_seed_same_numbers_and_resume_after_interruption(tmp_path):
    data, _ = bandit_dataset(1000)
    cfg = BehaviorConfig(widths=(32, 16, 8), steps=60, batch_size=64, log_every=10, ckpt_every=20)
    a = train_behavior(cfg, data.obs, data.actions, seed=3)
    b = train_behavior(cfg, data.obs, data.actions, seed=3)
    c = train_behavior(cfg, data.obs, data.actions, seed=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)

    class Stop(Exception):
        pass

    def interrupt(stage, step, metrics, ckpt):
        if step == 40:
            raise Stop
    ck = tmp_path / "behavior.pt"
    with pytest.raises(Stop):
        train_behavior(cfg, data.obs, data.actions, seed=3, ckpt_path=ck, callback=interrupt)
    assert torch.load(ck, weights_only=True)["step"] == 40
    steps_seen = []
    resumed = train_behavior(cfg, data.obs, data.actions, seed=3, ckpt_path=ck,
                             callback=lambda st, step, m, ck: steps_seen.append(step))
    assert steps_seen[0] == 50                     # continued, not restarted
    assert torch.equal(torch.cat([p.flatten() for p in resumed.parameters()]), pa)
    # the compute of the finished stage counts its interrupted run: the CPU seconds carried in the checkpoint
    with pytest.raises(Stop):
        train_behavior(cfg, data.obs, data.actions, seed=3, ckpt_path=tmp_path / "b2.pt", callback=interrupt)
    first = torch.load(tmp_path / "b2.pt", weights_only=True)["cpu_seconds"]
    seen = {}
    train_behavior(cfg, data.obs, data.actions, seed=3, ckpt_path=tmp_path / "b2.pt",
                   callback=lambda st, step, m, ck: seen.update(m))
    final = torch.load(tmp_path / "b2.pt", weights_only=True)["cpu_seconds"]
    assert 0 < first < final and abs(seen["behavior/cpu_seconds"] - final) < 0.5


def test_ema_samples_with_the_average_and_resumes_with_the_cosine_schedule(tmp_path):
    """behavior.ema keeps a moving average (what load_behavior returns and the policy samples with), equal to
    the recursion computed by hand; the cosine schedule ends at 0; an interrupted run resumes both exactly."""
    from cepdist.algos.qgpo.stages import load_behavior
    data, _ = bandit_dataset(1000)
    cfg = BehaviorConfig(widths=(16, 8, 4), steps=30, batch_size=64, lr=1e-2, ema=0.9, lr_schedule="cosine",
                         log_every=10, ckpt_every=10)
    raw = replace(cfg, ema=0.0)
    seen = {}

    def spy(stage, step, metrics, ck):
        if ck is not None:
            seen[step] = torch.load(ck, weights_only=True)
    full = train_behavior(cfg, data.obs, data.actions, seed=1, ckpt_path=tmp_path / "a.pt", callback=spy)
    plain = train_behavior(raw, data.obs, data.actions, seed=1)
    ck = seen[30]
    flat = lambda sd: torch.cat([v.flatten() for v in sd.values()])
    assert torch.equal(flat(ck["model"]), flat(plain.state_dict()))        # the EMA does not change training
    assert not torch.allclose(flat(ck["ema"]), flat(ck["model"]))
    assert torch.equal(flat(load_behavior(ck).state_dict()), flat(ck["ema"]))
    assert torch.equal(flat(full.state_dict()), flat(ck["ema"]))
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # the average by hand (constant rate, so shorter runs follow the same path): from the initial weights,
    # e ← e + (1 − d_i)(θ_{i+1} − e) with d_i = min(0.9, (1+i)/(10+i))
    const = replace(cfg, lr_schedule="constant", steps=12)
    avg = flat(train_behavior(const, data.obs, data.actions, seed=1).state_dict())
    e = flat(train_behavior(replace(const, steps=0, ema=0.0), data.obs, data.actions, seed=1).state_dict())
    for i in range(12):
        theta = flat(train_behavior(replace(const, steps=i + 1, ema=0.0), data.obs, data.actions, seed=1).state_dict())
        e = e + (1 - min(0.9, (1 + i) / (10 + i))) * (theta - e)
    assert torch.allclose(e, avg, atol=1e-5)
    with pytest.raises(Stop):
        train_behavior(cfg, data.obs, data.actions, seed=1, ckpt_path=tmp_path / "b.pt", callback=stop_at(20))
    resumed = train_behavior(cfg, data.obs, data.actions, seed=1, ckpt_path=tmp_path / "b.pt")
    assert torch.equal(flat(resumed.state_dict()), flat(ck["ema"]))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data, _ = bandit_dataset(1000)
    cfg = small_cfg(**{"q.steps": 300, "q.log_every": 50, "q.ckpt_every": 100, "behavior.steps": 20})
    beh = train_behavior(cfg.behavior, data.obs, data.actions)
    sup = generate_support(cfg.support, beh, data)

    def poison(stage, step, metrics, ckpt):
        if step == 100:
            data.rewards[:] = float("nan")
    ck = tmp_path / "q.pt"
    with pytest.raises(NonFiniteLossError, match=r"q: non-finite q_loss.*between steps 100 and 150.*step 100"):
        train_q(cfg.q, data, sup, ckpt_path=ck, callback=poison)
    kept = torch.load(ck, weights_only=True)
    assert kept["step"] == 100
    assert all(torch.isfinite(v).all() for v in kept["q"].values())


def test_resume_refuses_checkpoint_of_another_config(tmp_path):
    data, _ = bandit_dataset(500)
    cfg = BehaviorConfig(widths=(16, 8, 4), steps=10, batch_size=32, ckpt_every=10)
    train_behavior(cfg, data.obs, data.actions, ckpt_path=tmp_path / "b.pt")
    with pytest.raises(ValueError, match="different config"):
        train_behavior(replace(cfg, lr=1e-3), data.obs, data.actions, ckpt_path=tmp_path / "b.pt")


def test_state_table_reuses_next_states():
    obs = torch.arange(10.0).view(5, 2)
    nxt = torch.cat([obs[1:], torch.tensor([[99.0, 99.0]])])
    nxt[1] = torch.tensor([-1.0, -1.0])        # an episode boundary: s'_1 is not s_2
    d = Transitions(obs, torch.zeros(5, 1), torch.zeros(5), nxt, torch.zeros(5), torch.zeros(5, dtype=bool))
    table, oi, ni = state_table(d)
    assert torch.equal(table[oi], obs) and torch.equal(table[ni], nxt)
    assert table.shape[0] == 7


def test_config_round_trip_and_errors():
    cfg = QGPOConfig()
    assert cfg.behavior.steps == 600_000 and cfg.energy.beta == 3.0 and cfg.support.K == 16
    assert cfg.q.steps == 500_000 and cfg.energy.steps == 1_000_000 and cfg.q.beta_q == 1.0
    assert cfg.sampler.steps == 15 and cfg.sampler.order == 2 and cfg.behavior.schedule.beta_max == 20.0
    assert from_dict(QGPOConfig, to_dict(cfg)) == cfg
    assert load_yaml(QGPOConfig, dump_yaml(cfg)) == cfg
    assert replace(cfg, **{"energy.beta": 10.0}).energy.beta == 10.0
    assert isinstance(from_dict(QGPOConfig, {"energy": {"beta": 10}}).energy.beta, float)   # YAML's 10 → 10.0
    with pytest.raises(ValueError, match=r"energy\.betta"):
        from_dict(QGPOConfig, {"energy": {"betta": 1}})
    with pytest.raises(ValueError, match="unknown config key"):
        replace(cfg, **{"energy.nope": 1})
    # a deep merge changes only the keys a partial section names
    merged = from_dict(QGPOConfig, merge(to_dict(cfg), {"energy": {"beta": 7}, "behavior": {"schedule": {"beta_max": 10}}}))
    assert merged.energy.beta == 7.0 and merged.energy.steps == 1_000_000
    assert merged.behavior.schedule == ScheduleConfig(0.1, 10.0) and merged.behavior.lr == 1e-4


def test_reward_preprocessing():
    r = np.array([1.0, 2.0, 3.0, 10.0, 0.5, 4.0])
    ends = np.array([0, 0, 1, 1, 0, 1], dtype=bool)      # returns 6, 10, 4.5
    assert np.allclose(episode_returns(r, ends), [6.0, 10.0, 4.5])
    d = Transitions.from_numpy(np.zeros((6, 1)), np.zeros((6, 1)), r, np.zeros((6, 1)), np.zeros(6), ends)
    assert torch.allclose(preprocess_rewards(d, "locomotion").rewards, torch.tensor(r * 1000 / 5.5, dtype=torch.float32))
    assert torch.allclose(preprocess_rewards(d, "antmaze").rewards, torch.tensor(r - 1, dtype=torch.float32))
    with pytest.raises(ValueError, match="reward preprocessing"):
        preprocess_rewards(d, "mujoco")
    one = Transitions.from_numpy(np.zeros((2, 1)), np.zeros((2, 1)), [1, 1], np.zeros((2, 1)), [0, 0], [0, 1])
    with pytest.raises(ValueError, match="two complete episodes"):
        preprocess_rewards(one, "locomotion")


def test_a_diverging_loss_fails_the_stage_and_a_retry_keeps_the_last_good_checkpoint(tmp_path):
    """Q at lr 1e3 stays finite but explodes: the divergence guard (loss over 1e6× its first logged value)
    stops it like a non-finite loss. A resumed run that then fails names the checkpoint it resumed from."""
    from cepdist.algos.loop import DivergedLossError
    data, _ = bandit_dataset(1000)
    cfg = small_cfg(**{"q.steps": 400, "q.log_every": 20, "q.ckpt_every": 100, "behavior.steps": 20})
    sup = generate_support(cfg.support, train_behavior(cfg.behavior, data.obs, data.actions), data)
    with pytest.raises(DivergedLossError, match=r"q: q_loss diverged to .* over 1e\+06× its value at the first step"):
        train_q(replace(cfg.q, lr=1e3), data, sup)

    class Stop(Exception):
        pass

    def stop(stage, step, metrics, ckpt):
        if step == 120:
            raise Stop
    ck = tmp_path / "q.pt"
    with pytest.raises(Stop):
        train_q(cfg.q, data, sup, ckpt_path=ck, callback=stop)

    def poison(stage, step, metrics, ckpt):
        data.rewards[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"last good checkpoint: .*q\.pt \(step 100\)"):
        train_q(cfg.q, data, sup, ckpt_path=ck, callback=poison)


def test_a_critic_ensemble_trains_each_twin_on_its_own_target_and_reads_the_min(tmp_path):
    """q.members > 1: independent twin critics, member m's two heads regress r + γ·softmax-value of *its* twin
    min at s'; Q̄ is the min over every head. members = 1 is the reference's twin loss, and its stage key is
    the one it had before the setting existed."""
    from cepdist.algos.qgpo.stages import load_q
    from cepdist.algos.qgpo.config import check
    from cepdist.core.nets import TwinQEnsemble
    from cepdist.core.qlearning import in_support_target, q_loss
    from cepdist.distributed.store import stage_key
    from cepdist.distributed.study import _key_cfg
    torch.manual_seed(0)
    ens = TwinQEnsemble(2, 3, (16,), members=3)
    a, s, nxt = torch.randn(5, 4, 2), torch.randn(5, 3), torch.randn(5, 2)
    r, d = torch.randn(5), torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])
    per = torch.stack([torch.minimum(*t(a, s)) for t in ens.twins])            # [3, 5, 4]
    assert torch.equal(ens.member_min(a, s), per) and torch.equal(ens.min(a, s), per.amin(0))
    y = in_support_target(ens, a, s, r, d, 0.99, 2.0)
    assert y.shape == (3, 5)
    for m in range(3):
        v = (torch.softmax(2.0 * per[m], -1) * per[m]).sum(-1)
        assert torch.allclose(y[m], r + 0.99 * (1 - d) * v)
    mse = [0.5 * sum(((h - y[m]) ** 2).mean() for h in t(nxt, s)) for m, t in enumerate(ens.twins)]
    assert torch.allclose(q_loss(ens, nxt, s, y), sum(mse) / 3)
    twin = ens.twins[0]
    assert torch.allclose(q_loss(twin, nxt, s, y[:1]), mse[0])                # the reference's twin loss
    assert torch.allclose(q_loss(twin, nxt, s, y[0]), mse[0])                 # one y for every head (IQL's)

    assert "members" not in _key_cfg(QConfig()) and _key_cfg(QConfig(members=3))["members"] == 3
    assert stage_key("q", {"cfg": _key_cfg(QConfig())}) == "q-e47887c5aaada35d"   # unchanged by the setting

    data, _ = bandit_dataset(1000)
    cfg = small_cfg(**{"q.steps": 60, "q.ckpt_every": 30, "q.members": 2, "behavior.steps": 20})
    sup = generate_support(cfg.support, train_behavior(cfg.behavior, data.obs, data.actions), data)
    q = train_q(cfg.q, data, sup, ckpt_path=tmp_path / "q.pt")
    back = load_q(tmp_path / "q.pt")
    assert isinstance(back, TwinQEnsemble) and back.members == 2
    x = sup.at_obs(torch.arange(8))
    assert torch.equal(back.min(x, data.obs[:8]), q.min(x, data.obs[:8]))
    assert any("q.members" in e for e in check(replace(cfg, **{"q.members": 0})))


def test_obs_norm_trains_on_standardised_states_and_samples_from_raw_ones(tmp_path):
    """behavior.obs_norm: the network is trained on (s − mean)/std (a constant dimension keeps scale 1), and
    the model it returns, and load_behavior of its checkpoint, take raw states with the same outputs (the
    statistics folded into the state layer). Off, the stage key is the one it had before the setting."""
    from cepdist.algos.qgpo.stages import load_behavior
    from cepdist.distributed.store import stage_key
    from cepdist.distributed.study import _key_cfg
    data, _ = bandit_dataset(1000)
    raw = torch.cat([data.obs * torch.tensor([100.0, 0.01]) + torch.tensor([50.0, -3.0]),
                     torch.full((len(data), 1), 7.0)], 1)                    # scales 100 and 0.01, one constant
    cfg = BehaviorConfig(widths=(16, 8, 4), steps=30, batch_size=64, lr=1e-2, obs_norm=True, log_every=10,
                         ckpt_every=10)
    model = train_behavior(cfg, raw, data.actions, seed=1, ckpt_path=tmp_path / "b.pt")
    o = raw.double().numpy()
    mean, std = o.mean(0), o.std(0, ddof=1)
    std[std < 1e-6] = 1.0
    assert std[2] == 1.0
    by_hand = (raw - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    assert torch.allclose(by_hand.mean(0), torch.tensor([0.0, 0.0, 0.0]), atol=1e-4)
    plain = train_behavior(replace(cfg, obs_norm=False), by_hand, data.actions, seed=1)
    x, t = torch.randn(200, 2), torch.rand(200) * 0.9 + 0.05
    with torch.no_grad():
        want = plain(x, t, by_hand[:200])
        assert torch.allclose(model(x, t, raw[:200]), want, atol=1e-4)
        back = load_behavior(tmp_path / "b.pt")
        assert torch.allclose(back(x, t, raw[:200]), want, atol=1e-4)
        # without the fold the raw states would give other outputs: the test can fail
        assert not torch.allclose(plain(x, t, raw[:200]), want, atol=1e-2)
        # a warm start from it (0 further steps) is the same model, not folded twice
        again = train_behavior(replace(cfg, steps=0), raw, data.actions, seed=1, init=model)
        assert torch.allclose(again(x, t, raw[:200]), want, atol=1e-4)
    ck = torch.load(tmp_path / "b.pt", weights_only=True)
    assert torch.allclose(ck["obs_norm"]["std"], torch.tensor(std, dtype=torch.float32))
    assert "obs_norm" not in _key_cfg(BehaviorConfig()) and _key_cfg(cfg)["obs_norm"] is True
    assert stage_key("behavior", {"cfg": _key_cfg(BehaviorConfig())}) == "behavior-e24f371e9753e8b3"


def test_bf16_q_and_energy_updates_learn_what_fp32_learns_and_keep_their_keys(monkeypatch, caplog):
    """q.precision / energy.precision 'bf16': the updates run under bf16 autocast (the result differs from
    fp32's) with the output layer in fp32 (Q̄ comes out fp32 and exact to its bf16 features), and the
    critic learns the bandit's reward as well as in fp32. At 'fp32' the stage keys are the old ones."""
    from cepdist.algos.qgpo.stages import SupportSet, train_energy
    from cepdist.core.diffusion import VPSchedule
    from cepdist.core.nets import TwinQ
    from cepdist.distributed.store import stage_key
    from cepdist.distributed.study import _key_cfg
    data, g = bandit_dataset(2000)
    n = len(data)
    sup = SupportSet(torch.randn(n, 4, 2) * 0.6, torch.arange(n), torch.arange(n))     # terminal: unused by y
    cfg = small_cfg(**{"q.steps": 600})
    qs = {p: train_q(replace(cfg.q, precision=p), data, sup, seed=3) for p in ("fp32", "bf16")}
    a, s = data.actions[:500], data.obs[:500]
    with torch.no_grad():
        err = {p: (q.min(a, s) - data.rewards[:500]).square().mean().sqrt().item() for p, q in qs.items()}
        assert not torch.equal(qs["fp32"].min(a, s), qs["bf16"].min(a, s))
    assert err["fp32"] < 0.5 * data.rewards.std() and err["bf16"] < err["fp32"] * 1.2 + 0.02, err
    head = TwinQ(2, 2, (32, 32)).q1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = head.act(head.hidden[0](head.act(head.inp(a) + head.cond(s))))
        out = head.forward_projected(a, head.project_cond(s))
    assert out.dtype == torch.float32 and h.dtype == torch.bfloat16
    assert torch.allclose(out, h.float() @ head.out.weight[0] + head.out.bias, atol=1e-5)
    energy = train_energy(replace(cfg.energy, steps=50, precision="bf16"), qs["bf16"], sup, data,
                          VPSchedule(), seed=0)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in energy.parameters())
    assert stage_key("q", {"cfg": _key_cfg(QConfig())}) == "q-e47887c5aaada35d"
    assert stage_key("energy", {"cfg": _key_cfg(EnergyConfig())}) == "energy-4b922b85661bbe74"
    assert _key_cfg(replace(cfg.q, precision="bf16"))["precision"] == "bf16"
    with pytest.raises(ValueError, match="q.precision must be 'fp32' or 'bf16'"):
        train_q(replace(cfg.q, precision="fp16"), data, sup)
    # a CPU without native bf16 (AVX2 only: not this one, so its flag is patched) is told before training
    from cepdist.algos.qgpo import stages
    monkeypatch.setattr(stages, "native_bf16_cpu", lambda: False)
    train_q(replace(cfg.q, precision="bf16", steps=1), data, sup)
    assert "q.precision: bf16 on a CPU without AVX-512 BF16 or AMX" in caplog.text
