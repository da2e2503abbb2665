"""One entry point from a dataset config to its examples."""
from metamae.config import DatasetConfig
from metamae.data.arrays import ArrayDataset
from metamae.data.digits import digits
from metamae.data.synthetic import synthetic


def load_dataset(cfg: DatasetConfig, seed: int = 0) -> ArrayDataset:
    spec = cfg.spec()
    if cfg.source == "digits":
        data = digits(patch=spec.patch)
    elif cfg.source == "synthetic":
        data = synthetic(spec, num_classes=cfg.num_classes, seed=seed)
    else:
        raise FileNotFoundError(
            f"dataset {cfg.name!r} reads Parquet shards (dataset.path={cfg.path!r}), and this version "
            f"has no shard reader yet: use dataset=digits, or a synthetic dataset, for now")
    if data.spec != spec:
        raise ValueError(f"dataset {cfg.name!r}: the config's input {spec} does not match the data's {data.spec}")
    return data
