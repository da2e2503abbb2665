"""A dataset held in memory as numpy arrays, and a seeded batch iterator over it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Protocol, Union

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
        return Split(take_rows(self.x, index), self.y[index])


def take_rows(x: Inputs, index) -> Inputs:
    """The rows `index` (an index array or a slice) of inputs, of each part for (image, text)."""
    return tuple(part[index] for part in x) if isinstance(x, tuple) else x[index]


class Dataset(Protocol):
    """What training and evaluation read: a name, a modality spec, and batches of a split."""
    name: str
    spec: Spec

    def stream(self, split: str, batch_size: int, seed: Optional[int] = None,
               drop_last: bool = False) -> Iterator[tuple[object, torch.Tensor]]: ...


@dataclass
class ArrayDataset:
    """A dataset small enough to hold in memory (the digits, synthetic data)."""
    name: str
    spec: Spec
    train: Split
    test: Split

    def stream(self, split: str, batch_size: int, seed: Optional[int] = None,
               drop_last: bool = False) -> Iterator[tuple[object, torch.Tensor]]:
        """One pass over a split in (inputs, labels) tensor batches; shuffled when seeded."""
        rng = np.random.default_rng(seed) if seed is not None else None
        return batches(self.split(split), batch_size, rng, drop_last)

    def split(self, name: str) -> Split:
        if name not in ("train", "test"):
            raise KeyError(f"{self.name!r} has splits 'train' and 'test', not {name!r}")
        return getattr(self, name)


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


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The examples of step `step`'s batch (steps count from 1) in `endless_batches(seed)`'s order,
    computed from the step alone, so a resumed or data-parallel run can find its place."""
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"{num_examples} examples are fewer than one batch of {batch_size}: lower "
                         f"dataset.batch_size")
    epoch, index = divmod(step - 1, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(num_examples)
    return order[index * batch_size:(index + 1) * batch_size]


def batches_from_step(split: Split, batch_size: int, seed: int, step: int,
                      rows: slice = slice(None)) -> Iterator[Split]:
    """Steps step+1, step+2, ... of `endless_batches(seed)` (optionally some rows of each batch),
    found from the step alone: a resumed run goes on with the batches an uninterrupted one sees."""
    while True:
        step += 1
        yield split.take(batch_indices(len(split), batch_size, seed, step)[rows])


def endless_batches(dataset: Dataset, split: str, batch_size: int, seed: int) -> Iterator[tuple[object, torch.Tensor]]:
    """Full batches of a split, epoch after epoch; epoch e is shuffled with seed + e."""
    return epochs(lambda epoch_seed: dataset.stream(split, batch_size, seed=epoch_seed, drop_last=True), seed,
                  f"the {split!r} split of {dataset.name!r} has fewer examples than one batch of {batch_size}: "
                  f"lower dataset.batch_size")


def epochs(one_epoch: Callable[[int], Iterable], seed: int, too_small: str) -> Iterator:
    """one_epoch(seed), one_epoch(seed + 1), ... one after the other, forever. An epoch without a
    batch (a split smaller than one batch) raises ValueError(too_small) instead of looping forever."""
    while True:
        empty = True
        for batch in one_epoch(seed):
            empty = False
            yield batch
        if empty:
            raise ValueError(too_small)
        seed += 1
