"""What keeping freed memory gains a CPU training step: glibc's default malloc against
metamae.process.keep_freed_memory, paired.

Per shape and method, two worker processes (this script re-invoked with --worker) build the same
model, optimizer and batch as bench/step.py (`dabs` preset, batch 64, 2 threads): one with glibc's
default settings, one after keep_freed_memory(). The driver asks them for one training step each
in turn, alternating which goes first, so both see the same machine speed (it drifts by ±20 % over
minutes here); only one process computes at a time. Reported: each process's median ms per step,
page faults per step (minor faults, from getrusage) and peak resident memory (VmHWM), and the median
of the per-round ratios kept / default. Prints one JSON object.

    .venv/bin/python bench/allocator.py                     # both shapes, MAE and second order
    .venv/bin/python bench/allocator.py --shapes pamap2 --methods mae --rounds 4
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.step import SHAPES, THREADS, WARMUP, build, cpu_model, proc_status_mb, training_step  # noqa: E402
from metamae.process import keep_freed_memory  # noqa: E402

SETTINGS = ("default", "kept")


def worker(shape: str, method: str, setting: str, batch: int) -> None:
    """Serve the driver: one training step per line read, answered with its ms and page faults."""
    torch.set_num_threads(THREADS)
    if setting == "kept" and not keep_freed_memory():
        sys.exit("keep_freed_memory() had no effect here: this C library is not glibc")
    torch.manual_seed(0)
    model, optimizer, x = build(shape, method, batch)
    print("ready", flush=True)
    for _ in sys.stdin:
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        training_step(model, optimizer, x)
        ms = (time.perf_counter() - start) * 1e3
        print(json.dumps({"ms": ms, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                          "peak_rss_mb": proc_status_mb("VmHWM")}), flush=True)


def paired(shape: str, method: str, batch: int, rounds: int) -> dict:
    command = [sys.executable, __file__, "--batch", str(batch), "--worker"]
    workers = {s: subprocess.Popen(command + [f"{shape}:{method}:{s}"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True) for s in SETTINGS}
    try:
        for setting, process in workers.items():
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {setting} worker for {shape}:{method} failed to start")

        def step(setting: str) -> dict:
            workers[setting].stdin.write("step\n")
            workers[setting].stdin.flush()
            return json.loads(workers[setting].stdout.readline())

        for _ in range(WARMUP):
            for setting in SETTINGS:
                step(setting)
        results = {s: [] for s in SETTINGS}
        for i in range(rounds):
            for setting in SETTINGS if i % 2 == 0 else SETTINGS[::-1]:
                results[setting].append(step(setting))
    finally:
        for process in workers.values():
            process.stdin.close()
            process.wait()
    report = {s: {"ms_median": statistics.median(r["ms"] for r in results[s]),
                  "faults_per_step": statistics.median(r["faults"] for r in results[s]),
                  "peak_rss_mb": results[s][-1]["peak_rss_mb"]} for s in SETTINGS}
    report["time_kept_over_default"] = statistics.median(
        k["ms"] / d["ms"] for k, d in zip(results["kept"], results["default"]))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--methods", default="mae,second_order")
    p.add_argument("--rounds", type=int, default=10, help="timed steps of each process")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--worker", help=argparse.SUPPRESS)    # shape:method:setting; internal
    args = p.parse_args()
    if args.worker:
        worker(*args.worker.split(":"), args.batch)
        return
    report = {"setup": {"torch": torch.__version__, "threads": THREADS, "cpu": cpu_model(), "batch": args.batch,
                        "warmup": WARMUP, "rounds": args.rounds}, "shapes": {}}
    for shape in args.shapes.split(","):
        report["shapes"][shape] = {method: paired(shape, method, args.batch, args.rounds)
                                   for method in args.methods.split(",")}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
