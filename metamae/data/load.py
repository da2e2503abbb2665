"""One entry point from a dataset config to its examples."""
import dataclasses
from pathlib import Path

from metamae.config import DatasetConfig
from metamae.data.arrays import Dataset
from metamae.data.digits import DIGIT_CLASSES, digits
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
    if cfg.source == "digits" and (spec.kind != "image" or cfg.num_classes != DIGIT_CLASSES):
        raise ValueError(f"dataset {cfg.name!r}: source=digits is 1 × 8 × 8 images of {DIGIT_CLASSES} classes, "
                         f"not {spec.kind} input with {cfg.num_classes} classes; fix dataset.input and "
                         f"dataset.num_classes (see configs/dataset/digits.yaml)")
    data = digits(patch=spec.patch) if cfg.source == "digits" else synthetic(spec, cfg.num_classes, seed=seed)
    if data.spec != spec:
        raise ValueError(f"dataset {cfg.name!r}: the config's input {spec} does not match the data's {data.spec}")
    return data, cfg


def prepare_command(name: str, folder: Path) -> str:
    """The command that writes dataset `name`'s shards to `folder`."""
    if name == "custom":
        return (f"python -m metamae.data.prepare custom (--npz FILE | --csv FILE | --npy-dir DIR) --name NAME "
                f"--out {folder}")
    if name == "genomics_ood":                              # written by genomics' converter, into out/ood
        return f"python -m metamae.data.prepare genomics --raw RAW_DIR --out {folder.parent}"
    return f"python -m metamae.data.prepare {name} --raw RAW_DIR --out {folder}"


def _shards(cfg: DatasetConfig) -> tuple[Dataset, DatasetConfig]:
    if not cfg.path:
        raise ValueError(f"dataset {cfg.name!r} reads Parquet shards: set dataset.path to the prepared folder")
    folder = Path(cfg.path)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(
            f"dataset {cfg.name!r}: no prepared shards at {folder} ({MANIFEST} is missing). Prepare them with "
            f"`{prepare_command(cfg.name, folder)}`, or point dataset.path at a prepared folder")
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
