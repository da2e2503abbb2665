"""A dataset held in memory as numpy arrays, and a seeded batch iterator over it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch

from metamae.modality import Spec

Inputs = Union[np.ndarray, tuple[np.ndarray, np.ndarray]]   # (image, text) for image_text


@dataclass
class Split:
    x: Inputs            # N × example shape (float32 values or int64 token ids)
    y: np.ndarray        # N class indices, N × labels (multi-label), N floats, or N × L per-token labels

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> "Split":
        x = tuple(part[index] for part in self.x) if isinstance(self.x, tuple) else self.x[index]
        return Split(x, self.y[index])


@dataclass
class ArrayDataset:
    name: str
    spec: Spec
    train: Split
    test: Split


def to_tensors(x: Inputs, device: Union[str, torch.device] = "cpu"):
    if isinstance(x, tuple):
        return tuple(torch.from_numpy(part).to(device) for part in x)
    return torch.from_numpy(x).to(device)


def batches(split: Split, batch_size: int, rng: Optional[np.random.Generator] = None,
            drop_last: bool = True) -> Iterator[tuple[object, torch.Tensor]]:
    """One pass over `split` in batches of (inputs, labels) tensors; shuffled when `rng` is given."""
    order = rng.permutation(len(split)) if rng is not None else np.arange(len(split))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        part = split.take(order[start:start + batch_size])
        yield to_tensors(part.x), torch.from_numpy(part.y)


def endless_batches(split: Split, batch_size: int, seed: int) -> Iterator[tuple[object, torch.Tensor]]:
    """Epoch after epoch, reshuffled each time, deterministic under `seed`."""
    if len(split) < batch_size:
        raise ValueError(f"the training split has {len(split)} examples, fewer than one batch of "
                         f"{batch_size}: lower dataset.batch_size")
    rng = np.random.default_rng(seed)
    while True:
        yield from batches(split, batch_size, rng)
