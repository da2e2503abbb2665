"""Pretraining's parts: the step, the optimizer, compiling the loss, and a stop on a signal.

`train_step` is the step that the one loop (metamae/loop.py) runs in every mode: the plain command,
a one-worker sweep trial, each Ray Train worker.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from metamae.config import DatasetConfig, TrainConfig
from metamae.model import MetaMAE, ModelConfig, ObjectiveConfig


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or infinite; raised before the weights are touched."""


class Interrupted(KeyboardInterrupt):
    """A signal stopped pretraining after a step, whose checkpoint was saved, which the message names.
    `exit_code` is the shell's for that signal: 128 + its number."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """In a `with` block in the main thread: the first of `signals` asks the run to stop after its
    current step (`requested()`; `then` is called too), and says so; a second one acts as it would
    have without this (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process)."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM), then: Callable[[], None] = lambda: None):
        self.signals, self.then, self.signum = signals, then, None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        self.previous = {signum: signal.signal(signum, self.received) for signum in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def received(self, signum: int, frame) -> None:
        for other, handler in self.previous.items():
            signal.signal(other, handler)
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after the current step, with a checkpoint of it "
              f"(again to stop at once)", file=sys.stderr, flush=True)
        self.then()

    def requested(self) -> bool:
        return self.signum is not None

    def interrupted(self, step: int, kept: str) -> Interrupted:
        return Interrupted(f"stopped by {signal.Signals(self.signum).name} after step {step}: its checkpoint is "
                           f"{kept}", self.signum)


def compile_loss(model: MetaMAE, backend: str = "inductor") -> None:
    """torch.compile the model's loss, forward and backward, the inner step's double backward included.

    Dropout keeps drawing eager mode's random stream (inductor's fallback_random, which
    metamae.process.start_training sets for train.compile), so a compiled run draws what an eager one
    does. On 2 CPU cores the first step compiles for 1-2 minutes; a `dabs` step then takes 0.94-0.98
    of its eager time for MetaMAE (second order), 0.97-1.01 for MAE (bench/step.py --compile, paired).
    Shapes stay static: a batch of a new size compiles again, where a dynamic batch dimension would
    fail to trace the masking draw (torch.rand).
    """
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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x, step: int,
               masking_noise: Optional[torch.Tensor] = None, support_noise: Optional[torch.Tensor] = None,
               mean: Callable[[dict[str, float]], dict[str, float]] = lambda scalars: scalars) -> dict[str, float]:
    """One optimisation step on batch `x` with the step's draws (drawn from torch's generator where
    None); the loss terms, averaged over the workers by `mean`. Raises NonFiniteLoss before touching
    the weights (on every worker at the same step: the terms are the global batch's)."""
    model.train()
    losses = model(x, masking_noise=masking_noise, support_noise=support_noise)
    scalars = mean(losses.scalars())
    check_finite(scalars, step, x)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    optimizer.step()
    return scalars


@dataclass
class RunRecipe:
    """What a run trains, and on what: stored in its checkpoint, from which it is rebuilt."""
    dataset: DatasetConfig
    model: ModelConfig
    objective: ObjectiveConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_same_run(saved: dict[str, Any], run: RunRecipe, where: str) -> None:
    """A run resumes only from a checkpoint of the same dataset, model and objective."""
    for part in ("dataset", "model", "objective"):
        if saved[part] != run.to_dict()[part]:
            raise ValueError(f"{where} was saved by a run with another {part} config ({saved[part]}); "
                             f"use a new out_dir, or the same {part} settings to resume it")
