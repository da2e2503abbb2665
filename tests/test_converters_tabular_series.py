"""Converters for PAMAP2, HIGGS and Genomics OOD, on tiny raw files in each publisher's format."""
import gzip
import math
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metamae.data.converters import genomics, higgs, pamap2
from metamae.data.shards import check_shards, decode_table, iter_examples, open_dataset
from metamae.modality import TabularSpec, TimeSeriesSpec, TokenSpec


def read_split(folder, manifest, split):
    """-> (x, y, ids) of a whole split, in file order, as stored (not standardised)."""
    table = pa.concat_tables([pq.read_table(folder / s.file) for s in manifest.splits[split]])
    x, y = decode_table(table, manifest.columns())
    return x, y, table["id"].to_numpy()


def dabs_split(n):
    """DABS's split, with pandas as DABS runs it: (train rows, val rows) of n rows in file order."""
    shuffled = pd.DataFrame({"row": np.arange(n)}).sample(frac=1, random_state=42).reset_index(drop=True)
    return (set(shuffled.head(math.ceil(0.9 * n))["row"]), set(shuffled.tail(math.floor(0.1 * n))["row"]))


# --------------------------------------------------------------------------------------------
# PAMAP2
# --------------------------------------------------------------------------------------------

def pamap2_value(column, rows):
    """The value a test file holds in 0-based `column` at `rows`: linear in the row, so that linear
    interpolation restores it exactly; heart rate (column 2) 60 + row, IMU columns 100·column + row."""
    return np.where(column == 2, 60.0, 100.0 * column) + rows


def write_subject(path, segments):
    """A subject file: runs of (activityID, rows), 54 columns; heart rate only every 10th row (the
    rest NaN, as at ~9 Hz), and a few NaN gaps in the hand IMU (wireless drops)."""
    activity = np.concatenate([np.full(n, a) for a, n in segments])
    rows = np.arange(len(activity))
    table = pamap2_value(np.arange(54)[None, :], rows[:, None].astype(float))
    table[:, 0] = 5.0 + rows / 100
    table[:, 1] = activity
    table[rows % 10 != 5, 2] = np.nan
    table[60:63, 4:7] = np.nan
    lines = [" ".join("NaN" if np.isnan(v) else f"{v:g}" for v in line) for line in table]
    path.write_text("\n".join(lines) + "\n")


PAMAP2_SEGMENTS = {
    101: [(0, 50), (1, 500), (0, 30), (24, 330), (9, 400), (17, 320), (3, 319), (0, 20)],
    105: [(0, 10), (5, 700), (0, 20)],
    106: [(0, 10), (13, 400), (0, 20)],
}


@pytest.fixture(scope="module")
def pamap2_raw(tmp_path_factory):
    """A raw folder laid out as the unpacked zip: PAMAP2_Dataset/Protocol/subject1NN.dat."""
    raw = tmp_path_factory.mktemp("pamap2_raw")
    folder = raw / "PAMAP2_Dataset" / "Protocol"
    folder.mkdir(parents=True)
    for subject in (*pamap2.SUBJECTS["train"], *pamap2.SUBJECTS["test"]):
        segments = PAMAP2_SEGMENTS.get(subject, [(0, 5), (4, 330), (0, 20)])
        write_subject(folder / f"subject{subject}.dat", segments)
    return raw


@pytest.fixture(scope="module")
def pamap2_data(pamap2_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("pamap2_shards")
    pamap2.convert(pamap2_raw, out)
    return out


def test_pamap2_manifest_and_windows(pamap2_data):
    manifest = open_dataset(pamap2_data)
    check_shards(pamap2_data, manifest, full=True)
    assert manifest.spec == TimeSeriesSpec(channels=52, length=320, patch=5)
    assert (manifest.num_classes, manifest.metric, manifest.label) == (12, "accuracy", "class")
    assert set(manifest.splits) == {"train", "test"}
    x, y, ids = read_split(pamap2_data, manifest, "train")
    subject, start = ids // pamap2.ID_BASE, ids % pamap2.ID_BASE
    # subject 101: lying (rows 50-549) at stride 160 -> starts 50, 210; rope jumping (24) -> 11 at 580;
    # ironing (17) -> 10 at 1310; watching TV (9), 319 rows of standing and activity 0 -> nothing
    first = subject == 101
    assert sorted(zip(start[first], y[first])) == [(50, 0), (210, 0), (580, 11), (1310, 10)]
    assert sorted(subject[~first]) == [102, 103, 104, 107, 108, 109] and set(y[~first]) == {3}
    assert manifest.rows("train") == 10 and x.shape == (10, 52, 320) and x.dtype == np.float32
    # channel c is file column c + 2 (heart rate first), time along the last axis, NaNs interpolated
    expected = pamap2_value(np.arange(2, 54)[None, :, None], (start[:, None, None] + np.arange(320)))
    np.testing.assert_array_equal(x, expected.astype(np.float32))


def test_pamap2_held_out_subjects_only_in_test(pamap2_data):
    manifest = open_dataset(pamap2_data)
    _, y, ids = read_split(pamap2_data, manifest, "test")
    # 105: 700 rows of running at stride 320 -> 2 windows; 106: 400 rows of descending stairs -> 1
    windows = sorted(zip(ids // pamap2.ID_BASE, ids % pamap2.ID_BASE, y))
    assert windows == [(105, 10, 4), (105, 330, 4), (106, 10, 8)]
    _, _, train_ids = read_split(pamap2_data, manifest, "train")
    assert not set(train_ids // pamap2.ID_BASE) & {105, 106}


def test_pamap2_is_read_standardised_with_the_train_split_statistics(pamap2_data):
    manifest = open_dataset(pamap2_data)
    x, _, _ = read_split(pamap2_data, manifest, "train")
    norm = manifest.normalization
    assert (norm["axis"], norm["split"]) == ("channel", "train")
    np.testing.assert_allclose(norm["mean"], x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-9)
    np.testing.assert_allclose(norm["std"], x.astype(np.float64).std(axis=(0, 2)), rtol=1e-9)
    assert manifest.converter["activities"] == [1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 17, 24]
    read, _ = next(iter_examples(pamap2_data, manifest, "train", batch_size=4096))      # as every reader reads it
    assert read.dtype == np.float32
    np.testing.assert_allclose(read.mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(read.std(axis=(0, 2)), 1, rtol=1e-4)
    test, _, _ = read_split(pamap2_data, manifest, "test")
    read, _ = next(iter_examples(pamap2_data, manifest, "test", batch_size=4096))
    mean, std = (np.array(norm[k])[:, None] for k in ("mean", "std"))
    np.testing.assert_allclose(read, (test - mean) / std, rtol=1e-4, atol=1e-4)


def test_pamap2_interpolation_matches_pandas_inside_and_fills_the_lead_in(tmp_path):
    column = np.array([np.nan, 1.0, np.nan, np.nan, 4.0, np.nan])
    filled = pamap2.interpolate(column[:, None].copy(), tmp_path)[:, 0]
    np.testing.assert_array_equal(filled[1:], pd.Series(column).interpolate().to_numpy()[1:])
    assert filled[0] == 1.0                                   # pandas leaves it NaN
    with pytest.raises(ValueError, match="column 3 has no value"):
        pamap2.interpolate(np.full((4, 1), np.nan), tmp_path)


def test_pamap2_reads_the_published_zip(pamap2_raw, tmp_path):
    (tmp_path / "raw").mkdir()
    shutil.make_archive(str(tmp_path / "raw" / "PAMAP2_Dataset"), "zip", pamap2_raw)
    manifest = pamap2.convert(tmp_path / "raw", tmp_path / "out")
    assert manifest.rows("train") == 10 and manifest.rows("test") == 3


def test_pamap2_missing_or_bad_files(pamap2_raw, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"subject101\.dat.*PAMAP2_Dataset\.zip"):
        pamap2.convert(tmp_path, tmp_path / "out")
    shutil.copytree(pamap2_raw / "PAMAP2_Dataset" / "Protocol", tmp_path / "Protocol")     # MetaMAE's layout
    (tmp_path / "Protocol" / "subject109.dat").unlink()
    with pytest.raises(FileNotFoundError, match=r"subject109\.dat missing"):
        pamap2.convert(tmp_path, tmp_path / "out")
    (tmp_path / "Protocol" / "subject109.dat").write_text("1 2 3\n4 5 6\n")
    with pytest.raises(ValueError, match=r"subject109\.dat has 3 columns"):
        pamap2.convert(tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# HIGGS
# --------------------------------------------------------------------------------------------

def higgs_value(rows, column):
    """Feature `column` (1-28, UCI order) of a test file's row: readable back from float32."""
    return rows + column / 32


def write_higgs(path, n):
    """n lines as UCI writes them: label, 28 features, '%.18e', comma-separated, no header; gzipped."""
    rows = np.arange(n)[:, None]
    table = np.hstack([rows % 2, higgs_value(rows, np.arange(1, 29)[None, :])])
    text = "\n".join(",".join(f"{v:.18e}" for v in line) for line in table) + "\n"
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.write(text)


def test_higgs_portions_splits_and_values(tmp_path, monkeypatch):
    monkeypatch.setattr(higgs, "BLOCK_BYTES", 4096)          # ~5 lines a block: many blocks
    write_higgs(tmp_path / "HIGGS.csv.gz", 100)
    out = tmp_path / "out"
    higgs.convert(tmp_path, out)
    manifest = open_dataset(out)
    check_shards(out, manifest, full=True)
    assert manifest.spec == TabularSpec(features=28)
    assert (manifest.num_classes, manifest.metric) == (2, "binary_accuracy")
    # pretraining: the first 90 lines, 81 train / 9 test; transfer: the last 10, 9 / 1
    assert {s: manifest.rows(s) for s in manifest.splits} == \
        {"train": 81, "test": 9, "transfer_train": 9, "transfer_test": 1}
    for prefix, rows in (("", np.arange(90)), ("transfer_", np.arange(90, 100))):
        train, test = dabs_split(len(rows))
        assert set(read_split(out, manifest, prefix + "train")[2]) == {rows[i] for i in train}
        assert set(read_split(out, manifest, prefix + "test")[2]) == {rows[i] for i in test}
    x, y, ids = read_split(out, manifest, "train")
    assert x.shape == (81, 1, 28) and np.array_equal(y, ids % 2)
    uci_column = np.array([higgs.COLUMNS.index(name) for name in higgs.FEATURE_ORDER])   # DABS's order
    expected = higgs_value(ids[:, None], uci_column[None, :]).astype(np.float32)
    np.testing.assert_array_equal(x[:, 0, :], expected)
    assert higgs.FEATURE_ORDER[:2] == ("jet_1_b-tag", "jet_1_eta") and manifest.converter["rows"] == 100


def test_higgs_missing_or_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HIGGS\.csv\.gz.*00280/HIGGS\.csv\.gz"):
        higgs.convert(tmp_path, tmp_path / "out")
    write_higgs(tmp_path / "HIGGS.csv", 20)
    with open(tmp_path / "HIGGS.csv", "a") as f:
        f.write("1.0,2.0,3.0\n")
    with pytest.raises(ValueError, match=r"HIGGS\.csv is not the UCI HIGGS file"):
        higgs.convert(tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Genomics OOD
# --------------------------------------------------------------------------------------------

def random_sequences(rng, n):
    return ["".join(rng.choice(list("ACGT"), 250)) for _ in range(n)]


def write_published(folder, rng, sizes):
    """The TFDS download's three files DABS uses: tab-separated, header, genus names as labels."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for part, n in sizes.items():
        name, _, first, classes, _ = genomics.PARTS[part]
        labels = first + np.arange(n) % classes
        seqs = random_sequences(rng, n)
        lines = ["seq\tlabel\tseq_info\tdomain"] + [
            f"{s}\t{genomics.GENERA[c]}\tNC_{i}, pos {i}\t{'in' if first == 0 else 'ood'}"
            for i, (s, c) in enumerate(zip(seqs, labels))]
        (folder / name).write_text("\n".join(lines) + "\n")
        written[part] = (seqs, labels)
    return written


def write_dabs_csvs(folder, written):
    """DABS's exports of the same splits: tfds.as_dataframe(...).to_csv(), bytes written b'...'."""
    for part, (seqs, labels) in written.items():
        frame = pd.DataFrame({"domain": [b"in"] * len(seqs), "label": labels,
                              "seq": [s.encode() for s in seqs], "seq_info": [b"NC_1, pos 7"] * len(seqs)})
        frame.to_csv(folder / genomics.PARTS[part][1])


def tokens_of(seqs):
    return np.array([["ACGT".index(b) for b in s] for s in seqs])


@pytest.fixture(scope="module")
def genomics_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("genomics_raw")
    written = write_published(raw, np.random.default_rng(0), {"pretrain": 30, "transfer": 20, "ood": 20})
    return raw, written


def check_genomics(out, written):
    manifest = open_dataset(out)
    check_shards(out, manifest, full=True)
    assert manifest.spec == TokenSpec(vocab=4, length=250)
    assert (manifest.num_classes, manifest.metric) == (10, "accuracy")
    assert {s: manifest.rows(s) for s in manifest.splits} == \
        {"train": 27, "test": 3, "transfer_train": 18, "transfer_test": 2}
    ood = open_dataset(out / "ood")
    check_shards(out / "ood", ood, full=True)
    assert ood.num_classes == 60 and {s: ood.rows(s) for s in ood.splits} == {"train": 18, "test": 2}
    for folder, meta, part, prefix, offset in ((out, manifest, "pretrain", "", 0),
                                               (out, manifest, "transfer", "transfer_", 0),
                                               (out / "ood", ood, "ood", "", 10)):
        seqs, labels = written[part]
        train, test = dabs_split(len(seqs))
        for split, rows in (("train", train), ("test", test)):
            x, y, ids = read_split(folder, meta, prefix + split)
            assert set(ids) == rows
            np.testing.assert_array_equal(x, tokens_of([seqs[i] for i in ids]))
            np.testing.assert_array_equal(y, labels[ids] - offset)


def test_genomics_published_files(genomics_raw, tmp_path):
    raw, written = genomics_raw
    genomics.convert(raw, tmp_path / "out")
    check_genomics(tmp_path / "out", written)


def test_genomics_dabs_csvs(genomics_raw, tmp_path):
    _, written = genomics_raw
    write_dabs_csvs(tmp_path, written)
    manifest = genomics.convert(tmp_path, tmp_path / "out")
    assert manifest.converter["files"]["pretrain"] == "genomicsPretrain.csv"
    check_genomics(tmp_path / "out", written)


def test_genomics_missing_or_bad_files(tmp_path):
    missing = r"before_2011_in_tr\.txt.*genomics_ood\.zip.*genomicsPretrain\.csv"
    with pytest.raises(FileNotFoundError, match=missing):
        genomics.convert(tmp_path, tmp_path / "out")
    written = write_published(tmp_path, np.random.default_rng(1), {"pretrain": 5, "transfer": 3, "ood": 3})
    seqs, _ = written["pretrain"]
    path = tmp_path / "before_2011_in_tr.txt"
    path.write_text(path.read_text().replace(seqs[2], seqs[2][:9] + "N" + seqs[2][10:]))
    with pytest.raises(ValueError, match=r"before_2011_in_tr\.txt.*line 4 has base 'N' at position 10"):
        genomics.convert(tmp_path, tmp_path / "out")
