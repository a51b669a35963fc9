"""Hot paths of the QGPO core at HalfCheetah sizes (s_dim 17, a_dim 6) and the reference network widths.

Prints a table and writes JSON (default benchmarks/results/core.json):
behaviour-model training steps/s at batch 4096 and 256, Q-stage and
energy-stage iterations/s (batch 256 × K = 16), each in fp32 and under bf16 autocast, and their combination as the reference's critic iteration
(one Q update + one CEP update), guided sampling actions/s at state batches 1, 10, 100,
1000 (15 steps, 2nd-order DPM-Solver++, w = 1), and support-action generation samples/s (w = 0).
AEPO (reconstructed): energy-stage iterations/s of `aepo` for each order and covariance (batch 256 dataset
actions, each with its own t; cep's batch is 256 states × 16 support actions), and guided-sampling actions/s of
`aepo-analytic` (order 1 and 2, Jacobian covariance) beside cep's.
Stage rates are the difference of two runs of different lengths, so set-up time is excluded.

    python benchmarks/core.py [--device cuda] [--quick] [--only aepo] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cepdist.algos.qgpo.config import BehaviorConfig, EnergyConfig, QConfig, SupportConfig
from cepdist.algos.qgpo.policy import GuidedPolicy
from cepdist.algos.qgpo.stages import (SupportSet, build_energy, build_q, generate_support, state_table,
                                       train_behavior, train_energy, train_q)
from cepdist.core.analytic import COVARIANCES, ORDERS
from cepdist.data.transitions import Transitions

S_DIM, A_DIM = 17, 6
REFERENCE = {"behavior_4096": 2.0, "behavior_256": 24.6, "critic": 9.9, "sample_1": 25.5, "sample_10": 227,
             "sample_100": 1157, "sample_1000": 1777, "support": 1973}


def cpu_model() -> str:
    """The CPU's model name and the instruction sets that decide matmul speed (bf16 needs AVX-512 BF16 or
    AMX to be fast on CPU; without them autocast to bf16 is emulated and far slower than fp32)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(have) or 'no avx2'})"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def rate_of(run, k1, k2, device):
    """Steps per second from two runs of k1 and k2 steps (set-up cancels), after a warm-up run that
    absorbs one-time costs (thread pools, kernel selection) which would otherwise bias the difference."""
    run(k1)
    t1, t2 = timed(lambda: run(k1), device), timed(lambda: run(k2), device)
    return (k2 - k1) / max(t2 - t1, 1e-9)


def fake_data(n, device):
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(n, S_DIM, generator=g)
    return Transitions(obs, torch.rand(n, A_DIM, generator=g) * 2 - 1, torch.randn(n, generator=g),
                       torch.randn(n, S_DIM, generator=g), torch.zeros(n), torch.zeros(n, dtype=torch.bool)).to(device)


def aepo_rates(data: Transitions, device, q: int) -> dict[str, float]:
    """AEPO's energy stage per order × covariance, and aepo-analytic's sampling, beside cep's."""
    res = {}
    M = 16
    support = SupportSet(torch.randn(len(data), M, A_DIM, device=device), torch.arange(len(data), device=device),
                         torch.arange(len(data), device=device))
    behavior = train_behavior(BehaviorConfig(steps=0), data.obs, data.actions).to(device)
    q_target = build_q(QConfig(), S_DIM, A_DIM)[1].to(device)
    quiet = dict(log_every=10**9, ckpt_every=10**9)
    for order in ORDERS:
        for cov in COVARIANCES:
            key = f"energy_aepo_o{order}_{cov}"
            cfg = dict(method="aepo", order=order, covariance=cov, **quiet)
            res[key] = rate_of(lambda k: train_energy(EnergyConfig(steps=k, **cfg), q_target, support, data,
                                                      behavior.schedule, behavior=behavior), 2, 2 + 10 * q, device)
            print(f"{key:24s} {res[key]:10.2f} it/s (aepo regression, 256 dataset actions)")
    energy = build_energy(EnergyConfig(), S_DIM, A_DIM).to(device)
    for name, policy in (("cep", GuidedPolicy(behavior, energy=energy)),
                         ("aepo_analytic_o1", GuidedPolicy(behavior, "aepo-analytic", q=q_target, beta=3.0,
                                                           analytic={"order": 1, "max_var": 1.0})),
                         ("aepo_analytic_o2", GuidedPolicy(behavior, "aepo-analytic", q=q_target, beta=3.0,
                                                           analytic={"order": 2, "max_var": 1.0}))):
        for b in (1, 100):
            states = data.obs[:b]
            policy(states, w=1.0)
            reps = max(2, int(100 / b)) * q
            key = f"sample_{name}_{b}"
            res[key] = b * reps / timed(lambda: [policy(states, w=1.0) for _ in range(reps)], device)
            print(f"{key:24s} {res[key]:10.1f} actions/s (15 steps, w=1)")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (noisier)")
    ap.add_argument("--only", choices=("aepo",), help="measure only this part (results merged into --out)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "core.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    q = 1 if args.quick else 2
    data = fake_data(20_000, device)
    out = Path(args.out)
    if args.only:
        old = json.loads(out.read_text()) if out.is_file() else {"results": {}}
        old["results"].update(aepo_rates(data, device, q))
        out.write_text(json.dumps(old, indent=2))
        print(f"wrote {out}")
        return
    res: dict[str, float] = {}

    for bs, (k1, k2) in ((4096, (2, 2 + 5 * q)), (256, (5, 5 + 40 * q))):
        for prec in ("fp32", "bf16"):
            cfg = BehaviorConfig(batch_size=bs, precision=prec, log_every=10**9, ckpt_every=10**9)
            run = lambda k: train_behavior(BehaviorConfig(**{**cfg.__dict__, "steps": k}), data.obs, data.actions)
            key = f"behavior_{bs}" + ("" if prec == "fp32" else "_bf16")
            res[key] = rate_of(run, k1, k2, device)
            print(f"{key:24s} {res[key]:10.2f} steps/s")

    M = 16
    support = SupportSet(torch.randn(len(data), M, A_DIM, device=device), torch.arange(len(data), device=device),
                         torch.arange(len(data), device=device))
    behavior = train_behavior(BehaviorConfig(steps=0), data.obs, data.actions).to(device)
    quiet = dict(log_every=10**9, ckpt_every=10**9)
    q_target = build_q(QConfig(), S_DIM, A_DIM)[1]
    for prec in ("fp32", "bf16"):
        sfx = "" if prec == "fp32" else "_bf16"
        res["q" + sfx] = rate_of(lambda k: train_q(QConfig(steps=k, reward="none", precision=prec, **quiet), data,
                                                   support), 5, 5 + 40 * q, device)
        print(f"{'q' + sfx:24s} {res['q' + sfx]:10.2f} it/s (in-support Q update, 256 × 16)")
        res["energy" + sfx] = rate_of(lambda k: train_energy(EnergyConfig(steps=k, precision=prec, **quiet), q_target,
                                                             support, data, behavior.schedule), 5, 5 + 40 * q, device)
        print(f"{'energy' + sfx:24s} {res['energy' + sfx]:10.2f} it/s (CEP update on the frozen Q̄, 256 × 16)")
    res["critic"] = 1 / (1 / res["q"] + 1 / res["energy"])
    print(f"{'critic':24s} {res['critic']:10.2f} it/s (one Q + one CEP update, the reference's iteration)")

    policy = GuidedPolicy(behavior, energy=build_energy(EnergyConfig(), S_DIM, A_DIM).to(device))
    for b in (1, 10, 100, 1000):
        states = data.obs[:b]
        policy(states, w=1.0)                                  # warm-up
        reps = max(3, int(300 / b)) * q
        res[f"sample_{b}"] = b * reps / timed(lambda: [policy(states, w=1.0) for _ in range(reps)], device)
        print(f"{'sample_' + str(b):24s} {res[f'sample_' + str(b)]:10.1f} actions/s (15 steps, w=1)")

    scfg = SupportConfig(K=M, batch_states=256)
    # consecutive transitions (s'_i = s_{i+1}): n transitions have n + 1 distinct states to sample at
    sub = lambda n: Transitions(data.obs[:n], data.actions[:n], data.rewards[:n], data.obs[1:n + 1],
                                data.terminals[:n], data.ends[:n])
    n1, n2 = 255, 256 * (1 + 4 * q) - 1
    assert state_table(sub(n2))[0].shape[0] == n2 + 1
    generate_support(scfg, behavior, sub(n1))                 # warm-up
    t1 = timed(lambda: generate_support(scfg, behavior, sub(n1)), device)
    t2 = timed(lambda: generate_support(scfg, behavior, sub(n2)), device)
    res["support"] = (n2 - n1) * M / (t2 - t1)
    print(f"{'support':24s} {res['support']:10.1f} samples/s (256 states × 16, 15 steps, w=0)")

    res.update(aepo_rates(data, device, q))
    print("\nspeed-up over the reference implementation on 2 CPU cores:")
    for k, ref in REFERENCE.items():
        print(f"  {k:16s} {res[k] / ref:6.2f}x" + (f"   (bf16: {res[k + '_bf16'] / ref:.2f}x)" if k + "_bf16" in res else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "cpu": cpu_model(),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "results": res, "reference_2cpu": REFERENCE}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
