"""What the Ray sweep costs per trial over a plain in-process Optuna loop running the same trials.

Runs N short trials (tiny model on the embedded digits, the same steps, no early stopping) three
ways in one run, with the machine's CPU utilisation over each (/proc/stat):
  - plain_optuna: optuna.create_study().optimize() in this process, one trial after the other, each
    metamae.loop.pretrain with its final linear evaluation (the baseline; torch uses every core);
  - ray_one_worker: `python tune/sweep.py` on a local Ray, trials of one worker (each runs the loop in
    its Tune trial's process), as many at once as the CPUs hold (execution.cpus_per_worker);
  - ray_two_workers: the same with execution.num_workers=2: each trial a Ray Train run.
The Ray wall times are the whole command's, Ray's start-up and the report included. Prints JSON: wall
times, each Ray sweep's ratio to the plain loop and overhead per trial in seconds, and utilisation.

    .venv/bin/python bench/sweep_overhead.py [--trials 8] [--steps 150]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from metamae.config import DatasetConfig, ExecutionConfig, ProbeConfig, TrainConfig
from metamae.data.digits import digits
from metamae.loop import pretrain
from metamae.model import ModelConfig, ObjectiveConfig
from metamae.train import RunRecipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(enc_width=64, enc_depth=4, enc_heads=4, dec_width=32, dec_depth=2, dec_heads=4)   # model=tiny
DIGITS = DatasetConfig(name="digits", input={"kind": "image", "channels": 1, "height": 8, "width": 8, "patch": 2},
                       num_classes=10, metric="accuracy", batch_size=64, source="digits")


def cpu_times() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat (Linux)."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]                                 # idle, iowait
    return sum(ticks) - idle, sum(ticks)


class Utilisation:
    """The machine's CPU utilisation (0-1, all cores) over the block: busy ticks over all ticks."""

    def __enter__(self) -> "Utilisation":
        self.start = cpu_times()
        return self

    def __exit__(self, *exc) -> None:
        busy, total = (end - start for end, start in zip(cpu_times(), self.start))
        self.mean = busy / total


def plain_optuna(trials: int, steps: int, folder: Path) -> None:
    data = digits()
    train = TrainConfig(steps=steps, log_every=steps, checkpoint_every=steps)
    execution = ExecutionConfig(ray=False, probe_every=steps, probe_examples=400)   # as the sweep's trials probe

    def objective(trial: optuna.Trial) -> float:
        objective_cfg = ObjectiveConfig(inner_lr=trial.suggest_float("inner_lr", 0.05, 5.0, log=True),
                                        temperature=trial.suggest_float("temperature", 0.05, 1.0, log=True),
                                        mask_ratio=trial.suggest_float("mask_ratio", 0.3, 0.9))
        final = pretrain(RunRecipe(DIGITS, TINY, objective_cfg, train), ProbeConfig(), execution, data,
                         folder / str(trial.number), on_report=lambda metrics: None)
        return final["validation"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)


def ray_sweep(trials: int, steps: int, folder: str, name: str, *overrides: str) -> None:
    subprocess.run([sys.executable, "tune/sweep.py", f"sweep.dir={folder}", f"sweep.name={name}",
                    f"sweep.num_samples={trials}", "sweep.baseline=false", f"train.steps={steps}",
                    f"train.log_every={steps}", f"sweep.grace_period={steps}", *overrides],
                   cwd=ROOT, check=True, capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = {"trials": args.trials, "steps_per_trial": args.steps, "cpus": os.cpu_count()}
    ways = {"plain_optuna": lambda folder: plain_optuna(args.trials, args.steps, Path(folder) / "plain"),
            "ray_one_worker": lambda folder: ray_sweep(args.trials, args.steps, folder, "one"),
            "ray_two_workers": lambda folder: ray_sweep(args.trials, args.steps, folder, "two",
                                                        "execution.num_workers=2")}
    with tempfile.TemporaryDirectory() as folder:
        for way, run in ways.items():
            started = time.perf_counter()
            with Utilisation() as busy:
                run(folder)
            results[way] = {"wall_s": round(time.perf_counter() - started, 1), "cpu_utilisation": round(busy.mean, 3)}
            print(way, results[way], file=sys.stderr, flush=True)
    plain = results["plain_optuna"]["wall_s"]
    for way in ("ray_one_worker", "ray_two_workers"):
        results[way]["ratio_to_plain"] = round(results[way]["wall_s"] / plain, 3)
        results[way]["overhead_per_trial_s"] = round((results[way]["wall_s"] - plain) / args.trials, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
