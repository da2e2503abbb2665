"""Does the data pipeline keep a trainer fed? Rows/s of each reader on PAMAP2-shaped shards.

Writes PAMAP2-shaped shards (52 × 320 float32, 65 KiB a row) and measures, in one run:
  - ray_data_1_reader, ray_data_2_readers: read_parquet -> map_batches(decode) -> iter_torch_batches,
    with a seeded shuffle (file order and a 1024-row local buffer), batches of 64;
  - local_reader: the plain pyarrow reader the single-process loop uses, same shuffle;
  - dataloader_in_memory: a torch DataLoader over the same rows held in memory (the baseline);
  - trainer_demand: rows/s one `dabs`-preset MetaMAE (second order) trainer consumes here, fed
    from memory with no pipeline running;
  - data_wait_fraction: the share of that trainer's time spent waiting when the Ray pipeline feeds
    it (both share this machine's 2 cores, so its steps are slower then).
Prints JSON; `target_met` is whether the 2-reader pipeline delivers at least 3 × the trainer's demand.

    .venv/bin/python bench/stream.py [--rows 2048] [--train-steps 6]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from metamae.data.shards import ShardDataset, ShardWriter
from metamae.distributed.stream import RayShardDataset, StreamConfig
from metamae.modality import TimeSeriesSpec
from metamae.model import MetaMAE, ModelConfig, ObjectiveConfig

SPEC = TimeSeriesSpec(channels=52, length=320, patch=5)
ROW_MB = 52 * 320 * 4 / 2**20
BATCH = 64
WARMUP_STEPS = 2


def write_shards(folder: Path, rows: int) -> None:
    writer = ShardWriter(folder, "pamap2_shaped", SPEC, 12, "accuracy", shard_bytes=32 * 2**20, progress=False)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 512):
        n = min(512, rows - start)
        writer.add("train", rng.standard_normal((n, 52, 320), dtype=np.float32), np.arange(n) % 12)
    writer.finish()


def throughput(batches) -> dict:
    start, rows = time.perf_counter(), 0
    for _, y in batches:
        rows += len(y)
    seconds = time.perf_counter() - start
    return {"rows_per_s": round(rows / seconds), "mb_per_s": round(rows * ROW_MB / seconds, 1), "rows": rows}


def in_memory_loader(folder: Path):
    x, y = zip(*ShardDataset(folder).stream("train", 512))
    tensors = torch.utils.data.TensorDataset(torch.cat(x), torch.cat(y))
    return torch.utils.data.DataLoader(tensors, batch_size=BATCH, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def dabs_step():
    """One dabs-preset MetaMAE (second order) training step on a batch, as a function."""
    torch.manual_seed(0)
    model = MetaMAE(SPEC, ModelConfig(), ObjectiveConfig(mask_ratio=0.85, contrastive_weight=1.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def step(x):
        optimizer.zero_grad()
        model(x).total.backward()
        optimizer.step()
    return step


def trainer_demand(steps: int) -> dict:
    """Rows/s one trainer consumes, fed from memory (no data pipeline running)."""
    step, x = dabs_step(), torch.randn(BATCH, 52, 320)
    for _ in range(WARMUP_STEPS):
        step(x)
    start = time.perf_counter()
    for _ in range(steps):
        step(x)
    return {"rows_per_s": round(steps * BATCH / (time.perf_counter() - start), 1), "steps": steps}


def data_wait_fraction(folder: Path, steps: int) -> float:
    """The share of a Ray-fed trainer's time spent waiting for its next batch."""
    step = dabs_step()
    batches = iter(RayShardDataset(folder, StreamConfig(shuffle_buffer=1024, readers=2)).stream(
        "train", BATCH, seed=0, drop_last=True))
    waiting = computing = 0.0
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:                                        # start-up is not steady state
            waiting = computing = 0.0
        t0 = time.perf_counter()
        x, _ = next(batches)
        t1 = time.perf_counter()
        step(x)
        waiting, computing = waiting + t1 - t0, computing + time.perf_counter() - t1
    batches.close()                                                  # stop the pipeline while Ray is up
    return round(waiting / (waiting + computing), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_shards(folder, args.rows)
        report = {"rows": args.rows, "row_kib": round(ROW_MB * 1024, 1), "batch": BATCH, "readers": {},
                  "trainer_demand": trainer_demand(args.train_steps)}     # before Ray starts: a quiet machine
        ray.init(num_cpus=2, log_to_driver=False)
        try:
            for readers in (1, 2):
                cfg = StreamConfig(shuffle_buffer=1024, readers=readers)
                report["readers"][f"ray_data_{readers}_reader{'s' if readers > 1 else ''}"] = throughput(
                    RayShardDataset(folder, cfg).stream("train", BATCH, seed=0))
            report["readers"]["local_reader"] = throughput(
                ShardDataset(folder, shuffle_buffer=1024).stream("train", BATCH, seed=0))
            report["readers"]["dataloader_in_memory"] = throughput(in_memory_loader(folder))
            report["data_wait_fraction"] = data_wait_fraction(folder, args.train_steps)
            supply = report["readers"]["ray_data_2_readers"]["rows_per_s"]
            report["supply_over_demand"] = round(supply / report["trainer_demand"]["rows_per_s"], 1)
            report["target_met"] = report["supply_over_demand"] >= 3
            print(json.dumps(report, indent=2), flush=True)   # before Ray's shutdown, which has ended the process
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
