"""AEPO's analytic estimator against ground truth: exact Gaussian posteriors, an exact-posterior Monte-Carlo
oracle for Gaussian mixtures, finite differences of the log-expectation."""
import math

import pytest
import torch

from cepdist.core.analytic import analytic_grad, isotropic_table, interpolate, log_expectation, posterior
from cepdist.core.diffusion import VPSchedule

SCHED = VPSchedule()


@pytest.fixture(autouse=True)
def float64():
    """These checks run in float64; the default is restored so that later test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Mixture:
    """μ = Σ_k π_k N(μ_k, C_k) in d dims: exact ε(at, t), exact posterior μ(a0 | at), and its Monte Carlo."""

    def __init__(self, weights, means, covs):
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.mu = torch.as_tensor(means, dtype=torch.float64)
        self.C = torch.as_tensor(covs, dtype=torch.float64)

    def _marginal(self, alpha, sigma):
        d = self.mu.shape[-1]
        return alpha * self.mu, alpha ** 2 * self.C + sigma ** 2 * torch.eye(d)

    def resp(self, at, alpha, sigma):
        mean, cov = self._marginal(alpha, sigma)
        logp = torch.distributions.MultivariateNormal(mean, cov).log_prob(at[..., None, :])
        return torch.softmax(logp + self.w.log(), -1), mean, cov

    def eps(self, at, alpha, sigma):
        """ε̂ = −σ·∇log p(at) exactly."""
        r, mean, cov = self.resp(at, alpha, sigma)
        comp = torch.linalg.solve(cov, (at[..., None, :] - mean)[..., None])[..., 0]     # [..., k, d]
        return sigma * (r[..., None] * comp).sum(-2)

    def post_sample(self, at, alpha, sigma, n, gen):
        """n draws of a0 ~ μ(a0 | at) for one at [d]."""
        r, _, _ = self.resp(at, alpha, sigma)
        d = self.mu.shape[-1]
        Ci = torch.linalg.inv(self.C)
        P = torch.linalg.inv(Ci + alpha ** 2 / sigma ** 2 * torch.eye(d))                   # [k, d, d]
        m = (P @ ((Ci @ self.mu[..., None])[..., 0] + alpha / sigma ** 2 * at)[..., None])[..., 0]
        k = torch.multinomial(r, n, replacement=True, generator=gen)
        z = torch.randn(n, d, generator=gen)
        return m[k] + (torch.linalg.cholesky(P)[k] @ z[..., None])[..., 0]

    def oracle(self, value, at, alpha, sigma, n=400_000, seed=0):
        """Monte-Carlo Et = log E_post e^V and ∇Et = (α/σ²)(E_π − E_μ) at one at."""
        a0 = self.post_sample(at, alpha, sigma, n, torch.Generator().manual_seed(seed))
        V = value(a0, None)
        E = torch.logsumexp(V, 0) - math.log(n)
        wts = torch.softmax(V, 0)
        return float(E), alpha / sigma ** 2 * ((wts[:, None] * a0).sum(0) - a0.mean(0))


def ab(t):
    t = torch.tensor(float(t))
    return SCHED.alpha(t).reshape(1), SCHED.sigma(t).reshape(1)


def quadratic(b, P, c=0.0):
    b, P = torch.as_tensor(b, dtype=torch.float64), torch.as_tensor(P, dtype=torch.float64)
    return lambda a, s: (a * b).sum(-1) - 0.5 * ((a @ P) * a).sum(-1) + c


def gaussian_exact_E(mix, value_b, value_P, at, alpha, sigma):
    """log E_{N(m,Σ)} e^{bᵀa − ½aᵀPa} in closed form for a one-component mixture."""
    d = at.shape[-1]
    Ci = torch.linalg.inv(mix.C[0])
    Sig = torch.linalg.inv(Ci + alpha ** 2 / sigma ** 2 * torch.eye(d))
    m = Sig @ (Ci @ mix.mu[0] + alpha / sigma ** 2 * at)
    Q = torch.linalg.inv(Sig) + value_P
    h = torch.linalg.solve(Sig, m) + value_b
    return float(0.5 * h @ torch.linalg.solve(Q, h) - 0.5 * m @ torch.linalg.solve(Sig, m)
                 - 0.5 * torch.logdet(Sig @ Q))


@pytest.mark.parametrize("t", [0.05, 0.3, 0.6, 0.9])
def test_gaussian_behaviour_quadratic_value_second_order_is_exact(t):
    mix = Mixture([1.0], [[0.3, -0.2]], [[[0.5, 0.1], [0.1, 0.3]]])
    b, P = torch.tensor([1.0, -0.5]), torch.tensor([[0.8, 0.2], [0.2, 0.4]])
    V = quadratic(b, P)
    alpha, sigma = ab(t)
    at = torch.tensor([[0.4, 0.1], [-0.7, 0.9]])
    eps_of = lambda x: mix.eps(x, alpha, sigma)
    # the Jacobian covariance is the exact posterior covariance for a Gaussian behaviour
    _, S, _ = posterior(eps_of, at, alpha, sigma, "jacobian")
    exact_S = torch.linalg.inv(torch.linalg.inv(mix.C[0]) + alpha ** 2 / sigma ** 2 * torch.eye(2))
    assert torch.allclose(S, exact_S.expand_as(S), atol=1e-10)
    E2, _ = log_expectation(eps_of, V, at, None, alpha, sigma, "jacobian", order=2)
    E1, _ = log_expectation(eps_of, V, at, None, alpha, sigma, "jacobian", order=1)
    for i in range(2):
        exact = gaussian_exact_E(mix, b, P, at[i], alpha, sigma)
        assert abs(float(E2[i]) - exact) < 1e-8
        mc, _ = mix.oracle(V, at[i], alpha, sigma, n=200_000)
        assert abs(mc - exact) < 0.02                        # the oracle agrees with the closed form
        assert float(E1[i]) > exact + 1e-4                   # order 1 overestimates when H ≠ 0 (H = −P)


def test_linear_value_first_order_is_exact():
    mix = Mixture([1.0], [[0.0, 0.5]], [[[0.4, 0.0], [0.0, 0.2]]])
    V = quadratic([0.7, -1.2], torch.zeros(2, 2), c=0.3)
    alpha, sigma = ab(0.5)
    at = torch.tensor([0.2, -0.3])
    E1, _ = log_expectation(lambda x: mix.eps(x, alpha, sigma), V, at, None, alpha, sigma, "jacobian", 1)
    assert abs(float(E1) - gaussian_exact_E(mix, torch.tensor([0.7, -1.2]), torch.zeros(2, 2), at, alpha, sigma)
               - 0.3) < 1e-9


def test_gradient_identity_against_finite_differences():
    """∇Et = (αt/σt²)(E_π[a0|at] − E_μ[a0|at]) for a mixture behaviour and a non-quadratic value, with Et
    itself from the exact posterior by quadrature-free Monte Carlo with common random numbers."""
    mix = Mixture([0.6, 0.4], [[-0.8, 0.2], [0.7, -0.4]], [[[0.05, 0.0], [0.0, 0.08]], [[0.1, 0.03], [0.03, 0.06]]])
    V = lambda a, s: 2.0 * torch.sin(1.5 * a[..., 0]) + a[..., 1] - a[..., 1] ** 2
    alpha, sigma = ab(0.4)
    at = torch.tensor([0.1, 0.05])
    _, grad = mix.oracle(V, at, alpha, sigma, n=400_000)
    # Et by importance sampling of a0 ~ μ with weights N(at; α a0, σ²I): the same a0 for every at
    gen = torch.Generator().manual_seed(3)
    k = torch.multinomial(mix.w, 400_000, replacement=True, generator=gen)
    a0 = mix.mu[k] + (torch.linalg.cholesky(mix.C)[k] @ torch.randn(400_000, 2, 1, generator=gen))[..., 0]

    def E(x):
        logw = -((x - alpha * a0) ** 2).sum(-1) / (2 * sigma ** 2)
        return float(torch.logsumexp(logw + V(a0, None), 0) - torch.logsumexp(logw, 0))
    h = 1e-3
    fd = torch.tensor([(E(at + h * e) - E(at - h * e)) / (2 * h) for e in torch.eye(2)])
    assert torch.allclose(fd, grad, atol=0.05 * float(grad.norm()) + 0.02), (fd, grad)


def test_mixture_error_by_noise_level_within_established_bounds():
    """The Gaussian-posterior target against the exact-posterior oracle on a 2-mode mixture: accurate at
    low noise, approximate at high noise (the bounds below are the measured errors with a margin)."""
    mix = Mixture([0.5, 0.5], [[-0.6, 0.0], [0.6, 0.1]], [[[0.03, 0.0], [0.0, 0.03]]] * 2)
    V = lambda a, s: 3.0 * torch.tanh(2.0 * a[..., 0]) - 2.0 * a[..., 1] ** 2
    gen = torch.Generator().manual_seed(0)
    errors = {}
    for t in (0.05, 0.3, 0.6):
        alpha, sigma = ab(t)
        k = torch.multinomial(mix.w, 12, replacement=True, generator=gen)
        at = alpha * (mix.mu[k] + 0.17 * torch.randn(12, 2, generator=gen)) + sigma * torch.randn(12, 2, generator=gen)
        eps_of = lambda x: mix.eps(x, alpha, sigma)
        est, _ = log_expectation(eps_of, V, at, None, alpha, sigma, "jacobian", order=2)
        truth = torch.tensor([mix.oracle(V, at[i], alpha, sigma, n=100_000, seed=i)[0] for i in range(12)])
        errors[t] = float((est - truth).abs().mean())
    print("mean |Êt − Et| by t:", errors)       # measured: 0.024, 1.79, 4.24 nats
    assert errors[0.05] < 0.05
    assert errors[0.3] < 3.0
    assert errors[0.6] < 7.0
    assert errors[0.6] > 20 * errors[0.05]             # exact as t → 0, approximate at high noise


def test_prior_covariance_is_clipped_and_isotropic_table_matches_exact_variance():
    mix = Mixture([1.0], [[0.1, -0.1]], [[[0.2, 0.0], [0.0, 0.2]]])
    alpha, sigma = ab(0.95)
    at = torch.zeros(3, 2)
    eps_of = lambda x: mix.eps(x, alpha, sigma)
    _, S, _ = posterior(eps_of, at, alpha, sigma, "prior", max_var=1.0)
    assert float(S[0, 0, 0]) == pytest.approx(min(float((sigma / alpha) ** 2), 1.0))
    # the isotropic factor: (σ²/α²)(1 − E‖ε‖²/d) equals the exact posterior variance 1/(1/c + α²/σ²)
    gen = torch.Generator().manual_seed(0)
    a0 = mix.mu[0] + 0.2 ** 0.5 * torch.randn(50_000, 2, generator=gen)
    def eps_of_t(x, t):                                  # the table's rows share their t
        return mix.eps(x, SCHED.alpha(t.flatten()[0]), SCHED.sigma(t.flatten()[0]))
    table = isotropic_table(eps_of_t, a0, SCHED, generator=gen)
    for t in (0.2, 0.5, 0.8):
        a, s = ab(t)
        v = float((s / a) ** 2 * interpolate(table, torch.tensor(t)))
        assert v == pytest.approx(1 / (1 / 0.2 + float(a ** 2 / s ** 2)), rel=0.05)


def test_trained_aepo_energy_gradient_tracks_its_analytic_target():
    """fφ regressed onto Êt (Gaussian behaviour, exact εθ, a value with curvature) learns a gradient that points
    where the analytic guidance (αt/σt²)·δ does, at the noise levels guidance uses."""
    from cepdist.core.guidance import energy_loss
    from cepdist.core.nets import EnergyNet
    torch.manual_seed(0)
    mu, C = torch.tensor([0.2, -0.3]), torch.tensor([[0.3, 0.1], [0.1, 0.2]])
    V = lambda a, s: 2.0 * a[..., 0] - a[..., 1] - 0.5 * (a ** 2).sum(-1)

    def eps_exact(x, alpha, sigma):                      # per-row α, σ shaped like x[..., :1]
        cov = alpha[..., None] ** 2 * C + sigma[..., None] ** 2 * torch.eye(2)
        return sigma * torch.linalg.solve(cov, (x - alpha * mu)[..., None])[..., 0]

    def target(at, t):
        a, s = SCHED.alpha(t)[..., None], SCHED.sigma(t)[..., None]
        return log_expectation(lambda x: eps_exact(x, a, s), V, at, None, a, s, "jacobian", 2)[0]
    f = EnergyNet(2, 0, (64, 64)).double()
    opt = torch.optim.Adam(f.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    L = torch.linalg.cholesky(C)
    for _ in range(800):
        a0 = mu + (L @ torch.randn(512, 2, 1, generator=gen))[..., 0]
        loss = energy_loss("aepo", f, a0[:, None, :], None, target, SCHED, gen)
        opt.zero_grad(); loss.backward(); opt.step()
    cos = []
    for t in (0.05, 0.2, 0.4):
        a, s = ab(t)
        at = a * (mu + (L @ torch.randn(256, 2, 1, generator=gen))[..., 0]) + s * torch.randn(256, 2, generator=gen)
        _, g = analytic_grad(lambda x: eps_exact(x, a.expand(256, 1), s.expand(256, 1)), V, at, None, a, s,
                             "jacobian", 2)
        x = at.clone().requires_grad_(True)
        gf, = torch.autograd.grad(f(x, torch.full((256,), t)).sum(), x)
        cos.append(float(torch.nn.functional.cosine_similarity(gf, g, dim=-1).mean()))
    print("cosine(∇fφ, analytic) at t = 0.05, 0.2, 0.4:", cos)
    assert min(cos) > 0.9
