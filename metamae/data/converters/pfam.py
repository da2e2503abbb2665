"""Pfam and the TAPE protein transfer tasks, from TAPE's raw JSON files, as DABS prepares them.

Publisher's format: TAPE (songlab-cal/tape, README "Raw Data") publishes each task as a tarball of
JSON files, each one JSON list of records (`[{...}, {...}]`; TAPE's `JSONDataset` requires a list of
dicts). DABS downloads them from `.../proteindata/data_raw_pytorch/<task>.tar.gz`, and each unpacks
to `<task>/<task>_<split>.json`. TAPE also publishes LMDB copies; this converter reads the JSON that
DABS reads (the `lmdb` package is not a dependency here). Records are read one at a time, so the
multi-GB `pfam_train.json` is never held in memory; tokens go to a scratch folder beside `out`
(128 bytes a record: about 4 GB for pfam_train.json), removed when the conversion ends.

Preprocessing, as in DABS (alextamkin/dabs, src/datasets/proteins/pfam.py, utils.py, scop.py,
secondary_struct.py, stability.py, fluorescence.py, and catalog.py), also what the MetaMAE code
reads (alinlab/MetaMAE, data/token.py):

- tokens: `record["primary"]` cut to 128 residues, then padded with "X" to 128, each letter mapped
  to its index in "XARNDCQEGHILKMFPSTWYVUOBZJ" (26 letters; X = 0 is also the padding token). A
  letter outside that string is an error, as in DABS (only the first 128 residues are checked).
  Token ids: no reader standardises them.
- order: every JSON file is shuffled as pandas `sample(frac=1, random_state=42)` does, which is
  `numpy.random.RandomState(42).permutation(n)`; rows are written in that order, and each row's
  `id` is the record's index in the publisher's file.

Tasks (`convert(..., task=NAME)`, one dataset folder each; DABS's catalog names; "test" is DABS's
validation split, the one DABS and MetaMAE evaluate on):

- `pfam` (default; DABS `pfam`, pretraining): train = all of pfam_train.json; test = pfam_valid.json
  after the shuffle, less its last 200,000 records. Label: the record's clan, renumbered by the
  sorted clans of pfam_train.json (623 on TAPE's file). 623 classes, accuracy.
- `pfam_transfer` (DABS `pfam_transfer`): the last 200,000 shuffled pfam_valid.json records; train
  = their first ceil(0.9 n), test = their last floor(0.1 n). Clans numbered as for `pfam`.
- `scop` (remote homology): `fold_label`, 1195 classes, accuracy. Train = remote_homology_train.json.
  DABS's scop.py names remote_homology_valid.json as its train file as well as its validation file
  (the probe would train on its test set); this converter reads the train file instead.
- `secondary_struct`: `ss3` (0, 1, 2) per residue, cut to 128 and padded with 3, which DABS
  ignores in the loss and metric (catalog.py: IGNORE_INDEX_DATASETS = {'secondary_struct': 3});
  label kind per_token with 4 classes, accuracy.
- `stability`, `fluorescence`: `stability_score` / `log_fluorescence` (a one-element list in the
  JSON), label kind float, Spearman's rho.

`TASK_SOURCES[task]` lists the archive each task needs; `SOURCES` is the default task's.
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from metamae.data.download import Source, raw_path
from metamae.data.shards import DEFAULT_SHARD_BYTES, MANIFEST, Manifest, ShardWriter
from metamae.modality import TokenSpec

AMINO_ACIDS = "XARNDCQEGHILKMFPSTWYVUOBZJ"       # DABS's token ids, in this order
LENGTH = 128
SPEC = TokenSpec(vocab=len(AMINO_ACIDS), length=LENGTH)
SEED = 42                                        # DABS: sample(frac=1, random_state=42)
TRANSFER_EXAMPLES = 200_000                      # DABS Pfam.NUM_TRANSFER_EXAMPLES
TRAIN_PROPORTION, VAL_PROPORTION = 0.9, 0.1      # DABS Pfam.TRAIN_PROPORTION / VAL_PROPORTION
SS_PAD = 3                                       # DABS SecondaryStructure.PADDING_IDX
URL = "http://s3.amazonaws.com/songlabdata/proteindata/data_raw_pytorch/{}.tar.gz"
READ_CHARS = 2**22                               # JSON read size
MAX_RECORD_CHARS = 2**28                         # a longer record means a malformed file
_SPACE, _BETWEEN = re.compile(r"\s*"), re.compile(r"[\s,]*")   # before '[', between records
WRITE_ROWS = 2**16                               # rows per ShardWriter.add


@dataclass(frozen=True)
class Task:
    folder: str            # TAPE's archive name, and the folder it unpacks to
    train: str             # JSON files in that folder
    test: str
    field: str             # the record field DABS reads the label from
    label: str             # label kind (metamae.data.shards.LABEL_KINDS)
    num_classes: Optional[int]   # None: the clans found in pfam_train.json (623 in TAPE's)
    metric: str


TASKS = {
    "pfam": Task("pfam", "pfam_train.json", "pfam_valid.json", "clan", "class", None, "accuracy"),
    "pfam_transfer": Task("pfam", "pfam_train.json", "pfam_valid.json", "clan", "class", None, "accuracy"),
    "scop": Task("remote_homology", "remote_homology_train.json", "remote_homology_valid.json",
                 "fold_label", "class", 1195, "accuracy"),
    "secondary_struct": Task("secondary_structure", "secondary_structure_train.json",
                             "secondary_structure_valid.json", "ss3", "per_token", 4, "accuracy"),
    "stability": Task("stability", "stability_train.json", "stability_valid.json", "stability_score",
                      "float", 0, "spearman"),
    "fluorescence": Task("fluorescence", "fluorescence_train.json", "fluorescence_valid.json",
                         "log_fluorescence", "float", 0, "spearman"),
}
TASK_SOURCES = {name: [Source(URL.format(t.folder), f"{t.folder}.tar.gz")] for name, t in TASKS.items()}
SOURCES = TASK_SOURCES["pfam"]


def convert(raw: Path, out: Path = Path("data/pfam"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False, task: str = "pfam",
            transfer_examples: int = TRANSFER_EXAMPLES) -> Manifest:
    """TAPE's JSON files under `raw` -> the dataset folder `out` for one task (see the module doc).
    `transfer_examples` is DABS's 200,000 (smaller only for tests)."""
    if task not in TASKS:
        raise ValueError(f"task is {task!r}; expected one of {sorted(TASKS)}")
    spec = TASKS[task]
    raw, out = Path(raw), Path(out)
    source = TASK_SOURCES[task][0]
    train_json, test_json = (raw_path(raw, f"{spec.folder}/{name}", source, task)
                             for name in (spec.train, spec.test))
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    params = {"source": URL.format(spec.folder), "task": task, "files": [spec.train, spec.test],
              "label_field": spec.field, "length": LENGTH, "vocabulary": AMINO_ACIDS, "pad": "X",
              "shuffle": f"numpy.random.RandomState({SEED}).permutation (pandas sample(frac=1))"}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-scratch-") as scratch:
        if task in ("pfam", "pfam_transfer"):
            return _convert_pfam(train_json, test_json, out, Path(scratch), task, transfer_examples,
                                 params, shard_bytes, overwrite)
        return _convert_transfer(train_json, test_json, out, Path(scratch), task, params,
                                 shard_bytes, overwrite)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

def _convert_pfam(train_json: Path, valid_json: Path, out: Path, scratch: Path, task: str,
                  transfer_examples: int, params: dict, shard_bytes: int, overwrite: bool) -> Manifest:
    if task == "pfam":
        codes: dict[Any, int] = {}                                     # clan -> order first seen
        train_tokens, seen = _encode_file(train_json, scratch / "train.u8",
                                          lambda r: codes.setdefault(r["clan"], len(codes)))
        clans = sorted(codes)
        rank = {clan: i for i, clan in enumerate(clans)}
        train_labels = np.array([rank[clan] for clan in codes], np.int64)[seen]
    else:
        clans = sorted({record["clan"] for record in _records(train_json)})
        rank = {clan: i for i, clan in enumerate(clans)}
    valid_tokens, valid_labels = _encode_file(valid_json, scratch / "valid.u8", lambda r: rank[r["clan"]])
    order = _dabs_order(len(valid_labels))
    cut = max(0, len(order) - transfer_examples)                      # DABS: head(n - 200000), tail(200000)
    writer = ShardWriter(out, task, SPEC, num_classes=len(clans), metric=TASKS[task].metric, label="class",
                         converter={**params, "transfer_examples": transfer_examples,
                                    "clans": [_plain(c) for c in clans]},
                         shard_bytes=shard_bytes, overwrite=overwrite)
    if task == "pfam":
        _write(writer, "train", train_tokens, train_labels, _dabs_order(len(train_labels)))
        _write(writer, "test", valid_tokens, valid_labels, order[:cut])
    else:
        train_rows, test_rows = _dabs_split(order[cut:])
        _write(writer, "train", valid_tokens, valid_labels, train_rows)
        _write(writer, "test", valid_tokens, valid_labels, test_rows)
    return writer.finish()


def _convert_transfer(train_json: Path, test_json: Path, out: Path, scratch: Path, task: str,
                      params: dict, shard_bytes: int, overwrite: bool) -> Manifest:
    spec = TASKS[task]
    label_of = {"class": lambda r: int(r[spec.field]),
                "per_token": lambda r: _per_token(r[spec.field]),
                "float": lambda r: _scalar(r[spec.field])}[spec.label]
    splits = {split: _encode_file(path, scratch / f"{split}.u8", label_of)
              for split, path in (("train", train_json), ("test", test_json))}
    for split, (_, labels) in splits.items():
        if spec.label != "float" and len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise ValueError(f"{train_json if split == 'train' else test_json}: {spec.field} values lie in "
                             f"[{labels.min()}, {labels.max()}], outside [0, {spec.num_classes - 1}]")
    writer = ShardWriter(out, task, SPEC, num_classes=spec.num_classes, metric=spec.metric, label=spec.label,
                         converter={**params, **({"label_pad": SS_PAD} if spec.label == "per_token" else {})},
                         shard_bytes=shard_bytes, overwrite=overwrite)
    for split, (tokens, labels) in splits.items():
        _write(writer, split, tokens, labels, _dabs_order(len(labels)))
    return writer.finish()


# --------------------------------------------------------------------------------------------
# Raw files, records, tokens
# --------------------------------------------------------------------------------------------

def _records(path: Path) -> Iterator[dict]:
    """The records of a JSON list file, `[{...}, {...}, ...]`, decoded one at a time."""
    decoder = json.JSONDecoder()
    buffer, pos, opened = "", 0, False
    with open(path, encoding="utf-8") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                                  desc=f"reading {path.name}") as bar:

        def refill(why: str) -> None:
            nonlocal buffer, pos
            if len(buffer) - pos > MAX_RECORD_CHARS:
                raise ValueError(f"{path}: no complete JSON record in {MAX_RECORD_CHARS} characters at "
                                 f"character {bar.n - len(buffer) + pos}: the file is malformed")
            chunk = f.read(READ_CHARS)
            if not chunk:
                raise ValueError(f"{path} is not a complete JSON list of records ({why}): the file is "
                                 f"truncated or not TAPE's; download it again")
            buffer, pos = buffer[pos:] + chunk, 0
            bar.update(len(chunk))

        while True:
            pos = (_BETWEEN if opened else _SPACE).match(buffer, pos).end()
            if pos == len(buffer):
                refill("it ends early")
            elif not opened:
                if buffer[pos] != "[":
                    raise ValueError(f"{path} does not start with '[': TAPE's raw files are JSON lists of records")
                opened, pos = True, pos + 1
            elif buffer[pos] == "]":
                return
            else:
                try:
                    record, pos = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError as error:
                    refill(str(error))
                    continue
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: expected a JSON list of records (dicts), found a "
                                     f"{type(record).__name__}")
                yield record


def _encode_file(path: Path, scratch: Path, label_of: Callable[[dict], Any]) -> tuple[np.ndarray, np.ndarray]:
    """A TAPE JSON file -> tokens N × 128 uint8 (memory-mapped from `scratch`) and N labels
    (N × 128 for per-token labels), in file order."""
    labels, count = [], 0
    with open(scratch, "wb") as f:
        for batch in _batches(_records(path), WRITE_ROWS):
            _tokens(batch, path, count).tofile(f)
            labels.append(np.asarray([_label(label_of, r, path, count + i) for i, r in enumerate(batch)]))
            count += len(batch)
    if not count:
        raise ValueError(f"{path} holds no records: download it again")
    return np.memmap(scratch, np.uint8, "r", shape=(count, LENGTH)), np.concatenate(labels)


_LOOKUP = np.full(256, 255, np.uint8)                                  # byte -> token id (255: invalid)
_LOOKUP[np.frombuffer(AMINO_ACIDS.encode(), np.uint8)] = np.arange(len(AMINO_ACIDS))


def _tokens(batch: list[dict], path: Path, first: int) -> np.ndarray:
    """Records -> B × 128 token ids: `primary` cut to 128, padded with X (DABS's ljust(128, 'X'))."""
    try:
        text = "".join(r["primary"][:LENGTH].ljust(LENGTH, "X") for r in batch)
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path}: a record among {first}..{first + len(batch) - 1} has no string 'primary'") from None
    tokens = _LOOKUP[np.frombuffer(text.encode("ascii", "replace"), np.uint8)].reshape(len(batch), LENGTH)
    bad = np.argwhere(tokens == 255)
    if len(bad):
        row, col = bad[0]
        raise ValueError(f"{path}: record {first + row} has {batch[row]['primary'][col]!r} at residue {col}, "
                         f"not one of DABS's amino-acid letters {AMINO_ACIDS}")
    return tokens


def _label(label_of: Callable[[dict], Any], record: dict, path: Path, index: int):
    try:
        return label_of(record)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: record {index} has no usable label ({type(error).__name__}: {error}); "
                         f"for Pfam, its clan may be missing from pfam_train.json") from None


def _per_token(values: list) -> np.ndarray:
    """ss3 -> 128 labels: cut to 128, padded with 3 (DABS SecondaryStructure)."""
    values = [int(v) for v in values[:LENGTH]]
    return np.array(values + [SS_PAD] * (LENGTH - len(values)), np.int64)


def _scalar(value) -> float:
    """A regression target: TAPE stores it as a one-element list (DABS strips the brackets)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"expected one value, found {len(value)}")
        value = value[0]
    return float(value)


def _plain(value):
    return value if isinstance(value, (int, str)) else str(value)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# DABS's order and splits, and writing
# --------------------------------------------------------------------------------------------

def _dabs_order(n: int) -> np.ndarray:
    """Row i of DABS's shuffled frame is record order[i] (pandas sample(frac=1, random_state=42))."""
    return np.random.RandomState(SEED).permutation(n)


def _dabs_split(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DABS's train/validation: head(ceil(0.9 n)) and tail(floor(0.1 n)), with DABS's float arithmetic."""
    n = len(rows)
    return rows[:math.ceil(TRAIN_PROPORTION * n)], rows[n - math.floor(VAL_PROPORTION * n):]


def _write(writer: ShardWriter, split: str, tokens: np.ndarray, labels: np.ndarray,
           rows: np.ndarray) -> None:
    """Write records `rows` (indices into the file) in that order; their ids are those indices."""
    for lo in range(0, len(rows), WRITE_ROWS):
        index = rows[lo:lo + WRITE_ROWS]
        writer.add(split, tokens[index], labels[index], ids=index)
