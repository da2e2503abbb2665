"""The linear probe against pretraining steps, beside the baselines: how to size a sweep's train.steps.

    python bench/probe_vs_steps.py [--steps 150,300,600,1200] [--methods metamae,mae] [Hydra overrides ...]

Composes the sweep's trial config (configs/pretrain.yaml with train=short, then the overrides, e.g.
`dataset=custom dataset.path=data/mine`), pretrains each method once with the plain loop, going on
from one step count to the next, and after each runs the project's linear evaluation (validation and
test scores). The random-init encoder of the same architecture and the raw inputs are probed the
same way. Prints JSON: where the validation score peaks, and whether it ever passes the baselines,
tells how long a sweep's trials should run, and whether pretraining pays on this data at all.
"""
import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import hydra

from metamae.config import CONFIG_DIR, to_object
from metamae.data import load_dataset
from metamae.loop import RESULTS, pretrain
from metamae.pretrain import baseline_probes
from metamae.process import start_command
from metamae.train import RunRecipe


def scores(result: dict) -> dict:
    return {"validation": round(result["validation"], 4), "test": round(result["test"], 4), "l2": result["l2"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="150,300,600,1200", help="step counts to probe at, ascending")
    parser.add_argument("--methods", default="metamae,mae")
    args, overrides = parser.parse_known_args()
    start_command()
    with tempfile.TemporaryDirectory() as folder, hydra.initialize_config_dir(config_dir=CONFIG_DIR,
                                                                              version_base=None):
        cfg = to_object(hydra.compose("pretrain", overrides=["train=short", *overrides, f"out_dir={folder}"]))
        data, dataset = load_dataset(cfg.dataset, seed=cfg.train.seed)
        cfg = replace(cfg, dataset=dataset)
        report = {"dataset": dataset.name, "model": cfg.model.__dict__, "probe": cfg.probe.method,
                  "baselines": {name: scores(result.summary()) for name, result in baseline_probes(data, cfg).items()}}
        for method in args.methods.split(","):
            objective = replace(cfg.objective, method=method)
            curve = []
            for steps in (int(s) for s in args.steps.split(",")):
                started = time.perf_counter()
                run = RunRecipe(dataset, cfg.model, objective, replace(cfg.train, steps=steps))
                with contextlib.redirect_stdout(sys.stderr):           # its "resuming from ..." lines
                    pretrain(run, cfg.probe, cfg.execution, data, Path(folder) / method, on_report=lambda m: None)
                result = json.loads((Path(folder) / method / RESULTS).read_text())["probe_result"]
                curve.append({"steps": steps, **scores(result), "seconds": round(time.perf_counter() - started, 1)})
                print(f"{method} {curve[-1]}", file=sys.stderr, flush=True)
            report[method] = curve
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
