"""EDIS's exactness toy: offline and online distributions of (s, a, r, s') that differ in all three factors
in a known way, so that guided samples can be scored against exact online samples, factor by factor.

States are 2-D, actions 1-D, no terminals, r = s₁·a:
- state:      offline ½N((−1, 0), 0.35²) + ½N((1, 0), 0.35²);  online 0.2·N((−1, 0), ·) + 0.8·N((1, 0.5), ·)
- policy:     offline a = tanh(0.8·s₁ + 0.3ε);                 online a = tanh(−0.8·s₁ + 0.5 + 0.2ε)
- transition: offline s' = s + (0.5a, 0.5a² − 0.2) + 0.1ε;      online s' = s + (0.3a + 0.1, 0.5a² − 0.2) + 0.1ε

A transition model is fitted to offline data; the three energies are trained on exact online positives
against its samples; each factor is then scored by the sliced W2 distance (on normalised blocks) between
samples and exact online draws, given exact online conditions (state: none; policy: s; transition: (s, a)),
and the whole chain on (s, a, y). Compared: unguided samples, guidance by energies trained at every noise
level (EDIS here), by energies trained only at the smallest one (the released code's state energy), and the
floor between two exact online draws."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...config import to_dict
from ...data.transitions import Transitions
from .. import checkpoint
from ..qgpo.config import SolverConfig
from ..qgpo.stages import seed_generator
from ..toy import sliced_w2
from .config import EnergiesConfig, TransitionModelConfig
from .energies import Energies, contrast_sets, train_energies
from .model import FACTORS, load_transition_model, train_transition_model


def _states(rng, n: int, online: bool) -> np.ndarray:
    w, centres = (0.2, np.array([[-1.0, 0.0], [1.0, 0.5]])) if online else (0.5, np.array([[-1.0, 0.0], [1.0, 0.0]]))
    c = np.where(rng.random(n) < w, 0, 1)
    return centres[c] + 0.35 * rng.standard_normal((n, 2))


def policy_action(s: np.ndarray, rng, online: bool) -> np.ndarray:
    if online:
        return np.tanh(-0.8 * s[:, :1] + 0.5 + 0.2 * rng.standard_normal((len(s), 1)))
    return np.tanh(0.8 * s[:, :1] + 0.3 * rng.standard_normal((len(s), 1)))


def _step(s: np.ndarray, a: np.ndarray, rng, online: bool) -> np.ndarray:
    drift = np.concatenate([0.3 * a + 0.1 if online else 0.5 * a, 0.5 * a**2 - 0.2], 1)
    return s + drift + 0.1 * rng.standard_normal(s.shape)


def draw(n: int, online: bool, seed: int, states: np.ndarray | None = None, actions: np.ndarray | None = None) -> Transitions:
    """n exact transitions of the offline or online distribution; given states (and actions), only the
    later factors are drawn."""
    rng = np.random.default_rng(seed)
    s = _states(rng, n, online) if states is None else states
    a = policy_action(s, rng, online) if actions is None else actions
    s2 = _step(s, a, rng, online)
    z = np.zeros(len(s))
    return Transitions.from_numpy(s, a, s[:, 0] * a[:, 0], s2, z, z)


@dataclass
class EDISToyPreset:
    n_data: int = 50_000
    model: TransitionModelConfig = field(default_factory=lambda: TransitionModelConfig(
        widths=(256, 128, 64), steps=4000, batch_size=1024, lr=1e-3, ema=0.999, log_every=1000, ckpt_every=4000,
        solver=SolverConfig(steps=25, order=2, spacing="logSNR")))
    energies: EnergiesConfig = field(default_factory=lambda: EnergiesConfig(
        hidden=(128, 128, 128), steps=3000, groups=256, negatives=10, pool=8192, weights=(1.0, 1.0, 1.0)))
    n_eval: int = 5000


TOY_PRESETS = {
    "cpu": EDISToyPreset(),
    "tiny": EDISToyPreset(n_data=10_000, model=TransitionModelConfig(
        widths=(64, 32, 16), steps=300, batch_size=256, lr=1e-3, ema=0.99, log_every=300, ckpt_every=300,
        solver=SolverConfig(steps=10, order=2, spacing="logSNR")),
        energies=EnergiesConfig(hidden=(32, 32), steps=100, groups=64, negatives=4, pool=512, weights=(1.0, 1.0, 1.0)),
        n_eval=1000),
}


def run_toy(preset: EDISToyPreset, cache_dir: Path, seed: int = 0) -> dict:
    """Distances per factor and arm (see the module docstring); models are cached under cache_dir."""
    key = hashlib.sha1(json.dumps([to_dict(preset), seed]).encode()).hexdigest()[:10]
    root = Path(cache_dir) / f"edis-toy-{key}"
    offline = draw(preset.n_data, False, seed)
    if (root / "model" / "moments.pt").is_file():
        model = load_transition_model(preset.model, root / "model")
    else:
        model = train_transition_model(preset.model, offline, seed=seed, ckpt_dir=root / "model")
    gen = seed_generator(seed, "edis-toy", "cpu")
    online = draw(preset.n_data, True, seed + 1)
    rng_pi = np.random.default_rng(seed + 2)
    pi = lambda s: torch.from_numpy(policy_action(s.numpy(), rng_pi, True).astype(np.float32))
    sets = contrast_sets(model, online, pi, preset.energies.pool, preset.energies.negatives, gen)
    arms = {"unguided": None}
    for name, clean in (("edis", False), ("t0_energies", True)):
        ecfg = dataclasses.replace(preset.energies, clean_only=clean)
        path = root / f"energies-{name}.pt"
        energies = Energies(ecfg, model.s_dim, model.a_dim, sets["transition"].x.shape[-1], seed)
        if path.is_file():
            energies.load_state_dict(checkpoint.load(path)["energies"])
        else:
            train_energies(ecfg, energies, sets, model.schedule, gen)
            checkpoint.save(path, energies=energies.state_dict())
        arms[name] = energies.requires_grad_(False).eval()

    n = preset.n_eval
    exact = draw(n, True, seed + 10)
    s, a, y = model.blocks(exact)
    s2, a2, y2 = model.blocks(draw(n, True, seed + 11))                                   # independent
    _, pa, _ = model.blocks(draw(n, True, seed + 12, states=exact.obs.numpy()))           # same states
    _, _, ty = model.blocks(draw(n, True, seed + 13, exact.obs.numpy(), exact.actions.numpy()))  # same (s, a)
    cat = lambda *xs: torch.cat(xs, -1).numpy()
    out = {"floor": {"state": sliced_w2(s.numpy(), s2.numpy()), "policy": sliced_w2(cat(s, pa), cat(s, a)),
                     "transition": sliced_w2(cat(s, a, ty), cat(s, a, y)), "chain": sliced_w2(cat(s2, a2, y2), cat(s, a, y))}}
    w = preset.energies.weights
    for name, energies in arms.items():
        g = {} if energies is None else energies.guidance(preset.energies.clip)
        gs = model.sample_factor("state", None, n, g.get("state"), w[0], gen)
        ga = model.sample_factor("policy", s, 1, g.get("policy"), w[1], gen)[:, 0]
        gy = model.sample_factor("transition", torch.cat([s, a], -1), 1, g.get("transition"), w[2], gen)[:, 0]
        cs, ca, cy = model.sample(n, g, w if energies is not None else (0.0, 0.0, 0.0), gen)
        out[name] = {"state": sliced_w2(gs.numpy(), s.numpy()), "policy": sliced_w2(cat(s, ga), cat(s, a)),
                     "transition": sliced_w2(cat(s, a, gy), cat(s, a, y)), "chain": sliced_w2(cat(cs, ca, cy), cat(s, a, y))}
    return out


FACTOR_ROWS = (*FACTORS, "chain")


def write_toy(preset: EDISToyPreset, out: Path, seed: int = 0) -> Path:
    """Run the toy and write toy.json and toy.md (a table: factor × arm, with the floor) under out."""
    out = Path(out)
    r = run_toy(preset, out / "cache", seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "toy.json").write_text(json.dumps({"preset": to_dict(preset), "seed": seed, "distances": r}, indent=1))
    arms = ("unguided", "t0_energies", "edis", "floor")
    md = ["Sliced W2 to exact online samples (normalised blocks; lower is better). Per factor: samples given exact "
          "online conditions; chain: whole transitions. `t0_energies`: energies trained at the smallest noise level "
          "only (the released code's state energy); `floor`: two exact online draws.", "",
          "| factor | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    md += [f"| {f} | " + " | ".join(f"{r[a][f]:.3f}" for a in arms) + " |" for f in FACTOR_ROWS]
    (out / "toy.md").write_text("\n".join(md) + "\n")
    return out / "toy.md"
