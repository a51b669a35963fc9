"""Reference networks: behaviour score net, twin Q, time-conditioned energy model.

Every network takes the action (or 2-D point) as its first input and an optional state. A state
dimension of 0 means unconditional (the 2-D toys). The first layer of every MLP is split into an
action part and a condition part, so a condition shared by many actions (one state, M support
actions; one time step, a whole batch) is projected once and broadcast, never concatenated per action.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


def cat_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dim after broadcasting the leading dims of a and b."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*lead, a.shape[-1]), b.expand(*lead, b.shape[-1])], dim=-1)


class FourierFeatures(nn.Module):
    """Fixed Gaussian Fourier features of a scalar time: [sin 2πWt, cos 2πWt]."""

    def __init__(self, dim: int = 32, scale: float = 30.0):
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        proj = t[..., None] * self.W * (2 * torch.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


class TimeStateEmbedding(nn.Module):
    """Fourier(t) → Linear(32,32), optionally concatenated with SiLU(Linear(s, 32))."""

    def __init__(self, state_dim: int, embed_dim: int = 32, fourier_scale: float = 30.0):
        super().__init__()
        self.time = nn.Sequential(FourierFeatures(embed_dim, fourier_scale), nn.Linear(embed_dim, embed_dim))
        self.state = nn.Linear(state_dim, embed_dim) if state_dim > 0 else None
        self.out_dim = embed_dim * (2 if state_dim > 0 else 1)

    @torch.no_grad()
    def fold_state_norm(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Weights trained on standardised states (s − mean)/std become weights on raw states: W/std, and
        b − W·(mean/std). Exact (up to rounding), and sampling pays nothing for the standardisation."""
        w = self.state.weight
        self.state.bias -= w @ (mean / std).to(w)
        w /= std.to(w)

    def forward(self, t: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        te = self.time(t)
        if self.state is None:
            return te
        return cat_broadcast(te, F.silu(self.state(s)))


class ResBlock(nn.Module):
    """h = SiLU(Lin(x)) + Lin(SiLU(cond)); h = SiLU(Lin(h)); out = h + skip(x)."""

    def __init__(self, d_in: int, d_out: int, cond_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(d_in, d_out)
        self.cond = nn.Linear(cond_dim, d_out)
        self.lin2 = nn.Linear(d_out, d_out)
        self.skip = nn.Linear(d_in, d_out) if d_in != d_out else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """c is this block's projected condition Lin(SiLU(cond)), broadcastable to the output."""
        h = F.silu(self.lin1(x)) + c
        h = F.silu(self.lin2(h))
        return h + (self.skip(x) if self.skip is not None else x)


class ScoreNet(nn.Module):
    """State-conditioned residual MLP "U-Net" whose output approximates −ε (= σt·score).

    widths (512, 256, 128) give the reference: down 512→256→128, middle 128, up 256, 512, head 1024→a_dim.
    """

    def __init__(self, action_dim: int, state_dim: int, widths: Sequence[int] = (512, 256, 128),
                 embed_dim: int = 32, cond_dim: int = 128, fourier_scale: float = 30.0):
        super().__init__()
        self.action_dim, self.state_dim = action_dim, state_dim
        self.embed = TimeStateEmbedding(state_dim, embed_dim, fourier_scale)
        self.cond_mlp = nn.Sequential(nn.Linear(self.embed.out_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        widths = list(widths)
        downs, d = [], action_dim
        for w in widths:
            downs.append(ResBlock(d, w, cond_dim))
            d = w
        self.down = nn.ModuleList(downs)
        self.mid = ResBlock(d, d, cond_dim)
        ups = []
        for w_skip, w_out in zip(reversed(widths[1:]), reversed(widths[:-1])):
            ups.append(ResBlock(d + w_skip, w_out, cond_dim))
            d = w_out
        # the reference's up path widens as it goes: out width of up block i equals the skip it joins next
        self.up = nn.ModuleList(ups)
        self.head = nn.Linear(d + widths[0], action_dim)

    @property
    def blocks(self):
        return [*self.down, self.mid, *self.up]

    def block_conditions(self, t: torch.Tensor, s: torch.Tensor | None) -> list[torch.Tensor]:
        """Per-block projected conditions for times t (shape [...]) and states s (shape [..., s_dim])."""
        c = F.silu(self.cond_mlp(self.embed(t, s)))
        return [b.cond(c) for b in self.blocks]

    def trunk(self, x: torch.Tensor, conds: list[torch.Tensor]) -> torch.Tensor:
        it = iter(conds)
        skips = []
        h = x
        for b in self.down:
            h = b(h, next(it))
            skips.append(h)
        h = self.mid(h, next(it))
        for b, sk in zip(self.up, reversed(skips[1:])):
            h = b(torch.cat([h, sk], dim=-1), next(it))
        return self.head(torch.cat([h, skips[0]], dim=-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        return self.trunk(x, self.block_conditions(t, s))


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    sg = torch.sigmoid(z)
    return sg * (1 + z * (1 - sg))


class CondMLP(nn.Module):
    """MLP on [x, cond] with a split first layer: Lin_x(x) + Lin_c(cond), so a condition shared by many x is
    projected once. Output is a scalar per row."""

    def __init__(self, x_dim: int, cond_dim: int, hidden: Sequence[int], act: str = "silu"):
        super().__init__()
        hidden = list(hidden)
        self.inp = nn.Linear(x_dim, hidden[0])
        self.cond = nn.Linear(cond_dim, hidden[0], bias=False) if cond_dim > 0 else None
        # initialised as the reference's one layer over [x, cond]: U(±1/√(x_dim + cond_dim)) for every weight and
        # the bias (per-part defaults would scale the action weights by √((x_dim + cond_dim)/x_dim), 2.5–5×)
        bound = 1.0 / (x_dim + cond_dim) ** 0.5
        with torch.no_grad():
            for p in (self.inp.weight, self.inp.bias) + ((self.cond.weight,) if self.cond is not None else ()):
                p.uniform_(-bound, bound)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(hidden[:-1], hidden[1:]))
        self.out = nn.Linear(hidden[-1], 1)
        self.act = {"silu": F.silu, "relu": F.relu}[act]
        self.act_name = act

    def project_cond(self, c: torch.Tensor | None):
        return self.cond(c) if self.cond is not None else None

    def forward_projected(self, x: torch.Tensor, pc: torch.Tensor | None) -> torch.Tensor:
        h = self.inp(x)
        if pc is not None:
            h = h + pc
        h = self.act(h)
        for lin in self.hidden:
            h = self.act(lin(h))
        # the output layer in fp32 even under bf16 autocast: β·Q̄'s differences between one state's actions are
        # finer than bf16's spacing at Q's scale (0.5 near 100)
        with torch.autocast(h.device.type, enabled=False):
            return self.out(h.to(self.out.weight.dtype)).squeeze(-1)

    def grad_projected(self, x: torch.Tensor, pc: torch.Tensor | None) -> torch.Tensor:
        """∇x of forward_projected by an explicit backward pass (SiLU only).

        Needs no autograd graph, so the guided sampler can run under torch.inference_mode."""
        assert self.act_name == "silu"
        z = self.inp(x)
        if pc is not None:
            z = z + pc
        dz = []
        for lin in self.hidden:
            dz.append(_silu_grad(z))
            z = lin(F.silu(z))
        g = _silu_grad(z) * self.out.weight[0]
        for lin, d in zip(reversed(self.hidden), reversed(dz)):
            g = (g @ lin.weight) * d
        return g @ self.inp.weight


class TwinQ(nn.Module):
    """Two MLPs [a_dim + s_dim, 256, 256, 256, 1] with ReLU on (action, state)."""
    members = 1

    def __init__(self, action_dim: int, state_dim: int, hidden: Sequence[int] = (256, 256, 256)):
        super().__init__()
        self.q1 = CondMLP(action_dim, state_dim, hidden, act="relu")
        self.q2 = CondMLP(action_dim, state_dim, hidden, act="relu")

    def forward(self, a: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """Both heads stacked, [2, ...]. a: [..., N, a_dim] actions for states s: [..., s_dim] (broadcast as
        [..., 1, s_dim] when a has one more dimension than s; otherwise rows are paired)."""
        if s is not None and a.dim() == s.dim() + 1:
            s = s.unsqueeze(-2)
        return torch.stack((self.q1.forward_projected(a, self.q1.project_cond(s)),
                            self.q2.forward_projected(a, self.q2.project_cond(s))))

    def member_min(self, a: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """Each member's min of its twin heads, [members, ...]."""
        h = self(a, s)
        return h.view(self.members, 2, *h.shape[1:]).amin(1)

    def min(self, a: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """Q̄ = the min over every head (a twin's: the min of its two heads)."""
        return self(a, s).amin(0)


class TwinQEnsemble(TwinQ):
    """`members` independent twin Qs side by side (heads 2m and 2m + 1 are member m's), each learning from its
    own twin-min target; Q̄ is the min over all of them: pessimism at the actions one critic's draw over-rates."""

    def __init__(self, action_dim: int, state_dim: int, hidden: Sequence[int] = (256, 256, 256), members: int = 2):
        nn.Module.__init__(self)
        self.members = members
        self.twins = nn.ModuleList(TwinQ(action_dim, state_dim, hidden) for _ in range(members))

    def forward(self, a: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([t(a, s) for t in self.twins])


class EnergyNet(nn.Module):
    """fφ(a, s, t): MLP [a_dim + 32 + s_dim, 256×4, 1], SiLU, time via Fourier(32) → Linear(32,32).

    Trained as a Q-like score (higher is preferred); guidance adds w·∇a fφ to the behaviour score."""

    def __init__(self, action_dim: int, state_dim: int, hidden: Sequence[int] = (256, 256, 256, 256),
                 embed_dim: int = 32, fourier_scale: float = 30.0):
        super().__init__()
        self.time = nn.Sequential(FourierFeatures(embed_dim, fourier_scale), nn.Linear(embed_dim, embed_dim))
        self.mlp = CondMLP(action_dim, embed_dim + state_dim, hidden, act="silu")

    def condition(self, t: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """Projected condition for times t [...] and states s [..., s_dim] (broadcast together)."""
        te = self.time(t)
        if s is not None and s.shape[-1] > 0:
            te = cat_broadcast(te, s)
        return self.mlp.project_cond(te)

    def forward(self, a: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp.forward_projected(a, self.condition(t, s))

    def grad_action(self, a: torch.Tensor, pc: torch.Tensor) -> torch.Tensor:
        """∇a fφ given a projected condition from `condition` (broadcastable to a's rows)."""
        return self.mlp.grad_projected(a, pc)


class ValueNet(nn.Module):
    """A clean (time-free) value V(a, s), used as the differentiable energy of the DPS baseline on toys."""

    def __init__(self, action_dim: int, state_dim: int, hidden: Sequence[int] = (256, 256, 256)):
        super().__init__()
        self.mlp = CondMLP(action_dim, state_dim, hidden, act="silu")

    def forward(self, a: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        if s is not None and a.dim() == s.dim() + 1:
            s = s.unsqueeze(-2)
        return self.mlp.forward_projected(a, self.mlp.project_cond(s))


class StateValue(nn.Module):
    """V(s): MLP [s_dim, 256, 256, 1], ReLU (IQL's value network)."""

    def __init__(self, state_dim: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        self.mlp = CondMLP(state_dim, 0, hidden, act="relu")

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp.forward_projected(s, None)


class GaussianActor(nn.Module):
    """π(a|s) = N(tanh(MLP(s)), diag(exp(2·log_std))) with a state-independent log_std (IQL's actor); the
    deterministic action is the mean."""

    def __init__(self, state_dim: int, action_dim: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        layers, d = [], state_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.net = nn.Sequential(*layers, nn.Linear(d, action_dim))
        self.log_std = nn.Parameter(torch.zeros(action_dim))
        self.action_dim = action_dim

    def mean(self, s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(s))

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """log π(a|s) (the training objective's input, so that a data-parallel wrapper syncs its gradients)."""
        std = self.log_std.clamp(-5.0, 2.0).exp()
        return torch.distributions.Normal(self.mean(s), std).log_prob(a).sum(-1)
