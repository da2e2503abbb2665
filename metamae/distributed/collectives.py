"""A batch split over torch.distributed processes (the default process group of a DDP run).

Both operations keep gradients: the contrastive negatives and the BatchNorm statistics of other
processes' examples pass their gradients back to the process that holds those examples (the
backward of a sum is a sum; of a gather, a sum of the slices).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collective

from metamae.model import BatchGroup


class ProcessGroupBatch(BatchGroup):
    """The batch of every process in torch.distributed's default group (all of the same size)."""

    def __init__(self):
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupBatch needs torch.distributed: create it inside a Ray Train worker")
        self.size, self.rank = dist.get_world_size(), dist.get_rank()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return collective.all_reduce(t, "sum", dist.group.WORLD)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return collective.all_gather_single_autograd(t, 0, dist.group.WORLD)
