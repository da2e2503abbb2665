"""Does the data pipeline keep a trainer fed? Rows/s of each reader on PAMAP2-shaped shards.

Writes PAMAP2-shaped shards (52 × 320 float32, 65 KiB a row) and measures, in one run:
  - ray_data_1_reader, ray_data_2_readers: read_parquet -> map_batches(decode) -> iter_torch_batches,
    with a seeded shuffle (file order and a 1024-row local buffer), batches of 64;
  - local_reader: the plain pyarrow reader the single-process loop uses, same shuffle;
  - dataloader_in_memory: a torch DataLoader over the same rows held in memory (the baseline);
  - trainer_demand: rows/s one `dabs`-preset MetaMAE (second order) trainer consumes here, and the
    fraction of its step time spent waiting for the Ray pipeline.
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
from metamae.model import MetaMAE, ModelConfig, ObjectiveConfig
from metamae.modality import TimeSeriesSpec

SPEC = TimeSeriesSpec(channels=52, length=320, patch=5)
ROW_MB = 52 * 320 * 4 / 2**20
BATCH = 64


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


def trainer_demand(folder: Path, steps: int) -> dict:
    """Train the dabs preset on the Ray stream: rows/s consumed and the share of time spent waiting."""
    torch.manual_seed(0)
    model = MetaMAE(SPEC, ModelConfig(), ObjectiveConfig(mask_ratio=0.85, contrastive_weight=1.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    batches = iter(RayShardDataset(folder, StreamConfig(shuffle_buffer=1024, readers=2)).stream(
        "train", BATCH, seed=0, drop_last=True))
    next(batches)                                                    # pipeline start-up, not steady state
    waiting = computing = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        x, _ = next(batches)
        t1 = time.perf_counter()
        optimizer.zero_grad()
        model(x).total.backward()
        optimizer.step()
        waiting, computing = waiting + t1 - t0, computing + time.perf_counter() - t1
    return {"rows_per_s": round(steps * BATCH / (waiting + computing), 1),
            "data_wait_fraction": round(waiting / (waiting + computing), 4), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_shards(folder, args.rows)
        ray.init(num_cpus=2, log_to_driver=False)
        report = {"rows": args.rows, "row_kib": round(ROW_MB * 1024, 1), "batch": BATCH, "readers": {}}
        try:
            for readers in (1, 2):
                cfg = StreamConfig(shuffle_buffer=1024, readers=readers)
                report["readers"][f"ray_data_{readers}_reader{'s' if readers > 1 else ''}"] = throughput(
                    RayShardDataset(folder, cfg).stream("train", BATCH, seed=0))
            report["readers"]["local_reader"] = throughput(
                ShardDataset(folder, shuffle_buffer=1024).stream("train", BATCH, seed=0))
            report["readers"]["dataloader_in_memory"] = throughput(in_memory_loader(folder))
            report["trainer_demand"] = trainer_demand(folder, args.train_steps)
        finally:
            ray.shutdown()
    supply = report["readers"]["ray_data_2_readers"]["rows_per_s"]
    report["supply_over_demand"] = round(supply / report["trainer_demand"]["rows_per_s"], 1)
    report["target_met"] = report["supply_over_demand"] >= 3
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
