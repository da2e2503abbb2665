"""PAMAP2 Physical Activity Monitoring (Reiss & Stricker 2012) as shards: 52 channels × 320 steps.

Raw format, as UCI distributes it (`PAMAP2_Dataset.zip`): `PAMAP2_Dataset/Protocol/subject101.dat`
... `subject109.dat`, one line per 100 Hz sample, 54 space-separated columns, a missing value
written `NaN`:

    1 timestamp (s)   2 activityID   3 heart rate (bpm, sampled at ~9 Hz: mostly NaN)
    4-20 IMU hand, 21-37 IMU chest, 38-54 IMU ankle; each IMU: temperature, 3D acceleration
    (±16 g), 3D acceleration (±6 g), 3D gyroscope, 3D magnetometer, 4 orientation values

DABS preprocessing followed (alextamkin/dabs `src/datasets/sensor/pamap2.py`, and the MetaMAE
authors' copy of it, alinlab/MetaMAE `data/timeseries.py`, which this project reproduces):

- channels: every column but timestamp and activityID, in file order (`activity_data[..., 2:]`):
  heart rate, then the 3 × 17 IMU columns, orientation included -> 52 channels;
- each subject's table is interpolated linearly over its rows (`df.interpolate()`) before windows
  are cut, so a gap is bridged by the samples around it, whatever activity they belong to;
- an example is 320 consecutive samples of one activity, channels first (MetaMAE's `x.T`);
- activities 1-7, 12, 13, 16, 17, 24 -> labels 0..11 (MetaMAE's list; DABS's list also leaves out
  17, ironing, marking it optional, which gives 11 labels under its NUM_CLASSES = 12);
- subjects 101-104 and 107-109 train; 105 and 106 together are the test split (MetaMAE's
  transfer test set; DABS names subject 105 `val`, what it evaluates on, and 106 `test`): an
  example's `id` is subject · 10⁷ + its first row, so either subject can be picked out.

Where shards differ from DABS: DABS draws a fresh random window per example (50,000 a training
epoch, from a random subject and activity, start uniform in the activity's rows). Shards hold a
fixed set: windows at a fixed stride inside each contiguous run of one activity (a DABS window may
straddle two runs of one activity); the classes keep their natural frequencies; and NaNs before a
column's first value take that value (pandas leaves them NaN; they fall in the unlabelled lead-in).
`x` holds the values as published, unscaled; `normalization` holds each channel's mean and standard
deviation over the training split, and every reader of the shards standardises the channels with
them (metamae.data.shards), where DABS feeds the model the unscaled values.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv

from metamae.data.download import Source, unpack
from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, Moments, ShardWriter
from metamae.modality import TimeSeriesSpec

URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00231/PAMAP2_Dataset.zip"
SOURCES = [Source(URL, "PAMAP2_Dataset.zip")]

ACTIVITIES = (1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 17, 24)    # activityID of label 0..11
SUBJECTS = {"train": (101, 102, 103, 104, 107, 108, 109), "test": (105, 106)}
STRIDES = {"train": 160, "test": 320}                     # half-overlapping / disjoint windows
COLUMNS = 54                                              # per line of a subject file
FIRST_CHANNEL = 2                                         # drop timestamp and activityID
SPEC = TimeSeriesSpec(channels=COLUMNS - FIRST_CHANNEL, length=320, patch=5)
ID_BASE = 10**7                                           # id = subject · ID_BASE + first row


def convert(raw: Path, out: Path = Path("data/pamap2"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False) -> Manifest:
    files = subject_files(Path(raw))
    writer = ShardWriter(out, "pamap2", SPEC, num_classes=len(ACTIVITIES), metric="accuracy",
                         converter=_parameters(), shard_bytes=shard_bytes, overwrite=overwrite)
    moments = Moments(SPEC)
    for split, subjects in SUBJECTS.items():
        for subject in subjects:
            values, activity = read_subject(files[subject])
            x, y, starts = windows(values, activity, STRIDES[split])
            if split == "train":
                moments.add(x)
            writer.add(split, x, y, ids=subject * ID_BASE + starts)
    if moments.count == 0:
        raise ValueError(f"the training subjects {SUBJECTS['train']} have no run of {SPEC.length} samples "
                         f"of one of the activities {ACTIVITIES}: these are not the PAMAP2 Protocol files")
    return writer.finish(normalization=moments.normalization())


def _parameters() -> dict:
    return {"source": URL, "files": "PAMAP2_Dataset/Protocol/subject1NN.dat",
            "reference": "alextamkin/dabs src/datasets/sensor/pamap2.py; alinlab/MetaMAE data/timeseries.py",
            "channels": "columns 3-54: heart rate, then IMU hand, chest, ankle (17 columns each)",
            "interpolation": "linear over each subject's rows; before the first value, the first value",
            "activities": list(ACTIVITIES), "subjects": {k: list(v) for k, v in SUBJECTS.items()},
            "window": SPEC.length, "strides": STRIDES, "windows": "inside contiguous runs of one activity",
            "ids": f"subject * {ID_BASE} + first row (0-based) in the subject's file",
            "values": "as published, unscaled; normalization: per-channel mean/std over the train split, "
                      "applied when read"}


# --------------------------------------------------------------------------------------------
# Raw files
# --------------------------------------------------------------------------------------------

def subject_files(raw: Path) -> dict[int, Path]:
    """subject -> its .dat file, in PAMAP2_Dataset/Protocol (DABS's layout), Protocol (MetaMAE's)
    or raw itself; PAMAP2_Dataset.zip is unpacked first when no folder holds the files yet."""
    folders = [raw / "PAMAP2_Dataset" / "Protocol", raw / "Protocol", raw]
    if not any((f / "subject101.dat").is_file() for f in folders) and (raw / SOURCES[0].filename).is_file():
        unpack(raw / SOURCES[0].filename, raw)
    folder = next((f for f in folders if (f / "subject101.dat").is_file()), folders[0])
    files = {s: folder / f"subject{s}.dat" for subjects in SUBJECTS.values() for s in subjects}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"PAMAP2: {', '.join(missing)} missing from {folder}; download {URL} into "
                                f"{raw} (`python -m metamae.data.prepare pamap2 --download`)")
    return files


def read_subject(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A subject file -> (values: rows × 52 float64 with NaNs interpolated, activity: rows int)."""
    types = {f"f{i}": pa.float64() for i in range(COLUMNS)}
    try:
        table = pv.read_csv(path, read_options=pv.ReadOptions(autogenerate_column_names=True),
                            parse_options=pv.ParseOptions(delimiter=" "),
                            convert_options=pv.ConvertOptions(column_types=types))
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path} is not a PAMAP2 subject file ({COLUMNS} space-separated numbers a "
                         f"line): {error}") from error
    if table.num_columns != COLUMNS:
        raise ValueError(f"{path} has {table.num_columns} columns a line; a PAMAP2 subject file has "
                         f"{COLUMNS}")
    data = np.column_stack([c.to_numpy(zero_copy_only=False) for c in table.columns])   # rows × 54
    activity = data[:, 1]
    if not np.all(np.isfinite(activity)) or np.any(activity != np.round(activity)) or np.any(activity < 0):
        raise ValueError(f"{path}: column 2 (activityID) holds a value that is not a whole number >= 0")
    return interpolate(data[:, FIRST_CHANNEL:], path), activity.astype(np.int64)


def interpolate(values: np.ndarray, path: Path) -> np.ndarray:
    """rows × C with NaNs -> linear in the row index between known values; ends take the nearest."""
    rows = np.arange(len(values))
    for c in range(values.shape[1]):
        missing = np.isnan(values[:, c])
        if missing.all():
            raise ValueError(f"{path}: column {c + FIRST_CHANNEL + 1} has no value at all (every one NaN)")
        if missing.any():
            values[missing, c] = np.interp(rows[missing], rows[~missing], values[~missing, c])
    return values


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------

def windows(values: np.ndarray, activity: np.ndarray, stride: int):
    """Windows of SPEC.length rows at `stride` inside each run of one of ACTIVITIES ->
    (x: W × 52 × 320 float32, y: W labels, starts: W first rows)."""
    lookup = np.full(max(activity.max(initial=0), max(ACTIVITIES)) + 1, -1)      # activityID -> label
    lookup[list(ACTIVITIES)] = np.arange(len(ACTIVITIES))
    labels = lookup[activity]                                                     # rows; -1: not used
    bounds = np.r_[0, np.flatnonzero(np.diff(labels)) + 1, len(labels)]
    starts = [np.arange(lo, hi - SPEC.length + 1, stride) for lo, hi in zip(bounds[:-1], bounds[1:])
              if labels[lo] >= 0 and hi - lo >= SPEC.length]
    starts = np.concatenate(starts) if starts else np.empty(0, np.int64)
    if not len(starts):
        return np.empty((0, SPEC.channels, SPEC.length), np.float32), np.empty(0, np.int64), starts
    view = np.lib.stride_tricks.sliding_window_view(values.astype(np.float32), SPEC.length, axis=0)
    return view[starts], labels[starts], starts                                   # view: rows-L+1 × 52 × L

