"""Time, FLOPs and memory of one MetaMAE training step on a CPU, against a plain matmul.

For each input shape (PAMAP2: 64 × 52 × 320, patch 5; ImageNet32: 64 × 3 × 32 × 32, patch 4) and
each method (MAE, MetaMAE first order, MetaMAE second order) it builds the `dabs` backbone
(ModelConfig() defaults) in train mode and measures one training step: AdamW zero_grad,
loss = model(x).total, backward, optimizer step.

- time: 3 warm-up steps, then --steps timed ones; median, min, IQR and every step, in ms.
- GFLOP: torch.utils.flop_counter.FlopCounterMode over one further full step (forward + backward;
  it counts matmuls, convolutions and attention, not element-wise ops or the optimizer).
- GFLOP/s: GFLOP / median seconds. fraction_of_matmul: that over the GFLOP/s of a 2048 × 2048
  float32 matmul timed in the same process right after the timed steps (median of 20 after 3
  warm-ups: matmul_adjacent_gflop_per_s), so that the machine's drift over minutes, which moves the
  matmul by ±20 %, does not enter the ratio; fraction_of_matmul_paired (under ratios) takes the
  matmul's time in each round of the paired run (below) instead, which also cancels the swings of a
  few seconds that a noisy machine shows (the matmul alone: 160 to 305 ms within 20 s on a 2-core
  AMD EPYC). The run's first matmul (matmul_2048) is kept for reference.
- breakdown: where a step's time goes, from torch.profiler over 3 further steps (self CPU time):
  the matrix products (mm, addmm, bmm, convolutions, fused attention: what the FLOP count counts)
  and their GFLOP/s, dropout's mask draws (bernoulli_), and everything else, each as a share of the step.
- paired ratios: the step time of each method over MAE's, measured in one process that holds every
  method's model and runs the matmul, then one step of each method, in turn (--steps rounds after
  the warm-up): the median of the per-round ratios. With --compile that process also holds an
  eager twin of each compiled model, which gives each method's compiled time over its eager time
  the same way. The machine's speed drifts by ±20 % over minutes; a ratio of two medians taken
  minutes apart in separate processes carries that drift, a per-round ratio does not.
- memory: each configuration runs in its own subprocess (this script re-invoked with --config).
  peak_rss_mb is that process's VmHWM (peak resident set, from /proc/self/status) after the
  timed steps; setup_rss_mb is its VmRSS once the model, optimizer and batch exist; step_extra_mb
  is the difference, i.e. what the training steps add on top of the set-up process.
- contention: other_cpu_share is the share of the machine's CPU time that other processes used
  during the timed steps (from /proc/stat); "contended" lists the measurements where it exceeded
  5%, whose timings should be repeated on a quiet machine.

Everything runs with torch.set_num_threads(2) and, as in the training loop, with glibc's malloc
keeping freed memory (metamae.process.keep_freed_memory; bench/allocator.py measures what that
gains). With --compile every model's loss is compiled as train.compile=true does
(metamae.train.compile_loss): the first warm-up step compiles (1-2 minutes each on 2 cores), the
FLOPs are counted on the model before it is compiled (the same math), and the memory columns
include the compiled code. Prints one JSON object to stdout.

    .venv/bin/python bench/step.py                       # full run (several minutes)
    .venv/bin/python bench/step.py --steps 2 --batch 8   # smoke run
    .venv/bin/python bench/step.py --shapes pamap2 --methods mae,second_order
    .venv/bin/python bench/step.py --compile             # compiled losses (9-13 minutes)
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metamae.config import TrainConfig  # noqa: E402
from metamae.modality import ImageSpec, TimeSeriesSpec  # noqa: E402
from metamae.model import MetaMAE, ModelConfig, ObjectiveConfig  # noqa: E402
from metamae.process import start_training  # noqa: E402
from metamae.train import compile_loss, make_optimizer  # noqa: E402

THREADS, WARMUP, MATMUL_N, CONTENDED, PROFILED_STEPS = 2, 3, 2048, 0.05, 3
MATMUL_GFLOP = 2 * MATMUL_N ** 3 / 1e9
MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution",
                   "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
                   "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
DROPOUT_DRAWS = {"aten::bernoulli_"}

# shape -> (spec, input shape without the batch, mask ratio, contrastive weight)
SHAPES = {
    "pamap2": (TimeSeriesSpec(channels=52, length=320, patch=5), (52, 320), 0.85, 1.0),
    "imagenet32": (ImageSpec(channels=3, height=32, width=32, patch=4), (3, 32, 32), 0.5, 0.1),
}
METHODS = {
    "mae": dict(method="mae"),
    "first_order": dict(method="metamae", first_order=True),
    "second_order": dict(method="metamae", first_order=False),
}


def proc_status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, busy CPU seconds of the whole machine, CPU seconds of this process)."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split()[1:9]]   # user .. steal
    busy = sum(jiffies) - jiffies[3] - jiffies[4]                              # minus idle, iowait
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), sum(os.times()[:2])


def timed(fn, steps: int) -> dict:
    """Run fn WARMUP times, then time it `steps` times (ms). other_cpu_share: the share of the
    machine's CPUs that other processes (or the hypervisor) used meanwhile; above a few percent
    the timings are not to be trusted (2 OpenMP threads on 2 shared cores slow down many-fold)."""
    for _ in range(WARMUP):
        fn()
    times, before = [], cpu_seconds()
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    wall, busy, own = (after - b for after, b in zip(cpu_seconds(), before))
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_iqr": [q1, q3],
            "ms_all": [round(t, 2) for t in times],
            "other_cpu_share": max(0.0, (busy - own) / (wall * os.cpu_count()))}


def matmul_baseline(steps: int) -> dict:
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    stats = timed(lambda: a @ b, max(steps, 10))
    stats["gflop_per_s"] = MATMUL_GFLOP / (stats["ms_median"] / 1e3)
    return stats


def build(shape: str, method: str, batch: int):
    spec, dims, mask_ratio, weight = SHAPES[shape]
    objective = ObjectiveConfig(mask_ratio=mask_ratio, contrastive_weight=weight, inner_lr=0.5,
                                **METHODS[method])
    model = MetaMAE(spec, ModelConfig(), objective).train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=1e-4))    # the training loop's
    return model, optimizer, torch.randn(batch, *dims)


def training_step(model, optimizer, x) -> None:
    optimizer.zero_grad()
    model(x).total.backward()
    optimizer.step()


def breakdown(step, gflop: float) -> dict:
    """Shares of a step's self CPU time: matrix products, dropout's draws, the rest (profiled)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(PROFILED_STEPS):
            step()
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS)
    draws = sum(e.self_cpu_time_total for e in events if e.key in DROPOUT_DRAWS)
    return {"matrix_products_share": products / total, "dropout_draws_share": draws / total,
            "other_share": (total - products - draws) / total,
            "matrix_products_gflop_per_s": gflop / (products / 1e6 / PROFILED_STEPS)}


def measure_config(shape: str, method: str, batch: int, steps: int, compiled: bool) -> dict:
    """One configuration, in this process: FLOPs (eager), time, memory, then the profile (slow)."""
    torch.manual_seed(0)
    model, optimizer, x = build(shape, method, batch)
    step = functools.partial(training_step, model, optimizer, x)
    with FlopCounterMode(display=False) as counter:
        step()
    gflop = counter.get_total_flops() / 1e9
    if compiled:
        compile_loss(model)
    setup_rss = proc_status_mb("VmRSS")
    stats = timed(step, steps)
    peak_rss = proc_status_mb("VmHWM")
    matmul_rate = matmul_baseline(20)["gflop_per_s"]                  # right after, in this process
    report = {**stats, "gflop": gflop, "gflop_per_s": gflop / (stats["ms_median"] / 1e3),
              "matmul_adjacent_gflop_per_s": matmul_rate,
              "fraction_of_matmul": gflop / (stats["ms_median"] / 1e3) / matmul_rate,
              "setup_rss_mb": setup_rss, "peak_rss_mb": peak_rss, "step_extra_mb": peak_rss - setup_rss,
              "breakdown": breakdown(step, gflop)}
    report["breakdown"]["matrix_products_fraction_of_matmul"] = (
        report["breakdown"]["matrix_products_gflop_per_s"] / matmul_rate)
    return report


def measure_paired(shape: str, methods: list[str], batch: int, rounds: int, compiled: bool) -> dict:
    """Every model in this process: the 2048 × 2048 matmul, then one step of each model, in turn
    (`rounds` rounds after the warm-up).

    over_mae: per method, the median of its per-round time over MAE's (when MAE is measured).
    matmul_over: per method, the median of the matmul's per-round time over the method's step time
    (times the FLOP ratio, the step's GFLOP/s as a fraction of the matmul's).
    compiled_over_eager (compiled only): each method's model also runs eagerly beside its compiled
    twin; per method, the median of compiled over eager.
    """
    modes = ("compiled", "eager") if compiled else ("eager",)
    left, right = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    steps = {("matmul", "eager"): lambda: left @ right}
    for method in methods:
        for mode in modes:
            torch.manual_seed(0)
            model, optimizer, x = build(shape, method, batch)
            if mode == "compiled":
                compile_loss(model)
            steps[method, mode] = functools.partial(training_step, model, optimizer, x)
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)

    def ratio(a, b) -> float:
        return statistics.median(t / u for t, u in zip(times[a], times[b]))

    report = {"over_mae": {m: ratio((m, modes[0]), ("mae", modes[0]))
                           for m in methods if m != "mae" and "mae" in methods},
              "matmul_over": {m: ratio(("matmul", "eager"), (m, modes[0])) for m in methods}}
    if compiled:
        report["compiled_over_eager"] = {m: ratio((m, "compiled"), (m, "eager")) for m in methods}
    return report


def in_subprocess(flag: str, value: str, args: argparse.Namespace):
    """This script re-invoked with `flag value` (a fresh process: its own peak memory)."""
    command = [sys.executable, __file__, flag, value, "--batch", str(args.batch), "--steps", str(args.steps),
               *(["--compile"] if args.compile else [])]
    return json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout)


def ratios(shape: str, results: dict, args: argparse.Namespace) -> dict:
    """Paired times: each method's GFLOP/s as a fraction of the matmul's; per method over MAE's,
    beside the FLOP ratio (if MAE was measured); compiled over eager (--compile)."""
    paired = in_subprocess("--paired", f"{shape}:{','.join(results)}", args)
    report = {"fraction_of_matmul_paired": {m: results[m]["gflop"] / MATMUL_GFLOP * time_ratio
                                            for m, time_ratio in paired["matmul_over"].items()}}
    report |= {f"{m}_over_mae": {"time_paired": time_ratio,
                                 "time_of_medians": results[m]["ms_median"] / results["mae"]["ms_median"],
                                 "flop": results[m]["gflop"] / results["mae"]["gflop"]}
               for m, time_ratio in paired["over_mae"].items()}
    if args.compile:
        report["compiled_over_eager_paired"] = paired["compiled_over_eager"]
    return report


def measurements(report: dict):
    yield "matmul_2048", report["matmul_2048"]
    for shape, entry in report["shapes"].items():
        for method, r in entry["methods"].items():
            yield f"{shape}:{method}", r


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="torch.compile each loss, as train.compile=true does")
    p.add_argument("--config", help=argparse.SUPPRESS)    # shape:method; internal, one subprocess
    p.add_argument("--paired", help=argparse.SUPPRESS)    # shape:method,method,...; internal
    return p.parse_args()


def main() -> None:
    args = parse_args()
    keeps_freed_memory = start_training(TrainConfig(threads=THREADS, compile=args.compile))   # as a training process
    if args.config:
        print(json.dumps(measure_config(*args.config.split(":"), args.batch, args.steps, args.compile)))
        return
    if args.paired:
        shape, methods = args.paired.split(":")
        print(json.dumps(measure_paired(shape, methods.split(","), args.batch, args.steps, args.compile)))
        return
    first_matmul = matmul_baseline(args.steps)
    setup = {"torch": torch.__version__, "threads": THREADS, "cpu": cpu_model(), "cpus": os.cpu_count(),
             "keeps_freed_memory": keeps_freed_memory, "compiled": args.compile, "batch": args.batch,
             "warmup": WARMUP, "steps": args.steps}
    report = {"setup": setup, "matmul_2048": first_matmul, "shapes": {}}
    for shape in args.shapes.split(","):
        results = {method: in_subprocess("--config", f"{shape}:{method}", args)
                   for method in args.methods.split(",")}
        report["shapes"][shape] = {"methods": results,
                                   "ratios": ratios(shape, results, args)}
    report["contended"] = [name for name, r in measurements(report) if r["other_cpu_share"] > CONTENDED]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
