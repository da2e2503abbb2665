"""Parquet shards: one on-disk format for every modality.

A dataset is a folder of Parquet files plus `manifest.json`: the dataset's name, modality spec (the
dataclasses the model uses), label kind, metric, splits with each shard's rows, bytes and SHA-256,
the converter's parameters, the input normalisation and the format version. One row is one example:
`id`, the input (`x`; `x_image` and `x_text` for image+text) and the label `y`. A tensor is stored as
one binary value per row holding its bytes in C order, and decoded with numpy.frombuffer: 3 × faster
to read here than a fixed-size list or Arrow's tensor extension type (bench/encoding.py; numbers in
docs/measurements.md).

Shards hold inputs as the converter wrote them. The manifest's `normalization`, when not null, is

    {"mean": [...], "std": [...], "axis": "channel", "split": "train"}

one mean and standard deviation per channel of the float input (a time series' or an image's
channels; a table's features; the image of image+text) over the `split` split, and every reader
(`decode_table`: the local reader here and Ray Data's in metamae.distributed.stream) standardises
with it: (x - mean) / std, in float32, a constant channel (std 0) centred and left unscaled. Token ids
are never standardised. A converter that follows a published normalisation writes the data that way
and leaves `normalization` null.

The writer names each shard `*.parquet.tmp` until it is complete, renames it, and writes the
manifest last, so a crash mid-conversion never leaves a folder that looks complete. A folder with no
manifest is an unfinished conversion: a new one clears its shards before writing. A complete dataset
is replaced (overwrite=True) without being touched until its successor is complete: the new one is
written into a sibling folder `NAME.partial-PID` and swapped in once its manifest is written and read
back (see `swap_in`); a failed or killed conversion leaves the old dataset as it was, and the next
conversion into the folder deletes the `NAME.partial-*` folders left behind.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from metamae.data.arrays import take_rows, to_tensors
from metamae.files import atomic_file
from metamae.modality import Spec, spec_from_dict, spec_parts, spec_to_dict

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 128 * 2**20
ROW_GROUP_BYTES = 8 * 2**20
SHARD_NAME = re.compile(r"\w+-\d{5}\.parquet(\.tmp)?")     # ShardWriter's file names: SPLIT-NNNNN.parquet
STAGED = re.compile(r"\.partial-\d+")                      # a replacement being written: NAME.partial-PID
LABEL_KINDS = ("class", "multilabel", "float", "per_token")


class ShardError(ValueError):
    """A shard or manifest that does not match what the dataset says it is."""


# --------------------------------------------------------------------------------------------
# Columns: which arrays an example has, and how they are stored
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    name: str
    shape: tuple[int, ...]          # one example's shape
    dtype: str                      # numpy dtype in memory

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def stored(self) -> np.dtype:
        """Tokens are stored as int32 and read back as int64 (what an embedding table takes)."""
        return np.dtype(np.int32) if self.dtype == "int64" else np.dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        return self.size * self.stored.itemsize

    @property
    def arrow_type(self) -> pa.DataType:
        """A scalar is a plain column; a tensor is one binary value per row, its bytes in C order."""
        return pa.from_numpy_dtype(self.stored) if self.shape == () else pa.binary()

    def encode(self, values: np.ndarray) -> pa.Array:
        values = np.ascontiguousarray(values, dtype=self.stored)
        if self.shape == ():
            return pa.array(values.reshape(-1))
        offsets = np.arange(len(values) + 1, dtype=np.int32) * self.row_bytes
        return pa.Array.from_buffers(pa.binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(values)])

    def decode(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """One column of a batch -> N × shape numpy, without a per-row step (numpy.frombuffer)."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if self.shape == ():
            return column.to_numpy(zero_copy_only=False).astype(self.dtype, copy=False)
        n = len(column)
        offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset:column.offset + n + 1]
        if n and np.any(np.diff(offsets) != self.row_bytes):
            raise ShardError(f"column {self.name!r} holds rows of {sorted(set(np.diff(offsets).tolist()))[:3]} "
                             f"bytes; its shape {self.shape} of {self.stored} takes {self.row_bytes}")
        values = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[-1]] if n else np.empty(0, np.uint8)
        return values.view(self.stored).astype(self.dtype, copy=False).reshape(n, *self.shape)


def input_columns(spec: Spec) -> list[Column]:
    parts = spec_parts(spec)
    names = ["x_image", "x_text"] if len(parts) == 2 else ["x"]
    return [Column(name, part.shape, "int64" if part.kind == "tokens" else "float32")
            for name, part in zip(names, parts)]


def label_column(label: str, num_classes: int, spec: Spec) -> Column:
    if label == "class":
        return Column("y", (), "int64")
    if label == "multilabel":
        return Column("y", (num_classes,), "int8")
    if label == "float":
        return Column("y", (), "float32")
    return Column("y", (spec.length,), "int64")                       # per_token


def input_problem(parts: tuple, spec: Spec) -> Optional[str]:
    """What makes a batch of inputs unusable, or None: NaN or infinite values, or token ids outside
    the vocabulary (an embedding lookup would fail on them)."""
    for values, part in zip(parts, spec_parts(spec)):
        if part.kind == "tokens":
            if len(values) and (values.min() < 0 or values.max() >= part.vocab):
                return (f"token ids in [{values.min()}, {values.max()}], outside the vocabulary "
                        f"[0, {part.vocab - 1}]")
        elif not np.isfinite(values).all():
            return f"{np.count_nonzero(~np.isfinite(values))} NaN or infinite input values"
    return None


def schema(columns: list[Column]) -> pa.Schema:
    return pa.schema([pa.field("id", pa.int64())] + [pa.field(c.name, c.arrow_type) for c in columns])


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------

@dataclass
class ShardInfo:
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    name: str
    input: dict[str, Any]                          # spec_to_dict(spec)
    num_classes: int
    metric: str
    label: str                                     # one of LABEL_KINDS
    splits: dict[str, list[ShardInfo]]
    converter: dict[str, Any] = field(default_factory=dict)
    normalization: Optional[dict[str, Any]] = None
    format_version: int = FORMAT_VERSION

    @property
    def spec(self) -> Spec:
        return spec_from_dict(self.input)

    def columns(self) -> list[Column]:
        return input_columns(self.spec) + [label_column(self.label, self.num_classes, self.spec)]

    def normalization_problem(self) -> Optional[str]:
        """What makes `normalization` unusable for this dataset's inputs, or None."""
        if self.normalization is None:
            return None
        part = float_part(self.spec)
        if part is None:
            return f"{self.spec.kind} inputs are token ids, which are never standardised: normalization must be null"
        keys = sorted(self.normalization) if isinstance(self.normalization, dict) else self.normalization
        if keys != sorted(NORMALIZATION_KEYS):
            return f"normalization holds {keys}; expected the keys {NORMALIZATION_KEYS}"
        if self.normalization["axis"] != "channel" or self.normalization["split"] not in self.splits:
            return (f"normalization has axis {self.normalization['axis']!r} and split "
                    f"{self.normalization['split']!r}; expected axis 'channel' and one of {sorted(self.splits)}")
        channels = part.shape[channel_axis(part)]
        try:
            mean, std = (np.asarray(self.normalization[k], np.float64) for k in ("mean", "std"))
        except (TypeError, ValueError):
            return "normalization's mean and std are not lists of numbers"
        if mean.shape != (channels,) or std.shape != (channels,):
            return (f"normalization holds {mean.size} means and {std.size} standard deviations; the "
                    f"{part.kind} input has {channels} channels")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()):
            return "normalization holds a NaN, an infinite value or a negative standard deviation"
        return None

    def standardization(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(mean, std) as float32, shaped to broadcast over a batch of the float input (C × 1 for a
        time series, C × 1 × 1 for images, 1 × F for a table), std 0 replaced by 1; None: no
        normalization, the inputs are read as stored."""
        if self.normalization is None:
            return None
        part = float_part(self.spec)
        shape = [1] * len(part.shape)
        shape[channel_axis(part)] = -1
        mean, std = (np.asarray(self.normalization[k], np.float32).reshape(shape) for k in ("mean", "std"))
        return mean, np.where(std > 0, std, np.float32(1))

    def rows(self, split: str) -> int:
        return sum(s.rows for s in self.splits[split])

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {folder} is not a prepared dataset, or its "
                                    f"conversion did not finish; run `python -m metamae.data.prepare` for it")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format_version") != FORMAT_VERSION:
                raise ShardError(f"{path} has format version {raw.get('format_version')}, this library reads "
                                 f"{FORMAT_VERSION}: prepare the dataset again")
            raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
            manifest = cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError) as error:
            raise ShardError(f"{path} is not a valid manifest ({error}): prepare the dataset again") from error
        problem = manifest.normalization_problem()
        if problem:
            raise ShardError(f"{path}: {problem}; prepare the dataset again")
        return manifest

    def save(self, folder: Path) -> None:
        with atomic_file(Path(folder) / MANIFEST, "w") as f:
            f.write(json.dumps(dataclasses.asdict(self), indent=2))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Normalisation: per-channel statistics of the training split, applied when read
# --------------------------------------------------------------------------------------------

NORMALIZATION_KEYS = ("mean", "std", "axis", "split")


def float_part(spec: Spec) -> Optional[Spec]:
    """The input part that a normalisation standardises: the first (the image of image+text), or
    None when it holds token ids."""
    part = spec_parts(spec)[0]
    return None if part.kind == "tokens" else part


def channel_axis(part: Spec) -> int:
    """The axis of one example that holds its channels: a table's features (axis 1 of its 1 × F),
    otherwise axis 0 (C × L, C × H × W)."""
    return 1 if part.kind == "tabular" else 0


class Moments:
    """Per-channel mean and standard deviation of the float inputs added, merged batch by batch in
    float64; a channel whose values are all equal gets std 0 exactly."""

    def __init__(self, spec: Spec):
        part = float_part(spec)
        if part is None:
            raise ValueError(f"{spec.kind} inputs are token ids, which are never standardised")
        self.axis = channel_axis(part) + 1                # of a batch
        channels = part.shape[channel_axis(part)]
        self.count = 0
        self.mean, self.m2 = np.zeros(channels), np.zeros(channels)     # m2: squared deviations summed
        self.low, self.high = np.full(channels, np.inf), np.full(channels, -np.inf)

    def add(self, x: np.ndarray) -> None:
        """A batch of the float input (N × shape of one example)."""
        values = np.moveaxis(np.asarray(x, np.float64), self.axis, 0).reshape(len(self.mean), -1)
        n = values.shape[1]
        if n == 0:
            return
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total
        self.low, self.high = np.minimum(self.low, values.min(axis=1)), np.maximum(self.high, values.max(axis=1))

    def normalization(self, split: str = "train") -> dict[str, Any]:
        """The manifest's `normalization` for these statistics of split `split`."""
        if self.count == 0:
            raise ValueError(f"no {split} examples to compute the per-channel mean and std of")
        std = np.where(self.low == self.high, 0.0, np.sqrt(self.m2 / self.count))
        return {"mean": self.mean.tolist(), "std": std.tolist(), "axis": "channel", "split": split}


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------

class ShardWriter:
    """Writes a dataset folder split by split; `finish()` writes the manifest that makes it complete.

        with ShardWriter(out, "pamap2", spec, num_classes=12, metric="accuracy") as writer:
            writer.add("train", x, y)          # numpy arrays, any number of calls
            writer.finish()

    Leaving the `with` block without finish() (an error, or a forgotten call) aborts: what this writer
    wrote is deleted. Without `with`, an error before finish() leaves it (cleared by the next run).
    Either way a complete dataset that overwrite=True replaces is kept until finish() swaps in the new.
    A folder that cannot be created or written raises OSError naming it.
    """

    def __init__(self, folder: Path, name: str, spec: Spec, num_classes: int, metric: str,
                 label: str = "class", converter: Optional[dict[str, Any]] = None,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, progress: bool = True):
        if label not in LABEL_KINDS:
            raise ValueError(f"label is {label!r}; expected one of {LABEL_KINDS}")
        self.folder = Path(folder)
        self.manifest = Manifest(name, spec_to_dict(spec), num_classes, metric, label, {}, converter or {})
        self.columns = self.manifest.columns()
        self.schema = schema(self.columns)
        row_bytes = sum(c.row_bytes for c in self.columns) + 8
        self.rows_per_shard = max(1, shard_bytes // row_bytes)
        self.rows_per_group = max(1, min(self.rows_per_shard, ROW_GROUP_BYTES // row_bytes))
        self._open: dict[str, tuple[pq.ParquetWriter, Path, int]] = {}
        self._next_id: dict[str, int] = {}
        self._created = not self.folder.exists()
        self._finished = False
        self.staging = self._prepare_folder(overwrite)       # where shards go: folder, or NAME.partial-PID
        self._bar = tqdm(desc=f"{name} -> {self.folder}", unit=" rows", disable=not progress)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *error) -> None:
        """Leaving the block without finish() aborts (see `abort`)."""
        if not self._finished:
            self.abort()

    def _prepare_folder(self, overwrite: bool) -> Path:
        """The folder to write the shards into, created and checked to be writable: `folder` itself
        when it holds no complete dataset (an unfinished conversion's shards are deleted first), or a
        new sibling NAME.partial-PID when it holds one and overwrite is set. NAME.partial-* folders
        left by earlier conversions are deleted."""
        real = Path(os.path.realpath(self.folder))             # a symlinked folder: swap the folder it names
        remove_staged(real)
        complete = (self.folder / MANIFEST).exists()
        if complete and not overwrite:
            raise FileExistsError(f"{self.folder} already holds a prepared dataset; pass --overwrite to "
                                  f"replace it, or --verify to check it")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe_writable(self.folder)                         # swap_in also moves the user's files out of it
        except OSError as error:
            raise type(error)(f"cannot write to {self.folder}: {error.strerror or error}") from error
        if not complete:
            for stale in self.folder.glob("*.parquet*"):      # an unfinished conversion's shards, no other file
                if SHARD_NAME.fullmatch(stale.name):
                    stale.unlink()
            return self.folder
        staging = real.with_name(f"{real.name}.partial-{os.getpid()}")
        try:
            staging.mkdir()
            shutil.copymode(real, staging)
        except OSError as error:
            raise type(error)(f"cannot write to {staging.parent} (the new dataset is written to {staging.name}, "
                              f"then replaces {self.folder}): {error.strerror or error}") from error
        return staging

    def add(self, split: str, x, y: np.ndarray, ids: Optional[np.ndarray] = None) -> None:
        """Append examples: x is N × shape (a tuple (image, text) for image+text), y their labels."""
        parts = x if isinstance(x, tuple) else (x,)
        self._check_shapes(split, (*parts, y), ids)
        problem = input_problem(parts, self.manifest.spec)
        if problem:
            raise ShardError(f"the {split} examples written to {self.folder} hold {problem}: fix or drop "
                             f"them in the raw data")
        n = len(y)
        start = self._next_id.get(split, 0)
        ids = np.arange(start, start + n) if ids is None else np.asarray(ids)
        self._next_id[split] = start + n
        for lo in range(0, n, self.rows_per_group):
            hi = min(n, lo + self.rows_per_group)
            arrays = [pa.array(ids[lo:hi], pa.int64())]
            arrays += [c.encode(p[lo:hi]) for c, p in zip(self.columns, (*parts, y))]
            self._write(split, pa.Table.from_arrays(arrays, schema=self.schema))
            self._bar.update(hi - lo)

    def _check_shapes(self, split: str, arrays: tuple, ids: Optional[np.ndarray]) -> None:
        n = len(arrays[-1])
        got = [np.shape(a) for a in arrays]
        want = [(n, *c.shape) for c in self.columns]
        if got != want or (ids is not None and np.shape(ids) != (n,)):
            raise ShardError(f"the {split} examples written to {self.folder} have shapes {got} (ids: "
                             f"{None if ids is None else np.shape(ids)}); the {self.manifest.name} manifest's "
                             f"columns {[c.name for c in self.columns]} take {want} (ids: ({n},))")

    def _write(self, split: str, table: pa.Table) -> None:
        while table.num_rows:
            if split not in self._open:
                index = len(self.manifest.splits.get(split, []))
                tmp = self.staging / f"{split}-{index:05d}.parquet.tmp"
                self._open[split] = (pq.ParquetWriter(tmp, self.schema), tmp, 0)
            writer, tmp, rows = self._open[split]
            take = min(table.num_rows, self.rows_per_shard - rows)
            writer.write_table(table.slice(0, take), row_group_size=self.rows_per_group)
            table = table.slice(take)
            self._open[split] = (writer, tmp, rows + take)
            if rows + take == self.rows_per_shard:
                self._close(split)

    def _close(self, split: str) -> None:
        writer, tmp, rows = self._open.pop(split)
        writer.close()
        final = tmp.with_suffix("")                                    # drop .tmp
        os.replace(tmp, final)
        self.manifest.splits.setdefault(split, []).append(
            ShardInfo(final.name, rows, final.stat().st_size, sha256_of(final)))
        self._bar.set_postfix(shards=sum(len(s) for s in self.manifest.splits.values()))

    def finish(self, normalization: Optional[dict[str, Any]] = None) -> Manifest:
        """Close every shard and write the manifest, with `normalization` (see the module docstring;
        `Moments.normalization()` computes it) or none; a replacement written beside the folder is read
        back and swapped in (`swap_in`). An error before the swap aborts (see `abort`): a complete dataset
        being replaced is kept as it was."""
        try:
            for split in list(self._open):
                self._close(split)
            self.manifest.normalization = normalization
            problem = self.manifest.normalization_problem()
            if problem:
                raise ShardError(f"the normalization given for {self.folder}: {problem}")
            self.manifest.save(self.staging)
            if self.staging != self.folder:
                Manifest.load(self.staging)
        except BaseException:
            self.abort()
            raise
        if self.staging != self.folder:
            swap_in(self.staging, Path(os.path.realpath(self.folder)))
        self._finished = True
        self._bar.close()
        return self.manifest

    def abort(self) -> None:
        """Delete what this writer wrote: the NAME.partial-PID folder, or (written in place) its shards,
        and the folder too if this writer created it and nothing else is in it."""
        for writer, tmp, _ in self._open.values():
            writer.close()
            tmp.unlink(missing_ok=True)
        self._open.clear()
        if self.staging != self.folder:
            shutil.rmtree(self.staging, ignore_errors=True)
        else:
            for shards in self.manifest.splits.values():
                for shard in shards:
                    (self.folder / shard.file).unlink(missing_ok=True)
            self.manifest.splits.clear()
            if self._created and self.folder.is_dir() and not any(self.folder.iterdir()):
                self.folder.rmdir()
        self._bar.close()


def remove_staged(folder: Path) -> None:
    """Delete the NAME.partial-PID folders beside `folder` that earlier conversions into it left."""
    for stale in folder.parent.glob(f"{glob.escape(folder.name)}.partial-*"):
        if STAGED.fullmatch(stale.name[len(folder.name):]) and stale.is_dir():
            shutil.rmtree(stale)


def probe_writable(folder: Path) -> None:
    """Raise OSError when no file can be created in `folder` (whatever its mode says: root writes to
    any, and a read-only file system refuses every write)."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def swap_in(new: Path, folder: Path) -> None:
    """Replace the dataset folder `folder` by its complete sibling `new`: two renames, `folder` to
    NAME.replaced-PID and `new` to `folder`; then the entries of the old folder that are not its
    dataset (the user's own files, another dataset inside it such as genomics' ood/) are moved into the
    new one and the old dataset is deleted. If the second rename fails the first is undone. Between the
    two renames (microseconds) `folder` does not exist: a process killed there leaves the old dataset,
    complete, in NAME.replaced-PID, to be renamed back by hand (a new conversion ignores it)."""
    old = folder.with_name(f"{folder.name}.replaced-{os.getpid()}")
    os.rename(folder, old)
    try:
        os.rename(new, folder)
    except OSError:
        os.rename(old, folder)
        raise
    for entry in old.iterdir():
        if entry.name != MANIFEST and not SHARD_NAME.fullmatch(entry.name):
            os.rename(entry, folder / entry.name)
    shutil.rmtree(old)


# --------------------------------------------------------------------------------------------
# Checks: cheap ones before training, all of them with --verify
# --------------------------------------------------------------------------------------------

def check_shards(folder: Path, manifest: Manifest, full: bool = False) -> None:
    """Raise ShardError naming the file for a missing, truncated or corrupt shard, a schema that is
    not the manifest's, or a label out of range. Cheap checks read only Parquet footers; `full`
    also checks every shard's SHA-256 and reads every row."""
    expected = schema(manifest.columns())
    for split, shards in manifest.splits.items():
        for shard in shards:
            path = Path(folder) / shard.file
            if not path.is_file():
                raise ShardError(f"{path} is missing ({split} split, {shard.rows} rows in the manifest): "
                                 f"restore it or prepare the dataset again")
            if path.stat().st_size != shard.bytes:
                raise ShardError(f"{path} has {path.stat().st_size} bytes, the manifest says {shard.bytes}: "
                                 f"the file is truncated or was replaced; prepare the dataset again")
            try:
                meta = pq.ParquetFile(path)
            except Exception as error:
                raise ShardError(f"{path} is not a readable Parquet file ({error})") from error
            if not meta.schema_arrow.equals(expected):
                raise ShardError(f"{path} has schema {meta.schema_arrow}, expected {expected}")
            if meta.metadata.num_rows != shard.rows:
                raise ShardError(f"{path} has {meta.metadata.num_rows} rows, the manifest says {shard.rows}")
            if full:
                if sha256_of(path) != shard.sha256:
                    raise ShardError(f"{path} does not match its SHA-256 in the manifest: the file is corrupt")
                table = pq.read_table(path)
                try:
                    decoded = [c.decode(table[c.name]) for c in manifest.columns()]
                except ShardError as error:
                    raise ShardError(f"{path}: {error}") from error
                _check_labels(path, decoded[-1], manifest)
                problem = input_problem(tuple(decoded[:-1]), manifest.spec)
                if problem:
                    raise ShardError(f"{path} holds {problem}: prepare the dataset again")
            else:
                _check_label_statistics(path, meta, manifest)


def _check_labels(path: Path, y: np.ndarray, manifest: Manifest) -> None:
    if manifest.label in ("class", "per_token") and len(y) and (y.min() < 0 or y.max() >= manifest.num_classes):
        raise ShardError(f"{path} has labels in [{y.min()}, {y.max()}], outside [0, {manifest.num_classes - 1}]")


def _check_label_statistics(path: Path, meta: pq.ParquetFile, manifest: Manifest) -> None:
    """Class labels out of range, from the row groups' min/max statistics (no data read)."""
    if manifest.label != "class":
        return
    index = meta.schema_arrow.get_field_index("y")
    for g in range(meta.metadata.num_row_groups):
        stats = meta.metadata.row_group(g).column(index).statistics
        if stats is not None and stats.has_min_max and (stats.min < 0 or stats.max >= manifest.num_classes):
            raise ShardError(f"{path} has labels in [{stats.min}, {stats.max}] (row group {g}), outside "
                             f"[0, {manifest.num_classes - 1}]")


def open_dataset(folder: Path) -> Manifest:
    """The manifest of a prepared folder, after the cheap checks of every shard."""
    manifest = Manifest.load(folder)
    check_shards(folder, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# A plain local reader (no Ray): for tests, single-process runs and the linear probe
# --------------------------------------------------------------------------------------------

def decode_table(table: pa.Table, columns: list[Column],
                 standardization: Optional[tuple[np.ndarray, np.ndarray]] = None):
    """Arrow rows -> (x, y) numpy: x an array, or (image, text) for image+text; the float input
    standardised with `standardization`, the (mean, std) of `Manifest.standardization()`, if given."""
    arrays = [c.decode(table[c.name]) for c in columns]
    if standardization is not None:
        mean, std = standardization
        arrays[0] = (arrays[0] - mean) / std
    inputs, labels = arrays[:-1], arrays[-1]
    return (tuple(inputs) if len(inputs) == 2 else inputs[0]), labels


def iter_examples(folder: Path, manifest: Manifest, split: str, batch_size: int,
                  seed: Optional[int] = None, shuffle_buffer: int = 0) -> Iterator[tuple[Any, np.ndarray]]:
    """One pass over a split in batches of (x, y) numpy arrays, streaming shard by shard.

    With a seed: shards in a seeded random order, and rows drawn from a local shuffle buffer: once it
    holds `shuffle_buffer` rows they are shuffled together and drawn down to half, then it refills
    (each row is copied a few times, not once per batch). Without: file order. The last partial
    batch is yielded too. Inputs are standardised with the manifest's normalization, if it has one.
    """
    rng = np.random.default_rng(seed) if seed is not None else None
    shards = manifest.splits[split]
    order = rng.permutation(len(shards)) if rng is not None else range(len(shards))
    columns, standardization, keep = manifest.columns(), manifest.standardization(), shuffle_buffer // 2
    pool: list[tuple[Any, np.ndarray]] = []
    rows = 0
    for i in order:
        reader = pq.ParquetFile(Path(folder) / shards[i].file)
        for record_batch in reader.iter_batches(batch_size=batch_size):
            pool.append(decode_table(pa.Table.from_batches([record_batch]), columns, standardization))
            rows += record_batch.num_rows
            if rows >= max(shuffle_buffer, batch_size):
                x, y = _gather(pool, rng)
                start = 0
                while rows - start >= batch_size and rows - start > keep:
                    batch = slice(start, start + batch_size)
                    yield take_rows(x, batch), y[batch]
                    start += batch_size
                pool, rows = [(take_rows(x, slice(start, rows)), y[start:])], rows - start
    if rows:
        x, y = _gather(pool, rng)
        for start in range(0, rows, batch_size):
            batch = slice(start, start + batch_size)
            yield take_rows(x, batch), y[batch]


def _gather(pool: list[tuple[Any, np.ndarray]], rng) -> tuple[Any, np.ndarray]:
    """The pooled (x, y) batches as one, its rows shuffled with an rng."""
    xs = [x for x, _ in pool]
    x = tuple(np.concatenate(p) for p in zip(*xs)) if isinstance(xs[0], tuple) else np.concatenate(xs)
    y = np.concatenate([y for _, y in pool])
    if rng is None:
        return x, y
    index = rng.permutation(len(y))
    return take_rows(x, index), y[index]


class ShardDataset:
    """A prepared folder, streamed shard by shard: a Dataset that never holds all examples in RAM."""

    def __init__(self, folder: Path, shuffle_buffer: int = 4096):
        self.folder, self.shuffle_buffer = Path(folder), shuffle_buffer
        self.manifest = open_dataset(self.folder)
        self.name, self.spec = self.manifest.name, self.manifest.spec

    def stream(self, split: str, batch_size: int, seed: Optional[int] = None, drop_last: bool = False):
        if split not in self.manifest.splits:
            raise KeyError(f"{self.folder} has no {split!r} split; it has {sorted(self.manifest.splits)}")
        buffer = self.shuffle_buffer if seed is not None else 0
        for x, y in iter_examples(self.folder, self.manifest, split, batch_size, seed, buffer):
            if drop_last and len(y) < batch_size:
                continue
            yield to_tensors(x), torch.from_numpy(y)
