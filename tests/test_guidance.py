"""Guidance against ground truth: analytic tilts of a Gaussian, and trained fφ against Monte-Carlo ∇E_t."""
import math

import pytest
import torch
from torch import nn

from cepdist.core.diffusion import VPSchedule
from cepdist.core.guidance import EnergyGuidance, cep_loss, energy_loss, guided_sample
from cepdist.core.nets import EnergyNet
from cepdist.core.solver import make_plan

S = VPSchedule()
MU, SD = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.6


class GaussianBehavior(nn.Module):
    """Analytic raw head (−ε = σ·score) of q0 = N(MU, SD²·I), in the ScoreNet sampling interface."""
    action_dim = 2

    def block_conditions(self, t, s):
        return [t]

    def trunk(self, x, conds):
        t = conds[0]
        a, s = S.alpha(t), S.sigma(t)
        return -s * (x - a * MU) / (a * a * SD**2 + s * s)


class AnalyticEnergy:
    """f_t = −E_t in closed form for the Gaussian q0: linear energy E = −c·x (c given) or quadratic
    E = (k/2)‖x‖². Provides the EnergyNet guidance interface (condition, grad_action)."""

    def __init__(self, beta, c=None, k=None):
        self.beta, self.c, self.k = beta, c, k

    def condition(self, t, s):
        return t

    def grad_action(self, x, t):
        a, s = S.alpha(t), S.sigma(t)
        gain = a * SD**2 / (a * a * SD**2 + s * s)             # d m / d x_t of the posterior mean
        if self.c is not None:
            return self.beta * self.c * gain
        v = SD**2 * s * s / (a * a * SD**2 + s * s)              # posterior variance
        m = MU + gain * (x - a * MU)
        return -self.beta * self.k * m * gain / (1 + self.beta * self.k * v)


def _guided(energy, n=40000, w=1.0):
    torch.manual_seed(0)
    plan = make_plan(S, 30, 2, "singlestep", "logSNR")
    torch.set_default_dtype(torch.float64)
    try:
        return guided_sample(GaussianBehavior(), plan, None, n, EnergyGuidance(energy), w, device="cpu")
    finally:
        torch.set_default_dtype(torch.float32)


def test_exact_guidance_reaches_linear_tilt():
    """q0·exp(β c·x) = N(μ + β·SD²·c, SD²)."""
    c, beta = torch.tensor([1.0, 0.5], dtype=torch.float64), 2.0
    x = _guided(AnalyticEnergy(beta, c=c))
    assert torch.allclose(x.mean(0), MU + beta * SD**2 * c, atol=0.02)
    assert torch.allclose(x.std(0), torch.full((2,), SD, dtype=torch.float64), atol=0.02)


def test_exact_guidance_reaches_quadratic_tilt():
    """q0·exp(−β(k/2)‖x‖²) = N(μ/(1 + βk SD²), SD²/(1 + βk SD²))."""
    beta, k = 3.0, 1.0
    x = _guided(AnalyticEnergy(beta, k=k))
    prec = 1 + beta * k * SD**2
    assert torch.allclose(x.mean(0), MU / prec, atol=0.02)
    assert torch.allclose(x.std(0), torch.full((2,), SD / math.sqrt(prec), dtype=torch.float64), atol=0.02)


def test_guidance_scale_zero_is_behaviour_and_scale_flips_sign():
    c = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x0 = _guided(AnalyticEnergy(2.0, c=c), w=0.0)
    assert torch.allclose(x0.mean(0), MU, atol=0.02)
    xm = _guided(AnalyticEnergy(2.0, c=c), w=-1.0)
    assert xm.mean(0)[0] < MU[0] - 0.5


def test_cep_loss_is_cross_entropy_of_softmaxes():
    f, tgt = torch.randn(5, 7), torch.randn(5, 7)
    p, q = torch.softmax(tgt, -1), torch.softmax(f, -1)
    assert torch.allclose(cep_loss(f, tgt), -(p * q.log()).sum(-1).mean(), atol=1e-6)
    # minimised (= entropy of the labels) when the logits equal the targets up to a constant per group
    assert torch.allclose(cep_loss(tgt + 3.0, tgt), -(p * p.log()).sum(-1).mean(), atol=1e-6)


# ------------------------------------------------ trained energy models vs Monte-Carlo ground truth
def _toy_q0(n, g):
    """1-D mixture ±1 (std 0.2); value e(x) = x, so the exact E_t needs the posterior's full shape."""
    sign = torch.randint(0, 2, (n, 1), generator=g) * 2.0 - 1.0
    return sign + 0.2 * torch.randn(n, 1, generator=g)


def _mc_grad(xt, t, beta, pool):
    """∇ log E_{q(x0|xt)}[exp(β e(x0))] = E_{w·e^{βe}}[∇log w] − E_w[∇log w], w_i = N(xt; α x0_i, σ²)."""
    a, s = S.alpha(t), S.sigma(t)
    logw = -0.5 * (xt[:, None] - a * pool[None, :]) ** 2 / s**2          # [P, N]
    dlogw = -(xt[:, None] - a * pool[None, :]) / s**2
    w1 = torch.softmax(logw, -1)
    w2 = torch.softmax(logw + beta * pool[None, :], -1)
    return (w2 * dlogw).sum(-1) - (w1 * dlogw).sum(-1)


def _train(method, beta, steps=2500, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    f = EnergyNet(1, 0, hidden=(64, 64, 64))
    opt = torch.optim.Adam(f.parameters(), lr=2e-3)
    for _ in range(steps):
        x0 = _toy_q0(32 * 64, g).view(32, 64, 1)                 # 32 groups of K = 64, one t per group
        loss = energy_loss(method, f, x0, None, beta * x0[..., 0], S, generator=g)
        opt.zero_grad(); loss.backward(); opt.step()
    return f


@pytest.mark.slow
def test_cep_gradient_matches_monte_carlo_and_mse_does_not():
    beta = 3.0
    cep, mse = _train("cep", beta), _train("mse", beta)
    g = torch.Generator().manual_seed(123)
    pool = _toy_q0(200_000, g)[:, 0].double()
    errs = {}
    for t in (0.2, 0.35, 0.5):
        xt = S.alpha(t) * _toy_q0(400, g)[:, 0].double() + S.sigma(t) * torch.randn(400, generator=g).double()
        truth = _mc_grad(xt, t, beta, pool)
        for name, f in (("cep", cep), ("mse", mse)):
            x = xt.float()[:, None].requires_grad_(True)
            grad, = torch.autograd.grad(f(x, torch.full((400,), t)).sum(), x)
            errs[name, t] = ((grad[:, 0].double() - truth).norm() / truth.norm()).item()
    for t in (0.2, 0.35, 0.5):
        assert errs["cep", t] < 0.35, errs
        assert errs["mse", t] > 2 * errs["cep", t], errs


def test_dps_is_exact_for_gaussian_data_and_linear_energy():
    """With the exact score of a Gaussian q0, x̂0(x_t) is affine and ∇ β c·x̂0 equals ∇(−E_t): DPS must
    then reach the linear tilt too (it differs from CEP only when x̂0 or the energy is nonlinear)."""
    from cepdist.core.guidance import DPSGuidance
    c, beta = torch.tensor([1.0, 0.5], dtype=torch.float64), 2.0
    torch.manual_seed(0)
    plan = make_plan(S, 30, 2, "singlestep", "logSNR")
    torch.set_default_dtype(torch.float64)
    try:
        x = guided_sample(GaussianBehavior(), plan, None, 40000, DPSGuidance(lambda a, s: beta * (a * c).sum(-1)),
                          1.0, device="cpu")
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.allclose(x.mean(0), MU + beta * SD**2 * c, atol=0.02)
    assert torch.allclose(x.std(0), torch.full((2,), SD, dtype=torch.float64), atol=0.02)


def test_logsnr_training_times_teach_fphi_a_narrow_distribution_that_uniform_times_barely_do():
    """One state's actions are narrow (sd 0.05 here, 0.11-0.17 on hopper): CEP's labels are identifiable from
    the noised actions only at small t, which t ~ U(1e-3, 1) rarely draws. Same steps, same data: the label KL
    at small t must fall far more with t uniform in λ."""
    beta, sd = 20.0, 0.05

    def groups(g):
        return sd * torch.randn(64, 8, 1, generator=g)

    def label_kl(f, t, g):
        x0 = groups(g)
        xt = S.noise(x0, torch.full((64,), t), torch.randn(x0.shape, generator=g))
        with torch.no_grad():
            logits = f(xt, torch.full((64, 1), t))
        p = torch.log_softmax(beta * x0[..., 0], -1)
        return float((p.exp() * (p - torch.log_softmax(logits, -1))).sum(-1).mean())

    kl = {}
    for spacing in ("time_uniform", "logSNR"):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        f = EnergyNet(1, 0, hidden=(64, 64))
        opt = torch.optim.Adam(f.parameters(), lr=2e-3)
        for _ in range(300):
            x0 = groups(g)
            loss = energy_loss("cep", f, x0, None, beta * x0[..., 0], S, generator=g, t_sampling=spacing)
            opt.zero_grad(); loss.backward(); opt.step()
        kl[spacing] = sum(label_kl(f, 0.01, g) for _ in range(10)) / 10
    g = torch.Generator().manual_seed(1)
    x0 = groups(g)
    p = torch.log_softmax(beta * x0[..., 0], -1)
    flat = float((p.exp() * (p + math.log(8))).sum(-1).mean())       # KL of constant logits
    assert kl["logSNR"] < 0.5 * flat, (kl, flat)
    assert kl["logSNR"] < 0.6 * kl["time_uniform"], (kl, flat)
