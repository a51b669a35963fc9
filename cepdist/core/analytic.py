"""AEPO's analytic estimate of the intermediate energy (a reconstruction from the paper's abstract; see
../shared/reference/aepo.md), batched over any leading dimensions like the rest of the core.

The intermediate energy of the tilted policy π ∝ μ·exp(V), V = β·Q, is the log-expectation
    Et(s, at) = log E_{μ(a0 | at, s)} exp V(s, a0),
and its gradient obeys the exact identity  ∇_at Et = (αt/σt²)·(E_π[a0 | at] − E_μ[a0 | at]).
AEPO approximates the behaviour posterior μ(a0 | at, s) by a Gaussian N(m, Σ) built from the trained εθ:
    m = (at − σt·εθ)/αt                                  (Tweedie; exact)
    Σ: "jacobian"  (σt²/αt²)·(I − σt·∂εθ/∂at)            (second-order Tweedie; symmetrised, eigenvalues ≥ 0)
       "isotropic" (σt²/αt²)·(1 − E‖εθ‖²/d)·I            (the expectation tabulated per t from data)
       "prior"     (σt²/αt²)·I                            (diverges as αt → 0 without the cap)
    each with its eigenvalues capped at max_var (see `posterior`)
and expands V around m (g = ∇V(m), H = ∇²V(m)):
    order 1:  Êt = V(m) + ½·gᵀΣg,               E_π − E_μ ≈ Σg
    order 2:  Êt = V(m) + ½·gᵀ(Σ⁻¹ − H)⁻¹g − ½·log det(I − ΣH),   E_π − E_μ ≈ (Σ⁻¹ − H)⁻¹g
(both exact for a Gaussian posterior with V linear, resp. concave quadratic; H's upward part is dropped). The analytic guidance is then
(αt/σt²)·(E_π − E_μ), which the sampler uses as ∇a f in ε̃ = εθ − w·σt·∇a f.
A ReLU Q (the reference critic) has H = 0 almost everywhere, so order 2 equals order 1 with it."""
from __future__ import annotations

from typing import Callable

import torch

COVARIANCES = ("jacobian", "isotropic", "prior")
ORDERS = (1, 2)

EpsOf = Callable[[torch.Tensor], torch.Tensor]                       # at → εθ(at) (same shape)
Value = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]   # (a [..., d], s) → V = β·Q [...]
# order 2 uses only V's downward curvature: the eigenvalues of A = I − Σ^½ H Σ^½ are floored at 1. Upward
# curvature can make the Gaussian tilt unnormalisable (A singular), and flooring A near 0 instead sent the
# error on a 2-mode mixture from ≈2 to >1000 nats at αt ≈ 0.6 (tests/test_aepo.py)
A_FLOOR = 1.0


def check_options(covariance: str, order: int):
    if covariance not in COVARIANCES:
        raise ValueError(f"aepo covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
    if order not in ORDERS:
        raise ValueError(f"aepo order must be 1 or 2, got {order!r}")


def _jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, create_graph: bool = False):
    """fn(x) and J[..., i, j] = ∂fn_i/∂x_j for a row-wise fn (rows do not interact): d backward passes."""
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        y = fn(xg)
        d = y.shape[-1]
        rows = [torch.autograd.grad(y[..., i].sum(), xg, retain_graph=create_graph or i < d - 1,
                                    create_graph=create_graph)[0] for i in range(d)]
    return y, torch.stack(rows, -2)


def _psd(S: torch.Tensor, max_var: float) -> torch.Tensor:
    S = 0.5 * (S + S.transpose(-1, -2))
    lam, U = torch.linalg.eigh(S)
    return (U * lam.clamp(0.0, max_var).unsqueeze(-2)) @ U.transpose(-1, -2)


def posterior(eps_of: EpsOf, at: torch.Tensor, alpha, sigma, covariance: str = "jacobian",
              iso: torch.Tensor | float | None = None, max_var: float = 1.0):
    """Gaussian approximation N(m, Σ) of μ(a0 | at): m [..., d], Σ [..., d, d], and εθ [..., d].

    alpha, sigma: broadcastable to at[..., :1]; iso (isotropic only): 1 − E‖εθ‖²/d at this t, likewise.
    Σ's eigenvalues are capped at max_var, a bound on the variance of the clean data along any direction
    (1 for actions in [−1, 1]): every estimate of Σ carries the factor σt²/αt² (≈2·10⁴ at t = 1), which
    turns small errors of a learned εθ into posterior variances of 10²–10³ on a toy whose data variance
    is 4 (and AEPO targets of 10⁴ on hopper)."""
    d = at.shape[-1]
    alpha, sigma = (torch.as_tensor(v, device=at.device, dtype=at.dtype) for v in (alpha, sigma))
    eye = torch.eye(d, device=at.device, dtype=at.dtype)
    r = (sigma / alpha) ** 2 * torch.ones_like(at[..., :1])          # [..., 1]
    if covariance == "jacobian":
        eps, J = _jacobian(eps_of, at)
        S = _psd(r[..., None] * (eye - sigma[..., None] * J), max_var)
    else:
        eps = eps_of(at)
        if covariance == "isotropic":
            if iso is None:
                raise ValueError("the isotropic covariance needs 1 − E‖εθ‖²/d at this t (see isotropic_table)")
            v = r * torch.as_tensor(iso, device=at.device, dtype=at.dtype).clamp(0.0, 1.0)
        elif covariance == "prior":
            v = r
        else:
            check_options(covariance, 1)
        S = v.clamp_max(max_var)[..., None] * eye
    m = (at - sigma * eps) / alpha
    return m.detach(), S.detach(), eps.detach()


def tilt(value: Value, s: torch.Tensor | None, m: torch.Tensor, S: torch.Tensor, order: int = 1):
    """The Gaussian-posterior log-expectation Êt = log E_{N(m, Σ)} e^V (Taylor order 1 or 2 around m) and the
    shift of the posterior mean under the tilt, δ ≈ E_π[a0|at] − E_μ[a0|at]. Returns (Êt [...], δ [..., d])."""
    check_options("jacobian", order)
    with torch.enable_grad():
        mg = m.detach().requires_grad_(True)
        V = value(mg, s)
        g, = torch.autograd.grad(V.sum(), mg)
        if order == 2:
            _, H = _jacobian(lambda x: torch.autograd.grad(value(x, s).sum(), x, create_graph=True)[0], mg)
    V, g = V.detach(), g.detach()
    if order == 1:
        delta = (S @ g[..., None])[..., 0]
        return V + 0.5 * (g * delta).sum(-1), delta
    # Σ = L Lᵀ (L = U·√λ), A = I − Lᵀ H L symmetric; (Σ⁻¹ − H)⁻¹ = L A⁻¹ Lᵀ and det(I − ΣH) = det A
    H = 0.5 * (H + H.transpose(-1, -2)).detach()
    lam, U = torch.linalg.eigh(S)
    L = U * lam.clamp_min(0.0).sqrt().unsqueeze(-2)
    A = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype) - L.transpose(-1, -2) @ H @ L
    mu, W = torch.linalg.eigh(A)
    mu = mu.clamp_min(A_FLOOR)
    Ltg = (L.transpose(-1, -2) @ g[..., None])                        # [..., d, 1]
    u = (W.transpose(-1, -2) @ Ltg)[..., 0]                          # Lᵀg in A's eigenbasis
    quad = (u.square() / mu).sum(-1)
    delta = (L @ (W @ (u / mu)[..., None]))[..., 0]
    return V + 0.5 * quad - 0.5 * mu.log().sum(-1), delta


def log_expectation(eps_of: EpsOf, value: Value, at: torch.Tensor, s: torch.Tensor | None, alpha, sigma,
                    covariance: str = "jacobian", order: int = 1, iso=None, max_var: float = 1.0,
                    bounds: tuple | None = None):
    """Êt(s, at) (AEPO's stop-gradient regression target) and δ; see `posterior` and `tilt`.

    bounds=(lo, hi): the range of V over the data. The exact Et = log E e^V lies in it, but the Gaussian
    expansion's ½gᵀΣg leaves it at high noise, where the posterior is wide and multimodal (by 10³–10⁴ nats on
    the 2-D toys at β = 10, which made the regressed fφ useless), so Êt is clipped to it."""
    m, S, _ = posterior(eps_of, at, alpha, sigma, covariance, iso, max_var)
    E, delta = tilt(value, s, m, S, order)
    if bounds is not None:
        E = E.clamp(*bounds)
    return E, delta


def analytic_grad(eps_of: EpsOf, value: Value, at: torch.Tensor, s: torch.Tensor | None, alpha, sigma,
                  covariance: str = "jacobian", order: int = 1, iso=None, max_var: float = 1.0):
    """εθ(at) and the analytic guidance ∇_at Et ≈ (αt/σt²)·δ. With the raw Jacobian and no cap, order 1 is
    exactly DPS's gradient through the Tweedie estimate, since ∂m/∂at = (αt/σt²)·Σ."""
    m, S, eps = posterior(eps_of, at, alpha, sigma, covariance, iso, max_var)
    _, delta = tilt(value, s, m, S, order)
    alpha, sigma = (torch.as_tensor(v, device=at.device, dtype=at.dtype) for v in (alpha, sigma))
    return eps, (alpha / sigma ** 2) * delta


def isotropic_table(eps_of_t: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a0: torch.Tensor,
                    schedule, n_times: int = 64, generator: torch.Generator | None = None):
    """1 − E‖εθ(at, t)‖²/d on a grid of t (at = αt·a0 + σt·z over the given clean actions a0 [..., d]);
    eps_of_t(at, t) with t broadcast like a0[..., 0]. Returns (times [n], factors [n]) for `interpolate`.

    Estimated as the denoising error E‖z − εθ‖²/d, equal to it for the exact εθ = E[z | at] (because
    E[z·εθ] = E‖εθ‖²) and far less noisy at high noise, where both are small differences of numbers near 1."""
    times = torch.linspace(schedule.t_eps, schedule.t_max, n_times, device=a0.device)
    out = []
    with torch.no_grad():
        for t in times:
            tt = torch.full(a0.shape[:-1], float(t), device=a0.device)
            z = torch.randn(a0.shape, device=a0.device, generator=generator)
            eps = eps_of_t(schedule.noise(a0, tt, z), tt)
            out.append((z - eps).square().sum(-1).mean() / a0.shape[-1])
    return times, torch.stack(out).clamp(0.0, 1.0)


def interpolate(table, t: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear lookup of a (times, values) table at t (any shape)."""
    times, vals = table
    i = torch.searchsorted(times, t.clamp(times[0], times[-1]).contiguous()).clamp(1, len(times) - 1)
    t0, t1 = times[i - 1], times[i]
    f = (t.clamp(times[0], times[-1]) - t0) / (t1 - t0)
    return vals[i - 1] + f * (vals[i] - vals[i - 1])
