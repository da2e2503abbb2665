"""Streaming a dataset several times larger than Ray's object store keeps memory bounded."""
import threading

import numpy as np
import pytest
import ray

from metamae.data.shards import ShardWriter
from metamae.distributed.stream import RayShardDataset, StreamConfig
from metamae.modality import TimeSeriesSpec

OBJECT_STORE = 100 * 2**20
SPEC = TimeSeriesSpec(channels=52, length=320, patch=5)       # PAMAP2-shaped: 65 KiB a row
ROWS, CHUNK = 6000, 500                                        # 381 MiB: 3.8 × the object store


def write_large_dataset(folder):
    writer = ShardWriter(folder, "large", SPEC, 12, "accuracy", shard_bytes=32 * 2**20, progress=False)
    rng = np.random.default_rng(0)
    for start in range(0, ROWS, CHUNK):                          # never all rows in memory
        writer.add("train", rng.standard_normal((CHUNK, 52, 320), dtype=np.float32), np.arange(CHUNK) % 12)
    writer.add("test", rng.standard_normal((CHUNK, 52, 320), dtype=np.float32), np.arange(CHUNK) % 12)
    writer.finish()


def private_memory_mib() -> float:
    """This process's private resident memory (RssAnon). Object-store pages that Ray maps into the
    process are shared memory and bounded by the object store's size, so they are left out."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise KeyError("RssAnon")


class PeakMemory(threading.Thread):
    """Samples private_memory_mib() every 20 ms until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stopped = 0.0, threading.Event()

    def run(self):
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, private_memory_mib())


@pytest.mark.ray
def test_streaming_a_dataset_larger_than_the_object_store_keeps_memory_bounded(tmp_path):
    write_large_dataset(tmp_path)
    dataset_bytes = ROWS * 52 * 320 * 4
    ray.shutdown()            # the session's shared Ray, if it is up: this test needs a small object store
    ray.init(num_cpus=2, object_store_memory=OBJECT_STORE, log_to_driver=False)
    try:
        stream = RayShardDataset(tmp_path, StreamConfig(shuffle_buffer=256, cpu_limit=1))
        assert sum(len(y) for _, y in stream.stream("test", 64, seed=0)) == CHUNK     # warm-up: imports, workers
        baseline, monitor = private_memory_mib(), PeakMemory()
        monitor.start()
        rows = sum(len(y) for _, y in stream.stream("train", 64, seed=0))
        monitor.stopped.set()
        monitor.join()
        growth = monitor.peak - baseline
    finally:
        ray.shutdown()
    assert rows == ROWS
    assert growth < dataset_bytes / 2**20 / 4, f"the driver grew by {growth:.0f} MiB"
