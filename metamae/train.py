"""Pretraining on one process: the step function and the plain loop around it.

`train_step` is the unit that every trainer (this loop, Ray Train) calls. The loop adds logging to
TensorBoard (loss terms and health signals, metamae/health.py), atomic checkpoints, resuming from the
run folder, and a clear stop on a NaN loss.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tensorboardX import SummaryWriter

from metamae.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from metamae.config import DatasetConfig, TrainConfig
from metamae.data.arrays import ArrayDataset, Dataset, batches_from_step, endless_batches, to_tensors
from metamae.health import Health
from metamae.model import Losses, MetaMAE, ModelConfig, ObjectiveConfig
from metamae.modality import to_device


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or infinite; raised before the weights are touched."""


class Interrupted(KeyboardInterrupt):
    """A signal stopped pretraining (Ctrl-C; SIGTERM of a Ray Train run); the last finished step's
    checkpoint is saved, which the message names. `exit_code` is the shell's for that signal: 128 + its number."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # mallopt's parameters, from glibc's malloc.h


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees, for the next step to reuse.

    By default glibc hands freed memory back to the kernel: each block over its mmap threshold (128
    KiB, raised on the fly up to 32 MiB) as it is freed, and the heap's top once that exceeds the
    trim threshold. Most of a CPU step's activations are such blocks, so every step faults their
    pages in afresh: 7-25 thousand page faults per `dabs` step, 1-10 % of its time on two cores
    (bench/allocator.py). The process's peak memory grows by up to 4 %; it no longer shrinks after it.
    Returns False where the C library has no mallopt (macOS, changing nothing) or refuses a setting.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(M_MMAP_THRESHOLD, 2**30))


def configure_process(cfg: TrainConfig) -> None:
    """Process-wide settings of a training process: torch's intra-op threads, the allocator."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()


def compile_loss(model: MetaMAE, backend: str = "inductor") -> None:
    """torch.compile the model's loss, forward and backward, the inner step's double backward included.

    Dropout keeps drawing eager mode's random stream (inductor's fallback_random, set process-wide),
    so a compiled run draws what an eager one does. On 2 CPU cores the first step compiles for 1-2
    minutes; a `dabs` PAMAP2 step then takes 0.84 of its eager time for MetaMAE (second order), 0.93
    for MAE (bench/step.py --compile, paired). Shapes stay static: a batch of a new size compiles
    again, where a dynamic batch dimension would fail to trace the masking draw (torch.rand).
    """
    torch._inductor.config.fallback_random = True
    model.compile(backend=backend, dynamic=False)


def make_optimizer(model: MetaMAE, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with its fused kernel: 5 ms per `dabs` step on CPU, against 36 ms for the default (profiled)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                             lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state (moments, step counts); the settings (lr, weight decay,
    the fused kernel) stay this run's, which load_state_dict would replace with the checkpoint's."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def check_finite(scalars: dict[str, float], step: int, x=None) -> None:
    """Raise NonFiniteLoss naming the step, the first loss term that is NaN or infinite (the terms
    before their total) and the likely cause: the input batch `x` when it is not finite itself."""
    for name in sorted(scalars, key=lambda name: name == "total"):
        if not math.isfinite(scalars[name]):
            parts = x if isinstance(x, tuple) else (x,)
            if any(part is not None and part.is_floating_point() and not torch.isfinite(part).all()
                   for part in parts):
                cause = ("its input batch holds NaN or infinite values: check the dataset "
                         "(`python -m metamae.data.prepare verify --out DIR` for shards)")
            else:
                cause = "lower train.lr or objective.inner_lr"
            raise NonFiniteLoss(f"step {step}: the {name} loss is {scalars[name]}; {cause}. The last good "
                                f"checkpoint is kept")


def train_step(model: MetaMAE, optimizer: torch.optim.Optimizer, x, step: int) -> Losses:
    """One optimisation step on batch `x`; raises NonFiniteLoss before touching the weights."""
    model.train()
    losses = model(x)
    check_finite(losses.scalars(), step, x)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    optimizer.step()
    return losses


@dataclass
class RunConfig:
    """What a run needs to be rebuilt later; stored in its checkpoint."""
    dataset: DatasetConfig
    model: ModelConfig
    objective: ObjectiveConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pretrain(run: RunConfig, data: Dataset, out_dir: Path, log: bool = True) -> MetaMAE:
    """Pretrain for run.train.steps steps, resuming from out_dir's checkpoint if one is there."""
    cfg, out_dir = run.train, Path(out_dir)
    configure_process(cfg)
    torch.manual_seed(cfg.seed)
    model = MetaMAE(data.spec, run.model, run.objective).to(cfg.device)
    if cfg.compile:
        compile_loss(model)
    optimizer = make_optimizer(model, cfg)
    step = resume(out_dir / FILENAME, model, optimizer, run)
    if step >= cfg.steps:
        return model

    writer = SummaryWriter(str(out_dir / "tensorboard"))
    stream = pretrain_inputs(data, run, step)
    last_log, examples, health = time.perf_counter(), 0, Health()
    done = saved = step                                 # the last finished step, the last one saved
    try:
        while step < cfg.steps:
            x = next(stream)
            step += 1
            losses = train_step(model, optimizer, to_device(x, cfg.device), step)
            done = step
            health.step(losses.scalars())
            examples += run.dataset.batch_size
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                scalars = {**losses.scalars(), **health.read(), "samples_per_s": examples / (now - last_log)}
                for name, value in scalars.items():
                    writer.add_scalar(f"pretrain/{name}", value, step)
                if log:
                    print(f"[{run.objective.method}] step {step}/{cfg.steps} "
                          + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()), flush=True)
                    for line in health.new_warnings(step):
                        print(f"health: {line}", flush=True)
                last_log, examples = now, 0
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(out_dir / FILENAME, model, optimizer, step, run.to_dict())
                saved = step
    except KeyboardInterrupt:
        if done > saved:
            save_checkpoint(out_dir / FILENAME, model, optimizer, done, run.to_dict())
        raise Interrupted(f"interrupted after step {done}: the checkpoint at {out_dir / FILENAME} holds step "
                          f"{max(done, saved)}") from None
    finally:
        writer.close()
    return model


def pretrain_inputs(data: Dataset, run: RunConfig, step: int) -> Iterator:
    """Input batches for steps step+1, step+2, ...: in-memory data in exactly the order an
    uninterrupted run sees it; shards (streamed, not indexable) reshuffled from the step on resume."""
    split, batch_size, seed = run.dataset.pretrain_split, run.dataset.batch_size, run.train.seed
    if isinstance(data, ArrayDataset):
        return (to_tensors(batch.x) for batch in batches_from_step(data.split(split), batch_size, seed, step))
    return (x for x, _ in endless_batches(data, split, batch_size, seed=seed + step))


def check_same_run(saved: dict[str, Any], run: RunConfig, where: str) -> None:
    """A run resumes only from a checkpoint of the same dataset, model and objective."""
    for part in ("dataset", "model", "objective"):
        if saved[part] != run.to_dict()[part]:
            raise ValueError(f"{where} was saved by a run with another {part} config ({saved[part]}); "
                             f"use a new out_dir, or the same {part} settings to resume it")


def resume(path: Path, model: MetaMAE, optimizer: torch.optim.Optimizer, run: RunConfig) -> int:
    """Load a run folder's checkpoint into model and optimizer; the step it was saved at, or 0."""
    if not path.exists():
        return 0
    checkpoint = load_checkpoint(path)
    check_same_run(checkpoint["config"], run, str(path))
    model.load_state_dict(checkpoint["model"])
    restore_optimizer(optimizer, checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["torch_rng"])
    print(f"resuming from {path} at step {checkpoint['step']}", flush=True)
    return checkpoint["step"]
