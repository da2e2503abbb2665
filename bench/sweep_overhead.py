"""What the Ray sweep costs per trial over a plain in-process Optuna loop running the same trials.

Runs N short trials (tiny model on the embedded digits, the same steps, one at a time, no early
stopping) twice in one run:
  - plain_optuna: optuna.create_study().optimize() in this process, each trial metamae.train.pretrain
    plus the final linear probe (the baseline);
  - ray_sweep: `python tune/sweep.py` on a local Ray (Tune + OptunaSearch + one Ray Train run per
    trial), wall time of the whole command including Ray's start-up and the report.
Prints JSON with both wall times and the overhead per trial in seconds.

    .venv/bin/python bench/sweep_overhead.py [--trials 4] [--steps 150]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from metamae.config import DatasetConfig, ProbeConfig, TrainConfig
from metamae.data.digits import digits
from metamae.linear_eval import linear_probe
from metamae.model import ModelConfig, ObjectiveConfig
from metamae.train import RunConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(enc_width=64, enc_depth=4, enc_heads=4, dec_width=32, dec_depth=2, dec_heads=4)
DIGITS = DatasetConfig(name="digits", input={"kind": "image", "channels": 1, "height": 8, "width": 8, "patch": 2},
                       num_classes=10, metric="accuracy", batch_size=64, source="digits")
PROBE = ProbeConfig()                  # the sweep's default: the converged probe


def plain_optuna(trials: int, steps: int, folder: Path) -> None:
    data = digits()
    train = TrainConfig(steps=steps, log_every=steps, checkpoint_every=steps, threads=1)

    def objective(trial: optuna.Trial) -> float:
        objective_cfg = ObjectiveConfig(inner_lr=trial.suggest_float("inner_lr", 0.05, 5.0, log=True),
                                        temperature=trial.suggest_float("temperature", 0.05, 1.0, log=True),
                                        mask_ratio=trial.suggest_float("mask_ratio", 0.3, 0.9))
        model = pretrain(RunConfig(DIGITS, TINY, objective_cfg, train), data, folder / str(trial.number), log=False)
        return linear_probe(model, data, DIGITS, PROBE).validation

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        plain_optuna(args.trials, args.steps, Path(folder) / "plain")
        plain_s = time.perf_counter() - started

        started = time.perf_counter()
        subprocess.run([sys.executable, "tune/sweep.py", f"sweep.dir={folder}", "sweep.name=ray",
                        f"sweep.num_samples={args.trials}", "sweep.max_concurrent_trials=1", "sweep.baseline=false",
                        f"train.steps={args.steps}", f"train.log_every={args.steps}",
                        f"sweep.grace_period={args.steps}"],
                       cwd=ROOT, check=True, capture_output=True, text=True)
        sweep_s = time.perf_counter() - started
    print(json.dumps({"trials": args.trials, "steps_per_trial": args.steps, "plain_optuna_wall_s": plain_s,
                      "ray_sweep_wall_s": sweep_s, "ratio": sweep_s / plain_s,
                      "overhead_per_trial_s": (sweep_s - plain_s) / args.trials}, indent=2))


if __name__ == "__main__":
    main()
