"""Typed configs with the reference defaults (../shared/reference/qgpo.md §4–6).

Each stage's config is a dataclass; `to_dict`/`from_dict` round-trip them through plain dicts (YAML, Tune
search spaces, MLflow params, checkpoints), and `from_dict` rejects unknown keys by name.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class SolverConfig:
    steps: int = 15                  # network evaluations per sample
    order: int = 2
    method: str = "singlestep"       # or "multistep"
    spacing: str = "time_uniform"    # or "logSNR"


@dataclass
class BehaviorConfig:
    widths: tuple[int, ...] = (512, 256, 128)
    embed_dim: int = 32
    steps: int = 600_000
    batch_size: int = 4096
    lr: float = 1e-4
    precision: str = "fp32"          # "bf16": autocast matmuls to bfloat16 (fp32 master weights)
    log_every: int = 1000
    ckpt_every: int = 50_000


@dataclass
class SupportConfig:
    M: int = 16                      # support actions per state (K = M); 32 for AntMaze
    batch_states: int = 256
    solver: SolverConfig = field(default_factory=SolverConfig)


@dataclass
class CriticConfig:
    q_hidden: tuple[int, ...] = (256, 256, 256)
    f_hidden: tuple[int, ...] = (256, 256, 256, 256)
    steps: int = 1_000_000
    q_fraction: float = 0.5          # Q (and its target) train for the first steps·q_fraction iterations
    batch_size: int = 256
    lr_q: float = 3e-4
    lr_f: float = 3e-4
    beta: float = 3.0                # CEP label temperature
    q_alpha: float | None = 1.0      # βQ of the in-support softmax target; None → beta
    gamma: float = 0.99
    tau: float = 0.005
    method: str = "cep"              # energy model's training loss: cep | mse | dps (no fφ)
    log_every: int = 1000
    ckpt_every: int = 50_000

    @property
    def q_steps(self) -> int:
        return int(round(self.steps * self.q_fraction))

    @property
    def beta_q(self) -> float:
        return self.beta if self.q_alpha is None else self.q_alpha


@dataclass
class QGPOConfig:
    seed: int = 0
    reward: str = "locomotion"       # locomotion | antmaze | none
    beta_min: float = 0.1
    beta_max: float = 20.0
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    support: SupportConfig = field(default_factory=SupportConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    sampler: SolverConfig = field(default_factory=SolverConfig)


def to_dict(cfg) -> dict[str, Any]:
    """Plain, YAML/JSON-safe dict (tuples become lists)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def from_dict(cls, d: dict[str, Any] | None, where: str = ""):
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys raise with their path."""
    d = dict(d or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)} for {cls.__name__}; "
                         f"expected some of: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v, where=f"{where}{k}.")
        elif typing.get_origin(tp) is tuple and isinstance(v, (list, tuple)):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def replace(cfg, **overrides):
    """Copy with dotted-path overrides: replace(cfg, **{"critic.beta": 10})."""
    d = to_dict(cfg)
    for path, v in overrides.items():
        node = d
        *parents, last = path.split(".")
        for p in parents:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"unknown config section {path!r}")
            node = node[p]
        if last not in node:
            raise ValueError(f"unknown config key {path!r}")
        node[last] = list(v) if isinstance(v, tuple) else v
    return from_dict(type(cfg), d)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_yaml(cls, text: str):
    return from_dict(cls, yaml.safe_load(text))
