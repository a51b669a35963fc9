"""EDIS throughput on this machine: generated transitions per second without and with the three energies, and
online environment steps per second of the whole loop (plain fine-tuning and EDIS, whose refreshes are
amortised over `refresh_every` steps).

    python benchmarks/edis.py --data-root DIR [--device cpu|cuda] [--task hopper-medium-local]

Sizes are the `local` EDIS preset's (cepdist/distributed/presets.py); the networks are trained only as far as
the loop needs (throughput does not depend on the weights). Writes benchmarks/results/edis[-cuda].json."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from cepdist.algos.edis.energies import Energies
from cepdist.algos.edis.model import train_transition_model
from cepdist.algos.edis.online import run_online
from cepdist.algos.iql import IQLAgent
from cepdist.data import datasets
from cepdist.distributed.presets import edis_preset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper-medium-local")
    ap.add_argument("--data-root")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=4096, help="transitions per generation call")
    ap.add_argument("--online-steps", type=int, default=3000)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    data, task = datasets.load(a.task, root=Path(a.data_root) if a.data_root else None)
    data = data.to(dev)
    cfg = edis_preset("local").base
    cfg = dataclasses.replace(cfg, iql=dataclasses.replace(cfg.iql, reward=task.reward))
    out = {"task": a.task, "device": str(dev), "threads": a.threads, "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "sizes": "EDIS local preset"}

    model = train_transition_model(dataclasses.replace(cfg.model, steps=10), data).to(dev)
    energies = Energies(cfg.energies, data.state_dim, data.action_dim, data.state_dim + 2).to(dev).requires_grad_(False)
    g = torch.Generator(device=dev).manual_seed(0)
    for name, guidance, w in (("unguided", None, (0.0, 0.0, 0.0)),
                              ("guided", energies.guidance(), cfg.energies.weights)):
        model.generate(256, guidance, w, g)                      # warm-up
        t0 = time.perf_counter()
        model.generate(a.n, guidance, w, g)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[f"generate_{name}_per_s"] = a.n / (time.perf_counter() - t0)
        print(f"generated transitions/s ({name}, {cfg.model.solver.steps} solver steps × 3 factors): "
              f"{out[f'generate_{name}_per_s']:.0f}", flush=True)

    agent = IQLAgent(cfg.iql, data.state_dim, data.action_dim).to(dev)
    n = a.online_steps
    online = dataclasses.replace(cfg.online, steps=n, start_after=n // 3, refresh_every=n, eval_every=10 * n,
                                 ckpt_every=10 * n)
    for arm in ("plain", "edis"):
        c = dataclasses.replace(cfg, enabled=arm == "edis", online=online)
        t0 = time.perf_counter()
        _, hist = run_online(c, task, data, agent, model if arm == "edis" else None,
                             evaluate=lambda step, ag: {}, ckpt_dir=None)
        wall = time.perf_counter() - t0
        parts = {k.removeprefix("seconds_"): v for k, v in hist[-1].items() if k.startswith("seconds_")}
        refresh = parts["model"] + parts["energies"] + parts["generate"]
        loop = (wall - refresh) / n                              # seconds per step outside refreshes
        out[arm] = {"steps": n, "wall_s": wall, "parts_s": parts, "refresh_s": refresh,
                    "steps_per_s_between_refreshes": 1.0 / loop}
        if arm == "edis":
            every = cfg.online.refresh_every
            out[arm]["steps_per_s_whole_loop_at_preset"] = every / (every * loop + refresh)
        print(f"online {arm}: {1.0 / loop:.0f} env steps/s between refreshes"
              + (f", refresh {refresh:.1f} s (model {parts['model']:.1f}, energies {parts['energies']:.1f}, "
                 f"generate {parts['generate']:.1f}) → {out[arm]['steps_per_s_whole_loop_at_preset']:.0f} steps/s "
                 f"over the whole loop at refresh_every={cfg.online.refresh_every}" if arm == "edis" else ""), flush=True)
    path = Path(a.out or Path(__file__).parent / "results" / f"edis{'-cuda' if dev.type == 'cuda' else ''}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
