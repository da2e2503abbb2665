"""Ray Train's data-parallel throughput and overhead, on the embedded digits.

Measures, in one run, the same pretraining (tiny model, MetaMAE second order, batch 64, one torch
thread per process):
  - plain_loop: metamae.loop.pretrain in this process (the baseline);
  - ray_train_1_worker, ray_train_2_workers: metamae.distributed.trainer.fit, DDP over gloo.
samples/s is the training loop's own rate (from the workers' report); wall_s includes Ray Train's
start-up (controller, worker group, process group) and the final linear probe. The ratios are
against the plain loop of the same run.

    .venv/bin/python bench/scaling.py [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray

from metamae.config import DatasetConfig, ExecutionConfig, ProbeConfig, TrainConfig
from metamae.data.digits import digits
from metamae.distributed.trainer import fit
from metamae.loop import pretrain
from metamae.model import ModelConfig, ObjectiveConfig
from metamae.process import start_command
from metamae.train import RunRecipe

TINY = ModelConfig(enc_width=64, enc_depth=4, enc_heads=4, dec_width=32, dec_depth=2, dec_heads=4)
DIGITS = DatasetConfig(name="digits", input={"kind": "image", "channels": 1, "height": 8, "width": 8, "patch": 2},
                       num_classes=10, metric="accuracy", batch_size=64, source="digits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    train = TrainConfig(steps=args.steps, log_every=args.steps, checkpoint_every=args.steps, threads=1)
    run = RunRecipe(DIGITS, TINY, ObjectiveConfig(), train)
    results = {"steps": args.steps, "batch_size": DIGITS.batch_size}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        plain = ExecutionConfig(ray=False, probe_every=0)
        pretrain(run, ProbeConfig(epochs=1), plain, digits(), Path(folder) / "plain", on_report=lambda metrics: None)
        plain_s = time.perf_counter() - started
        results["plain_loop"] = {"samples_per_s": args.steps * DIGITS.batch_size / plain_s, "wall_s": plain_s}

        start_command()
        ray.init(num_cpus=2, log_to_driver=False)
        for workers in (1, 2):
            started = time.perf_counter()
            metrics = fit(run, ProbeConfig(epochs=1), ExecutionConfig(num_workers=workers, probe_every=0),
                          Path(folder) / f"ray{workers}").metrics
            results[f"ray_train_{workers}_worker{'s' if workers > 1 else ''}"] = {
                "samples_per_s": metrics["samples_per_s"], "wall_s": time.perf_counter() - started,
                "data_wait": metrics["data_wait"]}
        ray.shutdown()

    plain = results["plain_loop"]["samples_per_s"]
    results["ray_train_loop_overhead_ratio"] = plain / results["ray_train_1_worker"]["samples_per_s"]
    results["two_workers_speedup"] = results["ray_train_2_workers"]["samples_per_s"] / results[
        "ray_train_1_worker"]["samples_per_s"]
    results["ray_train_startup_s"] = results["ray_train_1_worker"]["wall_s"] - args.steps * DIGITS.batch_size / \
        results["ray_train_1_worker"]["samples_per_s"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
