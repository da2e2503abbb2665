"""Ray Data: stream a prepared folder's Parquet shards to trainers, never holding a dataset in RAM.

    read_parquet(the manifest's shards)  ->  map_batches(decode, vectorised)  ->  iter_torch_batches

Shards are checked against the manifest before anything starts (a missing or corrupt shard is an
error naming the file). Shard order is shuffled per epoch and rows pass through a local shuffle
buffer, both seeded. Under Ray Train each worker passes its `get_dataset_shard` to `torch_batches`.

Ray Data's tasks need CPUs of their own: trainers that reserve every CPU starve the read tasks and
the pipeline hangs (ray-project/ray#29662). `StreamConfig.task_cpus` makes each read and decode
task ask for a fraction of a CPU, and `cpu_limit` caps what the pipeline takes in all, so both can
be fitted into what the trainers leave free.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from metamae.data.shards import Column, Manifest, decode_table, open_dataset


@dataclass
class StreamConfig:
    batch_size: int = 64
    shuffle_buffer: int = 4096        # rows in the local shuffle buffer
    prefetch_batches: int = 2
    task_cpus: float = 0.25           # CPUs each read / decode task asks for
    cpu_limit: Optional[float] = None  # CPUs the whole pipeline may use (None: Ray Data decides)
    readers: Optional[int] = None     # read tasks at once (None: Ray Data decides)


def decode_batch(table: pa.Table, columns: list[Column],
                 standardization: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Arrow rows -> {'x': ..., 'y': ...} (or x_image, x_text, y) numpy arrays, one call per block,
    standardised as the local reader does (shards.decode_table)."""
    x, y = decode_table(table, columns, standardization)
    if isinstance(x, tuple):
        return {"x_image": x[0], "x_text": x[1], "y": y}
    return {"x": x, "y": y}


def read_split(folder: Path, split: str, cfg: StreamConfig = StreamConfig(), seed: Optional[int] = None,
               manifest: Optional[Manifest] = None) -> ray.data.Dataset:
    """A lazy Ray Dataset of one split's decoded examples; shard order shuffled when seeded."""
    folder = Path(folder)
    manifest = manifest or open_dataset(folder)
    if split not in manifest.splits:
        raise KeyError(f"{folder} has no {split!r} split; it has {sorted(manifest.splits)}")
    options = ray.data.DataContext.get_current().execution_options
    if cfg.cpu_limit is not None:
        options.resource_limits = options.resource_limits.copy(cpu=cfg.cpu_limit)
    options.preserve_order = seed is not None        # the same seed gives the same order
    paths = [str(folder / shard.file) for shard in manifest.splits[split]]
    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
    dataset = ray.data.read_parquet(paths, shuffle=shuffle, num_cpus=cfg.task_cpus, concurrency=cfg.readers)
    decode = partial(decode_batch, columns=manifest.columns(), standardization=manifest.standardization())
    return dataset.map_batches(decode, batch_format="pyarrow", zero_copy_batch=True, num_cpus=cfg.task_cpus)


def torch_batches(dataset, cfg: StreamConfig, seed: Optional[int] = None,
                  drop_last: bool = True) -> Iterator[tuple[object, torch.Tensor]]:
    """(inputs, labels) tensor batches from a Ray Dataset or a Ray Train dataset shard."""
    for batch in dataset.iter_torch_batches(
            batch_size=cfg.batch_size, prefetch_batches=cfg.prefetch_batches, drop_last=drop_last, device="cpu",
            local_shuffle_buffer_size=cfg.shuffle_buffer if seed is not None else None, local_shuffle_seed=seed):
        x = (batch["x_image"], batch["x_text"]) if "x_image" in batch else batch["x"]
        yield x, batch["y"]


class RayShardDataset:
    """A prepared folder read through Ray Data: the same `Dataset` protocol as the local reader."""

    def __init__(self, folder: Path, cfg: StreamConfig = StreamConfig()):
        self.folder, self.cfg = Path(folder), cfg
        self.manifest = open_dataset(self.folder)
        self.name, self.spec = self.manifest.name, self.manifest.spec

    def stream(self, split: str, batch_size: int, seed: Optional[int] = None, drop_last: bool = False):
        cfg = StreamConfig(**{**self.cfg.__dict__, "batch_size": batch_size})
        return torch_batches(read_split(self.folder, split, cfg, seed, self.manifest), cfg, seed, drop_last)
