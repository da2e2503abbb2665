"""A batch split over torch.distributed processes (the default process group of a DDP run).

Both operations keep gradients: the contrastive negatives and the BatchNorm statistics of other
processes' examples pass their gradients back to the process that holds those examples (the
backward of a sum is a sum; of a gather, a sum of the slices).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from metamae.model import BatchGroup
from metamae.private_apis import all_gather_differentiable, all_reduce_sum


class ProcessGroupBatch(BatchGroup):
    """The batch of every process in torch.distributed's default group (all of the same size)."""

    def __init__(self):
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupBatch needs torch.distributed: create it inside a Ray Train worker")
        self.size, self.rank = dist.get_world_size(), dist.get_rank()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_differentiable(t)
