"""Energy guidance: the exact method (CEP), AEPO's analytic estimate and the inexact baselines (MSE, DPS),
selectable by name.

Sign convention (reference): the energy model fφ is a Q-like score, higher is preferred.
Guided ε-prediction:  ε̃ = εθ(a_t, s, t) − w·σt·∇a f_t(a_t, s),  w = guidance scale (w = 1: exact tilt).

- cep: fφ trained with the contrastive loss (labels softmax(β·Q̄) over a support set sharing one t).
- mse: fφ trained to regress β·Q̄(s, a0) from the noisy a_t (learns E[βQ | a_t], Jensen gap).
- dps: no energy model; f_t(a_t) = β·Q(s, â0(a_t)) at the Tweedie estimate, differentiated through εθ.
- aepo: fφ regressed onto AEPO's Gaussian-posterior log-expectation Êt(s, a_t) (analytic.py), a
  reconstruction from the paper's abstract.
- aepo-analytic: no energy model; ∇f_t = (αt/σt²)·(E_π − E_μ)[a0 | a_t] from the same estimator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import analytic
from .diffusion import VPSchedule
from .nets import EnergyNet, ScoreNet
from .solver import EpsFn, SolverPlan, sample

METHODS = ("cep", "mse", "dps", "aepo", "aepo-analytic")
ENERGY_METHODS = ("cep", "mse", "aepo")          # train a time-conditioned energy model fφ
VALUE_METHODS = ("dps", "aepo-analytic")         # guide with β·Q (a clean value) directly: no energy stage


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"guidance method must be one of {METHODS}, got {method!r}")
    return method


# ---------------------------------------------------------------- training losses of fφ
def cep_loss(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−Σ_i softmax_i(target)·log_softmax_i(f), averaged over groups. f, target: [G, K] (target = β·Q̄)."""
    return -(torch.softmax(target, -1) * torch.log_softmax(f, -1)).sum(-1).mean()


def mse_loss(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(f, target)


def energy_loss(method: str, energy: EnergyNet, a0: torch.Tensor, s: torch.Tensor | None,
                target, schedule: VPSchedule, generator=None, t_sampling: str = "time_uniform") -> torch.Tensor:
    """Loss of fφ on groups of clean actions a0 [G, K, a_dim] with targets [G, K]: β·Q̄(s, a0) (cep, mse),
    or for aepo a function (a_t, t) → Êt(s, a_t) evaluated here on the noised actions (no gradient).

    One t per group, shared by its K actions (the CEP estimator needs it), independent noise per action;
    groups of one action (K = 1) give one t per sample, the reference's form of the regressions.
    s: [G, s_dim] or None (unconditional toys). t_sampling: VPSchedule.sample_t's spacing."""
    G = a0.shape[0]
    t = schedule.sample_t(G, device=a0.device, generator=generator, spacing=t_sampling)
    eps = torch.randn(a0.shape, device=a0.device, dtype=a0.dtype, generator=generator)
    at = schedule.noise(a0, t, eps)
    f = energy(at, t[:, None], None if s is None else s[:, None, :])
    if method == "cep":
        return cep_loss(f, target)
    if method == "mse":
        return mse_loss(f, target)
    if method == "aepo":
        return mse_loss(f, target(at, t[:, None]).detach())
    raise ValueError(f"guidance method {method!r} trains no energy model")


# ---------------------------------------------------------------- guided sampling
def is_zero(w) -> bool:
    """w is a float, or a tensor of per-state scales shaped [B, 1, 1]; only a plain 0 skips guidance."""
    return not torch.is_tensor(w) and w == 0

def _broadcast_times(plan: SolverPlan, states: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """Times [K, 1, 1] and states [B, 1, s_dim] so that conditions come out as [K, B, 1, ·], which
    broadcast against samples shaped [B, N, a_dim]; unconditional: times [K], conditions [K, ·]."""
    t = torch.tensor(plan.times, device=like.device, dtype=like.dtype)
    if states is None:
        return t, None
    return t.view(-1, 1, 1), states[:, None, :]


class Guidance:
    """Turns a behaviour model (and whatever the method needs) into the guided ε of one sampling call."""
    needs_autograd = False

    def eps_fn(self, behavior: ScoreNet, plan: SolverPlan, states: torch.Tensor | None,
               w: float, like: torch.Tensor) -> EpsFn:
        t, s = _broadcast_times(plan, states, like)
        conds = behavior.block_conditions(t, s)
        off = is_zero(w)
        extra = None if off else self.prepare(t, s)

        def eps(x: torch.Tensor, k: int) -> torch.Tensor:
            ck = [c[k] for c in conds]
            if off:
                return -behavior.trunk(x, ck)
            return self.guided(behavior, x, ck, extra, k, plan, w, s)
        return eps

    def prepare(self, t, s):
        return None

    def guided(self, behavior, x, conds_k, extra, k, plan, w, s):
        raise NotImplementedError


class EnergyGuidance(Guidance):
    """cep and mse: w·∇a fφ(a_t, s, t) from a trained time-conditioned energy model. `clip`: cap each sample's
    gradient norm at clip·√dim (EDIS's authors' safeguard; None: off, the exact method)."""

    def __init__(self, energy: EnergyNet, clip: float | None = None):
        self.energy, self.clip = energy, clip

    def prepare(self, t, s):
        return self.energy.condition(t, s)

    def guided(self, behavior, x, conds_k, pc, k, plan, w, s):
        g = self.energy.grad_action(x, pc[k])
        if self.clip is not None:
            cap = self.clip * g.shape[-1] ** 0.5
            g = g * (cap / g.norm(dim=-1, keepdim=True).clamp(min=cap))
        return -behavior.trunk(x, conds_k) - g * (w * plan.sigmas[k])


class AnalyticGuidance(Guidance):
    """aepo-analytic: ∇f_t = (αt/σt²)·δ, δ the tilt of AEPO's Gaussian posterior by value = β·Q (analytic.py).
    `iso_table` (from analytic.isotropic_table) is needed by the isotropic covariance only; `max_var` caps
    Σ's eigenvalues (the data's largest variance)."""
    needs_autograd = True

    def __init__(self, value, covariance: str = "jacobian", order: int = 1, iso_table=None,
                 max_var: float = 1.0):
        analytic.check_options(covariance, order)
        if covariance == "isotropic" and iso_table is None:
            raise ValueError("aepo-analytic with the isotropic covariance needs its table of 1 − E‖εθ‖²/d per t")
        self.value, self.covariance, self.order = value, covariance, order
        self.iso_table, self.max_var = iso_table, max_var

    def guided(self, behavior, x, conds_k, extra, k, plan, w, s):
        a, sg = plan.alphas[k], plan.sigmas[k]
        iso = None
        if self.covariance == "isotropic":
            iso = analytic.interpolate(self.iso_table, torch.tensor(plan.times[k], device=x.device))
        eps, grad = analytic.analytic_grad(lambda y: -behavior.trunk(y, conds_k), self.value, x,
                                           None if s is None else s[:, 0, :], torch.tensor(a, device=x.device),
                                           torch.tensor(sg, device=x.device), self.covariance, self.order, iso,
                                           self.max_var)
        return eps - grad * (w * sg)


class DPSGuidance(AnalyticGuidance):
    """dps: ∇_{a_t} value(â0(a_t), s) through the behaviour model's Tweedie estimate â0 = m. Since
    ∂m/∂a_t = (αt/σt²)·Σ with Σ the Jacobian posterior covariance, this is AEPO's first-order analytic
    guidance; with max_var=None it is the published form (autograd through εθ, nothing capped), which on the
    toys leaves the data's range because the learned εθ's Jacobian errors are amplified by σt²/αt² at high
    noise; by default Σ's eigenvalues are capped at the data's largest variance (README, "A fair DPS")."""

    def __init__(self, value, max_var: float | None = 1.0):
        super().__init__(value, "jacobian", 1, max_var=max_var)

    def guided(self, behavior, x, conds_k, extra, k, plan, w, s):
        if self.max_var is not None:
            return super().guided(behavior, x, conds_k, extra, k, plan, w, s)
        a, sg = plan.alphas[k], plan.sigmas[k]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            eps = -behavior.trunk(xg, conds_k)
            x0 = (xg - sg * eps) / a
            g, = torch.autograd.grad(self.value(x0, None if s is None else s[:, 0, :]).sum(), xg)
        return eps.detach() - g * (w * sg)


def make_guidance(method: str, energy: EnergyNet | None = None, value=None, **analytic_options) -> Guidance:
    """The guidance of a method: cep/mse/aepo from a trained energy model, dps/aepo-analytic from a clean
    value β·Q (aepo-analytic also takes covariance, order, iso_table, max_var)."""
    check_method(method)
    if method in VALUE_METHODS:
        if value is None:
            raise ValueError(f"guidance method {method!r} needs a clean value function (β·Q)")
        if method == "dps":
            return DPSGuidance(value, **{k: v for k, v in analytic_options.items() if k == "max_var"})
        return AnalyticGuidance(value, **analytic_options)
    if energy is None:
        raise ValueError(f"guidance method {method!r} needs a trained energy model")
    return EnergyGuidance(energy)


def guided_sample(behavior: ScoreNet, plan: SolverPlan, states: torch.Tensor | None, n: int,
                  guidance: Guidance | None = None, w: float = 0.0,
                  generator: torch.Generator | None = None, device=None,
                  x_init: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Draw n actions per state: returns [B, n, a_dim] (or [n, a_dim] when states is None).

    All states × samples go through the solver in one batch; the behaviour model's and the energy
    model's time/state conditions are computed once per call for all solver times. x_init, if given,
    is the starting noise (shape as returned) instead of a draw from `generator`. `temperature` scales the
    starting noise (1: exact; < 1: a colder, narrower sample, no longer exact)."""
    device = device or next(behavior.parameters()).device
    shape = (n, behavior.action_dim) if states is None else (states.shape[0], n, behavior.action_dim)
    x = torch.randn(shape, device=device, generator=generator) if x_init is None else x_init.to(device)
    if temperature != 1.0:
        x = temperature * x
    guidance = guidance or Guidance()
    ctx = torch.no_grad() if (guidance.needs_autograd and not is_zero(w)) else torch.inference_mode()
    with ctx:
        return sample(guidance.eps_fn(behavior, plan, states, w, x), x, plan)
