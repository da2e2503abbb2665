"""The shard format: round trips, crash-safe writing, and a clear error for every bad shard."""
import json
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from metamae.config import METRICS
from metamae.data.converters import custom
from metamae.data.prepare import main as prepare_main
from metamae.data.shards import (MANIFEST, Manifest, Moments, ShardDataset, ShardError, ShardWriter, check_shards,
                                 iter_examples, open_dataset, sha256_of)
from metamae.data.synthetic import synthetic
from metamae.modality import TabularSpec
from tests.conftest import SPECS


def write(folder, data, num_classes=3, shard_bytes=20_000, **kwargs):
    writer = ShardWriter(folder, data.name, data.spec, num_classes, "accuracy", shard_bytes=shard_bytes,
                         progress=False, **kwargs)
    writer.add("train", data.train.x, data.train.y)
    writer.add("test", data.test.x, data.test.y)
    return writer.finish()


def test_every_modality_round_trips_through_shards(tmp_path, kind):
    data = synthetic(SPECS[kind], num_classes=3, train=100, test=30)
    manifest = write(tmp_path, data)
    assert manifest.rows("train") == 100 and manifest.rows("test") == 30
    check_shards(tmp_path, Manifest.load(tmp_path), full=True)
    x, y = next(iter_examples(tmp_path, manifest, "train", batch_size=100))
    assert np.array_equal(y, data.train.y)
    parts = lambda inputs: inputs if isinstance(inputs, tuple) else (inputs,)
    for got, want in zip(parts(x), parts(data.train.x)):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_examples_of_another_shape_than_the_manifests_are_refused(tmp_path):
    """Cut into rows of the manifest's size they would be misaligned, and pass every later check."""
    data = synthetic(SPECS["image"], train=20, test=5)                  # 2 × 8 × 8
    writer = ShardWriter(tmp_path, "d", data.spec, 3, "accuracy", progress=False)
    with pytest.raises(ShardError, match=r"have shapes \[\(20, 2, 8, 9\), \(20,\)\]"):
        writer.add("train", np.zeros((20, 2, 8, 9), np.float32), data.train.y)
    with pytest.raises(ShardError, match=r"ids: \(3,\)"):
        writer.add("train", data.train.x, data.train.y, ids=np.arange(3))


def test_shards_and_row_groups_follow_the_target_size(tmp_path):
    data = synthetic(SPECS["image"], train=200, test=10)     # 2 × 8 × 8 float32 = 512 bytes a row
    manifest = write(tmp_path, data, shard_bytes=30_000)
    sizes = [s.rows for s in manifest.splits["train"]]
    assert len(sizes) == 4 and sum(sizes) == 200 and max(sizes) <= 30_000 // 512
    assert all(s.bytes == (tmp_path / s.file).stat().st_size for s in manifest.splits["train"])


def test_an_unfinished_conversion_never_looks_complete_and_is_cleared_on_rerun(tmp_path):
    data = synthetic(SPECS["tabular"], train=100, test=20)
    crashed = ShardWriter(tmp_path, "t", data.spec, 3, "accuracy", shard_bytes=1000, progress=False)
    crashed.add("train", data.train.x, data.train.y)          # no finish(): as if the process died
    assert not (tmp_path / MANIFEST).exists() and list(tmp_path.glob("*.parquet"))
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ShardDataset(tmp_path)
    manifest = write(tmp_path, data, shard_bytes=4000)
    on_disk = sorted(p.name for p in tmp_path.glob("*.parquet*"))
    assert on_disk == sorted(s.file for split in manifest.splits.values() for s in split)


def test_a_complete_dataset_is_kept_unless_overwritten(tmp_path):
    data = synthetic(SPECS["tabular"], train=50, test=10)
    write(tmp_path, data)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write(tmp_path, data)
    smaller = synthetic(SPECS["tabular"], train=20, test=10)
    assert write(tmp_path, smaller, overwrite=True).rows("train") == 20
    assert Manifest.load(tmp_path).rows("train") == 20


@pytest.fixture
def prepared(tmp_path):
    write(tmp_path, synthetic(SPECS["tabular"], num_classes=3, train=100, test=30), shard_bytes=2000)
    return tmp_path


def first_shard(folder):
    return folder / Manifest.load(folder).splits["train"][0].file


def test_a_missing_shard_is_named(prepared):
    first_shard(prepared).unlink()
    with pytest.raises(ShardError, match=r"train-00000\.parquet is missing"):
        open_dataset(prepared)


def test_a_truncated_shard_is_named(prepared):
    path = first_shard(prepared)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"train-00000\.parquet has \d+ bytes, the manifest says"):
        open_dataset(prepared)


def test_a_corrupt_shard_of_the_right_size_fails_its_checksum(prepared):
    path = first_shard(prepared)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="SHA-256"):
        check_shards(prepared, Manifest.load(prepared), full=True)


def rewrite_first_shard(folder, column: str, values: pa.Array):
    """Replace a column of the first train shard, keeping the manifest's size and checksum in step
    (as a converter that wrote the wrong thing would)."""
    path = first_shard(folder)
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, values), path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["splits"]["train"][0].update(bytes=path.stat().st_size, sha256=sha256_of(path))
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return path, table.num_rows


def test_a_shard_with_another_column_type_is_refused(prepared):
    rows = pq.ParquetFile(first_shard(prepared)).metadata.num_rows
    path, _ = rewrite_first_shard(prepared, "x", pa.array(np.zeros(rows * 7, np.float32).reshape(rows, 7).tolist()))
    with pytest.raises(ShardError, match=f"{path.name} has schema"):
        open_dataset(prepared)


def test_a_shard_with_another_example_shape_is_refused(prepared):
    rows = pq.ParquetFile(first_shard(prepared)).metadata.num_rows
    wrong = [np.zeros(8, np.float32).tobytes()] * rows               # 8 features, the manifest says 7
    path, _ = rewrite_first_shard(prepared, "x", pa.array(wrong, pa.binary()))
    with pytest.raises(ShardError, match=rf"{path.name}: column 'x' holds rows of \[32\] bytes; its shape \(1, 7\)"):
        check_shards(prepared, Manifest.load(prepared), full=True)


def test_labels_out_of_range_are_found_before_training(prepared):
    manifest = json.loads((prepared / MANIFEST).read_text())
    manifest["num_classes"] = 2                                # the shards hold labels 0, 1 and 2
    (prepared / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"labels in \[0, 2\].*outside \[0, 1\]"):
        open_dataset(prepared)


def test_a_bad_manifest_is_named(prepared):
    (prepared / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match="not a valid manifest"):
        Manifest.load(prepared)


def test_the_local_reader_shuffles_deterministically_and_covers_every_row(prepared):
    dataset = ShardDataset(prepared, shuffle_buffer=32)
    order = lambda seed: np.concatenate([y.numpy() for _, y in dataset.stream("train", 16, seed=seed)])
    ids_in_file_order = np.concatenate([y.numpy() for _, y in dataset.stream("train", 16)])
    assert np.array_equal(order(1), order(1)) and not np.array_equal(order(1), order(2))
    assert sorted(order(1).tolist()) == sorted(ids_in_file_order.tolist())
    assert not np.array_equal(order(1), ids_in_file_order)
    assert all(len(y) == 16 for _, y in dataset.stream("train", 16, seed=0, drop_last=True))


def test_custom_arrays_get_a_sensible_checked_patch(tmp_path):
    assert custom.default_patch((320,)) == 5 and custom.default_patch((32, 32)) == 4
    x = np.random.default_rng(0).standard_normal((40, 3, 30)).astype(np.float32)
    with pytest.raises(ValueError, match="patch 7 does not divide length 30"):
        custom.convert_arrays(x, np.arange(40) % 2, "timeseries", tmp_path, patch=7)
    with pytest.raises(ValueError, match="takes 4 dimensions"):
        custom.convert_arrays(x, np.arange(40) % 2, "image", tmp_path)


def prepare(*args):
    return subprocess.run([sys.executable, "-m", "metamae.data.prepare", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_prepare_custom_npz_csv_and_npy_folders(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 7, size=(50, 12))
    np.savez(tmp_path / "tokens.npz", X=tokens, y=np.arange(50) % 5, train_idx=np.arange(40),
             test_idx=np.arange(40, 50))
    run = prepare("custom", "--npz", tmp_path / "tokens.npz", "--modality", "tokens", "--out", tmp_path / "tok",
                  "--verify")
    assert run.returncode == 0, run.stderr
    manifest = Manifest.load(tmp_path / "tok")
    assert manifest.spec == SPECS["tokens"].__class__(vocab=7, length=12)
    assert manifest.rows("train") == 40 and manifest.num_classes == 5

    (tmp_path / "table.csv").write_text("a,b,label\n" + "".join(f"{i},{2 * i},{i % 2}\n" for i in range(30)))
    run = prepare("custom", "--csv", tmp_path / "table.csv", "--out", tmp_path / "tab")
    assert run.returncode == 0, run.stderr
    assert Manifest.load(tmp_path / "tab").input == {"kind": "tabular", "features": 2}
    assert Manifest.load(tmp_path / "tab").rows("test") == 6                 # stratified 80/20

    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "X.npy", rng.standard_normal((20, 1, 8, 8)).astype(np.float32))
    np.save(tmp_path / "npy" / "y.npy", np.arange(20) % 2)
    run = prepare("custom", "--npy-dir", tmp_path / "npy", "--modality", "image", "--patch", "3",
                  "--out", tmp_path / "img")
    assert run.returncode != 0 and "patch 3 does not divide height 8" in run.stderr

    run = prepare("verify", "--out", tmp_path / "nothing")
    assert run.returncode != 0 and "manifest.json does not exist" in run.stderr


def test_the_writer_refuses_inputs_a_model_cannot_read(tmp_path):
    series = synthetic(SPECS["timeseries"], train=20, test=5)
    series.train.x[3, 0, 7] = np.nan
    with pytest.raises(ShardError, match="train examples .* hold 1 NaN or infinite input values"):
        write(tmp_path / "series", series)
    tokens = synthetic(SPECS["tokens"], train=20, test=5)                        # vocabulary 5
    tokens.test.x[0, 0] = 5
    with pytest.raises(ShardError, match=r"token ids in \[0, 5\], outside the vocabulary \[0, 4\]"):
        write(tmp_path / "tokens", tokens)


def test_preparing_a_folder_deletes_only_an_unfinished_conversions_shards(tmp_path):
    (tmp_path / "mine.parquet").write_bytes(b"a user's own file")
    (tmp_path / "train-00000.parquet.tmp").write_bytes(b"left by a killed conversion")
    write(tmp_path, synthetic(SPECS["tabular"], train=20, test=5))
    assert (tmp_path / "mine.parquet").exists() and not (tmp_path / "train-00000.parquet.tmp").exists()


def test_custom_labels_follow_the_metric(tmp_path):
    assert set(custom.LABEL_KIND) == set(METRICS)
    x, rng = np.zeros((30, 4), np.float32), np.random.default_rng(0)
    regression = custom.convert_arrays(x, rng.normal(size=30), "tabular", tmp_path / "reg", metric="spearman")
    assert (regression.label, regression.num_classes) == ("float", 0)
    y = next(iter_examples(tmp_path / "reg", regression, "train", batch_size=100))[1]
    assert y.dtype == np.float32 and len(np.unique(y)) == 24                     # not cut to class indices
    with pytest.raises(ValueError, match="scores class indices"):
        custom.convert_arrays(x, rng.normal(size=30), "tabular", tmp_path / "cls")
    with pytest.raises(ValueError, match="--metric is 'acuracy'"):
        custom.convert_arrays(x, np.arange(30) % 2, "tabular", tmp_path / "typo", metric="acuracy")
    with pytest.raises(ValueError, match="both train_idx and test_idx"):
        custom.convert_arrays(x, np.arange(30) % 2, "tabular", tmp_path / "half", train_idx=np.arange(20))


# --------------------------------------------------------------------------------------------
# Standardised inputs
# --------------------------------------------------------------------------------------------

def test_every_float_input_is_read_standardised_per_channel(tmp_path, kind):
    """Channels (a table's features) on scales 1, 10, 100, ... read back with mean 0 and std 1; token
    ids, and the text of image+text, are read as stored."""
    data = synthetic(SPECS[kind], num_classes=3, train=100, test=30)
    if kind == "tokens":
        with pytest.raises(ValueError, match="token ids, which are never standardised"):
            Moments(data.spec)
        return
    axis = 2 if kind == "tabular" else 1                                 # the channels' axis in a batch
    image = lambda x: x[0] if isinstance(x, tuple) else x
    channels = image(data.train.x).shape[axis]
    scale = lambda part: np.moveaxis(np.moveaxis(part, axis, -1) * 10.0 ** np.arange(channels) + 50, -1, axis)
    inputs = lambda x: (scale(x[0]), x[1]) if isinstance(x, tuple) else scale(x)
    moments = Moments(data.spec)
    moments.add(image(inputs(data.train.x)))
    writer = ShardWriter(tmp_path, data.name, data.spec, 3, "accuracy", progress=False)
    writer.add("train", inputs(data.train.x), data.train.y)
    writer.add("test", inputs(data.test.x), data.test.y)
    manifest = writer.finish(normalization=moments.normalization())
    x, _ = next(iter_examples(tmp_path, manifest, "train", batch_size=100))
    others = tuple(a for a in range(image(x).ndim) if a != axis)
    assert image(x).dtype == np.float32
    np.testing.assert_allclose(image(x).mean(axis=others), 0, atol=1e-5)
    np.testing.assert_allclose(image(x).std(axis=others), 1, rtol=1e-4)
    if kind == "image_text":
        assert np.array_equal(x[1], data.train.x[1])


def wild_table(n=300):
    """n × 3 features on wildly different scales: N(0, 1), N(0, 1) · 1e4 + 500 and a constant 7."""
    x = np.random.default_rng(0).standard_normal((n, 3))
    x[:, 1] = x[:, 1] * 1e4 + 500
    x[:, 2] = 7
    return x.astype(np.float32), np.arange(n) % 2


def split_of(folder, split):
    """(inputs as ShardDataset reads them, ids) of a split in file order."""
    x = np.concatenate([x.numpy() for x, _ in ShardDataset(folder).stream(split, 64)])
    ids = np.concatenate([pq.read_table(folder / s.file, columns=["id"])["id"].to_numpy()
                          for s in Manifest.load(folder).splits[split]])
    return x, ids


def test_custom_inputs_are_read_standardised_with_the_train_splits_statistics(tmp_path):
    x, y = wild_table()
    np.savez(tmp_path / "wild.npz", X=x, y=y)
    prepare_main(["custom", "--npz", str(tmp_path / "wild.npz"), "--modality", "tabular", "--out",
                  str(tmp_path / "wild")])
    manifest = Manifest.load(tmp_path / "wild")
    train, train_ids = split_of(tmp_path / "wild", "train")
    norm = manifest.normalization
    assert manifest.converter["standardize"] is True and (norm["axis"], norm["split"]) == ("channel", "train")
    np.testing.assert_allclose(norm["mean"], x[train_ids].astype(np.float64).mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(norm["std"], x[train_ids].astype(np.float64).std(axis=0), rtol=1e-9)
    assert train.dtype == np.float32 and train.shape == (240, 1, 3)
    np.testing.assert_allclose(train[:, 0].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train[:, 0, :2].std(axis=0), 1, rtol=1e-4)
    assert np.all(train[:, 0, 2] == 0)                                   # a constant feature: centred, not divided
    test, test_ids = split_of(tmp_path / "wild", "test")
    std = np.where(np.array(norm["std"]) > 0, norm["std"], 1)
    np.testing.assert_allclose(test[:, 0], (x[test_ids] - np.array(norm["mean"])) / std, atol=1e-4)
    assert np.abs(test[:, 0, :2].mean(axis=0)).min() > 1e-3             # the train split's statistics, not its own
    prepare_main(["verify", "--out", str(tmp_path / "wild")])           # the stored values, unscaled, pass


def test_no_standardize_reads_the_inputs_as_given(tmp_path):
    x, y = wild_table()
    np.savez(tmp_path / "wild.npz", X=x, y=y)
    prepare_main(["custom", "--npz", str(tmp_path / "wild.npz"), "--modality", "tabular", "--no-standardize",
                  "--out", str(tmp_path / "raw")])
    manifest = Manifest.load(tmp_path / "raw")
    assert manifest.normalization is None and manifest.converter["standardize"] is False
    train, ids = split_of(tmp_path / "raw", "train")
    assert np.array_equal(train[:, 0], x[ids])


def test_a_table_of_n_by_f_and_a_csv_are_read_back_as_1_by_f(tmp_path):
    x, y = wild_table(100)
    np.savez(tmp_path / "table.npz", X=x, y=y)
    prepare_main(["custom", "--npz", str(tmp_path / "table.npz"), "--modality", "tabular", "--name", "table",
                  "--out", str(tmp_path / "npz")])
    rows = "".join(f"{a!r},{b!r},{c!r},{label}\n" for (a, b, c), label in zip(x.tolist(), y))
    (tmp_path / "table.csv").write_text("f0,f1,f2,label\n" + rows)
    prepare_main(["custom", "--csv", str(tmp_path / "table.csv"), "--out", str(tmp_path / "csv")])
    for folder in ("npz", "csv"):
        data = ShardDataset(tmp_path / folder)
        assert data.spec == TabularSpec(features=3)
        batch, labels = next(data.stream("train", 16))
        assert batch.shape == (16, 1, 3) and batch.dtype == torch.float32 and labels.shape == (16,)
    assert (Manifest.load(tmp_path / "npz").name, Manifest.load(tmp_path / "csv").name) == ("table", "custom")
    (npz, npz_ids), (csv, csv_ids) = split_of(tmp_path / "npz", "train"), split_of(tmp_path / "csv", "train")
    assert np.array_equal(npz_ids, csv_ids) and np.array_equal(npz, csv)


def test_variable_length_sequences_padded_into_x_are_refused(tmp_path):
    x, lengths = np.zeros((20, 2, 50), np.float32), np.arange(20) + 30
    np.savez(tmp_path / "padded.npz", X=x, y=np.arange(20) % 2, lengths=lengths)
    (tmp_path / "npy").mkdir()
    for name, values in (("X", x), ("y", np.arange(20) % 2), ("lengths", lengths)):
        np.save(tmp_path / "npy" / f"{name}.npy", values)
    for source in (["--npz", str(tmp_path / "padded.npz")], ["--npy-dir", str(tmp_path / "npy")]):
        with pytest.raises(SystemExit, match=r"has `lengths` beside X.*length 50.*padding would be read as data.*"
                                             r"Crop or resample.*drop `lengths`"):
            prepare_main(["custom", *source, "--modality", "timeseries", "--out", str(tmp_path / "out")])
        assert not (tmp_path / "out" / MANIFEST).exists()


def test_a_name_that_is_not_a_safe_folder_name_is_refused(tmp_path):
    np.savez(tmp_path / "t.npz", X=np.zeros((20, 3), np.float32), y=np.arange(20) % 2)
    for name in ("my data", "a/b", "../up", ".hidden", ""):
        with pytest.raises(SystemExit, match=rf"--name '{re.escape(name)}' cannot name the dataset.*letters, digits"):
            prepare_main(["custom", "--npz", str(tmp_path / "t.npz"), "--modality", "tabular", "--name", name,
                          "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_normalization_that_does_not_fit_the_inputs_is_refused(prepared):
    manifest = json.loads((prepared / MANIFEST).read_text())          # 7 features
    manifest["normalization"] = {"mean": [0.0] * 6, "std": [1.0] * 6, "axis": "channel", "split": "train"}
    (prepared / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"manifest\.json: normalization holds 6 means .* 7 channels; prepare"):
        Manifest.load(prepared)
    manifest["normalization"] = {"mean": [0.0] * 7, "std": [1.0] * 7}                 # no axis, no split
    (prepared / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"normalization holds \['mean', 'std'\]; expected the keys"):
        open_dataset(prepared)
