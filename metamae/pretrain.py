"""python -m metamae.pretrain [dataset=digits] [model=tiny] [train.steps=5000] [baselines=true]
                           [execution.num_workers=2] [execution.use_gpu=true] [execution.ray=false]

Pretrains with Ray Train (on a local Ray, or the cluster RAY_ADDRESS names), or with
execution.ray=false in this process, then evaluates the encoder by linear probing. With
baselines=true it also pretrains MAE and probes a random-init encoder and the raw inputs, side by side.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig

from metamae.config import CONFIG_DIR, ExperimentConfig, PretrainConfig, to_object
from metamae.data import Dataset, load_dataset
from metamae.files import DiskFull
from metamae.linear_eval import ProbeResult, linear_probe, raw_input_probe, split_names
from metamae.loop import RESULTS, pretrain
from metamae.model import MetaMAE
from metamae.process import start_command
from metamae.train import Interrupted, NonFiniteLoss, RunRecipe, StopSignals


def random_init_encoder(data: Dataset, cfg: ExperimentConfig) -> MetaMAE:
    """The architecture of `cfg`, initialised as pretraining starts it: the encoder to beat."""
    torch.manual_seed(cfg.train.seed)
    return MetaMAE(data.spec, cfg.model, cfg.objective)


def baseline_probes(data: Dataset, cfg: ExperimentConfig,
                    encoder: Optional[MetaMAE] = None) -> dict[str, ProbeResult]:
    """What pretraining has to beat, under the same probe and splits: a random-init encoder of the same
    architecture (`encoder`, or a new one), and the raw inputs, where they are few enough to probe
    (linear_eval.MAX_RAW_FEATURES; the reason is printed where not)."""
    results = {"random_init": linear_probe(encoder or random_init_encoder(data, cfg), data, cfg.dataset, cfg.probe)}
    try:
        results["raw_input"] = raw_input_probe(data, cfg.dataset, cfg.probe)
    except ValueError as too_large:
        print(f"no raw-input baseline: {too_large}", flush=True)
    return results


def run(cfg: PretrainConfig) -> dict[str, dict]:
    """Pretrain (and with cfg.baselines MAE, and probe the baselines), then write results.json: every
    method's probe scores, each with the split it is on."""
    out_dir = Path(cfg.out_dir)
    data, dataset = load_dataset(cfg.dataset, seed=cfg.train.seed)
    cfg = dataclasses.replace(cfg, dataset=dataset)
    if cfg.execution.ray:              # imported here: the plain loop (execution.ray=false) runs without Ray
        import ray

        from metamae.distributed.trainer import connect_ray, fit
        if not ray.is_initialized():
            connect_ray()
    methods = ["metamae", "mae"] if cfg.baselines else [cfg.objective.method]
    results = {}
    for method in methods:
        objective = dataclasses.replace(cfg.objective, method=method)
        recipe = RunRecipe(cfg.dataset, cfg.model, objective, cfg.train)
        if cfg.execution.ray:                              # the final report reaches the driver through Ray
            final = fit(recipe, cfg.probe, cfg.execution, out_dir / method, stop_on_sigterm=True).metrics
        else:
            with StopSignals() as signals:
                final = pretrain(recipe, cfg.probe, cfg.execution, data, out_dir / method, stop=signals)
        results[method] = ProbeResult(cfg.dataset.metric, cfg.probe.method, validation=final["validation"],
                                      test=final["test"], train=final["fit"],
                                      splits=split_names(cfg.dataset, cfg.probe)).summary()
    if cfg.baselines:
        results.update({name: result.summary() for name, result in baseline_probes(data, cfg).items()})

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS).write_text(json.dumps(results, indent=2))
    splits = next(iter(results.values()))["splits"]
    print(f"\n{cfg.probe.method} linear probe on {cfg.dataset.name} ({cfg.dataset.metric}) after "
          f"{cfg.train.steps} pretraining steps; fitted on {splits['fit']}, L2 chosen on the validation "
          f"split ({splits['validation']}), test = the {splits['test']!r} split:")
    for name, result in results.items():
        print(f"  {name:12s} validation {result['validation']:.4f}   test {result['test']:.4f}")
    print(f"results, checkpoints and TensorBoard events: {out_dir}")
    return results


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="pretrain")
def main(cfg: DictConfig) -> None:
    """The command: Ctrl-C of the plain loop, or SIGTERM of a Ray Train run, keeps a checkpoint of the
    last finished step, says where in one line, and exits 130 (SIGINT) or 143 (SIGTERM); a full disk
    or a NaN loss is one line too, and exit 1."""
    try:
        run(to_object(cfg))
    except Interrupted as stop:
        print(f"{stop}; the same command with out_dir={Path(cfg.out_dir).resolve()} resumes from it",
              file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except (DiskFull, NonFiniteLoss) as error:         # the message names the file or step, and what is kept
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    start_command()
    main()
