"""Ray Data: stream a prepared folder's Parquet shards to trainers, never holding a dataset in RAM.

    read_parquet(the manifest's shards)  ->  map_batches(decode, vectorised)  ->  iter_torch_batches

Shards are checked against the manifest before anything starts (a missing or corrupt shard is an
error naming the file). Shard order is shuffled per epoch and rows pass through a local shuffle
buffer, both seeded. A Ray Train run of several workers streams its shards so
(`streams_through_ray_data`): each worker passes its `get_dataset_shard` to `torch_batches`. A run
of one worker reads them in the worker's own process with the plain reader
(metamae.data.shards.ShardDataset), as the one-process loop does: no Ray Data task at all.

Ray Data's tasks need CPUs of their own, outside any reservation of the trainers': trainers that
reserve every CPU starve them and the pipeline hangs (ray-project/ray#29662). In Ray 2.60 the read
starts with a ListFiles task that asks for one whole CPU whatever `num_cpus` says (it is neither
configurable nor throttled), and the CPU budget of a pipeline running beside Train runs is what
Ray Data's autoscaling coordinator hands out of the CPUs the Train runs leave, split in whole CPUs
between the pipelines running at once: concurrent sweep trials on a small node got none and sat at
0 rows. So a sweep trial that streams reserves its pipeline's CPUs itself: a bundle of
`TRIAL_DATA_CPUS` in the trial's own placement group (tune/sweep.py), into which `read_split`
schedules every task of the pipeline (`reserved_data_bundle`); Ray Data's budget is then that
placement group. Elsewhere (a run started on its own) the pipeline takes free CPUs:
`StreamConfig.task_cpus` makes each read and decode task ask for a fraction of a CPU, and
`cpu_limit` caps what the pipeline takes in all.
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
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from metamae.data.shards import Column, Manifest, decode_table, open_dataset


@dataclass
class StreamConfig:
    batch_size: int = 64
    shuffle_buffer: int = 4096        # rows in the local shuffle buffer
    prefetch_batches: int = 2
    task_cpus: float = 0.25           # CPUs each read / decode task asks for
    cpu_limit: Optional[float] = None  # CPUs the whole pipeline may use (None: Ray Data decides)
    readers: Optional[int] = None     # read tasks at once (None: Ray Data decides)
    progress_bars: bool = False       # Ray Data's progress bars: a line per update, hundreds in a run's log


LIST_FILES_CPUS = 1.0     # Ray Data's ListFiles task asks for a whole CPU, whatever num_cpus says (Ray 2.60)
TRIAL_DATA_CPUS = LIST_FILES_CPUS   # what a sweep trial reserves for its pipeline: its tasks take turns there
DATA_BUNDLE = 1           # that bundle's index in the trial's placement group: [its driver, its data]


def streams_through_ray_data(source: str, num_workers: int) -> bool:
    """Whether a Ray Train run's workers stream their shards through Ray Data: a run of several
    workers does (a streaming split hands each worker its part of the data); one worker reads
    them itself with the plain reader, so that nothing of the run asks for a CPU outside the CPUs
    its worker holds. In-memory datasets (digits, synthetic) never do."""
    return source == "shards" and num_workers > 1


def reserved_data_bundle() -> Optional[PlacementGroupSchedulingStrategy]:
    """The CPUs this process's placement group holds for a Ray Data pipeline (bundle DATA_BUNDLE of a
    sweep trial's [driver, data] placement group, tune/sweep.py), as a scheduling strategy; None
    outside such a placement group (a run started on its own: the pipeline takes free CPUs)."""
    if not ray.is_initialized():
        return None
    group = ray.util.get_current_placement_group()
    if group is None or len(group.bundle_specs) <= DATA_BUNDLE:
        return None
    if group.bundle_specs[DATA_BUNDLE].get("CPU", 0.0) < TRIAL_DATA_CPUS:
        return None
    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=DATA_BUNDLE)


def decode_batch(table: pa.Table, columns: list[Column],
                 standardization: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Arrow rows -> {'x': ..., 'y': ...} (or x_image, x_text, y) numpy arrays, one call per block,
    standardised as the local reader does (shards.decode_table)."""
    x, y = decode_table(table, columns, standardization)
    if isinstance(x, tuple):
        return {"x_image": x[0], "x_text": x[1], "y": y}
    return {"x": x, "y": y}


def read_split(folder: Path, split: str, cfg: StreamConfig = StreamConfig(), seed: Optional[int] = None,
               manifest: Optional[Manifest] = None,
               within: Optional[PlacementGroupSchedulingStrategy] = None) -> ray.data.Dataset:
    """A lazy Ray Dataset of one split's decoded examples; shard order shuffled when seeded.

    `within` (a placement group bundle, `reserved_data_bundle()`): every task of the pipeline, the
    listing, reading and decoding, runs in that bundle, and Ray Data's budget is that placement
    group's CPUs: the read and decode tasks are placed by their remote arguments, and the rest (the
    listing, Ray Data's budget: its PlacementGroupClusterAutoscaler) by the dataset's own DataContext
    (Ray 2.60, which warns that these DataContext fields are deprecated after January 2027). Every
    setting goes to the dataset's own DataContext; the process's is left as it was."""
    folder = Path(folder)
    manifest = manifest or open_dataset(folder)
    if split not in manifest.splits:
        raise KeyError(f"{folder} has no {split!r} split; it has {sorted(manifest.splits)}")
    paths = [str(folder / shard.file) for shard in manifest.splits[split]]
    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
    decode = partial(decode_batch, columns=manifest.columns(), standardization=manifest.standardization())

    placed = {} if within is None else {"scheduling_strategy": within}
    dataset = ray.data.read_parquet(paths, shuffle=shuffle, num_cpus=cfg.task_cpus, concurrency=cfg.readers,
                                    ray_remote_args=placed)
    dataset = dataset.map_batches(decode, batch_format="pyarrow", zero_copy_batch=True, num_cpus=cfg.task_cpus,
                                  **placed)
    own = dataset.context
    if within is not None:
        own.scheduling_strategy = own.scheduling_strategy_large_args = within
    own.enable_progress_bars = cfg.progress_bars
    own.execution_options.preserve_order = seed is not None        # the same seed gives the same order
    if cfg.cpu_limit is not None:
        own.execution_options.resource_limits = own.execution_options.resource_limits.copy(cpu=cfg.cpu_limit)
    return dataset


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
