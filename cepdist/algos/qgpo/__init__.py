"""QGPO (Lu et al., ICML 2023): configs, stages, the guided policy."""
from .config import (BehaviorConfig, EnergyConfig, QConfig, QGPOConfig, ScheduleConfig, SolverConfig,  # noqa: F401
                     SupportConfig)
from .policy import GuidedPolicy, load_policy, run_qgpo  # noqa: F401
