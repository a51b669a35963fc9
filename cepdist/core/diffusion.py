"""Continuous linear VP schedule and the ε-prediction loss.

log αt = −¼·t²·(βmax − βmin) − ½·t·βmin,  σt = √(1 − αt²),  λt = log(αt/σt).
Networks in cepdist output σt·∇log qt (the "raw head"), which approximates −ε; the
noise prediction is therefore ε̂ = −raw and the loss is E‖raw + ε‖² (sum over dims, mean over batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


SPACINGS = ("time_uniform", "logSNR")   # how times spread on [t_eps, t_max]: solver grids and training draws


@dataclass(frozen=True)
class VPSchedule:
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_eps: float = 1e-3  # smallest time used in training and sampling
    t_max: float = 1.0

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t):
        return torch.exp(self.log_alpha(t)) if torch.is_tensor(t) else math.exp(self.log_alpha(t))

    def sigma(self, t):
        if torch.is_tensor(t):
            return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))
        return math.sqrt(-math.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t):
        """log-SNR/2: λt = log αt − log σt."""
        la = self.log_alpha(t)
        if torch.is_tensor(t):
            return la - 0.5 * torch.log(-torch.expm1(2.0 * la))
        return la - 0.5 * math.log(-math.expm1(2.0 * la))

    def t_of_lam(self, lam):
        """Inverse of λt: solves ½Δt² + βmin·t = log(1 + e^{−2λ}) for t ≥ 0."""
        d = self.beta_max - self.beta_min
        if torch.is_tensor(lam):
            L = torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
            return 2.0 * L / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * L))
        L = max(0.0, -2.0 * lam) + math.log1p(math.exp(-abs(2.0 * lam)))
        return 2.0 * L / (self.beta_min + math.sqrt(self.beta_min**2 + 2.0 * d * L))

    def sample_t(self, n: int, device=None, generator=None, spacing: str = "time_uniform") -> torch.Tensor:
        """Training times on [t_eps, t_max]: "time_uniform" (the reference's), or "logSNR": uniform in λ, the
        density of the log-SNR sampler's own grid, which puts most draws at the small t where a narrow action
        distribution is still resolved (fφ's labels are identifiable there and nearly flat at large t)."""
        u = torch.rand(n, device=device, generator=generator)
        if spacing == "time_uniform":
            return u * (self.t_max - self.t_eps) + self.t_eps
        if spacing == "logSNR":
            lo, hi = self.lam(self.t_max), self.lam(self.t_eps)
            return self.t_of_lam(lo + u * (hi - lo)).clamp(self.t_eps, self.t_max)
        raise ValueError(f"t spacing must be one of {SPACINGS}, got {spacing!r}")

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = αt·x0 + σt·ε with t broadcast over the trailing dimensions of x0."""
        t = t.reshape(t.shape + (1,) * (x0.dim() - t.dim()))
        return self.alpha(t) * x0 + self.sigma(t) * eps


def denoising_loss(raw_model, x0: torch.Tensor, cond, schedule: VPSchedule,
                   generator=None) -> torch.Tensor:
    """Reference ε-loss: E‖raw(x_t, t, s) + ε‖², summed over action dims, averaged over the batch."""
    t = schedule.sample_t(x0.shape[0], device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xt = schedule.noise(x0, t, eps)
    raw = raw_model(xt, t, cond)
    return (raw.float() + eps).square().sum(-1).mean()
