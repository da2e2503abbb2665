"""Your own arrays as shards: X and y from a .npz, a CSV table or a folder of .npy files.

X is N × C × L (time series), N × F (table), N × L integer tokens, or N × C × H × W (images and
spectrograms), every example the same shape: sequences of different lengths padded to one (a
`lengths` array beside X) are refused, as the padding would be read as data. y holds what --metric
scores: class indices (accuracy, binary_accuracy, weighted_f1), N × labels of 0/1 (auroc), or real
targets (spearman, pearson). Class indices run over 0..K-1: K is --num-classes when given (every label
must be below it), otherwise the largest label + 1, and then a class with no example is refused: a
gap is more often a labelling mistake (labels from 1, a class dropped) than a real class absent here.
`train_idx` and `test_idx` pick the split: 1-D integer arrays of distinct indices into X that share
none (a shared example would be tested on after training on it). Otherwise a seeded 80/20 split is
made, stratified by class for class labels.

Files numpy cannot read (not an .npz archive or .npy array, truncated, corrupt, holding Python
objects, which are never unpickled) raise ValueError naming the file and the array.

Float inputs are stored as given, with each channel's (a table's: each feature's) mean and standard
deviation over the train split as the manifest's `normalization`, which every reader standardises
with; standardize=False (--no-standardize) stores none, and the inputs are read as given. The name
names the dataset's runs and sweeps (configs/dataset/custom.yaml reads it from the manifest), so it
must be a safe folder name.
"""
from __future__ import annotations

import re
import zipfile
import zlib
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
NPZ_START = (b"PK\x03\x04", b"PK\x05\x06")       # a zip archive's first bytes (an empty archive's: the second)
NPY_START = b"\x93NUMPY"
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)   # what numpy raises on a bad file


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


def labels_for(y: np.ndarray, metric: str, num_classes: Optional[int] = None) -> tuple[np.ndarray, str, int]:
    """y as the manifest stores it for `metric`, its label kind and its number of classes (or labels);
    `num_classes` (--num-classes) only for class labels."""
    if metric not in LABEL_KIND:
        raise ValueError(f"--metric is {metric!r}; expected one of {list(LABEL_KIND)}")
    kind, y = LABEL_KIND[metric], np.asarray(y)
    if num_classes is not None and kind != "class":
        raise ValueError(f"--num-classes {num_classes} is for class labels (--metric accuracy, binary_accuracy or "
                         f"weighted_f1); --metric {metric} does not score classes: drop --num-classes")
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
    y = y.astype(np.int64)
    return y, kind, class_count(y, num_classes)


def class_count(y: np.ndarray, num_classes: Optional[int]) -> int:
    """The number of classes of the class indices y: `num_classes` when given, every label below it;
    otherwise the largest label + 1, every class below it holding an example."""
    present = np.unique(y)
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"--num-classes is {num_classes}; it counts the classes, at least 1")
        outside = present[present >= num_classes]
        if len(outside):
            raise ValueError(f"y holds labels {runs(outside)}, outside --num-classes {num_classes} (labels "
                             f"0..{num_classes - 1}): relabel them, or pass the right --num-classes")
        return num_classes
    missing = np.setdiff1d(np.arange(present[-1] + 1), present)
    if len(missing):
        absent = f"class {missing[0]} has" if len(missing) == 1 else f"classes {runs(missing)} have"
        raise ValueError(f"y holds classes {runs(present)}; {absent} no example: relabel to 0..K-1 (K the number "
                         f"of classes), or pass --num-classes {present[-1] + 1} if they are real classes absent here")
    return int(present[-1]) + 1


def runs(values: np.ndarray, limit: int = 8) -> str:
    """Sorted distinct integers as text, three or more consecutive ones as a range: [0, 1, 3, 4, 5] ->
    '0, 1, 3-5'; after `limit` runs, '...'."""
    pieces = np.split(values, np.flatnonzero(np.diff(values) != 1) + 1)
    text = [", ".join(map(str, run)) if len(run) < 3 else f"{run[0]}-{run[-1]}" for run in pieces[:limit]]
    return ", ".join(text) + (", ..." if len(pieces) > limit else "")


def split_indices(y: np.ndarray, label: str, train_idx, test_idx, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The given train_idx and test_idx, checked (see `check_indices`) and disjoint, or a seeded 80/20
    split, stratified by class for class labels."""
    if (train_idx is None) != (test_idx is None):
        raise ValueError("give both train_idx and test_idx, or neither (for a seeded 80/20 split)")
    if train_idx is None:
        return train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed,
                                stratify=y if label == "class" else None)
    train, test = check_indices("train_idx", train_idx, len(y)), check_indices("test_idx", test_idx, len(y))
    shared = np.intersect1d(train, test)
    if len(shared):
        raise ValueError(f"train_idx and test_idx share {len(shared)} examples (e.g. {shared[0]}): the model would "
                         f"be tested on examples it was trained on; make the two splits disjoint")
    return train, test


def check_indices(name: str, indices, n: int) -> np.ndarray:
    """`indices` (train_idx or test_idx) as int64, once checked to be a 1-D integer array of distinct
    indices into the n examples; ValueError naming the array and the first bad index otherwise."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer indices into X; it has shape {indices.shape} and "
                         f"dtype {indices.dtype}")
    outside = np.flatnonzero((indices < 0) | (indices >= n))
    if len(outside):
        first = outside[0]
        raise ValueError(f"{name}[{first}] is {indices[first]}, outside [0, {n - 1}]: X has {n} examples "
                         f"(indices outside it in {name}: {len(outside)} of {len(indices)})")
    values, counts = np.unique(indices, return_counts=True)
    repeated = values[counts > 1]
    if len(repeated):
        raise ValueError(f"{name} repeats {len(repeated)} {'index' if len(repeated) == 1 else 'indices'} "
                         f"(e.g. {repeated[0]}): each example goes into a split once")
    return indices.astype(np.int64)


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
                   metric: str = "accuracy", num_classes: Optional[int] = None, seed: int = 0,
                   source: str = "arrays", standardize: bool = True, shard_bytes: int = DEFAULT_SHARD_BYTES,
                   overwrite: bool = False) -> Manifest:
    """Check x, y and the split, and write them as the dataset folder `out`; a complete dataset there is
    replaced (overwrite) only once the new one is complete, and an error leaves nothing written."""
    check_name(name)
    spec = spec_for(modality, x, patch, vocab)
    x = x.astype(np.int64 if modality == "tokens" else np.float32)
    if modality == "tabular":
        x = x[:, None, :]                                              # N × F -> N × 1 × F
    if len(x) != len(y):
        raise ValueError(f"X has {len(x)} examples and y has {len(y)}")
    y, label, num_classes = labels_for(y, metric, num_classes)
    train, test = split_indices(y, label, train_idx, test_idx, seed)
    standardize = standardize and modality != "tokens"
    with ShardWriter(out, name, spec, num_classes=num_classes, metric=metric, label=label,
                     converter={"source": source, "modality": modality, "seed": seed,
                                "split": "given" if train_idx is not None else "seeded 80/20",
                                "standardize": standardize},
                     shard_bytes=shard_bytes, overwrite=overwrite) as writer:
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
    """X, y and those of train_idx, test_idx (and lengths, refused) an .npz archive holds."""
    start = file_start(path)
    if start[:4] not in NPZ_START:
        raise ValueError(f"{path} is not an .npz archive ({described(start)}, not a zip archive's 'PK'): "
                         f"save X and y with numpy.savez(path, X=X, y=y)")
    try:
        archive = np.load(path, allow_pickle=False)
    except READ_ERRORS as error:
        raise unreadable(str(path), error) from error
    with archive:
        missing = {"X", "y"} - set(archive.files)
        if missing:
            raise ValueError(f"{path} has arrays {archive.files}; it needs X and y (and may have train_idx, test_idx)")
        found = {k: npz_array(archive, k, path) for k in ("X", "y", "train_idx", "test_idx", "lengths")
                 if k in archive.files}
    refuse_lengths(found, path)
    return found


def npz_array(archive, key: str, path: Path) -> np.ndarray:
    """One array of an open .npz archive, read (and its data's checksum checked) now."""
    try:
        array = archive[key]
    except READ_ERRORS as error:
        raise unreadable(f"{path} (array {key!r})", error) from error
    if not isinstance(array, np.ndarray):                 # numpy hands back the bytes of a member not in .npy format
        raise ValueError(f"{path} (array {key!r}) is not a .npy array inside the archive: save X and y with "
                         f"numpy.savez(path, X=X, y=y)")
    return array


def read_npy_dir(folder: Path) -> dict:
    arrays = {p.stem: read_npy(p) for p in Path(folder).glob("*.npy")}
    if not {"X", "y"} <= set(arrays):
        raise ValueError(f"{folder} needs X.npy and y.npy (and may have train_idx.npy, test_idx.npy)")
    refuse_lengths(arrays, folder)
    return arrays


def read_npy(path: Path) -> np.ndarray:
    start = file_start(path)
    if start != NPY_START:
        raise ValueError(f"{path} is not a .npy array ({described(start)}, not {NPY_START!r}): save it with "
                         f"numpy.save")
    try:
        return np.load(path, allow_pickle=False)
    except READ_ERRORS as error:
        raise unreadable(str(path), error) from error


def file_start(path: Path) -> bytes:
    """A file's first bytes, enough to tell an .npz archive from a .npy array from anything else."""
    try:
        with open(path, "rb") as f:
            return f.read(len(NPY_START))
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from error


def described(start: bytes) -> str:
    return f"it starts with {start!r}" if start else "it is empty"


def unreadable(where: str, error: Exception) -> ValueError:
    """The error for an array numpy could not read: one of Python objects, which are never unpickled,
    or one truncated or corrupt, with numpy's or zipfile's reason."""
    if "allow_pickle" in str(error):                      # numpy's words for an array of dtype object
        return ValueError(f"{where} holds Python objects (an array of dtype object), which are never unpickled: "
                          f"save it as an array of numbers")
    reason = " ".join(str(error).split()) or type(error).__name__
    return ValueError(f"{where} is truncated or corrupt ({reason}): save it again")


def read_csv(path: Path, label: str = "label") -> dict:
    table = pacsv.read_csv(path)
    if label not in table.column_names:
        raise ValueError(f"{path} has no {label!r} column; its columns are {table.column_names}")
    y = table[label].to_numpy()
    x = np.stack([table[c].to_numpy().astype(np.float32) for c in table.column_names if c != label], axis=1)
    return {"X": x, "y": y}
