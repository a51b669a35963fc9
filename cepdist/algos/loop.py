"""A small training-loop helper shared by the stages: progress lines with rate and ETA, the non-finite
loss guard, periodic checkpoints and resumption.

Losses are accumulated on the device and read back once per log interval, so the inner loop has no
host synchronisation; a checkpoint is written only right after such a check passed, so the last
checkpoint on disk is always a finite one."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint

log = logging.getLogger("cepdist")

# (stage, step, metrics, path of the checkpoint written at this step or None); called at the same steps on
# every data-parallel worker (log steps, checkpoint steps, the last step), whether or not it writes files
Callback = Callable[[str, int, dict, "Path | None"], None]


class NonFiniteLossError(RuntimeError):
    pass


class DivergedLossError(NonFiniteLossError):
    """A loss still finite but far above its own early scale: the run has diverged all the same."""


# a loss logged above this multiple of max(its value at the first step, 1) is treated as divergence (a
# learning rate of 1e3 drives Q's loss from ~1 to ~1e22 within 20 steps; healthy losses stay within ~100×)
DIVERGENCE_FACTOR = 1e6


class Loop:
    def __init__(self, stage: str, total: int, names: tuple[str, ...], device, log_every: int,
                 ckpt_every: int, ckpt_path: Path | None, snapshot: Callable[[int], dict],
                 callback: Callback | None = None, start: int = 0, cpu_before: float = 0.0):
        self.stage, self.total, self.names = stage, total, names
        self.log_every, self.ckpt_every = max(1, log_every), max(1, ckpt_every)
        self.ckpt_path, self.snapshot, self.callback = ckpt_path, snapshot, callback
        self.acc = torch.zeros(len(names), device=device, dtype=torch.float64)
        self.count = torch.zeros(len(names), device=device, dtype=torch.float64)
        self.step, self.start = start, start
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = start
        # a resumed run's last good checkpoint is the one it resumed from
        self.last_good_step: int | None = start if start > 0 else None
        self.first: dict[str, float] = {}            # each loss at this run's first step (one host sync)
        # the stage's compute is this process's CPU time, carried in the checkpoints across interruptions
        # (cpu_before: the resumed checkpoint's)
        self.cpu0, self.cpu_before = time.process_time(), cpu_before

    def cpu_seconds(self) -> float:
        """CPU seconds of the process running this loop, over every run that led to the current step."""
        return self.cpu_before + time.process_time() - self.cpu0

    def record(self, i: int, value: torch.Tensor):
        if "loss" in self.names[i] and self.names[i] not in self.first:
            self.first[self.names[i]] = float(value.detach())
        self.acc[i] += value.detach().double()
        self.count[i] += 1

    def end_step(self):
        self.step += 1
        last = self.step == self.total
        ckpt_step = self.step % self.ckpt_every == 0 or last
        if ckpt_step or self.step % self.log_every == 0:
            metrics = self.flush()          # raises before anything non-finite is saved
            saved = None
            if ckpt_step and self.ckpt_path is not None:
                self.save()
                saved = self.ckpt_path
            if self.callback is not None:   # after the save: a callback that stops the run loses nothing
                self.callback(self.stage, self.step, metrics, saved)

    def flush(self):
        sums, counts = self.acc.tolist(), self.count.tolist()
        self.acc.zero_(); self.count.zero_()
        metrics = {n: s / c for n, s, c in zip(self.names, sums, counts) if c > 0}
        bad = [n for n, v in metrics.items() if not math.isfinite(v)]
        where = f"; last good checkpoint: {self.ckpt_path} (step {self.last_good_step})" \
            if self.last_good_step is not None else "; no checkpoint was written yet"
        if bad:
            raise NonFiniteLossError(f"{self.stage}: non-finite {', '.join(bad)} between steps "
                                     f"{self.step_last} and {self.step}{where}")
        for n, first in self.first.items():
            v = metrics.get(n, 0.0)
            if v > DIVERGENCE_FACTOR * max(first, 1.0):
                raise DivergedLossError(f"{self.stage}: {n} diverged to {v:.3g} between steps {self.step_last} and "
                                        f"{self.step}, over {DIVERGENCE_FACTOR:.0e}× its value at the first step "
                                        f"({first:.3g}){where}")
        now = time.perf_counter()
        rate = (self.step - self.step_last) / max(now - self.t_last, 1e-9)
        eta = (self.total - self.step) / max(rate, 1e-9)
        metrics[f"{self.stage}/steps_per_s"] = rate
        metrics[f"{self.stage}/total_steps"] = self.total
        metrics[f"{self.stage}/cpu_seconds"] = self.cpu_seconds()
        log.info("%s %d/%d (%.0f%%) %s | %.1f it/s, ETA %s", self.stage, self.step, self.total,
                 100.0 * self.step / self.total, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                           if "/" not in k), rate, _fmt(eta))
        self.t_last, self.step_last = now, self.step
        return metrics

    def save(self):
        checkpoint.save(self.ckpt_path, **self.snapshot(self.step), cpu_seconds=self.cpu_seconds())
        self.last_good_step = self.step


def _fmt(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


def resume_state(ckpt_path: Path | None, config: dict) -> dict | None:
    """The checkpoint at ckpt_path if it exists and was made with the same config, else None."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return None
    ck = checkpoint.load(ckpt_path)
    if ck.get("config") != config:
        raise ValueError(f"checkpoint {ckpt_path} was written with a different config; "
                         "remove it or use another checkpoint directory")
    return ck
