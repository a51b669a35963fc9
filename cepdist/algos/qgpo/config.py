"""QGPO's typed stage configs with the reference defaults (../shared/reference/qgpo.md §4–6).

One dataclass per stage; each holds everything its stage's result depends on, so a stage key derived from
it (plus its upstream keys) identifies the result: the noise schedule lives in the behaviour config (the
support actions, the energy model and the policy all use the behaviour model's schedule, read from its
checkpoint), the reward rule in the Q config. `log_every`/`ckpt_every` change no result."""
from __future__ import annotations

from dataclasses import dataclass, field

NOT_IN_KEY = ("log_every", "ckpt_every")       # settings that change no stage's result


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
    precision: str = "fp32"          # "bf16": autocast matmuls to bfloat16 (fp32 master weights)
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
    log_every: int = 1000
    ckpt_every: int = 50_000


@dataclass
class EnergyConfig:
    """The time-conditioned energy model fφ, trained on the frozen final Q̄ (method cep or mse); `beta` is
    the guidance temperature of every method (dps uses β·Q directly and trains no energy model)."""
    method: str = "cep"              # cep | mse | dps
    beta: float = 3.0
    hidden: tuple[int, ...] = (256, 256, 256, 256)
    steps: int = 1_000_000
    batch_size: int = 256
    lr: float = 3e-4
    log_every: int = 1000
    ckpt_every: int = 50_000


@dataclass
class QGPOConfig:
    seed: int = 0
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    support: SupportConfig = field(default_factory=SupportConfig)
    q: QConfig = field(default_factory=QConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    sampler: SolverConfig = field(default_factory=SolverConfig)
