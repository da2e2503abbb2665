"""python -m metamae.pretrain [dataset=digits] [model=tiny] [train.steps=5000] [baselines=true]
                           [trainer.num_workers=2] [trainer.use_gpu=true] [trainer.ray=false]

Pretrains with Ray Train (on a local Ray, or the cluster RAY_ADDRESS names), or with
trainer.ray=false in this process, then evaluates the encoder by linear probing. With
baselines=true it also pretrains MAE and probes a random-init encoder, side by side.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import hydra
import ray
import torch
from omegaconf import DictConfig

from metamae.config import CONFIG_DIR, PretrainConfig, register, to_object
from metamae.data import Dataset, load_dataset
from metamae.distributed.trainer import default_environment, fit
from metamae.linear_eval import ProbeResult, linear_probe
from metamae.model import MetaMAE
from metamae.train import RunConfig, pretrain


def random_init_encoder(data: Dataset, cfg: PretrainConfig) -> MetaMAE:
    torch.manual_seed(cfg.train.seed)
    return MetaMAE(data.spec, cfg.model, cfg.objective)


def run(cfg: PretrainConfig) -> dict[str, ProbeResult]:
    """Pretrain (and with cfg.baselines the MAE and random-init baselines), probe, write results.json."""
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
            metrics = fit(run_config, cfg.probe, cfg.trainer, out_dir / method).metrics   # the final report
            results[method] = ProbeResult(cfg.dataset.metric, metrics["objective"], metrics["objective_train"])
        else:
            model = pretrain(run_config, data, out_dir / method)
            results[method] = linear_probe(model, data, cfg.dataset, cfg.probe)
    if cfg.baselines:
        results["random_init"] = linear_probe(random_init_encoder(data, cfg), data, cfg.dataset, cfg.probe)

    (out_dir / "results.json").write_text(json.dumps(
        {name: dataclasses.asdict(r) for name, r in results.items()}, indent=2))
    metric = cfg.dataset.metric
    print(f"\nlinear probe on {cfg.dataset.name} ({metric}, {cfg.probe.epochs} epochs), "
          f"after {cfg.train.steps} pretraining steps:")
    for name, result in results.items():
        print(f"  {name:12s} test {result.test:.4f}   train {result.train:.4f}")
    print(f"results, checkpoints and TensorBoard events: {out_dir}")
    return results


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run(to_object(cfg))


register()

if __name__ == "__main__":
    main()
