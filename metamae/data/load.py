"""One entry point from a dataset config to its examples."""
import dataclasses
from pathlib import Path

from metamae.config import DatasetConfig
from metamae.data.arrays import Dataset
from metamae.data.digits import digits
from metamae.data.shards import MANIFEST, ShardDataset
from metamae.data.synthetic import synthetic
from metamae.modality import spec_to_dict


def load_dataset(cfg: DatasetConfig, seed: int = 0) -> tuple[Dataset, DatasetConfig]:
    """The dataset, and its config with every field filled in (from the manifest, for shards)."""
    if cfg.source == "shards":
        return _shards(cfg)
    for key in ("input", "num_classes", "metric"):
        if getattr(cfg, key) is None:
            raise ValueError(f"dataset {cfg.name!r} (source={cfg.source}) needs dataset.{key}")
    spec = cfg.spec()
    data = digits(patch=spec.patch) if cfg.source == "digits" else synthetic(spec, cfg.num_classes, seed=seed)
    if data.spec != spec:
        raise ValueError(f"dataset {cfg.name!r}: the config's input {spec} does not match the data's {data.spec}")
    return data, cfg


def _shards(cfg: DatasetConfig) -> tuple[Dataset, DatasetConfig]:
    if not cfg.path:
        raise ValueError(f"dataset {cfg.name!r} reads Parquet shards: set dataset.path to the prepared folder")
    folder = Path(cfg.path)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(
            f"dataset {cfg.name!r}: no prepared shards at {folder} ({MANIFEST} is missing). Prepare them with "
            f"`python -m metamae.data.prepare {cfg.name} --raw RAW_DIR --out {folder}`, or point dataset.path "
            f"at a prepared folder")
    data = ShardDataset(folder)
    manifest = data.manifest
    from_manifest = {"input": spec_to_dict(manifest.spec), "num_classes": manifest.num_classes,
                     "metric": manifest.metric}
    for key, value in from_manifest.items():
        given = getattr(cfg, key)
        if given is not None and (spec_to_dict(cfg.spec()) if key == "input" else given) != value:
            raise ValueError(f"dataset.{key} is {given}, and the manifest of {folder} says {value}: "
                             f"leave dataset.{key} out to take the manifest's")
    return data, dataclasses.replace(cfg, **from_manifest)
