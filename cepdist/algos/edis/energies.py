"""EDIS's three energies, trained contrastively at the noise level they guide.

For factor k with positives from the online distribution q_k and negatives from the model's pθ,k sharing the
positive's (clean) conditions, InfoNCE on the noised samples, one noise level t per group, has its optimum at
f_t = log q_k,t / pθ,k,t + const: the intermediate energy whose gradient is the exact guidance at t. InfoNCE
is CEP's loss with one-hot labels (core/guidance.cep_loss), so the same estimator trains QGPO's fφ and these.

Positives and negatives (edis.md; the released code's defects in brackets, absent here):
- state: recent online states against states the model generates [trained at t = 0 only and applied at
  every t: here every t, `clean_only` keeps the defect as an ablation];
- policy: (s, a ~ π(·|s)) for recent online states against actions the model generates given the same s
  [the conditioning mask indexed by the batch size: here the conditions are the factor networks' inputs];
- transition: real online (s, a, r, d, s') against (r, d, s') the model generates given the same (s, a)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ...core.diffusion import VPSchedule
from ...core.guidance import EnergyGuidance, energy_loss
from ...core.nets import EnergyNet
from ...data.transitions import Transitions
from ..qgpo.stages import adam, lr_scheduler
from .config import EnergiesConfig
from .model import FACTORS, TransitionModel


class Energies(torch.nn.Module):
    def __init__(self, cfg: EnergiesConfig, s_dim: int, a_dim: int, y_dim: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.state = EnergyNet(s_dim, 0, cfg.hidden)
        self.policy = EnergyNet(a_dim, s_dim, cfg.hidden)
        self.transition = EnergyNet(y_dim, s_dim + a_dim, cfg.hidden)

    def guidance(self, clip: float | None = None) -> dict[str, EnergyGuidance]:
        return {f: EnergyGuidance(getattr(self, f), clip) for f in FACTORS}


@dataclass
class Contrast:
    """Normalised groups of one factor: x [P, 1 + K, dim] (the positive first), conditions [P, c] or None."""
    x: torch.Tensor
    cond: torch.Tensor | None


def contrast_sets(model: TransitionModel, online: Transitions, policy: Callable[[torch.Tensor], torch.Tensor],
                  n: int, negatives: int, generator: torch.Generator | None = None) -> dict[str, Contrast]:
    """n positives per factor drawn from the online transitions, each with `negatives` model samples.
    policy: real-unit states [B, s_dim] → actions sampled from the current policy π(·|s)."""
    idx = torch.randint(len(online), (n,), generator=generator, device=online.obs.device)
    s, a, y = model.blocks(online[idx])
    a_pi = model.norm_actions(policy(online.obs[idx]))
    neg_s = model.sample_factor("state", None, n * negatives, generator=generator).view(n, negatives, -1)
    neg_a = model.sample_factor("policy", s, negatives, generator=generator)
    sa = torch.cat([s, a], -1)
    neg_y = model.sample_factor("transition", sa, negatives, generator=generator)
    return {"state": Contrast(torch.cat([s[:, None], neg_s], 1), None),
            "policy": Contrast(torch.cat([a_pi[:, None], neg_a], 1), s),
            "transition": Contrast(torch.cat([y[:, None], neg_y], 1), sa)}


def train_energies(cfg: EnergiesConfig, energies: Energies, sets: dict[str, Contrast], schedule: VPSchedule,
                   generator: torch.Generator | None = None) -> dict[str, float]:
    """cfg.steps InfoNCE updates of the energy of each factor in `sets` on groups drawn from its contrast set;
    returns each one's mean loss over the last tenth of the steps (log(1 + K) is chance)."""
    if cfg.clean_only:       # the ablation: every group at the smallest noise level
        schedule = dataclasses.replace(schedule, t_max=schedule.t_eps)
    opt = adam(energies.parameters(), cfg.lr)
    sched = lr_scheduler(opt, cfg.lr_schedule, cfg.steps)
    k = next(iter(sets.values())).x.shape[1]
    target = torch.full((cfg.groups, k), float("-inf"), device=next(energies.parameters()).device)
    target[:, 0] = 0.0                               # one-hot on the positive
    tail = max(1, cfg.steps // 10)
    acc = torch.zeros(len(sets), dtype=torch.float64)
    for step in range(cfg.steps):
        losses = []
        for f in sets:
            c = sets[f]
            idx = torch.randint(c.x.shape[0], (cfg.groups,), generator=generator, device=c.x.device)
            losses.append(energy_loss("cep", getattr(energies, f), c.x[idx], None if c.cond is None else c.cond[idx],
                                      target, schedule, generator))
        opt.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()
        opt.step()
        sched.step()
        if step >= cfg.steps - tail:
            acc += torch.stack(losses).detach().double().cpu()
    return {f"energy/{f}_loss": float(v) / tail for f, v in zip(sets, acc)}
