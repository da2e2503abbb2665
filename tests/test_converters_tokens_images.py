"""The Pfam/TAPE, ImageNet32 and WM-811K converters, on tiny raw files in each publisher's format."""
import collections
import json
import pickle

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from metamae.data.converters import imagenet32, pfam, wafermap
from metamae.data.shards import check_shards, iter_examples, open_dataset
from metamae.modality import ImageSpec, TokenSpec

dabs_order = lambda n: np.random.RandomState(42).permutation(n)      # pandas sample(frac=1, random_state=42)


def read_split(folder, manifest, split):
    """(ids, x, y) of a whole split, in file order, after the full shard check."""
    check_shards(folder, manifest, full=True)
    ids = np.concatenate([pq.read_table(folder / s.file, columns=["id"])["id"].to_numpy()
                          for s in manifest.splits[split]])
    x, y = next(iter_examples(folder, manifest, split, batch_size=10_000))
    return ids, x, y


def token(letter):
    return pfam.AMINO_ACIDS.index(letter)


def u8(value):
    """A uint8 pixel as the converters scale it (float32 / 255)."""
    return np.float32(value) / np.float32(255)


def objects(items):
    """A 1-D object array: one array per row, as in LSWMD.pkl's columns."""
    column = np.empty(len(items), dtype=object)
    column[:] = [None] * len(items)
    for i, item in enumerate(items):
        column[i] = item
    return column


# --------------------------------------------------------------------------------------------
# Pfam and the TAPE transfer tasks
# --------------------------------------------------------------------------------------------

def write_json(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))          # TAPE's raw files: one JSON list of records


def pfam_records(n, clans, first):
    """n Pfam records like TAPE's; record i's sequence starts with `first[i]` when given."""
    rng = np.random.default_rng(n)
    letters = np.array(list("ARNDCQEGHILKMFPSTWYV"))
    out = []
    for i in range(n):
        seq = first.get(i, "".join(rng.choice(letters, 20 + i)))
        out.append({"primary": seq, "protein_length": len(seq), "clan": clans[i % len(clans)],
                    "family": 100 + i, "id": f"seq{i}"})
    return out


LONG = "M" + "A" * 126 + "W" + "!?"          # 130 residues: W is residue 127, the last one kept


@pytest.fixture
def pfam_raw(tmp_path):
    raw = tmp_path / "raw"
    write_json(raw / "pfam" / "pfam_train.json", pfam_records(6, [7, 3, 12], {0: "MKV", 1: LONG}))
    write_json(raw / "pfam" / "pfam_valid.json", pfam_records(14, [12, 3, 7], {2: "WY"}))
    return raw


def test_pfam_pretrain_tokens_labels_and_dabs_order(pfam_raw, tmp_path):
    out = tmp_path / "pfam"
    pfam.convert(pfam_raw, out, transfer_examples=10)
    manifest = open_dataset(out)
    assert manifest.spec == TokenSpec(vocab=26, length=128)
    assert (manifest.name, manifest.label, manifest.metric, manifest.num_classes) == ("pfam", "class", "accuracy", 3)
    assert manifest.converter["clans"] == [3, 7, 12] and manifest.converter["transfer_examples"] == 10
    assert (manifest.rows("train"), manifest.rows("test")) == (6, 14 - 10)

    ids, x, y = read_split(out, manifest, "train")
    assert ids.tolist() == dabs_order(6).tolist()                       # DABS's shuffled order
    assert x.shape == (6, 128) and x.dtype == np.int64
    by_id = {i: (xi, yi) for i, xi, yi in zip(ids, x, y)}
    assert [by_id[i][1] for i in range(6)] == [1, 0, 2, 1, 0, 2]        # clans 7, 3, 12 -> sorted ranks
    mkv = by_id[0][0]
    assert mkv[:3].tolist() == [token("M"), token("K"), token("V")] == [13, 12, 20]
    assert (mkv[3:] == token("X")).all() and token("X") == 0             # padded with X
    long = by_id[1][0]
    assert long[0] == token("M") and long[127] == token("W")             # cut to 128 (the '!?' after are dropped)

    ids, x, y = read_split(out, manifest, "test")                        # DABS's pretraining validation
    assert ids.tolist() == dabs_order(14)[:4].tolist()


def test_pfam_transfer_is_the_last_shuffled_validation_records(pfam_raw, tmp_path):
    out = tmp_path / "pfam_transfer"
    manifest = pfam.convert(pfam_raw, out, task="pfam_transfer", transfer_examples=10)
    transfer = dabs_order(14)[4:]
    assert (manifest.rows("train"), manifest.rows("test")) == (9, 1)    # ceil(0.9 · 10), floor(0.1 · 10)
    ids, x, y = read_split(out, manifest, "train")
    assert ids.tolist() == transfer[:9].tolist()
    by_id = dict(zip(ids, y))
    assert all(by_id[i] == {12: 2, 3: 0, 7: 1}[[12, 3, 7][i % 3]] for i in ids)
    assert read_split(out, manifest, "test")[0].tolist() == transfer[9:].tolist()


def test_pfam_errors_name_the_file(pfam_raw, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"remote_homology_train\.json.*data_raw_pytorch/remote_homology"):
        pfam.convert(pfam_raw, tmp_path / "scop", task="scop")
    write_json(pfam_raw / "pfam" / "pfam_valid.json", pfam_records(3, [3], {1: "MKB1"}))
    with pytest.raises(ValueError, match=r"pfam_valid\.json: record 1 has '1' at residue 3"):
        pfam.convert(pfam_raw, tmp_path / "bad")
    write_json(pfam_raw / "pfam" / "pfam_valid.json", pfam_records(3, [99], {}))
    with pytest.raises(ValueError, match=r"pfam_valid\.json: record 0 has no usable label"):
        pfam.convert(pfam_raw, tmp_path / "bad")
    (pfam_raw / "pfam" / "pfam_valid.json").write_text(json.dumps(pfam_records(3, [3], {}))[:-40])
    with pytest.raises(ValueError, match=r"pfam_valid\.json is not a complete JSON list"):
        pfam.convert(pfam_raw, tmp_path / "bad")


def test_json_records_are_read_across_chunk_boundaries(tmp_path, monkeypatch):
    records = [{"primary": "MK" * i, "clan": i, "odd": ["a,]", {"b": "]"}, None]} for i in range(20)]
    path = tmp_path / "records.json"
    path.write_text(" \n" + json.dumps(records, indent=2) + "\n")
    monkeypatch.setattr(pfam, "READ_CHARS", 7)               # records straddle many reads
    assert list(pfam._records(path)) == records


def test_secondary_structure_pads_labels_with_3(tmp_path):
    raw = tmp_path / "raw"
    records = [{"primary": "MKV", "ss3": [0, 1, 2], "ss8": [0, 1, 2]},
               {"primary": "A" * 130, "ss3": [2] * 127 + [1, 0, 0], "ss8": [0] * 130}]
    write_json(raw / "secondary_structure" / "secondary_structure_train.json", records)
    write_json(raw / "secondary_structure" / "secondary_structure_valid.json", records[:1])
    manifest = pfam.convert(raw, tmp_path / "ss", task="secondary_struct")
    assert (manifest.label, manifest.num_classes, manifest.metric) == ("per_token", 4, "accuracy")
    ids, x, y = read_split(tmp_path / "ss", manifest, "train")
    by_id = dict(zip(ids, y))
    assert y.shape == (2, 128)
    assert by_id[0][:4].tolist() == [0, 1, 2, 3] and (by_id[0][3:] == 3).all()
    assert by_id[1][126:].tolist() == [2, 1]                             # cut to 128 like the tokens
    assert manifest.rows("test") == 1


def test_stability_and_scop_labels(tmp_path):
    raw = tmp_path / "raw"
    write_json(raw / "stability" / "stability_train.json",
               [{"primary": "MKV", "stability_score": [0.25], "topology": "HHH"},
                {"primary": "WY", "stability_score": [-1.5], "topology": "EEE"}])
    write_json(raw / "stability" / "stability_valid.json", [{"primary": "C", "stability_score": [2.0]}])
    manifest = pfam.convert(raw, tmp_path / "stability", task="stability")
    assert (manifest.label, manifest.num_classes, manifest.metric) == ("float", 0, "spearman")
    ids, x, y = read_split(tmp_path / "stability", manifest, "train")
    assert dict(zip(ids.tolist(), y.tolist())) == {0: 0.25, 1: -1.5} and y.dtype == np.float32

    write_json(raw / "remote_homology" / "remote_homology_train.json",
               [{"primary": "MKV", "fold_label": 1194, "class_label": 0}])
    write_json(raw / "remote_homology" / "remote_homology_valid.json", [{"primary": "MK", "fold_label": 1200}])
    with pytest.raises(ValueError, match=r"remote_homology_valid\.json: fold_label values lie in \[1200, 1200\]"):
        pfam.convert(raw, tmp_path / "scop", task="scop")


# --------------------------------------------------------------------------------------------
# ImageNet32
# --------------------------------------------------------------------------------------------

def write_batch(path, data, labels, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:                               # as published: a pickled dict, protocol 2
        pickle.dump({"data": data, "labels": labels, "mean": data.mean(0), **extra}, f, protocol=2)


@pytest.fixture
def imagenet_raw(tmp_path):
    raw = tmp_path / "raw"
    first = np.zeros((3, 3072), np.uint8)
    first[0, 0 * 1024 + 5 * 32 + 7] = 255                    # red plane, row 5, column 7
    first[0, 1 * 1024 + 0 * 32 + 31] = 51                    # green plane, row 0, column 31
    first[0, 2 * 1024 + 31 * 32 + 0] = 102                   # blue plane, row 31, column 0
    write_batch(raw / "Imagenet32_train" / "train_data_batch_1", first, [1, 1000, 500])
    for i in range(2, 11):
        write_batch(raw / "Imagenet32_train" / f"train_data_batch_{i}", np.full((1, 3072), i, np.uint8), [i])
    write_batch(raw / "Imagenet32_val" / "val_data", np.full((2, 3072), 255, np.uint8), [3, 4])
    return raw


def test_imagenet32_pixels_land_in_channel_row_column(imagenet_raw, tmp_path):
    out = tmp_path / "imagenet32"
    imagenet32.convert(imagenet_raw, out)
    manifest = open_dataset(out)
    assert manifest.spec == ImageSpec(3, 32, 32, 4) and manifest.num_classes == 1000
    assert (manifest.rows("train"), manifest.rows("test")) == (3 + 9, 2)
    ids, x, y = read_split(out, manifest, "train")
    assert x.shape == (12, 3, 32, 32) and x.dtype == np.float32
    assert y.tolist() == [0, 999, 499] + list(range(1, 10))              # labels 1..1000 -> 0..999
    assert x[0, 0, 5, 7] == 1.0 and x[0, 1, 0, 31] == u8(51) and x[0, 2, 31, 0] == u8(102)
    assert np.count_nonzero(x[0]) == 3 and not x[1:3].any()
    assert (x[3] == u8(2)).all()                           # batch 2 follows batch 1
    ids, x, y = read_split(out, manifest, "test")
    assert (x == 1.0).all() and y.tolist() == [2, 3]


def test_imagenet32_errors(imagenet_raw, tmp_path):
    (imagenet_raw / "Imagenet32_train" / "train_data_batch_7").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_data_batch_7 not found: download Imagenet32_train\.zip"):
        imagenet32.convert(imagenet_raw, tmp_path / "a")
    write_batch(imagenet_raw / "Imagenet32_train" / "train_data_batch_7", np.zeros((1, 3072), np.uint8), [1],
                extra=collections.OrderedDict())                # a non-numpy global: refused
    with pytest.raises(ValueError, match=r"train_data_batch_7 is not a downsampled-ImageNet batch.*refusing"):
        imagenet32.convert(imagenet_raw, tmp_path / "b", overwrite=True)
    write_batch(imagenet_raw / "Imagenet32_train" / "train_data_batch_7", np.zeros((1, 3072), np.uint8), [0])
    with pytest.raises(ValueError, match=r"labels lie in \[0, 0\], expected 1\.\.1000"):
        imagenet32.convert(imagenet_raw, tmp_path / "c")


# --------------------------------------------------------------------------------------------
# WM-811K
# --------------------------------------------------------------------------------------------

TYPES = ["Center", "none", "Edge-Loc", None, "Near-full", "none", "Donut", None, "Random", "Scratch",
         "Loc", None, "Edge-Ring"]                            # 10 labelled, 3 unlabelled


def lswmd_frame():
    rng = np.random.default_rng(0)
    maps, types = [], []
    for i, kind in enumerate(TYPES):
        shape = [(32, 32), (16, 20), (45, 40), (26, 26)][i % 4]
        wafer = rng.integers(0, 3, shape).astype(np.uint8)
        if i == 0:
            wafer = np.ones((32, 32), np.uint8)
            wafer[3, 5], wafer[0, 0] = 2, 0
        maps.append(wafer)
        # as in LSWMD.pkl: a 1 × 1 array holding the name, or an empty array when unlabelled
        types.append(np.zeros((0, 0)) if kind is None else np.array([[kind]], dtype=object if i % 2 else None))
    return pd.DataFrame({"waferMap": objects(maps), "dieSize": 1000.0, "lotName": "lot1",
                         "waferIndex": np.arange(1.0, len(TYPES) + 1),
                         "trianTestLabel": objects([np.array([["Training"]])] * len(TYPES)),
                         "failureType": objects(types)})


def write_lswmd(raw, legacy):
    raw.mkdir(parents=True, exist_ok=True)
    data = pickle.dumps(lswmd_frame(), protocol=2)
    if legacy:                                                # the module paths of the pandas 0.x original
        for today, then in [(b"cpandas.core.indexes.base\n_new_Index\n", b"cpandas.indexes.base\n_new_Index\n"),
                            (b"cpandas\nIndex\n", b"cpandas.indexes.numeric\nInt64Index\n")]:
            assert today in data
            data = data.replace(today, then)
    (raw / "LSWMD.pkl").write_bytes(data)


@pytest.mark.parametrize("legacy", [False, True])
def test_wafermap_labels_split_and_pixels(tmp_path, legacy):
    raw, out = tmp_path / "raw", tmp_path / "wafermap"
    write_lswmd(raw, legacy)
    wafermap.convert(raw, out)
    manifest = open_dataset(out)
    assert manifest.spec == ImageSpec(3, 32, 32, 4)
    assert (manifest.num_classes, manifest.metric) == (9, "weighted_f1")
    labelled = np.array([i for i, t in enumerate(TYPES) if t is not None])
    shuffled = labelled[dabs_order(10)]
    train_ids, x, y = read_split(out, manifest, "train")
    test_ids, xt, yt = read_split(out, manifest, "test")
    assert train_ids.tolist() == shuffled[:9].tolist() and test_ids.tolist() == shuffled[9:].tolist()
    ids, x, y = np.concatenate([train_ids, test_ids]), np.concatenate([x, xt]), np.concatenate([y, yt])
    expected = {"center": 4, "none": 0, "edge-loc": 6, "near-full": 8, "donut": 2, "random": 1,
                "scratch": 3, "loc": 5, "edge-ring": 7}
    assert y.tolist() == [expected[TYPES[i].lower()] for i in ids]
    assert x.shape == (10, 3, 32, 32) and (x[:, 0] == x[:, 1]).all() and (x[:, 0] == x[:, 2]).all()
    assert x.min() >= 0 and x.max() <= 1
    first = x[ids.tolist().index(0)]                          # the 32 × 32 map: resizing is the identity
    assert (first[:, 3, 5] == 1.0).all() and (first[:, 0, 0] == 0).all()
    assert (first[:, 10, 10] == u8(127)).all()  # DABS: int(1 × 127.5) = 127


def test_wafermap_pretrain_is_the_unlabelled_rows(tmp_path):
    raw = tmp_path / "raw"
    write_lswmd(raw, legacy=False)
    manifest = wafermap.convert(raw, tmp_path / "pretrain", task="wafermap_pretrain")
    ids, x, y = read_split(tmp_path / "pretrain", manifest, "train")
    unlabelled = np.array([3, 7, 11])
    assert ids.tolist() == unlabelled[dabs_order(3)].tolist() and (y == 0).all()   # ceil(0.9 · 3) = 3
    assert "test" not in manifest.splits                                            # floor(0.1 · 3) = 0


def test_wafermap_missing_or_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"LSWMD\.pkl not found: download WM-811K"):
        wafermap.convert(tmp_path, tmp_path / "out")
    (tmp_path / "LSWMD.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"LSWMD\.pkl could not be unpickled"):
        wafermap.convert(tmp_path, tmp_path / "out")
