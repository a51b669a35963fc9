"""Does fφ learn, and guide well, with its training times uniform in t (the reference) or uniform in log-SNR?

For one behaviour model and Q̄: K support actions at N random dataset states (w = 0, the `local` preset's
log-SNR sampler), CEP labels softmax(β·Q̄), then fφ trained with each `--t-sampling` on the same draws. Every
1000 steps it prints the label KL at t = 1e-3, 0.05, 0.2 and 0.5 against that of constant logits (what an fφ
that learned nothing scores): a state's actions are narrow (0.11–0.17 per dimension on hopper), so the labels
are identifiable only at small t. Then the guided policy is scored at each w on real episodes, every w on the
same reset seeds, with the paired difference against w = 0.

    python benchmarks/energy_t_sampling.py --task hopper-medium-local --data-root DIR \\
        --behavior STORE/behavior-…/artifact.pt --q STORE/q-…/artifact.pt --t-sampling logSNR \\
        [--states 50000 --K 8 --beta 30 --steps 4000 --scales 0,1,3 --episodes 50 --out FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cepdist.algos.qgpo.config import EnergyConfig
from cepdist.algos.qgpo.policy import GuidedPolicy
from cepdist.algos.qgpo.stages import SupportSet, load_behavior, load_energy, load_q, train_energy
from cepdist.data import datasets
from cepdist.data.tasks import get_task
from cepdist.distributed.presets import LOGSNR_15
from cepdist.envs.evaluation import evaluate


def label_kl(f, A, S, QS, beta, schedule, t, g, n=4096):
    """KL(labels ‖ softmax fφ) at time t on n random states, and the same for constant logits."""
    with torch.no_grad():
        j = torch.randint(len(S), (n,), generator=g)
        a0, tt = A[j], torch.full((n,), t)
        at = schedule.noise(a0, tt, torch.randn(a0.shape, generator=g))
        logp = torch.log_softmax(beta * QS[j], -1)
        kl = (logp.exp() * (logp - torch.log_softmax(f(at, tt[:, None], S[j][:, None, :]), -1))).sum(-1)
        flat = (logp.exp() * (logp + math.log(A.shape[1]))).sum(-1)
        return float(kl.mean()), float(flat.mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--behavior", required=True, help="a behaviour stage artifact")
    ap.add_argument("--q", required=True, help="a Q stage artifact")
    ap.add_argument("--t-sampling", choices=("time_uniform", "logSNR"), default="logSNR")
    ap.add_argument("--states", type=int, default=50_000)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--beta", type=float, default=30.0)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scales", default="0,1,3")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--support-cache", help="file to keep the support actions in between runs")
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/energy_t_sampling/T_SAMPLING.json)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = get_task(a.task)
    data, _ = datasets.load(task.name, root=Path(a.data_root))
    behavior, q = load_behavior(a.behavior), load_q(a.q).requires_grad_(False)
    schedule = behavior.schedule
    g = torch.Generator().manual_seed(0)
    sub = data[torch.randperm(len(data), generator=g)[:a.states]]
    S = sub.obs
    cache = Path(a.support_cache) if a.support_cache else None
    if cache and cache.is_file():
        A = torch.load(cache)
    else:
        t0, pol = time.perf_counter(), GuidedPolicy(behavior, "cep", seed=0, solver=LOGSNR_15)
        with torch.no_grad():
            A = torch.cat([pol(S[i:i + 1024], w=0.0, n=a.K) for i in range(0, len(S), 1024)])
        print(f"support {tuple(A.shape)} in {time.perf_counter() - t0:.0f}s", flush=True)
        if cache:
            torch.save(A, cache)
    with torch.no_grad():
        QS = torch.cat([q.min(A[i:i + 4096], S[i:i + 4096]) for i in range(0, len(S), 4096)])
    print(f"Q̄ mean {QS.mean():.1f}, per-state sd {QS.std(-1).mean():.3f}", flush=True)
    # fφ is the energy stage itself (train_energy) on these states' support actions; at each checkpoint the
    # callback reloads the model from the file just written and measures the label KL
    cfg = EnergyConfig(beta=a.beta, steps=a.steps, lr=a.lr, t_sampling=a.t_sampling, log_every=1000, ckpt_every=1000)
    support = SupportSet(A, torch.arange(len(S)), torch.arange(len(S)))
    t0, log = time.perf_counter(), []

    def at_checkpoint(stage, step, metrics, saved):
        if saved is None:
            return
        f = load_energy(saved)
        kls = {t: label_kl(f, A, S, QS, a.beta, schedule, t, g) for t in (1e-3, 0.05, 0.2, 0.5)}
        log.append({"step": step, "seconds": time.perf_counter() - t0, "loss": metrics["energy_loss"],
                    "kl": {str(t): v[0] for t, v in kls.items()}, "kl_flat": {str(t): v[1] for t, v in kls.items()}})
        print(f"step {step} | {time.perf_counter() - t0:.0f}s | label KL (flat) "
              + " ".join(f"t={t:g}: {v[0]:.3f} ({v[1]:.3f})" for t, v in kls.items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        f = train_energy(cfg, q, support, sub, schedule, seed=0, ckpt_path=Path(tmp) / "energy.pt",
                         callback=at_checkpoint)
    scales = [float(x) for x in a.scales.split(",")]
    res = evaluate(GuidedPolicy(behavior, "cep", energy=f, seed=0, solver=LOGSNR_15), task, scales, a.episodes,
                   seed=50_000)
    base = res.normalized[scales.index(0.0)] if 0.0 in scales else None
    rows = []
    for k, w in enumerate(scales):
        sc = res.normalized[k]
        row = {"w": w, "score": float(sc.mean()), "se": float(sc.std() / np.sqrt(len(sc))), "scores": sc.tolist()}
        if base is not None and w != 0:
            d = sc - base
            row.update(diff=float(d.mean()), diff_se=float(d.std(ddof=1) / np.sqrt(len(d))))
        rows.append(row)
        paired = f"  paired vs w = 0: {row['diff']:+.1f} ± {row['diff_se']:.1f}" if "diff" in row else ""
        print(f"w={w:g}: {row['score']:.1f} ± {row['se']:.1f}{paired}", flush=True)
    out = Path(a.out or Path(__file__).parent / "results" / "energy_t_sampling" / f"{a.t_sampling}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "log": log, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
