"""python -m metamae.evaluate checkpoint=PATH [dataset=scop] [probe=paper]

Linear evaluation of a pretrained checkpoint (a checkpoint.pt or the run folder holding it), on the
dataset it was pretrained on, or on another of the same input shape (a transfer task).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from metamae.checkpoint import load_checkpoint, model_from_checkpoint
from metamae.config import CONFIG_DIR, DatasetConfig, EvaluateConfig, to_object
from metamae.data import load_dataset
from metamae.linear_eval import PREDICTIONS, ProbeResult, linear_probe
from metamae.modality import spec_from_dict
from metamae.process import start_command


def run(cfg: EvaluateConfig) -> ProbeResult:
    checkpoint = load_checkpoint(Path(cfg.checkpoint))
    own = to_object(OmegaConf.merge(OmegaConf.structured(DatasetConfig), checkpoint["config"]["dataset"]))
    # the data seed pretraining used (it makes source=synthetic data), so both see the same examples
    data, dataset = load_dataset(cfg.dataset or own, seed=checkpoint["config"]["train"]["seed"])
    cfg = dataclasses.replace(cfg, dataset=dataset)
    trained_on = spec_from_dict(checkpoint["config"]["dataset"]["input"])
    if trained_on != cfg.dataset.spec():
        raise ValueError(f"checkpoint {cfg.checkpoint} was pretrained on inputs {trained_on}, and dataset "
                         f"{cfg.dataset.name!r} has inputs {cfg.dataset.spec()}: evaluate it on a dataset of "
                         f"the same shape")
    model = model_from_checkpoint(checkpoint)
    result = linear_probe(model, data, cfg.dataset, cfg.probe)
    out_dir = Path(cfg.out_dir)
    result.test_predictions.save(out_dir / PREDICTIONS)
    (out_dir / "evaluation.json").write_text(json.dumps(
        {"checkpoint": str(cfg.checkpoint), "step": checkpoint["step"], **result.summary()}, indent=2))
    print(f"{cfg.dataset.name}: {cfg.probe.method} linear probe, {result.metric} validation {result.validation:.4f} "
          f"({result.splits['validation']}), test {result.test:.4f} ({result.splits['test']!r} split); "
          f"checkpoint step {checkpoint['step']}")
    return result


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(to_object(cfg))


if __name__ == "__main__":
    start_command()
    main()
