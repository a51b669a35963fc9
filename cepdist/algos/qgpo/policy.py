"""The guided policy, built from stage artifacts, and `run_qgpo`: every stage in one process.

The policy samples with the behaviour model's own schedule; cep/mse/aepo guide with ∇a fφ, dps with β·Q̄ at
the Tweedie estimate, aepo-analytic with AEPO's estimate from β·Q̄, and a policy without guidance is the
behaviour model alone (w must then be 0)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...core.guidance import VALUE_METHODS, Guidance, check_method, guided_sample, make_guidance
from ...core.nets import EnergyNet, ScoreNet, TwinQ
from ...data.transitions import Transitions
from ..loop import Callback
from .config import EnergyConfig, QGPOConfig, SolverConfig, check
from .stages import (generate_support, iso_table, load_behavior, load_energy, load_q, max_variance, plan_for,
                     seed_generator, train_behavior, train_energy, train_q)


class GuidedPolicy:
    """state batch → actions, for any guidance scale w (a float, or one per state) and solver settings."""

    def __init__(self, behavior: ScoreNet, method: str = "cep", *, energy: EnergyNet | None = None,
                 q: TwinQ | None = None, beta: float | None = None, solver: SolverConfig | None = None,
                 seed: int = 0, analytic: dict | None = None, temperature: float = 1.0):
        """analytic: the estimator options of dps (max_var) and aepo-analytic (covariance, order, iso_table,
        max_var), from `analytic_options`. temperature: the scale of the starting noise (QGPOConfig.temperature)."""
        self.behavior = behavior.eval()
        self.schedule = behavior.schedule
        self.solver = solver or SolverConfig()
        self.temperature = temperature
        self.method = check_method(method)
        self.guidance: Guidance | None = None
        if method in VALUE_METHODS and q is not None:
            if beta is None:
                raise ValueError(f"{method} guidance needs β (energy.beta)")
            q = q.requires_grad_(False)
            self.guidance = make_guidance(method, value=lambda a, s: beta * q.min(a, s), **(analytic or {}))
        elif method not in VALUE_METHODS and energy is not None:
            self.guidance = make_guidance(method, energy)
        self.device = next(behavior.parameters()).device
        self.action_dim = behavior.action_dim
        self.generator = seed_generator(seed, "policy", self.device)
        self._plans = {}

    def plan(self, solver: SolverConfig):
        key = (solver.steps, solver.order, solver.method, solver.spacing, solver.grid, solver.update)
        if key not in self._plans:
            self._plans[key] = plan_for(self.schedule, solver)
        return self._plans[key]

    def __call__(self, states, w=1.0, n: int = 1, solver: SolverConfig | None = None,
                 x_init: torch.Tensor | None = None) -> torch.Tensor:
        states = torch.as_tensor(np.asarray(states) if not torch.is_tensor(states) else states,
                                 dtype=torch.float32, device=self.device)
        if torch.is_tensor(w) or isinstance(w, (list, tuple, np.ndarray)):
            w = torch.as_tensor(w, dtype=torch.float32, device=self.device).view(-1, 1, 1)
            if self.guidance is None and not bool((w == 0).all()):
                raise ValueError("guidance scale w ≠ 0 needs a trained energy model (or Q for dps)")
            w = 0.0 if self.guidance is None else w      # a behaviour-only policy: per-state zeros
        elif w != 0 and self.guidance is None:
            raise ValueError("guidance scale w ≠ 0 needs a trained energy model (or Q for dps)")
        a = guided_sample(self.behavior, self.plan(solver or self.solver), states, n, self.guidance, w,
                          generator=self.generator, x_init=x_init, temperature=self.temperature)
        return a[:, 0] if n == 1 else a


def load_policy(behavior, method: str, *, energy=None, q=None, beta: float | None = None,
                solver: SolverConfig | None = None, seed: int = 0, analytic: dict | None = None,
                temperature: float = 1.0) -> GuidedPolicy:
    """A guided policy from checkpoint files or loaded checkpoint dicts (energy for cep/mse/aepo, q for
    dps/aepo-analytic)."""
    return GuidedPolicy(load_behavior(behavior), method, energy=None if energy is None else load_energy(energy),
                        q=None if q is None else load_q(q), beta=beta, solver=solver, seed=seed,
                        analytic=analytic, temperature=temperature)


def analytic_options(cfg: EnergyConfig, behavior: ScoreNet, data: Transitions, seed: int = 0) -> dict | None:
    """The options of the methods that guide with β·Q̄ directly: the data's largest action variance (dps,
    aepo-analytic) and aepo-analytic's estimator settings (with the isotropic table when needed)."""
    if cfg.method not in VALUE_METHODS:
        return None
    out = {"max_var": max_variance(data.actions)}
    if cfg.method == "aepo-analytic":
        out.update(covariance=cfg.covariance, order=cfg.order,
                   iso_table=iso_table(behavior, data, seed) if cfg.covariance == "isotropic" else None)
    return out


def run_qgpo(cfg: QGPOConfig, data: Transitions, out_dir: Path | None = None,
             callback: Callback | None = None) -> GuidedPolicy:
    """All stages in order on one process; with out_dir, every stage checkpoints there and resumes."""
    errors = check(cfg)
    if errors:
        raise ValueError("invalid QGPO config: " + "; ".join(errors))
    path = (lambda name: Path(out_dir) / name) if out_dir is not None else (lambda name: None)
    behavior = train_behavior(cfg.behavior, data.obs, data.actions, seed=cfg.seed, ckpt_path=path("behavior.pt"),
                              callback=callback)
    support = generate_support(cfg.support, behavior, data, seed=cfg.seed, ckpt_path=path("support.pt"))
    q = train_q(cfg.q, data, support, seed=cfg.seed, ckpt_path=path("q.pt"), callback=callback)
    energy = None
    if cfg.energy.method not in VALUE_METHODS:
        energy = train_energy(cfg.energy, q, support, data, behavior.schedule, behavior=behavior, seed=cfg.seed,
                              ckpt_path=path("energy.pt"), callback=callback)
    return GuidedPolicy(behavior, cfg.energy.method, energy=energy, q=q, beta=cfg.energy.beta, solver=cfg.sampler,
                        seed=cfg.seed, analytic=analytic_options(cfg.energy, behavior, data, cfg.seed),
                        temperature=cfg.temperature)
