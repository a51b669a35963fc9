"""QGPO's typed stage configs with the reference defaults (../shared/reference/qgpo.md §4–6).

One dataclass per stage; each holds everything its stage's result depends on, so a stage key derived from
it (plus its upstream keys) identifies the result: the noise schedule lives in the behaviour config (the
support actions, the energy model and the policy all use the behaviour model's schedule, read from its
checkpoint), the reward rule in the Q config. `log_every`/`ckpt_every` change no result."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import Errors

NOT_IN_KEY = ("log_every", "ckpt_every")       # settings that change no stage's result
# settings added after stores held results, left out of a stage's key at these values (their old behaviour),
# so that results computed before they existed keep their keys (per config class: behaviour keys always held
# their `precision`)
KEY_NEUTRAL = {"BehaviorConfig": {"obs_norm": False}, "QConfig": {"members": 1, "precision": "fp32"},
               "EnergyConfig": {"precision": "fp32"}}
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class ScheduleConfig:
    beta_min: float = 0.1            # linear VP schedule, log αt = −¼t²(βmax − βmin) − ½tβmin
    beta_max: float = 20.0


@dataclass
class SolverConfig:
    steps: int = 15                  # network evaluations per sample
    order: int = 2
    method: str = "singlestep"       # or "multistep"
    spacing: str = "time_uniform"    # or "logSNR"
    grid: str = "fine"               # singlestep: "fine" (reference: inner points on the steps+1 grid) or "outer"
    update: str = "dpmsolver"        # 2nd-order singlestep update: "dpmsolver" (reference) or "taylor"


@dataclass
class BehaviorConfig:
    widths: tuple[int, ...] = (512, 256, 128)
    embed_dim: int = 32
    steps: int = 600_000
    batch_size: int = 4096
    lr: float = 1e-4
    lr_schedule: str = "constant"    # or "cosine": decay to 0 over `steps` (the reference: constant)
    ema: float = 0.0                 # decay of a moving average of the weights that samples; 0: none (reference)
    precision: str = "fp32"          # "bf16": autocast matmuls to bfloat16 (fp32 master weights)
    obs_norm: bool = False           # train on standardised states (the reference: raw), folded back at the end
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    log_every: int = 1000
    ckpt_every: int = 50_000


@dataclass
class SupportConfig:
    K: int | None = 16               # support actions per state; None → the task's (16 locomotion, 32 AntMaze)
    batch_states: int = 256
    solver: SolverConfig = field(default_factory=SolverConfig)


@dataclass
class QConfig:
    """In-support softmax Q-learning (twin Q, Polyak target); trained once per support set and reward rule,
    shared by every energy model and guidance method."""
    hidden: tuple[int, ...] = (256, 256, 256)
    steps: int = 500_000             # the reference's Q part of its 1M-iteration critic loop
    batch_size: int = 256
    lr: float = 3e-4
    beta_q: float = 1.0              # βQ of the in-support softmax target
    gamma: float = 0.99
    tau: float = 0.005
    reward: str | None = "locomotion"  # locomotion | antmaze | none; None → the task's rule (studies)
    members: int = 1                 # independent twin critics, Q̄ the min over all (1: the reference's twin)
    precision: str = "fp32"          # "bf16": autocast the update's matmuls (output layer and weights fp32)
    log_every: int = 1000
    ckpt_every: int = 50_000


@dataclass
class EnergyConfig:
    """The time-conditioned energy model fφ, trained on the frozen final Q̄ (method cep, mse or aepo); `beta`
    is the guidance temperature of every method (dps and aepo-analytic use β·Q̄ directly, no energy model).

    `actions`: the clean actions fφ is trained on: "support" (K per state sharing one t; what cep needs) or
    "dataset" (each transition's action with its own t: the reference's form of mse, and aepo's); None → the
    method's own (cep support, mse and aepo dataset). `order`/`covariance`: AEPO's estimator (core/analytic.py),
    used by aepo and aepo-analytic only."""
    method: str = "cep"              # cep | mse | dps | aepo | aepo-analytic
    beta: float = 3.0
    hidden: tuple[int, ...] = (256, 256, 256, 256)
    steps: int = 1_000_000
    batch_size: int = 256
    lr: float = 3e-4
    lr_schedule: str = "constant"    # or "cosine"
    t_sampling: str = "time_uniform"  # fφ's training times: time_uniform (reference) | logSNR (uniform in λ)
    actions: str | None = None       # support | dataset | None (the method's)
    order: int = 1                   # aepo: Taylor order of the log-expectation (1 or 2)
    covariance: str = "jacobian"     # aepo: jacobian | isotropic | prior
    precision: str = "fp32"          # "bf16": autocast fφ's update (its labels β·Q̄ stay fp32)
    log_every: int = 1000
    ckpt_every: int = 50_000

    def train_actions(self) -> str:
        return self.actions or ("support" if self.method == "cep" else "dataset")


@dataclass
class QGPOConfig:
    seed: int = 0
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    support: SupportConfig = field(default_factory=SupportConfig)
    q: QConfig = field(default_factory=QConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    sampler: SolverConfig = field(default_factory=SolverConfig)
    # the policy's starting noise scale (1: the reference, an exact sample of the guided distribution; < 1: a
    # colder, narrower sample that is no longer exact: on the *-local files it drops the data's action noise,
    # README "Why guidance does not help yet", point 14). Support actions always sample the behaviour model at 1.
    temperature: float = 1.0


def check(cfg: QGPOConfig, where: str = "") -> list[str]:
    """Every range violation of a QGPO config, each naming its dotted key and what is allowed."""
    from ...core.analytic import COVARIANCES, ORDERS
    from ...core.diffusion import SPACINGS
    from ...core.guidance import METHODS
    errors = Errors(where)
    need = errors.need

    def solver(s: SolverConfig, key: str):
        need(s.steps >= 1, f"{key}.steps", "≥ 1")
        need(s.order in (1, 2, 3), f"{key}.order", "1, 2 or 3")
        need(s.method in ("singlestep", "multistep"), f"{key}.method", "'singlestep' or 'multistep'")
        need(s.spacing in SPACINGS, f"{key}.spacing", "'time_uniform' or 'logSNR'")
        need(s.grid in ("fine", "outer"), f"{key}.grid", "'fine' or 'outer'")
        need(s.update in ("dpmsolver", "taylor"), f"{key}.update", "'dpmsolver' or 'taylor'")

    for name in ("behavior", "q", "energy"):
        c = getattr(cfg, name)
        need(c.steps >= 1, f"{name}.steps", "≥ 1")
        need(c.batch_size >= 1, f"{name}.batch_size", "≥ 1")
        need(c.lr > 0, f"{name}.lr", "> 0")
        need(c.log_every >= 1 and c.ckpt_every >= 1, f"{name}.log_every and {name}.ckpt_every", "≥ 1")
    for name in ("behavior", "energy"):
        need(getattr(cfg, name).lr_schedule in LR_SCHEDULES, f"{name}.lr_schedule", "'constant' or 'cosine'")
    b = cfg.behavior
    need(0 <= b.ema < 1, "behavior.ema", "in [0, 1) (0: no moving average)")
    need(len(b.widths) > 0 and min(b.widths) >= 1, "behavior.widths", "a non-empty list of widths ≥ 1")
    for key, v in (("behavior", b.precision), ("q", cfg.q.precision), ("energy", cfg.energy.precision)):
        need(v in PRECISIONS, f"{key}.precision", "'fp32' or 'bf16'")
    need(0 < b.schedule.beta_min < b.schedule.beta_max, "behavior.schedule", "0 < beta_min < beta_max")
    need(cfg.support.K is None or cfg.support.K >= 2, "support.K", "≥ 2 (or unset: the task's)")
    need(cfg.support.batch_states >= 1, "support.batch_states", "≥ 1")
    solver(cfg.support.solver, "support.solver")
    solver(cfg.sampler, "sampler")
    need(cfg.temperature > 0, "temperature", "> 0 (the policy's starting noise scale; 1: exact)")
    need(len(cfg.q.hidden) > 0 and len(cfg.energy.hidden) > 0, "q.hidden and energy.hidden", "non-empty")
    need(0 < cfg.q.gamma <= 1, "q.gamma", "in (0, 1]")
    need(0 < cfg.q.tau <= 1, "q.tau", "in (0, 1]")
    need(cfg.q.beta_q >= 0, "q.beta_q", "≥ 0")
    need(cfg.q.members >= 1, "q.members", "≥ 1 (independent twin critics; 1: the reference)")
    need(cfg.q.reward in (None, "locomotion", "antmaze", "none"), "q.reward",
         "'locomotion', 'antmaze', 'none' (or unset: the task's)")
    e = cfg.energy
    need(e.method in METHODS, "energy.method", f"one of {', '.join(METHODS)}")
    need(e.beta > 0, "energy.beta", "> 0")
    need(e.t_sampling in SPACINGS, "energy.t_sampling", "'time_uniform' or 'logSNR'")
    need(e.actions in (None, "support", "dataset"), "energy.actions", "'support', 'dataset' (or unset: the method's)")
    need(not (e.method == "cep" and e.actions == "dataset"), "energy.actions",
         "'support' for cep (its contrastive labels compare K actions of one state)")
    need(e.order in ORDERS, "energy.order", "1 or 2")
    need(e.covariance in COVARIANCES, "energy.covariance", f"one of {', '.join(COVARIANCES)}")
    return errors
