"""In-support softmax Q-learning (QGPO's critic), IQL's expectile and advantage-weighted losses, and Polyak
averaging."""
from __future__ import annotations

import torch

from .nets import TwinQ


@torch.no_grad()
def in_support_target(q_target: TwinQ, next_support: torch.Tensor, next_obs: torch.Tensor,
                      rewards: torch.Tensor, terminals: torch.Tensor, gamma: float, beta_q: float) -> torch.Tensor:
    """y = r + γ(1 − terminal)·Σ_i softmax_i(βQ·Q̄(s', â'_i))·Q̄(s', â'_i), Q̄ = min of the target twins; one y per
    member of an ensemble (its own twins' min), [members, B].

    next_support: [B, M, a_dim] behaviour samples at s'; timeouts are not terminal."""
    q = q_target.member_min(next_support, next_obs)            # [members, B, M]
    v = (torch.softmax(beta_q * q, dim=-1) * q).sum(-1)
    return rewards + gamma * (1.0 - terminals) * v


def q_loss(q, actions: torch.Tensor, obs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over heads of their MSE to y: y [B] for every head, or [members, B], each member's twins to theirs.
    q: a TwinQ (or ensemble), or a data-parallel wrapper of one."""
    heads = q(actions, obs)                                    # [2·members, B]
    if y.dim() == heads.dim():                                 # [members, 2, B] against [members, 1, B], no copy
        heads, y = heads.view(y.shape[0], 2, *y.shape[1:]), y.unsqueeze(1)
    return (heads - y).square().mean()


@torch.no_grad()
def polyak(target: torch.nn.Module, source: torch.nn.Module, tau: float):
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """E |τ − 1(diff < 0)|·diff²: minimised over V by the τ-expectile of Q − V (IQL's value loss)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.square()).mean()


def awr_loss(log_prob: torch.Tensor, advantage: torch.Tensor, temperature: float, max_weight: float) -> torch.Tensor:
    """−E min(exp(temperature·A), max_weight)·log π(a|s): advantage-weighted regression (IQL's policy)."""
    w = torch.exp(temperature * advantage.detach()).clamp(max=max_weight)
    return -(w * log_prob).mean()
