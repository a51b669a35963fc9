"""The paper's 2-D toy: exact (CEP) versus approximate (AEPO, reconstructed) and inexact (MSE, DPS) guidance
on six bandit datasets.

Each dataset is points x ∈ R² from q0 with a value e(x) ∈ [0, 1]; the target is p ∝ q0·exp(β·e).
Ground truth: resample a large pool from q0 without replacement with probabilities softmax(β·e).
The distance to it is the sliced 2-Wasserstein distance (128 projections), with the distance between two
independent ground-truth draws reported as the noise floor."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import to_dict
from ..core import analytic
from ..core.guidance import METHODS, VALUE_METHODS, energy_loss, guided_sample, make_guidance
from ..core.nets import EnergyNet, ValueNet
from .loop import Loop, resume_state
from .qgpo.config import BehaviorConfig, SolverConfig
from .qgpo.stages import adam, make_schedule, max_variance, plan_for, seed_generator, train_behavior

log = logging.getLogger("cepdist")
DATASETS = ("swissroll", "8gaussians", "moons", "rings", "checkerboard", "2spirals")
BETAS = (0.0, 3.0, 10.0, 20.0)


# ---------------------------------------------------------------- datasets
def make_dataset(name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x [n, 2] float32, e [n] float32) for one of DATASETS."""
    rng = np.random.default_rng(seed)
    if name == "swissroll":
        t = 1.5 * np.pi * (1 + 2 * rng.random(n))
        x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2))
        x /= 5.0
        e = (x**2).sum(1) / 9.0
    elif name == "8gaussians":
        k = rng.integers(0, 8, n)
        ang = k * np.pi / 4
        x = (4 * np.stack([np.cos(ang), np.sin(ang)], 1) + 0.5 * rng.standard_normal((n, 2))) / 1.414
        e = k / 7.0
    elif name == "moons":
        lab = rng.integers(0, 2, n)
        th = np.pi * rng.random(n)
        x = np.where(lab[:, None] == 0, np.stack([np.cos(th), np.sin(th)], 1),
                     np.stack([1 - np.cos(th), 1 - np.sin(th) - 0.5], 1))
        x = (x + 0.1 * rng.standard_normal((n, 2))) * 2 + np.array([-1.0, -0.2])
        e = lab.astype(float)
    elif name == "rings":
        r = np.array([0.25, 0.5, 0.75, 1.0])[rng.integers(0, 4, n)] * 3
        th = 2 * np.pi * rng.random(n)
        x = np.stack([r * np.cos(th), r * np.sin(th)], 1)
        r2 = r**2
        e = np.select([r2 < 2, r2 < 5, r2 < 8.5], [0.0, 1.0, 1 / 3], 2 / 3)
        x = x + 0.08 * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
        x = np.stack([x1, x2], 1) * 2
        e = ((x[:, 0] > 0) & (x[:, 0] <= 2) | (x[:, 0] <= -2)).astype(float)
    elif name == "2spirals":
        m = n // 2
        t = np.sqrt(rng.random(m)) * 540 * (2 * np.pi) / 360
        d = np.stack([-np.cos(t) * t + rng.random(m) * 0.5, np.sin(t) * t + rng.random(m) * 0.5], 1)
        x = np.concatenate([d, -d]) / 3 + 0.1 * rng.standard_normal((2 * m, 2))
        e = np.clip(1 - np.concatenate([t, t]) / 10, 0, 1)
        if 2 * m < n:   # odd n: one more point from the first spiral
            x, e = np.concatenate([x, x[:1]]), np.concatenate([e, e[:1]])
    else:
        raise ValueError(f"unknown toy dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return x.astype(np.float32), e.astype(np.float32)


def ground_truth(name: str, beta: float, n: int, pool: int = 1_000_000, seed: int = 1) -> np.ndarray:
    """n exact samples of p ∝ q0·exp(β e): a pool from q0 resampled without replacement by softmax(β e)."""
    x, e = make_dataset(name, pool, seed)
    logits = beta * e.astype(np.float64)
    p = np.exp(logits - logits.max())
    idx = np.random.default_rng(seed + 1).choice(pool, size=n, replace=False, p=p / p.sum())
    return x[idx]


def sliced_w2(a: np.ndarray, b: np.ndarray, n_proj: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds of any dimension (directions uniform
    on the half circle in 2-D, on the sphere otherwise)."""
    n = min(len(a), len(b))
    rng = np.random.default_rng(seed)
    if a.shape[1] == 2:
        th = rng.uniform(0, np.pi, n_proj)
        dirs = np.stack([np.cos(th), np.sin(th)], 1)
    else:
        dirs = rng.standard_normal((n_proj, a.shape[1]))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa = np.sort(a[:n] @ dirs.T, axis=0)
    pb = np.sort(b[:n] @ dirs.T, axis=0)
    return float(np.sqrt(((pa - pb) ** 2).mean()))


# ---------------------------------------------------------------- training (cached)
@dataclass
class ToyPreset:
    n_data: int = 100_000
    behavior: BehaviorConfig = field(default_factory=lambda: BehaviorConfig(
        widths=(256, 128, 64), steps=3000, batch_size=1024, lr=1e-3, log_every=500, ckpt_every=3000))
    energy_hidden: tuple[int, ...] = (128, 128, 128)
    energy_steps: int = 1500
    groups: int = 8                  # one t per group of `group_size` points (the reference: 1 × 2048)
    group_size: int = 256
    lr: float = 1e-3
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(steps=25, order=2, spacing="logSNR"))
    aepo_order: int = 2              # the toy's value network is smooth (SiLU): its curvature counts
    aepo_covariance: str = "jacobian"


PRESETS = {
    "cpu": ToyPreset(),
    "paper": ToyPreset(n_data=1_000_000, behavior=BehaviorConfig(widths=(512, 256, 128), steps=400_000,
                       batch_size=2048, lr=1e-4, log_every=5000, ckpt_every=20_000),
                       energy_hidden=(256, 256, 256, 256), energy_steps=400_000, groups=1, group_size=2048,
                       lr=1e-4),
    "tiny": ToyPreset(n_data=5000, behavior=BehaviorConfig(widths=(64, 32, 16), steps=200, batch_size=256,
                      lr=1e-3, log_every=100, ckpt_every=200), energy_hidden=(32, 32), energy_steps=100,
                      groups=4, group_size=64),
}


class ToyModels:
    """Trains on first use and caches under cache_dir/<dataset>-<preset hash>/ (checkpoints)."""

    def __init__(self, dataset: str, preset: ToyPreset, cache_dir: Path, seed: int = 0, device="cpu"):
        if dataset not in DATASETS:
            raise ValueError(f"unknown toy dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
        self.dataset, self.preset, self.seed, self.device = dataset, preset, seed, torch.device(device)
        key = hashlib.sha1(json.dumps([to_dict(preset), seed]).encode()).hexdigest()[:10]
        self.dir = Path(cache_dir) / f"{dataset}-{key}"
        self.schedule = make_schedule(preset.behavior.schedule)
        self._data = None
        self._behavior = None

    @property
    def data(self):
        if self._data is None:
            x, e = make_dataset(self.dataset, self.preset.n_data, self.seed)
            self._data = torch.from_numpy(x).to(self.device), torch.from_numpy(e).to(self.device)
        return self._data

    @property
    def max_var(self) -> float:
        """The data's largest variance: the cap on the posterior covariance of aepo and dps."""
        return max_variance(self.data[0])

    def behavior(self):
        if self._behavior is None:
            x, _ = self.data
            self._behavior = train_behavior(self.preset.behavior, None, x, seed=self.seed,
                                             ckpt_path=self.dir / "behavior.pt")
        return self._behavior

    def _fit(self, name: str, net: torch.nn.Module, loss_fn, steps: int):
        path = self.dir / f"{name}.pt"
        cfg = {"preset": to_dict(self.preset), "name": name}
        ck = resume_state(path, cfg)
        if ck is not None and ck["step"] == steps:
            net.load_state_dict(ck["model"])
            return net.eval()
        net.to(self.device)
        opt = adam(net.parameters(), self.preset.lr)
        gen = seed_generator(self.seed, name, self.device)
        loop = Loop(f"toy/{self.dataset}/{name}", steps, ("loss",), self.device, max(steps // 4, 1), steps,
                    path, lambda step: {"config": cfg, "step": step, "model": net.state_dict()})
        for _ in range(steps):
            loss = loss_fn(net, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loop.record(0, loss)
            loop.end_step()
        return net.eval()

    def _batch(self, gen):
        x, e = self.data
        idx = torch.randint(len(x), (self.preset.groups * self.preset.group_size,), device=self.device,
                            generator=gen)
        return x[idx].view(self.preset.groups, self.preset.group_size, 2), e[idx].view(self.preset.groups, -1)

    def energy(self, method: str, beta: float) -> EnergyNet:
        """fφ: cep on groups sharing one t; mse (β·e of the clean point) and aepo (AEPO's target Êt from the
        behaviour model and β·V) with one t per point."""
        torch.manual_seed(self.seed)
        net = EnergyNet(2, 0, self.preset.energy_hidden)
        if method == "aepo":
            behavior, value, p = self.behavior().requires_grad_(False), self.value(), self.preset
            max_var = self.max_var

            def target(at, t):
                a, s = self.schedule.alpha(t)[..., None], self.schedule.sigma(t)[..., None]
                return analytic.log_expectation(lambda x: -behavior(x, t, None), lambda x, _: beta * value(x), at,
                                                None, a, s, p.aepo_covariance, p.aepo_order, None, max_var,
                                                (beta * float(self.data[1].min()), beta * float(self.data[1].max())))[0]

        def loss(f, gen):
            x0, e0 = self._batch(gen)
            if method != "cep":
                x0, e0 = x0.reshape(-1, 1, 2), e0.reshape(-1, 1)
            return energy_loss(method, f, x0, None, target if method == "aepo" else beta * e0, self.schedule, gen)
        return self._fit(f"energy-{method}-beta{beta:g}", net, loss, self.preset.energy_steps)

    def value(self) -> ValueNet:
        """V(x) ≈ e(x) for the DPS baseline, evaluated at the Tweedie estimate."""
        torch.manual_seed(self.seed)
        net = ValueNet(2, 0, self.preset.energy_hidden)

        def loss(v, gen):
            x0, e0 = self._batch(gen)
            return (v(x0) - e0).square().mean()
        return self._fit("value", net, loss, self.preset.energy_steps)

    def sample(self, method: str, beta: float, n: int, seed: int = 0) -> np.ndarray:
        """n samples of the guided model (guidance scale 1, the exact setting for cep)."""
        behavior = self.behavior()
        guidance, w = None, 0.0
        if beta != 0:
            if method in VALUE_METHODS:
                v = self.value().requires_grad_(False)
                opts = {"max_var": self.max_var}
                if method == "aepo-analytic":
                    opts.update(covariance=self.preset.aepo_covariance, order=self.preset.aepo_order)
                guidance = make_guidance(method, value=lambda a, s: beta * v(a), **opts)
            else:
                guidance = make_guidance(method, self.energy(method, beta))
            w = 1.0
        plan = plan_for(self.schedule, self.preset.solver)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return guided_sample(behavior, plan, None, n, guidance, w, generator=gen).cpu().numpy()


# ---------------------------------------------------------------- the experiment
def run_experiment(out: Path, preset: str = "cpu", datasets=DATASETS, betas=BETAS, methods=METHODS,
                   n_eval: int = 5000, cache_dir: Path | None = None, seed: int = 0) -> dict:
    """Distance of each method's samples to the exact target, per dataset and β; table + figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out / "cache"
    rows, samples = [], {}
    t0 = time.perf_counter()
    for di, ds in enumerate(datasets):
        models = ToyModels(ds, PRESETS[preset], cache_dir, seed)
        for beta in betas:
            gt = ground_truth(ds, beta, n_eval)
            floor = sliced_w2(gt, ground_truth(ds, beta, n_eval, seed=7))
            samples[ds, beta, "ground truth"] = gt
            for m in methods:
                x = models.sample(m, beta, n_eval, seed)
                samples[ds, beta, m] = x
                rows.append({"dataset": ds, "beta": beta, "method": m, "sw2": sliced_w2(x, gt), "floor": floor})
        el = time.perf_counter() - t0
        log.info("toy: %s done (%d/%d datasets) | %.0fs elapsed, ETA %.0fs", ds, di + 1, len(datasets), el,
                 el / (di + 1) * (len(datasets) - di - 1))
    _write_table(rows, out, methods)
    for beta in betas:
        _figure(samples, datasets, beta, ("ground truth", *methods), out / f"toy_beta{beta:g}.png")
    return {"rows": rows, "out": str(out)}


def _write_table(rows, out: Path, methods):
    import csv
    with open(out / "toy_distances.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(); w.writerows(rows)
    lines = ["Sliced W2 distance to the exact target (lower is better; floor = two exact draws). aepo and "
             "aepo-analytic are reconstructions of AEPO from its paper's abstract, not the authors' method.", "",
             "| dataset | β | " + " | ".join(methods) + " | floor |", "|---|---|" + "---|" * (len(methods) + 1)]
    keys = sorted({(r["dataset"], r["beta"]) for r in rows}, key=lambda k: (DATASETS.index(k[0]), k[1]))
    for ds, beta in keys:
        rs = {r["method"]: r for r in rows if r["dataset"] == ds and r["beta"] == beta}
        best = min(rs.values(), key=lambda r: r["sw2"])["method"]
        cells = [(f"**{rs[m]['sw2']:.3f}**" if m == best else f"{rs[m]['sw2']:.3f}") for m in methods]
        lines.append(f"| {ds} | {beta:g} | " + " | ".join(cells) + f" | {rs[methods[0]]['floor']:.3f} |")
    (out / "toy_distances.md").write_text("\n".join(lines) + "\n")


def _figure(samples, datasets, beta, row_names, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(row_names), len(datasets), figsize=(2.2 * len(datasets), 2.2 * len(row_names)),
                             squeeze=False)
    for j, ds in enumerate(datasets):
        gt = samples[ds, beta, "ground truth"]
        lo, hi = gt.min(0) - 0.5, gt.max(0) + 0.5
        for i, rn in enumerate(row_names):
            ax = axes[i, j]
            x = samples[ds, beta, rn]
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4, color="C0" if rn == "ground truth" else f"C{i}")
            ax.set_xlim(lo[0], hi[0]); ax.set_ylim(lo[1], hi[1])
            ax.set_xticks([]); ax.set_yticks([])
            if i == 0:
                ax.set_title(ds, fontsize=10)
            if j == 0:
                ax.set_ylabel(rn, fontsize=10)
    fig.suptitle(f"Guided samples at β = {beta:g} (rows: exact target, then each guidance method)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
