"""WM-811K wafer maps from the publisher's `LSWMD.pkl`, as DABS prepares them.

Publisher's format: `LSWMD.pkl`, the pickle of WM-811K (Wu et al. 2015, MIR lab) distributed on
Kaggle ("WM-811K wafer map", qingyi/wm811k-wafer-map), a pickled pandas DataFrame of 811,457 rows with
`waferMap` (a 2-D uint8 array per wafer, of varying size: 0 = no die, 1 = good die, 2 = failed
die) and `failureType` (a 1 × 1 array holding one of Center, Donut, Edge-Loc, Edge-Ring, Loc,
Near-full, Random, Scratch, none, or an empty array for the 638,507 unlabelled wafers), beside
dieSize, lotName, waferIndex and trianTestLabel (unused). The file was written by an old pandas
(module paths since renamed, e.g. `pandas.indexes`); it is read with pandas's own compatibility
unpickler, old paths mapped to today's, strings decoded as latin1 (as Python 2 pickles need).

SECURITY: unpickling runs whatever code the file names. Load ONLY the official LSWMD.pkl, as
downloaded from its publisher; never a file from anyone else. The whole frame is loaded at once
(a pickle cannot be streamed); the images are then resized and written in chunks.

Preprocessing, as in DABS (alextamkin/dabs, src/datasets/semiconductors/wafer_map.py; MetaMAE's
`wafer-map` in alinlab/MetaMAE data/rgbimage.py is the same). DABS reads the same wafers from the
MIR lab's MATLAB copy (MIR-WM811K.zip, WM811K.mat); its splits are reproduced here exactly if
LSWMD.pkl lists the wafers in the same order as that file (not checked):

- label: `failureType` lower-cased; a wafer is labelled when it has one (none included: 172,950
  wafers). FAILURE_MAP: none 0, random 1, donut 2, scratch 3, center 4, loc 5, edge-loc 6,
  edge-ring 7, near-full 8 (9 classes; DABS maps "unlabeled" to 0 too). Metric: weighted F1.
- image: `waferMap * 127.5` truncated to int (0, 127, 255), the same gray value in all 3 channels,
  resized to 32 × 32 by PIL bilinear (torchvision Resize((32, 32)) on a PIL image), then / 255
  (ToTensor): float32 3 × 32 × 32 in [0, 1]. No mean/std normalisation.
- split: the chosen rows, in file order, shuffled as pandas `sample(frac=1, random_state=42)`
  (= numpy.random.RandomState(42).permutation); train = the first ceil(0.9 n), test = the last
  floor(0.1 n) (DABS's validation split, which it evaluates on). Each row's `id` is its index in
  LSWMD.pkl.

Tasks (`convert(..., task=NAME)`, one dataset folder each):
- `wafermap` (default; DABS `wafer_transfer`): the labelled wafers, 9 classes.
- `wafermap_pretrain` (DABS `wafer`): the unlabelled wafers, for pretraining; every label is 0, as
  DABS's FAILURE_MAP gives "unlabeled" (they carry no class).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.compat import pickle_compat
from PIL import Image

from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, ShardWriter
from metamae.modality import ImageSpec

SPEC = ImageSpec(channels=3, height=32, width=32, patch=4)
FAILURE_MAP = {"none": 0, "random": 1, "donut": 2, "scratch": 3, "center": 4, "loc": 5,
               "edge-loc": 6, "edge-ring": 7, "near-full": 8}
UNLABELLED = "unlabeled"                                       # DABS's name for a wafer with no failureType
GRAY = 127.5                                                   # DABS GRAYSCALE_MULTIPLIER
SEED = 42
TRAIN_PROPORTION, VAL_PROPORTION = 0.9, 0.1
TASKS = {"wafermap": "labelled", "wafermap_pretrain": "unlabelled"}
FILE = "LSWMD.pkl"
WHERE = "https://www.kaggle.com/datasets/qingyi/wm811k-wafer-map"
WRITE_ROWS = 4096

SOURCES = []          # by hand (Kaggle needs a login): see WHERE


def convert(raw: Path, out: Path = Path("data/wafermap"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False, task: str = "wafermap") -> Manifest:
    """raw/LSWMD.pkl (the official file only: it is unpickled) -> the dataset folder `out`."""
    if task not in TASKS:
        raise ValueError(f"task is {task!r}; expected one of {sorted(TASKS)}")
    frame = _load_frame(Path(raw) / FILE)
    names = [_failure_type(v) for v in frame["failureType"]]
    unknown = sorted(set(names) - set(FAILURE_MAP) - {UNLABELLED})
    if unknown:
        raise ValueError(f"{Path(raw) / FILE}: unknown failureType values {unknown}; expected {sorted(FAILURE_MAP)}")
    labelled = np.array([n != UNLABELLED for n in names])
    rows = np.flatnonzero(labelled if TASKS[task] == "labelled" else ~labelled)
    rows = rows[np.random.RandomState(SEED).permutation(len(rows))]          # DABS's shuffled frame
    n = len(rows)
    splits = {"train": rows[:math.ceil(TRAIN_PROPORTION * n)], "test": rows[n - math.floor(VAL_PROPORTION * n):]}
    writer = ShardWriter(out, task, SPEC, num_classes=len(FAILURE_MAP), metric="weighted_f1",
                         converter={"source": f"{FILE} ({WHERE})", "task": task, "rows": TASKS[task],
                                    "failure_map": FAILURE_MAP, "gray": f"int(waferMap * {GRAY})",
                                    "resize": "PIL bilinear to 32 × 32", "scale": "x / 255", "seed": SEED},
                         shard_bytes=shard_bytes, overwrite=overwrite)
    maps = frame["waferMap"].to_numpy()
    for split, index in splits.items():
        for lo in range(0, len(index), WRITE_ROWS):
            chunk = index[lo:lo + WRITE_ROWS]
            x = np.stack([_image(maps[i], i) for i in chunk])                 # B × 3 × 32 × 32
            y = np.array([FAILURE_MAP.get(names[i], 0) for i in chunk], np.int64)
            writer.add(split, x, y, ids=chunk)
    return writer.finish()


def _failure_type(value) -> str:
    """[['Edge-Loc']] -> 'edge-loc'; an empty array (or None/NaN) -> 'unlabeled'."""
    if isinstance(value, str):
        return value.lower()
    array = np.asarray(value, dtype=object).ravel()
    first = array[0] if array.size else None
    if isinstance(first, bytes):                                   # a Python 2 str array
        first = first.decode("latin1")
    return first.lower() if isinstance(first, str) else UNLABELLED


def _image(wafer, row: int) -> np.ndarray:
    """H × W wafer map of 0/1/2 -> 3 × 32 × 32 float32 (DABS: gray 0/127/255, PIL bilinear, / 255)."""
    wafer = np.asarray(wafer)
    if wafer.ndim != 2 or wafer.size == 0 or not np.isin(wafer, (0, 1, 2)).all():
        raise ValueError(f"{FILE} row {row}: waferMap is {wafer.dtype} {wafer.shape} with values outside "
                         f"0/1/2 or empty; expected a 2-D map of 0, 1, 2")
    gray = np.ascontiguousarray((wafer * GRAY).astype(np.uint8))            # H × W: 0, 127, 255
    small = np.asarray(Image.fromarray(gray).resize((32, 32), Image.Resampling.BILINEAR), np.float32) / 255
    return np.broadcast_to(small, (3, 32, 32))


def _load_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: download WM-811K's {FILE} from {WHERE} into "
                                f"{path.parent} (only the official file: it is unpickled)")
    try:
        with open(path, "rb") as f:
            frame = _LegacyUnpickler(f, encoding="latin1").load()     # latin1: Python 2 pickle's arrays
    except Exception as error:                                     # any failure to unpickle: name the file
        raise ValueError(f"{path} could not be unpickled ({type(error).__name__}: {error}): it is not the "
                         f"official {FILE}, or is truncated; download it again from {WHERE}") from None
    if not isinstance(frame, pd.DataFrame) or not {"waferMap", "failureType"} <= set(frame.columns):
        raise ValueError(f"{path} is not WM-811K's frame: expected a pandas DataFrame with columns "
                         f"waferMap and failureType")
    return frame


class _LegacyUnpickler(pickle_compat.Unpickler):
    """pandas's compatibility unpickler, plus the module paths of pandas < 0.20 (`pandas.indexes`)
    and the index classes removed in pandas 2 (Int64Index and kin, now plain Index)."""

    def find_class(self, module: str, name: str):
        if name in ("Int64Index", "UInt64Index", "Float64Index"):
            return pd.Index
        if module == "pandas.indexes" or module.startswith("pandas.indexes."):
            module = "pandas.core.indexes" + module[len("pandas.indexes"):]
        return super().find_class(module, name)
