"""The in-memory transition format every stage consumes, and the reference reward preprocessing."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Transitions:
    """Offline transitions as float32 tensors. `terminals` stop bootstrapping; `ends` mark the last
    transition of each episode (terminal or timeout) and are used for episode returns only."""
    obs: torch.Tensor          # [N, s_dim]
    actions: torch.Tensor      # [N, a_dim]
    rewards: torch.Tensor      # [N]
    next_obs: torch.Tensor     # [N, s_dim]
    terminals: torch.Tensor    # [N] float 0/1
    ends: torch.Tensor         # [N] bool

    def __len__(self) -> int:
        return self.obs.shape[0]

    @property
    def state_dim(self) -> int:
        return self.obs.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def to(self, device) -> "Transitions":
        return Transitions(*(getattr(self, f).to(device) for f in FIELDS))

    def __getitem__(self, idx) -> "Transitions":
        return Transitions(*(getattr(self, f)[idx] for f in FIELDS))

    @classmethod
    def cat(cls, parts: "list[Transitions]") -> "Transitions":
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in FIELDS))

    @classmethod
    def from_numpy(cls, obs, actions, rewards, next_obs, terminals, ends) -> "Transitions":
        f = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float32))
        return cls(f(obs), f(actions), f(rewards), f(next_obs), f(terminals),
                   torch.as_tensor(np.asarray(ends, dtype=bool)))


FIELDS = ("obs", "actions", "rewards", "next_obs", "terminals", "ends")


def episode_returns(rewards: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Undiscounted returns of the complete episodes (a trailing unfinished one is dropped)."""
    rewards, ends = np.asarray(rewards, dtype=np.float64), np.asarray(ends, dtype=bool)
    idx = np.flatnonzero(ends)
    if len(idx) == 0:
        return np.zeros(0)
    csum = np.concatenate([[0.0], np.cumsum(rewards)])
    starts = np.concatenate([[0], idx[:-1] + 1])
    return csum[idx + 1] - csum[starts]


def reward_affine(data: Transitions, kind: str) -> tuple[float, float]:
    """(scale, shift) of the reference reward preprocessing, r ↦ scale·r + shift, fixed by the offline data so
    that online rewards are transformed alike: locomotion 1000/(max − min episode return), antmaze r − 1."""
    if kind == "none":
        return 1.0, 0.0
    if kind == "antmaze":
        return 1.0, -1.0
    if kind == "locomotion":
        rets = episode_returns(data.rewards.cpu().numpy(), data.ends.cpu().numpy())
        if len(rets) < 2 or rets.max() - rets.min() <= 0:
            raise ValueError("locomotion reward scaling needs at least two complete episodes with different "
                             f"returns; found {len(rets)} episode(s)")
        return float(1000.0 / (rets.max() - rets.min())), 0.0
    raise ValueError(f"reward preprocessing must be 'locomotion', 'antmaze' or 'none', got {kind!r}")


def preprocess_rewards(data: Transitions, kind: str) -> Transitions:
    """locomotion: r·1000/(max − min episode return); antmaze: r − 1; none: unchanged."""
    scale, shift = reward_affine(data, kind)
    if (scale, shift) == (1.0, 0.0):
        return data
    return Transitions(data.obs, data.actions, data.rewards * scale + shift, data.next_obs, data.terminals, data.ends)
