"""EDIS's typed configs (../shared/reference/edis.md). Defaults are the authors' IQL-EDIS settings where those
are not among the released code's defects; where this implementation differs by design, the field says so.

The transition model is three conditional diffusion models, pθ(s)·pθ(a|s)·pθ(r, d, s'|s, a), and each energy
guides its own factor (model.py), so every energy is trained and applied exactly as CEP's: at the noise level
it guides, its conditions clean."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import Errors
from ..iql import IQLConfig
from ..qgpo.config import LR_SCHEDULES, ScheduleConfig, SolverConfig


@dataclass
class TransitionModelConfig:
    """The diffusion model over normalised transitions, pre-trained offline and refreshed online."""
    widths: tuple[int, ...] = (512, 256, 128)
    embed_dim: int = 32
    steps: int = 100_000             # offline pre-training steps
    refresh_steps: int = 30_000      # steps per online refresh, warm-started (the authors retrain from scratch)
    batch_size: int = 1024
    lr: float = 3e-4
    ema: float = 0.999               # decay of the weights' moving average that samples; 0: none
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    log_every: int = 1000
    ckpt_every: int = 10_000


@dataclass
class EnergiesConfig:
    """The three time-conditioned energies f = log(online density / model density) of the state, the policy
    and the transition factor, trained by InfoNCE (one positive against `negatives` model samples sharing the
    positive's conditions and one noise level). `weights` scale each factor's guidance (w = 1: the exact tilt)."""
    hidden: tuple[int, ...] = (256, 256, 256)
    steps: int = 1000                # updates of each energy per refresh (the authors: 20, which leaves an
    #                                  energy near its initialisation for its first refreshes)
    groups: int = 256                # positives per update
    negatives: int = 10              # model samples per positive
    lr: float = 1e-3
    lr_schedule: str = "constant"
    pool: int = 4096                 # positives (and their negatives) drawn per refresh
    weights: tuple[float, float, float] = (2.0, 0.1, 0.1)   # state, policy, transition (the authors' IQL-EDIS)
    clip: float | None = None        # per-sample norm cap on a factor's guidance, ×√dim (the authors: 10); None: off
    clean_only: bool = False         # ablation: train at the smallest noise level only, apply at every level


@dataclass
class OnlineConfig:
    steps: int = 200_000             # online environment steps
    updates_per_step: int = 1
    start_after: int = 5_000         # online transitions collected before the first refresh (≥ energies.pool/…)
    refresh_every: int = 10_000      # online steps between refreshes of the model, the energies and the buffer
    generated: int = 100_000         # transitions generated per refresh
    generated_share: float = 0.5     # share of each batch drawn from generated transitions (EDIS only)
    recent: int = 10_000             # the last online transitions: the positives of the state and policy energies
    eval_every: int = 10_000
    eval_episodes: int = 10
    ckpt_every: int = 5_000


@dataclass
class EDISConfig:
    enabled: bool = True             # false: plain IQL fine-tuning on offline + online replay (the baseline)
    seed: int = 0
    iql: IQLConfig = field(default_factory=IQLConfig)
    model: TransitionModelConfig = field(default_factory=TransitionModelConfig)
    energies: EnergiesConfig = field(default_factory=EnergiesConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)


def check(cfg: EDISConfig, where: str = "") -> list[str]:
    """Every range violation, each naming its dotted key and what is allowed."""
    errors = Errors(where)
    need = errors.need

    m, e, o = cfg.model, cfg.energies, cfg.online
    for key, v in (("model.steps", m.steps), ("model.refresh_steps", m.refresh_steps),
                   ("model.batch_size", m.batch_size), ("energies.steps", e.steps), ("energies.groups", e.groups),
                   ("energies.negatives", e.negatives), ("energies.pool", e.pool), ("online.steps", o.steps),
                   ("online.updates_per_step", o.updates_per_step), ("online.refresh_every", o.refresh_every),
                   ("online.generated", o.generated), ("online.recent", o.recent), ("online.eval_every", o.eval_every),
                   ("online.eval_episodes", o.eval_episodes), ("online.ckpt_every", o.ckpt_every),
                   ("iql.steps", cfg.iql.steps)):
        need(v >= 1, key, "≥ 1")
    need(m.lr > 0 and e.lr > 0 and cfg.iql.lr > 0, "model.lr, energies.lr and iql.lr", "> 0")
    need(0 <= m.ema < 1, "model.ema", "in [0, 1)")
    need(e.lr_schedule in LR_SCHEDULES, "energies.lr_schedule", "'constant' or 'cosine'")
    need(len(e.weights) == 3 and min(e.weights) >= 0, "energies.weights", "three weights ≥ 0 (state, policy, transition)")
    need(e.clip is None or e.clip > 0, "energies.clip", "> 0 or null")
    need(0 <= o.generated_share < 1, "online.generated_share", "in [0, 1)")
    # the released code's first refresh ran on one online transition (defect 3): the energies need at least a
    # pool of real positives, and the generated share needs real online data beside it
    need(o.start_after >= e.groups, "online.start_after", f"≥ energies.groups ({e.groups}): the energies' positives "
         "are online transitions")
    need(o.start_after <= o.steps, "online.start_after", f"≤ online.steps ({o.steps})")
    return errors
