"""Your own arrays as shards: X and y from a .npz, a CSV table or a folder of .npy files.

X is N × C × L (time series), N × F (table), N × L integer tokens, or N × C × H × W (images and
spectrograms), every example the same shape: sequences of different lengths padded to one (a
`lengths` array beside X) are refused, as the padding would be read as data. y holds what --metric
scores: class indices (accuracy, binary_accuracy, weighted_f1), N × labels of 0/1 (auroc), or real
targets (spearman, pearson). `train_idx` and `test_idx` pick the split; otherwise a seeded 80/20
split is made, stratified by class for class labels.

Float inputs are stored as given, with each channel's (a table's: each feature's) mean and standard
deviation over the train split as the manifest's `normalization`, which every reader standardises
with; standardize=False (--no-standardize) stores none, and the inputs are read as given. The name
names the dataset's runs and sweeps (configs/dataset/custom.yaml reads it from the manifest), so it
must be a safe folder name.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.csv as pacsv
from sklearn.model_selection import train_test_split

from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, Moments, ShardWriter
from metamae.modality import ImageSpec, Spec, TabularSpec, TimeSeriesSpec, TokenSpec

MODALITIES = ("timeseries", "tabular", "tokens", "image")
LABEL_KIND = {"accuracy": "class", "binary_accuracy": "class", "weighted_f1": "class", "auroc": "multilabel",
              "spearman": "float", "pearson": "float"}                  # what each metric scores
TARGET_TOKENS = 64        # the default patch makes the token count closest to this
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")          # a folder (runs/NAME) and an Optuna study name
STATISTICS_ROWS = 4096    # train examples per float64 batch of the per-channel statistics


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


def check_name(name: str) -> None:
    """Raise for a name that cannot be a folder (runs/NAME) or an Optuna study's name."""
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"--name {name!r} cannot name the dataset: its runs go to runs/NAME/ and its sweeps to "
                         f"sweeps/.../NAME/; use letters, digits, '_', '-' and '.', starting with a letter or digit")


def train_normalization(x: np.ndarray, spec: Spec) -> dict:
    """The manifest's normalization: each channel's mean and std over the train examples x."""
    moments = Moments(spec)
    for lo in range(0, len(x), STATISTICS_ROWS):
        moments.add(x[lo:lo + STATISTICS_ROWS])
    return moments.normalization("train")


def convert_arrays(x: np.ndarray, y: np.ndarray, modality: str, out: Path, *, name: str = "custom",
                   patch: Optional[int] = None, vocab: Optional[int] = None, train_idx=None, test_idx=None,
                   metric: str = "accuracy", seed: int = 0, source: str = "arrays", standardize: bool = True,
                   shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Manifest:
    check_name(name)
    spec = spec_for(modality, x, patch, vocab)
    x = x.astype(np.int64 if modality == "tokens" else np.float32)
    if modality == "tabular":
        x = x[:, None, :]                                              # N × F -> N × 1 × F
    if len(x) != len(y):
        raise ValueError(f"X has {len(x)} examples and y has {len(y)}")
    y, label, num_classes = labels_for(y, metric)
    train, test = split_indices(y, label, train_idx, test_idx, seed)
    standardize = standardize and modality != "tokens"
    writer = ShardWriter(out, name, spec, num_classes=num_classes, metric=metric, label=label,
                         converter={"source": source, "modality": modality, "seed": seed,
                                    "split": "given" if train_idx is not None else "seeded 80/20",
                                    "standardize": standardize},
                         shard_bytes=shard_bytes, overwrite=overwrite)
    writer.add("train", x[train], y[train], ids=train)
    writer.add("test", x[test], y[test], ids=test)
    return writer.finish(normalization=train_normalization(x[train], spec) if standardize else None)


def refuse_lengths(arrays: dict, where: Path) -> None:
    """Raise for a `lengths` array: X then holds sequences of different lengths padded to one."""
    if "lengths" in arrays:
        raise ValueError(f"{where} has `lengths` beside X: sequences of different lengths padded to X's length "
                         f"{np.shape(arrays['X'])[-1]}, and the padding would be read as data (reconstructed, "
                         f"probed and standardised as real values). Crop or resample every sequence to one length "
                         f"and save X without `lengths`; if X holds no padding, drop `lengths`")


def read_npz(path: Path) -> dict:
    with np.load(path) as arrays:
        missing = {"X", "y"} - set(arrays.files)
        if missing:
            raise ValueError(f"{path} has arrays {arrays.files}; it needs X and y (and may have train_idx, test_idx)")
        found = {k: arrays[k] for k in ("X", "y", "train_idx", "test_idx", "lengths") if k in arrays.files}
    refuse_lengths(found, path)
    return found


def read_npy_dir(folder: Path) -> dict:
    arrays = {p.stem: np.load(p) for p in Path(folder).glob("*.npy")}
    if not {"X", "y"} <= set(arrays):
        raise ValueError(f"{folder} needs X.npy and y.npy (and may have train_idx.npy, test_idx.npy)")
    refuse_lengths(arrays, folder)
    return arrays


def read_csv(path: Path, label: str = "label") -> dict:
    table = pacsv.read_csv(path)
    if label not in table.column_names:
        raise ValueError(f"{path} has no {label!r} column; its columns are {table.column_names}")
    y = table[label].to_numpy()
    x = np.stack([table[c].to_numpy().astype(np.float32) for c in table.column_names if c != label], axis=1)
    return {"X": x, "y": y}
