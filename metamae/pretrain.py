"""python -m metamae.pretrain [dataset=digits] [model=tiny] [train.steps=5000] [baselines=true]
                           [trainer.num_workers=2] [trainer.use_gpu=true] [trainer.ray=false]

Pretrains with Ray Train (on a local Ray, or the cluster RAY_ADDRESS names), or with
trainer.ray=false in this process, then evaluates the encoder by linear probing. With
baselines=true it also pretrains MAE and probes a random-init encoder and the raw inputs, side by side.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import hydra
import ray
import torch
from omegaconf import DictConfig

from metamae.config import CONFIG_DIR, ExperimentConfig, PretrainConfig, register, to_object
from metamae.data import Dataset, load_dataset
from metamae.distributed.trainer import PREDICTIONS, RESULTS, default_environment, fit
from metamae.linear_eval import ProbeResult, linear_probe, raw_input_probe
from metamae.model import MetaMAE
from metamae.train import RunConfig, pretrain


def random_init_encoder(data: Dataset, cfg: ExperimentConfig) -> MetaMAE:
    """The architecture of `cfg`, initialised as pretraining starts it: the encoder to beat."""
    torch.manual_seed(cfg.train.seed)
    return MetaMAE(data.spec, cfg.model, cfg.objective)


def baseline_probes(data: Dataset, cfg: ExperimentConfig) -> dict[str, ProbeResult]:
    """What pretraining has to beat, under the same probe and splits: a random-init encoder of the same
    architecture, and the raw inputs."""
    return {"random_init": linear_probe(random_init_encoder(data, cfg), data, cfg.dataset, cfg.probe),
            "raw_input": raw_input_probe(data, cfg.dataset, cfg.probe)}


def run(cfg: PretrainConfig) -> dict[str, dict]:
    """Pretrain (and with cfg.baselines MAE, and probe the baselines), then write results.json: every
    method's probe scores, each with the split it is on."""
    out_dir = Path(cfg.out_dir)
    data, dataset = load_dataset(cfg.dataset, seed=cfg.train.seed)
    cfg = dataclasses.replace(cfg, dataset=dataset)
    if cfg.trainer.ray and not ray.is_initialized():
        default_environment()
        ray.init()                      # a local Ray, or the cluster that RAY_ADDRESS names
    methods = ["metamae", "mae"] if cfg.baselines else [cfg.objective.method]
    results = {}
    for method in methods:
        objective = dataclasses.replace(cfg.objective, method=method)
        run_config = RunConfig(cfg.dataset, cfg.model, objective, cfg.train)
        if cfg.trainer.ray:
            fit(run_config, cfg.probe, cfg.trainer, out_dir / method)
            results[method] = json.loads((out_dir / method / RESULTS).read_text())["probe_result"]
        else:
            result = linear_probe(pretrain(run_config, data, out_dir / method), data, cfg.dataset, cfg.probe)
            result.save_predictions(out_dir / method / PREDICTIONS)
            results[method] = result.summary()
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
    run(to_object(cfg))


register()

if __name__ == "__main__":
    main()
