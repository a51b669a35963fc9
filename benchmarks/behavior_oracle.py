"""What can any behaviour model score on a dataset made of several agents' parts (a `*-medium-expert-local`
file)? A model that fits the data exactly samples, at a state s, part k's action with probability P(k | s)
and then that part's agent. This script builds that policy from the agents themselves: a classifier learns
P(part | s) from the file's observations (parts are concatenated, equal rows each), and at every step the
policy draws a part from it and acts as that part's agent did when the file was written (its added noise,
or its own distribution). Its score is the ceiling of w = 0; the parts alone show what the mixture loses.

Real MuJoCo episodes on the study's test resets (reset seeds after its validation episodes), per seed.
Needs the agents (`--policy-dir` or $CEPDIST_POLICY_DIR).

    python benchmarks/behavior_oracle.py --task walker2d-medium-expert-local --data-root DATA [--seeds 0 1 2]
        [--behavior STORE/behavior-…/artifact.pt …]

`--behavior`: the same for behaviour models (w = 0), and where they do not act as the data's agents:
- per part, at 512 of that part's dataset states: the distance between the mean of 32 model samples and the
  agent's mean action, and the model's per-dimension spread beside the part's own (its added noise);
- at 256 episodes' first states (where every part starts): the share of 64 model samples within 0.1 / 0.3 /
  1.0 of each deterministic part's action, against that part's share of the file's episodes;
- along the rollouts, model and mixture alike: how many episodes are, by the classifier, in each part's
  states after 3, 10, 100 and 500 steps (the part an episode follows is chosen in its first steps).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from cepdist.data import datasets
from cepdist.data.tasks import get_task
from cepdist.distributed.presets import preset
from cepdist.distributed.study import EVAL_SEED_OFFSET
from cepdist.envs.environments import make_env
from cepdist.envs.evaluation import evaluate
from cepdist.envs.generate import AgentPolicy, env_level, level_sources, policy_dir



def part_classifier(obs: np.ndarray, parts: np.ndarray, n_parts: int, steps: int, seed: int):
    """An MLP for P(part | s) (cross-entropy, 5% of rows held out); returns it and its held-out figures."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.as_tensor(obs)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    y = torch.as_tensor(parts)
    perm = torch.randperm(len(x), generator=g)
    hold, train = perm[: len(x) // 20], perm[len(x) // 20:]
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, n_parts))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for i in range(steps):
        b = train[torch.randint(len(train), (2048,), generator=g)]
        loss = F.cross_entropy(net((x[b] - mu) / sd), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = net((x[hold] - mu) / sd)
        ce = float(F.cross_entropy(logits, y[hold]))
        acc = float((logits.argmax(1) == y[hold]).float().mean())
    prior = np.bincount(parts, minlength=n_parts) / len(parts)
    prior_ce = float(-(prior * np.log(prior)).sum())
    return (lambda s: torch.softmax(net((s - mu) / sd), -1)), {"holdout_cross_entropy": ce,
                                                                 "prior_cross_entropy": prior_ce,
                                                                 "holdout_accuracy": acc}


class PartTracker:
    """Wraps an evaluation policy; at each lockstep call (one per environment step) counts the live episodes
    (those run at scale `only_w`, if given) whose state the classifier puts in each part."""

    def __init__(self, policy, classify, n_parts: int, only_w: float | None = None):
        self.policy, self.classify, self.n_parts, self.only_w = policy, classify, n_parts, only_w
        self.device, self.action_dim = policy.device, policy.action_dim
        self.per_step: list[np.ndarray] = []

    def __call__(self, states, w, x_init=None):
        with torch.no_grad():
            part = self.classify(states.cpu()).argmax(-1).numpy()
        if self.only_w is not None:
            part = part[w.cpu().numpy() == self.only_w]
        self.per_step.append(np.bincount(part, minlength=self.n_parts))
        return self.policy(states, w=w, x_init=x_init)

    def at(self, steps=(3, 10, 100, 500)) -> dict:
        return {str(t): self.per_step[t].tolist() if t < len(self.per_step) else [0] * self.n_parts for t in steps}


class PartsPolicy:
    """The evaluation pool's policy interface; w selects the mode: −1 the mixture by P(part | s), k ≥ 0 part k."""
    device, action_dim = torch.device("cpu"), 0

    def __init__(self, agents, noises, classify, action_dim: int, seed: int):
        self.agents, self.noises, self.classify = agents, noises, classify
        self.action_dim = action_dim
        self.rng = np.random.default_rng(seed)
        self.counts = np.zeros(len(agents))

    def __call__(self, states, w, x_init=None):
        mode = w.numpy().astype(int)
        with torch.no_grad():
            p = self.classify(states).numpy()
        u = self.rng.random(len(states))[:, None]
        drawn = (u > np.cumsum(p, 1)).sum(1).clip(max=len(self.agents) - 1)
        part = np.where(mode < 0, drawn, mode)
        np.add.at(self.counts, part[mode < 0], 1)
        out = np.zeros((len(states), self.action_dim), np.float32)
        for k, (agent, noise) in enumerate(zip(self.agents, self.noises)):
            rows = np.flatnonzero(part == k)
            if len(rows):
                a = agent(states[rows].numpy())
                out[rows] = a + noise * self.rng.standard_normal(a.shape) if noise > 0 else a
        return torch.as_tensor(out)


def model_vs_parts(model, obs, parts, starts, agents, sources, states: int = 512, n: int = 32, seed: int = 0) -> dict:
    """Per part: mean over states of ‖mean of n model samples − the agent's mean action‖ and the model's mean
    per-dimension spread (the mean action: a noisy agent's without noise; a stochastic agent's is not known);
    at first states, the share of samples near each part's action (`start_share`, radius → share)."""
    rng = np.random.default_rng(seed)
    first = rng.choice(starts, min(256, len(starts)), replace=False)
    with torch.no_grad():
        a_first = model(torch.as_tensor(obs[first]), w=0.0, n=64)
    out = {}
    for k, (agent, src) in enumerate(zip(agents, sources)):
        idx = rng.choice(np.flatnonzero(parts == k), states, replace=False)
        s = torch.as_tensor(obs[idx])
        with torch.no_grad():
            a = model(s, w=0.0, n=n)                                     # [states, n, d]
        mean_action = torch.as_tensor(agent(obs[idx]), dtype=torch.float32)
        d_first = (a_first - torch.as_tensor(agent(obs[first]), dtype=torch.float32)[:, None]).norm(dim=-1)
        out[src.describe()] = {"distance_to_agent": float((a.mean(1) - mean_action).norm(dim=-1).mean()),
                               "model_spread": float(a.std(1).mean()), "part_spread": src.noise,
                               "start_share": {str(r): float((d_first < r).float().mean()) for r in (0.1, 0.3, 1.0)},
                               "data_start_share": float(np.mean(parts[starts] == k))}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="walker2d-medium-expert-local")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--policy-dir", help="agents folder (default $CEPDIST_POLICY_DIR)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the study's seeds (their test resets)")
    ap.add_argument("--episodes", type=int, default=50, help="test episodes per seed")
    ap.add_argument("--val-episodes", type=int, default=20, help="the study's validation episodes (skipped)")
    ap.add_argument("--classifier-steps", type=int, default=4000)
    ap.add_argument("--behavior", nargs="*", default=[], help="behaviour stage artifacts to measure per part")
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/behavior_oracle-TASK.json)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task(a.task)
    env, level = env_level(task)
    sources = [p[0] for p in level_sources(env, level)]
    if any(len(p) != 1 for p in level_sources(env, level)) or any(s.policy == "random" for s in sources):
        raise SystemExit(f"{task.name}: needs a level whose parts are one agent each (e.g. medium-expert)")
    path = datasets.local_path(task, Path(a.data_root))
    with h5py.File(path, "r") as f:
        obs = f["observations"][:]
        ends = f["terminals"][:] | f["timeouts"][:]
    starts = np.r_[0, np.flatnonzero(ends[:-1]) + 1]
    n_parts = len(sources)
    if len(obs) % n_parts:
        raise SystemExit(f"{path}: {len(obs)} rows do not split into {n_parts} equal parts")
    parts = np.repeat(np.arange(n_parts), len(obs) // n_parts)
    t0 = time.perf_counter()
    classify, fit = part_classifier(obs, parts, n_parts, a.classifier_steps, seed=0)
    print(f"P(part | s): held-out cross-entropy {fit['holdout_cross_entropy']:.3f} (prior {fit['prior_cross_entropy']:.3f}),"
          f" accuracy {fit['holdout_accuracy']:.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    e = make_env(task)
    root = policy_dir(a.policy_dir)
    agents = [AgentPolicy(s.policy, env, root, e.action_space, e.observation_space, s.stochastic) for s in sources]
    names = [s.describe() for s in sources]
    from cepdist.algos.qgpo.policy import load_policy
    models = {}
    for b in a.behavior:
        model = load_policy(b, "cep", seed=0, solver=preset("local").base.sampler)     # sampled as the study samples
        parts_m = model_vs_parts(model, obs, parts, starts, agents, sources)
        track = PartTracker(model, classify, n_parts)
        seed = a.seeds[0]
        res = evaluate(track, task, [0.0], a.val_episodes + a.episodes, seed=EVAL_SEED_OFFSET + seed,
                       pairs=[(0, ep) for ep in range(a.val_episodes, a.val_episodes + a.episodes)])
        sc = res.normalized[0, a.val_episodes:]
        models[b] = {"parts": parts_m, "seed": seed, "w0": sc.tolist(), "episodes_in_part": track.at()}
        print(f"{b}: w = 0 {sc.mean():.1f} ± {sc.std() / np.sqrt(len(sc)):.1f} (seed {seed}); episodes per part after "
              + ", ".join(f"{t} steps {c}" for t, c in track.at().items()), flush=True)
        for n, m in parts_m.items():
            print(f"  {n}: distance to the agent {m['distance_to_agent']:.3f}, spread {m['model_spread']:.3f} (the "
                  f"part's {m['part_spread']:g}); at first states within 0.1 / 0.3 / 1.0 of its action "
                  + " / ".join(f"{v:.3f}" for v in m["start_share"].values())
                  + f" (its share of the episodes {m['data_start_share']:.3f})", flush=True)
    modes = [-1.0] + [float(k) for k in range(n_parts)]
    rows = []
    for seed in a.seeds:
        torch.manual_seed(seed)                               # stochastic agents sample from torch's generator
        pol = PartsPolicy(agents, [s.noise for s in sources], classify, e.action_space.shape[0], seed)
        eps = range(a.val_episodes, a.val_episodes + a.episodes)
        t0 = time.perf_counter()
        mixture = PartTracker(pol, classify, n_parts, only_w=-1.0)
        res = evaluate(mixture, task, modes, a.val_episodes + a.episodes, seed=EVAL_SEED_OFFSET + seed,
                       pairs=[(i, ep) for i in range(len(modes)) for ep in eps])
        sc = res.normalized[:, a.val_episodes:]
        share = (pol.counts / max(pol.counts.sum(), 1)).tolist()
        rows.append({"seed": seed, "mixture": sc[0].tolist(), "parts": {n: sc[1 + k].tolist()
                                                                           for k, n in enumerate(names)},
                     "mixture_part_share": dict(zip(names, share)), "mixture_episodes_in_part": mixture.at()})
        print(f"seed {seed}: mixture {sc[0].mean():5.1f} ± {sc[0].std() / np.sqrt(sc.shape[1]):.1f} (parts drawn "
              + ", ".join(f"{n} {s:.2f}" for n, s in zip(names, share)) + ")  "
              + "  ".join(f"{n} alone {sc[1 + k].mean():5.1f}" for k, n in enumerate(names))
              + f"; mixture's episodes per part after " + ", ".join(f"{t} steps {c}" for t, c in mixture.at().items())
              + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    mix = np.array([r["mixture"] for r in rows])
    per_seed = mix.mean(1)
    print(f"mixture over {len(rows)} seeds: {per_seed.mean():.1f} (seed means {', '.join(f'{m:.1f}' for m in per_seed)})")
    out = Path(a.out or Path(__file__).parent / "results" / f"behavior_oracle-{a.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": a.task, "data": str(path), "sources": names, "classifier": fit,
                               "models": models, "episodes": a.episodes, "val_episodes": a.val_episodes, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
