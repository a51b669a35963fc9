"""EDIS's diffusion model over transitions and its energy-guided sampling.

The model is the chain pθ(s, a, r, d, s') = pθ(s)·pθ(a|s)·pθ(r, d, s'|s, a): three conditional diffusion
models (the project's ScoreNet, VP schedule, DPM-Solver++) over the per-dimension normalised blocks s, a and
y = (r, d, s'). Sampling the chain draws whole transitions; sampling one factor given its conditions draws
the negatives of that factor's energy.

Why a chain rather than one network over the whole vector: EDIS's target factorises as
q(s, a, y) = d^π(s)·π(a|s)·T(y|s, a) ∝ pθ(s, a, y)·exp(f1(s) + f2(a|s) + f3(y|s, a)), each fk the log-ratio of
one factor. With one joint network every block is noised together, and the intermediate energy of the
joint, −log E[exp(−E)|x_t], does not split into per-block terms; the released code applies each energy's
gradient to its own block anyway, which is inexact at every noise level. With the chain, factor k is
sampled with its conditions clean, so its energy's time-conditioned InfoNCE estimate is exactly CEP's
intermediate energy for that factor, and guiding each factor by its own energy (w = 1) samples q exactly
in the limit. The cost is three solver passes instead of one."""
from __future__ import annotations

from pathlib import Path

import torch

from ...core.guidance import Guidance, guided_sample
from ...core.nets import ScoreNet
from ...data.transitions import Transitions
from ..qgpo.config import BehaviorConfig
from .. import checkpoint
from ..qgpo.stages import load_behavior, plan_for, train_behavior
from .config import TransitionModelConfig

FACTORS = ("state", "policy", "transition")


class TransitionModel:
    """The three factor networks, the normalisation (fixed by the offline data, kept across refreshes so
    that warm starts stay valid) and the sampling plan."""

    def __init__(self, cfg: TransitionModelConfig, nets: dict[str, ScoreNet], mean: torch.Tensor, std: torch.Tensor):
        self.cfg, self.nets, self.mean, self.std = cfg, nets, mean, std
        self.schedule = nets["state"].schedule
        self.plan = plan_for(self.schedule, cfg.solver)
        self.s_dim, self.a_dim = nets["state"].action_dim, nets["policy"].action_dim

    def to(self, device) -> "TransitionModel":
        for net in self.nets.values():
            net.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    # -------------------------------------------------------------- normalisation: x = [s, a, r, d, s']
    @staticmethod
    def stack(data: Transitions) -> torch.Tensor:
        return torch.cat([data.obs, data.actions, data.rewards[:, None], data.terminals[:, None], data.next_obs], -1)

    @staticmethod
    def moments(data: Transitions) -> tuple[torch.Tensor, torch.Tensor]:
        x = TransitionModel.stack(data)
        return x.mean(0), x.std(0).clamp(min=1e-3)    # a constant column (no terminals) stays finite

    def blocks(self, data: Transitions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised (s, a, y) of real transitions."""
        x = (self.stack(data) - self.mean) / self.std
        return x[:, :self.s_dim], x[:, self.s_dim:self.s_dim + self.a_dim], x[:, self.s_dim + self.a_dim:]

    def norm_actions(self, a: torch.Tensor) -> torch.Tensor:
        lo = self.s_dim
        return (a - self.mean[lo:lo + self.a_dim]) / self.std[lo:lo + self.a_dim]

    def transitions(self, s: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> Transitions:
        """Real-unit transitions from normalised blocks; the terminal flag is rounded to 0/1, actions clipped
        to the action box [−1, 1]."""
        x = torch.cat([s, a, y], -1) * self.std + self.mean
        s0, a0 = x[:, :self.s_dim], x[:, self.s_dim:self.s_dim + self.a_dim].clamp(-1.0, 1.0)
        r, d, s1 = x[:, self.s_dim + self.a_dim], x[:, self.s_dim + self.a_dim + 1], x[:, self.s_dim + self.a_dim + 2:]
        d = (d > 0.5).float()
        return Transitions(s0, a0, r, s1, d, d.bool())

    # -------------------------------------------------------------- sampling
    def sample_factor(self, factor: str, cond: torch.Tensor | None, n: int, guidance: Guidance | None = None,
                      w: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n normalised samples of one factor: [n, dim] for the state factor (cond None), else [B, n, dim] for
        conditions [B, c] (the state for the policy factor, [s, a] for the transition factor)."""
        return guided_sample(self.nets[factor], self.plan, cond, n, guidance, w if guidance is not None else 0.0,
                             generator, device=self.mean.device)

    def sample(self, n: int, guidance: dict[str, Guidance] | None = None, weights=(0.0, 0.0, 0.0),
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n normalised transitions (s, a, y) down the chain, each factor guided by its own energy and weight."""
        g = guidance or {}
        s = self.sample_factor("state", None, n, g.get("state"), weights[0], generator)
        a = self.sample_factor("policy", s, 1, g.get("policy"), weights[1], generator)[:, 0]
        y = self.sample_factor("transition", torch.cat([s, a], -1), 1, g.get("transition"), weights[2], generator)[:, 0]
        return s, a, y

    def generate(self, n: int, guidance: dict[str, Guidance] | None = None, weights=(0.0, 0.0, 0.0),
                 generator: torch.Generator | None = None, batch: int = 8192) -> Transitions:
        """n real-unit transitions, drawn in batches of `batch` (memory stays flat for any n)."""
        parts = [self.transitions(*self.sample(min(batch, n - i), guidance, weights, generator))
                 for i in range(0, n, batch)]
        return Transitions.cat(parts)



def pack_transition_model(ckpt_dir: Path) -> dict:
    """The finished model under ckpt_dir as one checkpoint dict (what a store keeps)."""
    return {"moments": checkpoint.load(Path(ckpt_dir) / "moments.pt"),
            **{f: checkpoint.load(Path(ckpt_dir) / f"{f}.pt") for f in FACTORS}}


def load_transition_model(cfg: TransitionModelConfig, src: Path | dict) -> TransitionModel:
    """The model that train_transition_model(…, ckpt_dir=src) finished, or its pack_transition_model dict."""
    ck = src if isinstance(src, dict) else pack_transition_model(src)
    return TransitionModel(cfg, {f: load_behavior(ck[f]).requires_grad_(False) for f in FACTORS},
                           ck["moments"]["mean"], ck["moments"]["std"])


def _factor_config(cfg: TransitionModelConfig, steps: int) -> BehaviorConfig:
    return BehaviorConfig(widths=cfg.widths, embed_dim=cfg.embed_dim, steps=steps, batch_size=cfg.batch_size,
                          lr=cfg.lr, ema=cfg.ema, schedule=cfg.schedule, log_every=cfg.log_every,
                          ckpt_every=cfg.ckpt_every)


def train_transition_model(cfg: TransitionModelConfig, data: Transitions, *, seed: int = 0,
                           ckpt_dir: Path | None = None, init: TransitionModel | None = None,
                           steps: int | None = None) -> TransitionModel:
    """Fit the three factors to the transitions for `steps` (default cfg.steps). With `init`, start from its
    weights and keep its normalisation (an online refresh); otherwise the normalisation comes from `data`.
    Each factor checkpoints and resumes under ckpt_dir/<factor>.pt like any behaviour model."""
    mean, std = (init.mean, init.std) if init is not None else TransitionModel.moments(data)
    steps = cfg.steps if steps is None else steps
    x = (TransitionModel.stack(data) - mean) / std
    sd, ad = data.state_dim, data.action_dim
    s, a, y = x[:, :sd], x[:, sd:sd + ad], x[:, sd + ad:]
    fcfg = _factor_config(cfg, steps)
    inputs = {"state": (None, s), "policy": (s, a), "transition": (torch.cat([s, a], -1), y)}
    nets = {}
    for i, f in enumerate(FACTORS):
        cond, target = inputs[f]
        nets[f] = train_behavior(fcfg, cond, target, seed=seed * 3 + i,
                                 ckpt_path=None if ckpt_dir is None else Path(ckpt_dir) / f"{f}.pt",
                                 init=None if init is None else init.nets[f]).requires_grad_(False)
    if ckpt_dir is not None:
        checkpoint.save(Path(ckpt_dir) / "moments.pt", mean=mean.cpu(), std=std.cpu())
    return TransitionModel(cfg, nets, mean, std)
