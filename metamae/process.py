"""Everything the project changes process-wide, in one place, each set once as a process starts.

    start_command()          a command's process (python -m metamae.pretrain / metamae.evaluate,
                             python tune/sweep.py, the benchmarks): Hydra's schema and resolver, and
                             the environment Ray's processes inherit from it
    start_training(train)    a training process, as its run starts (the plain command, a sweep
                             trial's process, each Ray Train worker): torch's threads, the allocator,
                             and inductor's random numbers for train.compile

Nothing else in metamae/ or tune/ sets a process-wide value: Ray Data's settings go on each dataset's
own context (metamae.distributed.stream), and random draws use generators of their own.
"""
from __future__ import annotations

import ctypes
import os

import torch

from metamae.config import TrainConfig, register
from metamae.private_apis import compiled_code_draws_eager_random

# Defaults for variables the user did not set, read by the Ray processes this one starts.
ENVIRONMENT = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",    # Train's per-report latency: 0.5 s instead of about 2 s
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",    # a sweep's `validation` is in its trials' last report only
}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3        # mallopt's parameters, from glibc's malloc.h


def start_command() -> None:
    """Hydra's config schema and the ${manifest_name:...} resolver; Ray's environment defaults."""
    register()
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def start_training(train: TrainConfig) -> bool:
    """torch's intra-op threads (train.threads), glibc's allocator keeping freed memory, and, for
    train.compile, inductor drawing dropout from eager mode's random stream (fallback_random), so that a
    compiled run draws what an eager one does. Returns whether the allocator keeps freed memory."""
    if train.threads:
        torch.set_num_threads(train.threads)
    if train.compile:
        compiled_code_draws_eager_random()
    return keep_freed_memory()


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
