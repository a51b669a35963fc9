"""Schedule and DPM-Solver++ against closed forms and analytic scores."""
import math

import numpy as np
import pytest
import torch

from cepdist.core.diffusion import VPSchedule
from cepdist.core.solver import make_plan, sample, singlestep_orders

S = VPSchedule()


def test_schedule_identities():
    t = torch.linspace(1e-3, 1, 101, dtype=torch.float64)
    a, s = S.alpha(t), S.sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t))
    # log α at t = 1 is −¼(20 − 0.1) − ½·0.1 by definition
    assert math.isclose(S.log_alpha(1.0), -0.25 * 19.9 - 0.05)
    assert torch.allclose(S.t_of_lam(S.lam(t)), t, atol=1e-10)
    assert all(math.isclose(S.t_of_lam(S.lam(float(x))), float(x), rel_tol=1e-9) for x in t)


def test_singlestep_order_split_sums_to_nfe():
    for steps in range(1, 30):
        for order in (1, 2, 3):
            assert sum(singlestep_orders(steps, order)) == steps
            assert make_plan(S, steps, order, "singlestep").nfe == steps
            assert make_plan(S, steps, order, "multistep").nfe == steps


def test_first_order_is_ddim():
    """One first-order step equals DDIM: x_t = α_t·x̂0 + σ_t·ε̂ with ε̂ the prediction at x_s."""
    torch.manual_seed(0)
    plan = make_plan(S, 1, 1, "multistep", t_start=0.8, t_end=0.3)
    x = torch.randn(64, 3, dtype=torch.float64)
    W = torch.randn(3, 3, dtype=torch.float64)
    eps_fn = lambda x, k: torch.tanh(x @ W)
    y = sample(eps_fn, x, plan)
    eps = eps_fn(x, 0)
    x0 = (x - S.sigma(0.8) * eps) / S.alpha(0.8)
    assert torch.allclose(y, S.alpha(0.3) * x0 + S.sigma(0.3) * eps, atol=1e-12)


def _gaussian_eps(plan, mu, sd):
    def f(x, k):
        a, s = plan.alphas[k], plan.sigmas[k]
        return s * (x - a * mu) / (a * a * sd * sd + s * s)
    return f


@pytest.mark.parametrize("method", ["singlestep", "multistep"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_convergence_order_on_gaussian_flow(method, order):
    """For Gaussian data the probability-flow map is known exactly; halving the step size must divide the
    error by about 2^order."""
    mu, sd = 0.7, 0.3
    x = torch.linspace(-2, 2, 11, dtype=torch.float64)
    errs = []
    for n in (24, 48):
        p = make_plan(S, n, order, method, spacing="logSNR")
        y = sample(_gaussian_eps(p, mu, sd), x, p)
        z = (x - S.alpha(1.0) * mu) / math.sqrt(S.alpha(1.0) ** 2 * sd**2 + S.sigma(1.0) ** 2)
        exact = S.alpha(p.t_end) * mu + math.sqrt(S.alpha(p.t_end) ** 2 * sd**2 + S.sigma(p.t_end) ** 2) * z
        errs.append((y - exact).abs().max().item())
    assert math.log2(errs[0] / errs[1]) > order - 0.4


def _gmm_eps(plan, means, sd, weights):
    """Exact ε for a mixture of isotropic Gaussians: ε = −σ·∇log q_t."""
    def f(x, k):
        a, s = plan.alphas[k], plan.sigmas[k]
        var = a * a * sd * sd + s * s
        d = x[:, None, :] - a * means[None]                       # [N, C, D]
        logp = -0.5 * (d**2).sum(-1) / var + torch.log(weights)
        r = torch.softmax(logp, -1)
        score = -(r[..., None] * d).sum(1) / var
        return -s * score
    return f


# time-uniform steps are coarse in λ near t → 0 and under-disperse sharp modes at small step counts
# (std 0.20 instead of 0.30 at 15 steps here); logSNR spacing is accurate at 30 (singlestep order 2 at 60: its
# final 1st-order step(s), as in the reference, leave a mean error of 0.037 at 30 steps and 0.018 at 60).
@pytest.mark.parametrize("method,order,steps,spacing", [
    ("singlestep", 2, 60, "logSNR"), ("singlestep", 3, 30, "logSNR"), ("multistep", 2, 30, "logSNR"),
    ("multistep", 3, 30, "logSNR"), ("singlestep", 2, 120, "time_uniform")])
def test_solver_reproduces_gaussian_mixture(method, order, steps, spacing):
    torch.manual_seed(1)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    sd = 0.3
    plan = make_plan(S, steps, order, method, spacing)
    x = sample(_gmm_eps(plan, means, sd, w), torch.randn(20000, 2, dtype=torch.float64), plan)
    comp = torch.cdist(x, means).argmin(1)
    for c in range(3):
        xc = x[comp == c]
        assert abs(len(xc) / len(x) - w[c].item()) < 0.015
        assert torch.allclose(xc.mean(0), means[c], atol=0.03)
        # t_end = 1e-3 leaves σ ≈ 0.01 of extra spread: negligible against sd
        assert xc.std(0).sub(sd).abs().max() < 0.03


def reference_dpm_solver_pp_2s(eps_at, x, steps, t_T=1.0, t_0=1e-3):
    """The reference sampler written out directly (QGPO's DPM-Solver++, singlestep, order 2, time-uniform,
    "dpmsolver" update): `steps` equal steps in t; 2nd-order steps whose midpoint is the next grid point,
    then one 1st-order step (odd count) or two (even count)."""
    orders = [2] * (steps // 2) + [1] if steps % 2 else [2] * (steps // 2 - 1) + [1, 1]
    grid = np.linspace(t_T, t_0, steps + 1)
    outer = grid[np.cumsum([0] + orders)]
    x0 = lambda x, t: (x - S.sigma(t) * eps_at(x, t)) / S.alpha(t)
    for o, s, t in zip(orders, outer[:-1], outer[1:]):
        h = S.lam(t) - S.lam(s)
        m_s = x0(x, s)
        if o == 1:
            x = S.sigma(t) / S.sigma(s) * x - S.alpha(t) * math.expm1(-h) * m_s
        else:
            s1 = np.linspace(s, t, 3)[1]
            r1 = (S.lam(s1) - S.lam(s)) / h
            x_s1 = S.sigma(s1) / S.sigma(s) * x - S.alpha(s1) * math.expm1(-r1 * h) * m_s
            m_s1 = x0(x_s1, s1)
            x = (S.sigma(t) / S.sigma(s) * x - S.alpha(t) * math.expm1(-h) * m_s
                 - 0.5 / r1 * S.alpha(t) * math.expm1(-h) * (m_s1 - m_s))
    return x


@pytest.mark.parametrize("steps", [1, 2, 5, 6, 10, 15, 16])
def test_default_plan_reproduces_the_reference_sampler_exactly(steps):
    means = torch.tensor([[-1.0, 0.2], [1.0, -0.3]], dtype=torch.float64)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    sd = 0.1

    def eps_at(x, t):
        a, s = S.alpha(t), S.sigma(t)
        var = a * a * sd * sd + s * s
        d = x[:, None, :] - a * means[None]
        r = torch.softmax(-0.5 * (d**2).sum(-1) / var + torch.log(w), -1)
        return s * (r[..., None] * d).sum(1) / var
    x = torch.randn(4000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plan = make_plan(S, steps)
    ours = sample(lambda z, k: eps_at(z, plan.times[k]), x, plan)
    ref = reference_dpm_solver_pp_2s(eps_at, x, steps)
    assert torch.allclose(ours, ref, atol=1e-9, rtol=0), (ours - ref).abs().max()


def test_the_reference_grid_ends_where_the_reference_does():
    """15 steps: the last network call is at the 15th point of the 16-point grid, t ≈ 0.068 (σ ≈ 0.23), not at
    the 8-interval grid's t ≈ 0.126 (σ ≈ 0.40) of the alternative grid="outer"."""
    ref = make_plan(S, 15)
    assert math.isclose(ref.times[-1], np.linspace(1, 1e-3, 16)[14]) and abs(ref.sigmas[-1] - 0.23) < 0.01
    assert np.allclose(ref.times, np.linspace(1, 1e-3, 16)[:15])          # every call on the 16-point grid
    alt = make_plan(S, 15, grid="outer", update="taylor")
    assert abs(alt.times[-1] - 0.126) < 0.002 and abs(alt.sigmas[-1] - 0.40) < 0.01
    with pytest.raises(ValueError, match="grid"):
        make_plan(S, 15, grid="coarse")
    with pytest.raises(ValueError, match="update"):
        make_plan(S, 15, update="euler")


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        make_plan(S, 10, 4)
    with pytest.raises(ValueError, match="method"):
        make_plan(S, 10, 2, "onestep")
    with pytest.raises(ValueError, match="spacing"):
        make_plan(S, 10, 2, "singlestep", spacing="quadratic")


def test_logsnr_spacing_keeps_a_narrow_action_spread_that_the_reference_grid_shrinks():
    """Per-state action spreads of locomotion data are ≈0.15 (hopper-medium-local's agent: 0.11–0.17 per
    dimension). With an exact score, 15 time-uniform steps (the reference) return 0.6 of that spread: the last
    call at σ ≈ 0.23 is wider than the distribution, and its first-order step lands on E[x0 | x_t]. 15 steps
    uniform in log-SNR keep > 0.9 of it, which is why the CPU preset samples that way."""
    from cepdist.distributed.presets import preset
    sd, means, w = 0.15, torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    ratio = {}
    for spacing in ("time_uniform", "logSNR"):
        plan = make_plan(S, 15, spacing=spacing)
        x = sample(_gmm_eps(plan, means, sd, w),
                   torch.randn(20000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), plan)
        assert torch.allclose(x.mean(0), means[0], atol=0.005)
        ratio[spacing] = (x.std(0) / sd).mean().item()
    assert 0.55 < ratio["time_uniform"] < 0.65 and 0.9 < ratio["logSNR"] < 1.0, ratio
    local, paper = preset("local").base, preset("paper").base
    assert local.sampler.spacing == local.support.solver.spacing == "logSNR"
    assert paper.sampler.spacing == paper.support.solver.spacing == "time_uniform"     # the reference's


def test_logsnr_training_times_are_uniform_in_lambda_and_bad_names_are_refused():
    from scipy import stats
    g = torch.Generator().manual_seed(0)
    t = S.sample_t(20_000, generator=g, spacing="logSNR").double()
    assert float(t.min()) >= S.t_eps and float(t.max()) <= S.t_max
    lo, hi = S.lam(torch.tensor(S.t_max, dtype=torch.float64)), S.lam(torch.tensor(S.t_eps, dtype=torch.float64))
    u = ((S.lam(t) - lo) / (hi - lo)).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # many draws at small t, where uniform-in-t draws are rare: P(t < 0.1) ≈ 0.36 against 0.1
    assert 0.32 < float((t < 0.1).double().mean()) < 0.40
    tu = S.sample_t(20_000, generator=g)
    assert stats.kstest(((tu - S.t_eps) / (S.t_max - S.t_eps)).numpy(), "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="time_uniform.*logSNR"):
        S.sample_t(4, spacing="lognormal")
