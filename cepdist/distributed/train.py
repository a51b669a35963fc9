"""Any training stage, data-parallel under a Ray Train TorchTrainer.

A stage is a function `stage(parallel, ckpt_path, callback, device)`; this module supplies the worker's
rank and world size, DDP (gloo on CPU, NCCL on GPU), checkpoints through Ray Train (rank 0's stage
checkpoint file), and on restart after a worker failure the last reported checkpoint, from which the
stage function resumes. The global batch is preserved: the stage splits it across workers. A stage that
fails deterministically (bad config or data, a non-finite loss) is not restarted: the worker reports the
cause and `run_data_parallel` raises it once as a StageError."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..algos.loop import NonFiniteLossError
from ..algos.qgpo.stages import Parallel

log = logging.getLogger("cepdist")

StageFn = Callable[..., None]
PERMANENT = (ValueError, NonFiniteLossError)      # failures a retry cannot fix


class StageError(ValueError):
    """A stage failed in a way a retry cannot fix; the message names the cause."""


def run_data_parallel(stage: StageFn, *, workers: int, ckpt_file: str, name: str, storage_path: str,
                      use_gpu: bool = False, cpus_per_worker: float = 1.0, max_failures: int = 2,
                      out: Path | None = None) -> Path:
    """Run `stage` on `workers` Ray Train workers; return the final checkpoint file, copied to `out` (a file
    path, or an existing directory to put `ckpt_file` in; default a new temporary directory)."""
    import ray.train
    from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(config):
        import torch
        from ray.train.torch import get_device, prepare_model
        torch.set_num_threads(max(1, int(cpus_per_worker)))
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = get_device() if use_gpu else torch.device("cpu")
        work = Path(tempfile.mkdtemp(prefix="cepdist-train-"))
        local = work / ckpt_file
        restored = ray.train.get_checkpoint()
        if restored is not None:                      # a restart: every rank resumes from rank 0's file
            with restored.as_directory() as d:
                shutil.copy(Path(d) / ckpt_file, local)
        wrap = (lambda m: prepare_model(m, move_to_device=True)) if world > 1 else (lambda m: m.to(device))

        def report(stage_name, step, metrics, saved):
            metrics = {**metrics, "step": step}
            if rank == 0 and saved is not None:
                with tempfile.TemporaryDirectory() as d:
                    shutil.copy(saved, Path(d) / ckpt_file)
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)

        try:
            stage(Parallel(rank, world, wrap), local if (rank == 0 or restored is not None) else None, report,
                  device)
        except PERMANENT as e:                        # not a worker crash: report it instead of being restarted
            ray.train.report({"fatal": f"{type(e).__name__}: {e}"})

    trainer = TorchTrainer(
        loop,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures)))
    result = trainer.fit()
    if (result.metrics or {}).get("fatal"):
        raise StageError(result.metrics["fatal"])
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} ended without a checkpoint ({result.error})")
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="cepdist-"))
    if out.is_dir():                                  # a directory: the checkpoint keeps its file name
        out = out / ckpt_file
    out.parent.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        shutil.copy(Path(d) / ckpt_file, out)
    return out
