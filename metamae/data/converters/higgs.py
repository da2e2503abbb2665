"""HIGGS (Baldi, Sadowski & Whiteson 2014) as shards: 1 × 28 features, signal (1) or background (0).

Raw format, as UCI distributes it (`HIGGS.csv.gz`, 11,000,000 lines, no header): per line the
class label, then 21 low-level and 7 high-level features, comma-separated, in `COLUMNS` order.

DABS preprocessing followed (alextamkin/dabs `src/datasets/particle_physics/higgs.py`, and
alinlab/MetaMAE `data/tabular.py` with `data/utils.py`):

- DABS loads HIGGS through TFDS, whose only split is the whole file, and keeps its first
  ceil(0.9 N) rows for pretraining (`higgsPretrain.csv`, 9,900,000 rows) and its last
  floor(0.1 N) for transfer (`higgsTransfer.csv`, 1,100,000 rows);
- each portion is shuffled with `df.sample(frac=1, random_state=42)`, i.e. the rows in the order
  of `np.random.RandomState(42).permutation(n)`, and split into its first ceil(0.9 n) rows (train)
  and the rest (DABS's val): pretraining 8,910,000 / 990,000, transfer 990,000 / 110,000;
- features in the order of its CSV, which `tfds.as_dataframe` wrote with the feature names
  sorted (`FEATURE_ORDER`; the same sorting puts genomics' `label, seq` at columns 2-3, where
  DABS's genomics code reads them), as float32, 1 × 28 (MetaMAE's `view(1, 28)`);
- values as published, unscaled, as DABS and MetaMAE feed them (neither standardises): the
  manifest's `normalization` is null, and readers leave the features as they are.

Splits: `train`/`test` are the pretraining portion's train and val parts, `transfer_train`/
`transfer_test` the transfer portion's (what DABS's linear evaluation trains and tests on). Rows keep
their order in the file within a split, and `id` is the row's 0-based line number in HIGGS.csv.

Where shards differ from DABS: TFDS stores the rows in an order of its own (a hash of each row's
number, the hash function depending on the TFDS version), so DABS's portions are the first 90% and
last 10% of that order; here they are the first 90% and last 10% of the file as published. The
events are independent simulations, so the portions hold the same distribution, not the same rows.

The file is read in blocks of BLOCK_BYTES, twice (rows counted first): it is never held in memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv

from metamae.data.download import Source
from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, ShardWriter
from metamae.modality import TabularSpec

URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00280/HIGGS.csv.gz"
SOURCES = [Source(URL, "HIGGS.csv.gz")]

COLUMNS = ("class_label", "lepton_pT", "lepton_eta", "lepton_phi", "missing_energy_magnitude",
           "missing_energy_phi", "jet_1_pt", "jet_1_eta", "jet_1_phi", "jet_1_b-tag", "jet_2_pt",
           "jet_2_eta", "jet_2_phi", "jet_2_b-tag", "jet_3_pt", "jet_3_eta", "jet_3_phi", "jet_3_b-tag",
           "jet_4_pt", "jet_4_eta", "jet_4_phi", "jet_4_b-tag",
           "m_jj", "m_jjj", "m_lv", "m_jlv", "m_bb", "m_wbb", "m_wwbb")       # TFDS's names, UCI's order
FEATURE_ORDER = tuple(sorted(COLUMNS[1:]))
SPEC = TabularSpec(features=len(FEATURE_ORDER))
SPLITS = ("train", "test", "transfer_train", "transfer_test")
SEED = 42
BLOCK_BYTES = 64 * 2**20


def convert(raw: Path, out: Path = Path("data/higgs"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False) -> Manifest:
    path = csv_file(Path(raw))
    n = sum(len(labels) for labels, _ in read_blocks(path, labels_only=True))
    if n == 0:
        raise ValueError(f"{path} has no rows; download {URL} again")
    split_of_row = assign_splits(n)
    writer = ShardWriter(out, "higgs", SPEC, num_classes=2, metric="binary_accuracy",
                         converter=_parameters(path, n), shard_bytes=shard_bytes, overwrite=overwrite)
    start = 0
    for labels, features in read_blocks(path):
        rows = np.arange(start, start + len(labels))
        codes = split_of_row[rows]
        for code, split in enumerate(SPLITS):
            take = codes == code
            if take.any():
                writer.add(split, features[take], labels[take], ids=rows[take])
        start += len(labels)
    return writer.finish()


def _parameters(path: Path, n: int) -> dict:
    return {"source": URL, "file": path.name, "rows": n,
            "reference": "alextamkin/dabs src/datasets/particle_physics/higgs.py; "
                         "alinlab/MetaMAE data/tabular.py",
            "pretrain": "first ceil(0.9 N) rows of the file; transfer: the rest",
            "split": f"per portion: rows np.random.RandomState({SEED}).permutation(n)[:ceil(0.9 n)] train, "
                     f"the rest test (DABS: pandas df.sample(frac=1, random_state={SEED}), head/tail)",
            "splits": {"train": "pretraining train", "test": "pretraining val",
                       "transfer_train": "transfer train", "transfer_test": "transfer val"},
            "feature_order": list(FEATURE_ORDER), "ids": "0-based line number in the file",
            "values": "as published, unscaled, as DABS and MetaMAE feed them (no standardisation)"}


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

def nine_tenths(n: int) -> int:
    """ceil(0.9 n) in integer arithmetic; equal to DABS's `math.ceil(0.9 * n)`, and n minus it to its
    `math.floor(0.1 * n)`, for every n up to 2·10⁷ (checked), so head and tail split the rows."""
    return -(-9 * n // 10)


def dabs_train_mask(n: int, seed: int = SEED) -> np.ndarray:
    """Which of n rows (in file order) DABS's `df.sample(frac=1, random_state=seed).head(ceil(0.9 n))`
    keeps for training -> n bools; the rest is its `tail(floor(0.1 n))`."""
    order = np.random.RandomState(seed).permutation(n)        # shuffled position -> row
    train = np.zeros(n, bool)
    train[order[:nine_tenths(n)]] = True
    return train


def assign_splits(n: int) -> np.ndarray:
    """Each of n rows -> its index in SPLITS (n uint8): the first ceil(0.9 n) rows pretraining."""
    pretrain = nine_tenths(n)
    codes = np.empty(n, np.uint8)
    codes[:pretrain] = np.where(dabs_train_mask(pretrain), 0, 1)
    codes[pretrain:] = np.where(dabs_train_mask(n - pretrain), 2, 3)
    return codes


# --------------------------------------------------------------------------------------------
# Raw file
# --------------------------------------------------------------------------------------------

def csv_file(raw: Path) -> Path:
    for name in ("HIGGS.csv.gz", "HIGGS.csv"):
        if (raw / name).is_file():
            return raw / name
    raise FileNotFoundError(f"HIGGS: neither HIGGS.csv.gz nor HIGGS.csv is in {raw}; download {URL} into "
                            f"{raw} (`python -m metamae.data.prepare higgs --download`)")


def read_blocks(path: Path, labels_only: bool = False):
    """Stream the file -> (labels: B int64, features: B × 1 × 28 float32 in FEATURE_ORDER, or None)
    per block; a .gz file is decompressed on the fly."""
    names = [f"f{i}" for i in range(len(COLUMNS))]
    options = pv.ConvertOptions(column_types={name: pa.float64() for name in names},
                                include_columns=names[:1] if labels_only else None)
    line = 1
    try:
        reader = pv.open_csv(str(path), read_options=pv.ReadOptions(autogenerate_column_names=True,
                                                                    block_size=BLOCK_BYTES),
                             convert_options=options)
        if not labels_only and len(reader.schema) != len(COLUMNS):
            raise ValueError(f"{len(reader.schema)} columns, not {len(COLUMNS)}")
        for batch in reader:
            yield _decode(batch, labels_only)
            line += batch.num_rows
    except (pa.ArrowInvalid, ValueError) as error:
        raise ValueError(f"{path} is not the UCI HIGGS file (a 0/1 label then 28 numbers a line, comma-"
                         f"separated, no header): in the block from line {line}: {error}") from error


def _decode(batch: pa.RecordBatch, labels_only: bool):
    if any(column.null_count for column in batch.columns):
        raise ValueError("a line has an empty value")
    labels = batch.column(0).to_numpy()
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError(f"a label is {labels[~np.isin(labels, (0.0, 1.0))][0]}, not 0 or 1")
    if labels_only:
        return labels.astype(np.int64), None
    features = np.column_stack([batch.column(COLUMNS.index(name)).to_numpy() for name in FEATURE_ORDER])
    return labels.astype(np.int64), features.astype(np.float32)[:, None, :]          # B, B × 1 × 28
