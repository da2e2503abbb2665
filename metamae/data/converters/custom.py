"""Your own arrays as shards: X and y from a .npz, a CSV table or a folder of .npy files.

X is N × C × L (time series), N × F (table), N × L integer tokens, or N × C × H × W (images and
spectrograms). y holds what --metric scores: class indices (accuracy, binary_accuracy, weighted_f1),
N × labels of 0/1 (auroc), or real targets (spearman, pearson). `train_idx` and `test_idx` pick the
split; otherwise a seeded 80/20 split is made, stratified by class for class labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.csv as pacsv
from sklearn.model_selection import train_test_split

from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, ShardWriter
from metamae.modality import ImageSpec, Spec, TabularSpec, TimeSeriesSpec, TokenSpec

MODALITIES = ("timeseries", "tabular", "tokens", "image")
LABEL_KIND = {"accuracy": "class", "binary_accuracy": "class", "weighted_f1": "class", "auroc": "multilabel",
              "spearman": "float", "pearson": "float"}                  # what each metric scores
TARGET_TOKENS = 64        # the default patch makes the token count closest to this


def default_patch(sizes: tuple[int, ...]) -> int:
    """The patch, dividing every size, whose token count is closest to TARGET_TOKENS."""
    divisors = [p for p in range(1, min(sizes) + 1) if all(s % p == 0 for s in sizes)]
    return min(divisors, key=lambda p: abs(int(np.prod([s // p for s in sizes])) - TARGET_TOKENS))


def spec_for(modality: str, x: np.ndarray, patch: Optional[int], vocab: Optional[int]) -> Spec:
    expected = {"timeseries": 3, "tabular": 2, "tokens": 2, "image": 4}
    if modality not in expected:
        raise ValueError(f"--modality is {modality!r}; expected one of {MODALITIES}")
    if x.ndim != expected[modality]:
        raise ValueError(f"X has shape {x.shape}; --modality {modality} takes {expected[modality]} dimensions "
                         f"(N × C × L, N × F, N × L or N × C × H × W)")
    if modality == "timeseries":
        return TimeSeriesSpec(x.shape[1], x.shape[2], patch or default_patch((x.shape[2],)))
    if modality == "tabular":
        if patch not in (None, 1):
            raise ValueError(f"--patch {patch}: a table has one token per feature (patch 1)")
        return TabularSpec(x.shape[1])
    if modality == "tokens":
        if not np.issubdtype(x.dtype, np.integer) or x.min() < 0:
            raise ValueError(f"tokens must be non-negative integers; X has dtype {x.dtype}, minimum {x.min()}")
        if vocab is not None and x.max() >= vocab:
            raise ValueError(f"X has token {x.max()}, outside --vocab {vocab}")
        return TokenSpec(vocab or int(x.max()) + 1, x.shape[1])
    return ImageSpec(x.shape[1], x.shape[2], x.shape[3], patch or default_patch(x.shape[2:]))


def labels_for(y: np.ndarray, metric: str) -> tuple[np.ndarray, str, int]:
    """y as the manifest stores it for `metric`, its label kind and its number of classes (or labels)."""
    if metric not in LABEL_KIND:
        raise ValueError(f"--metric is {metric!r}; expected one of {list(LABEL_KIND)}")
    kind, y = LABEL_KIND[metric], np.asarray(y)
    if kind == "float":
        if y.ndim != 1 or not np.isfinite(y.astype(np.float64)).all():
            raise ValueError(f"--metric {metric} scores one finite real target per example; y has shape {y.shape}")
        return y.astype(np.float32), kind, 0
    if kind == "multilabel":
        if y.ndim != 2 or not np.isin(y, (0, 1)).all():
            raise ValueError(f"--metric {metric} scores multi-label targets: y must be N × labels of 0 and 1, "
                             f"not shape {y.shape}")
        return y.astype(np.int8), kind, y.shape[1]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y)) or y.min() < 0:
        raise ValueError(f"--metric {metric} scores class indices: y must hold integers >= 0 (for real "
                         f"targets pass --metric spearman or pearson)")
    return y.astype(np.int64), kind, int(y.max()) + 1


def split_indices(y: np.ndarray, label: str, train_idx, test_idx, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if (train_idx is None) != (test_idx is None):
        raise ValueError("give both train_idx and test_idx, or neither (for a seeded 80/20 split)")
    if train_idx is not None:
        return np.asarray(train_idx), np.asarray(test_idx)
    return train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed,
                            stratify=y if label == "class" else None)


def convert_arrays(x: np.ndarray, y: np.ndarray, modality: str, out: Path, *, name: str = "custom",
                   patch: Optional[int] = None, vocab: Optional[int] = None, train_idx=None, test_idx=None,
                   metric: str = "accuracy", seed: int = 0, source: str = "arrays",
                   shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Manifest:
    if modality == "tabular":
        x = x[:, None, :]                                              # N × F -> N × 1 × F
    spec = spec_for(modality, x if modality != "tabular" else x[:, 0], patch, vocab)
    x = x.astype(np.int64 if modality == "tokens" else np.float32)
    if len(x) != len(y):
        raise ValueError(f"X has {len(x)} examples and y has {len(y)}")
    y, label, num_classes = labels_for(y, metric)
    train, test = split_indices(y, label, train_idx, test_idx, seed)
    writer = ShardWriter(out, name, spec, num_classes=num_classes, metric=metric, label=label,
                         converter={"source": source, "modality": modality, "seed": seed,
                                    "split": "given" if train_idx is not None else "seeded 80/20"},
                         shard_bytes=shard_bytes, overwrite=overwrite)
    writer.add("train", x[train], y[train], ids=train)
    writer.add("test", x[test], y[test], ids=test)
    return writer.finish()


def read_npz(path: Path) -> dict:
    with np.load(path) as arrays:
        missing = {"X", "y"} - set(arrays.files)
        if missing:
            raise ValueError(f"{path} has arrays {arrays.files}; it needs X and y (and may have train_idx, test_idx)")
        return {k: arrays[k] for k in ("X", "y", "train_idx", "test_idx") if k in arrays.files}


def read_npy_dir(folder: Path) -> dict:
    arrays = {p.stem: np.load(p) for p in Path(folder).glob("*.npy")}
    if not {"X", "y"} <= set(arrays):
        raise ValueError(f"{folder} needs X.npy and y.npy (and may have train_idx.npy, test_idx.npy)")
    return arrays


def read_csv(path: Path, label: str = "label") -> dict:
    table = pacsv.read_csv(path)
    if label not in table.column_names:
        raise ValueError(f"{path} has no {label!r} column; its columns are {table.column_names}")
    y = table[label].to_numpy()
    x = np.stack([table[c].to_numpy().astype(np.float32) for c in table.column_names if c != label], axis=1)
    return {"X": x, "y": y}
