"""`python -m metamae.data.prepare custom` on bad input, interrupts and faults: one line naming the
file, array, value or folder at fault, no traceback, and a complete dataset never lost."""
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from metamae.data.prepare import main as prepare_main
from metamae.data.shards import MANIFEST, Manifest, ShardError, ShardWriter
from metamae.data.synthetic import synthetic
from tests.conftest import SPECS


def table(n=40, seed=0):
    """n × 4 float features and two balanced classes."""
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32), np.arange(n) % 2


def save(path, **arrays):
    np.savez(path, **arrays)
    return path


def custom(npz, out, *extra):
    return ["custom", "--npz", str(npz), "--modality", "tabular", "--out", str(out), *map(str, extra)]


def refused(argv) -> str:
    """The message the CLI exits with, checked to be one line."""
    with pytest.raises(SystemExit) as exit:
        prepare_main(argv)
    message = str(exit.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def snapshot(folder) -> dict:
    """Every file under a folder, byte for byte."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out) -> list[str]:
    """Siblings of `out` named after it: a staged conversion or a replaced dataset left behind."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f"{out.name}."))


def writable(folder) -> bool:
    """Whether this process can create a file in `folder` (root can, whatever its mode)."""
    probe = folder / ".probe"
    try:
        probe.touch()
    except PermissionError:
        return False
    probe.unlink()
    return True


# --------------------------------------------------------------------------------------------
# Each fault of the table: the CLI arguments that meet it and the one line that names it
# --------------------------------------------------------------------------------------------

def truncated_npz(tmp_path):
    x, y = table()
    path = save(tmp_path / "data.npz", X=x, y=y)
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    return custom(path, tmp_path / "out"), rf"{re.escape(str(path))} is truncated or corrupt \(File is not a zip"


def flipped_npz(tmp_path, header=False):
    """A byte flipped in the middle of X's compressed data (found by the zip's CRC), or in its first
    deflate block's header (found by zlib)."""
    x = np.random.default_rng(0).standard_normal((2000, 4)).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez_compressed(path, X=x, y=np.arange(2000) % 2)
    raw = bytearray(path.read_bytes())
    member = zipfile.ZipFile(path).getinfo("X.npy")
    name, extra = struct.unpack("<HH", raw[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name + extra                         # after the local file header
    raw[start + (1 if header else member.compress_size // 2)] ^= 0xFF
    path.write_bytes(bytes(raw))
    return custom(path, tmp_path / "out"), rf"{re.escape(str(path))} \(array 'X'\) is truncated or corrupt \("


def text_as_npz(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("a,b,label\n1,2,0\n3,4,1\n")
    return custom(path, tmp_path / "out"), rf"{re.escape(str(path))} is not an \.npz archive \(it starts with"


def index_out_of_range(tmp_path):
    x, y = table()
    path = save(tmp_path / "data.npz", X=x, y=y, train_idx=np.r_[0:30, 45], test_idx=np.arange(30, 40))
    return custom(path, tmp_path / "out"), r"train_idx\[30\] is 45, outside \[0, 39\]: X has 40 examples"


def overlapping_indices(tmp_path):
    x, y = table()
    path = save(tmp_path / "data.npz", X=x, y=y, train_idx=np.arange(30), test_idx=np.arange(25, 40))
    return custom(path, tmp_path / "out"), r"train_idx and test_idx share 5 examples \(e\.g\. 25\)"


def labels_with_a_gap(tmp_path):
    x, _ = table(42)
    path = save(tmp_path / "data.npz", X=x, y=np.array([0, 1, 7])[np.arange(42) % 3])
    return custom(path, tmp_path / "out"), (r"y holds classes 0, 1, 7; classes 2-6 have no example: relabel .*"
                                            r"or pass --num-classes 8 if they are real classes absent here")


def unwritable_out(tmp_path):
    """An output folder no one can create, root included: its parent is a regular file."""
    x, y = table()
    (tmp_path / "blocker").write_text("a file, not a folder")
    out = tmp_path / "blocker" / "out"
    return custom(save(tmp_path / "data.npz", X=x, y=y), out), rf"cannot write to {re.escape(str(out))}: Not a dir"


def overwrite_with_a_nan(tmp_path):
    """A complete dataset in out, then --overwrite with input holding a NaN."""
    x, y = table()
    prepare_main(custom(save(tmp_path / "old.npz", X=x, y=y), tmp_path / "out"))
    x[3, 2] = np.nan
    return (custom(save(tmp_path / "nan.npz", X=x, y=y), tmp_path / "out", "--overwrite"),
            r"the train examples written to .*out hold 1 NaN or infinite input values")


FAULTS = {f.__name__: f for f in (truncated_npz, flipped_npz, text_as_npz, index_out_of_range, overlapping_indices,
                                  labels_with_a_gap, unwritable_out, overwrite_with_a_nan)}


def output_state(argv):
    """The files of the run's --out folder (None when there is none) and its siblings named after it."""
    out = Path(argv[argv.index("--out") + 1])
    return (snapshot(out) if out.is_dir() else None), (leftovers(out) if out.parent.is_dir() else [])


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_one_line_naming_it_and_changes_no_output(tmp_path, fault):
    argv, expected = FAULTS[fault](tmp_path)
    before = output_state(argv)
    message = refused(argv)
    assert re.search(expected, message), message
    assert "pickle" not in message and output_state(argv) == before


# One fault of each kind of error that prepare's main turns into its line: the rest share its path.
@pytest.mark.parametrize("fault", ["text_as_npz", "unwritable_out", "overwrite_with_a_nan"])
def test_the_cli_prints_the_line_and_no_traceback(tmp_path, fault):
    argv, expected = FAULTS[fault](tmp_path)
    before = output_state(argv)
    run = subprocess.run([sys.executable, "-m", "metamae.data.prepare", *argv], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip() and " -> " not in line]   # not tqdm's bar
    assert len(lines) == 1 and re.fullmatch(rf"error: .*{expected}.*", lines[0]), run.stderr
    assert output_state(argv) == before


def test_a_flip_that_breaks_the_deflate_stream_is_named_too(tmp_path):
    argv, expected = flipped_npz(tmp_path, header=True)
    assert re.search(expected + r"Error -3 while decompressing data: invalid", refused(argv))


# --------------------------------------------------------------------------------------------
# Overwriting: the old dataset stays until the new one is complete, then one swap
# --------------------------------------------------------------------------------------------

def test_a_failed_overwrite_keeps_the_old_dataset_and_a_good_one_replaces_it_whole(tmp_path):
    x, y = table(200)
    out = tmp_path / "out"
    prepare_main(custom(save(tmp_path / "old.npz", X=x, y=y), out, "--shard-mb", 0.002))
    (out / "notes.txt").write_text("the user's own file")
    assert len(Manifest.load(out).splits["train"]) == 3
    before = snapshot(out)
    x[3, 2] = np.nan
    assert "NaN" in refused(custom(save(tmp_path / "nan.npz", X=x, y=y), out, "--overwrite"))
    assert snapshot(out) == before and leftovers(out) == []
    prepare_main(["verify", "--out", str(out)])

    new_x, new_y = table(50, seed=1)
    prepare_main(custom(save(tmp_path / "new.npz", X=new_x, y=new_y), out, "--overwrite", "--verify"))
    manifest = Manifest.load(out)
    assert manifest.rows("train") + manifest.rows("test") == 50
    shards = {s.file for split in manifest.splits.values() for s in split}
    assert {p.name for p in out.iterdir()} == shards | {MANIFEST, "notes.txt"}           # no old shard left
    assert (out / "notes.txt").read_text() == "the user's own file" and leftovers(out) == []


def write(folder, data, **kwargs):
    writer = ShardWriter(folder, data.name, data.spec, 4, "accuracy", progress=False, **kwargs)
    writer.add("train", data.train.x, data.train.y)
    writer.add("test", data.test.x, data.test.y)
    return writer.finish()


def test_a_writer_left_by_an_error_leaves_the_old_dataset_and_nothing_else(tmp_path):
    data = synthetic(SPECS["tabular"], train=50, test=10)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    write(out, data)
    before = snapshot(out)
    for folder in (out, fresh):
        with pytest.raises(RuntimeError, match="interrupted"):
            with ShardWriter(folder, data.name, data.spec, 4, "accuracy", overwrite=True, progress=False) as writer:
                writer.add("train", data.train.x, data.train.y)
                raise RuntimeError("interrupted")
    assert snapshot(out) == before and leftovers(out) == [] and not fresh.exists()


def test_an_error_in_finish_leaves_the_old_dataset(tmp_path):
    data = synthetic(SPECS["tabular"], train=50, test=10)
    out = tmp_path / "out"
    write(out, data)
    before = snapshot(out)
    writer = ShardWriter(out, data.name, data.spec, 4, "accuracy", overwrite=True, progress=False)
    writer.add("train", data.train.x, data.train.y)
    with pytest.raises(ShardError, match="the normalization given"):
        writer.finish(normalization={"mean": [0.0], "std": [1.0], "axis": "channel", "split": "train"})
    assert snapshot(out) == before and leftovers(out) == []


def test_an_overwrite_killed_midway_keeps_the_old_dataset_and_the_next_run_clears_its_folder(tmp_path):
    data = synthetic(SPECS["tabular"], train=50, test=10)
    out = tmp_path / "out"
    write(out, data)
    before = snapshot(out)
    killed = ShardWriter(out, data.name, data.spec, 4, "accuracy", shard_bytes=1000, overwrite=True, progress=False)
    killed.add("train", data.train.x, data.train.y)                   # no finish(), no with: the process died
    (tmp_path / "out.partial-4194305").mkdir()                        # an earlier one's, another process id
    (tmp_path / "out.partial-4194305" / "train-00000.parquet.tmp").write_bytes(b"half a shard")
    assert snapshot(out) == before and leftovers(out) == sorted(["out.partial-4194305", f"out.partial-{os.getpid()}"])
    smaller = synthetic(SPECS["tabular"], train=20, test=10)
    assert write(out, smaller, overwrite=True).rows("train") == 20
    assert leftovers(out) == [] and Manifest.load(out).rows("train") == 20


# --------------------------------------------------------------------------------------------
# Files numpy cannot read, indices and labels
# --------------------------------------------------------------------------------------------

def test_an_npy_folder_with_a_truncated_array_or_a_text_file_is_named(tmp_path):
    x, y = table()
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "X.npy", x)
    (folder / "y.npy").write_text("0\n1\n")
    argv = ["custom", "--npy-dir", str(folder), "--modality", "tabular", "--out", str(tmp_path / "out")]
    message = refused(argv)
    assert re.search(rf"{re.escape(str(folder / 'y.npy'))} is not a \.npy array", message) and "pickle" not in message
    np.save(folder / "y.npy", y)
    raw = (folder / "X.npy").read_bytes()
    (folder / "X.npy").write_bytes(raw[:len(raw) // 2])
    assert re.search(rf"{re.escape(str(folder / 'X.npy'))} is truncated or corrupt \(Failed to read", refused(argv))


def test_an_array_of_python_objects_is_refused_without_suggesting_to_unpickle_it(tmp_path):
    x, y = table()
    path = save(tmp_path / "data.npz", X=x, y=np.array(y.tolist(), dtype=object))
    message = refused(custom(path, tmp_path / "out"))
    assert re.search(r"\(array 'y'\) holds Python objects \(an array of dtype object\)", message)
    assert "allow_pickle" not in message


def test_repeated_and_non_integer_indices_are_refused(tmp_path):
    x, y = table()
    for train_idx, expected in ((np.r_[0:30, 3, 3], r"train_idx repeats 1 index \(e\.g\. 3\)"),
                                (np.arange(30.0), r"train_idx must be a 1-D array of integer indices into X; "
                                                  r"it has shape \(30,\) and dtype float64"),
                                (np.arange(30)[:, None], r"train_idx must be .* shape \(30, 1\)")):
        path = save(tmp_path / "data.npz", X=x, y=y, train_idx=train_idx, test_idx=np.arange(30, 40))
        assert re.search(expected, refused(custom(path, tmp_path / "out")))
    path = save(tmp_path / "data.npz", X=x, y=y, train_idx=np.arange(30), test_idx=np.r_[30:40, -1])
    assert re.search(r"test_idx\[10\] is -1, outside \[0, 39\]", refused(custom(path, tmp_path / "out")))


def test_num_classes_is_checked_against_the_labels(tmp_path):
    x, _ = table(42)
    path = save(tmp_path / "data.npz", X=x, y=np.array([0, 1, 7])[np.arange(42) % 3])
    message = refused(custom(path, tmp_path / "out", "--num-classes", 2))
    assert re.search(r"y holds labels 7, outside --num-classes 2 \(labels 0\.\.1\)", message)
    prepare_main(custom(path, tmp_path / "out", "--num-classes", 8, "--verify"))
    assert Manifest.load(tmp_path / "out").num_classes == 8
    regression = save(tmp_path / "real.npz", X=x, y=np.linspace(0, 1, 42))
    message = refused(custom(regression, tmp_path / "real", "--metric", "spearman", "--num-classes", 3))
    assert re.search(r"--num-classes 3 is for class labels.*--metric spearman", message)


# --------------------------------------------------------------------------------------------
# Output folders that cannot be written
# --------------------------------------------------------------------------------------------

def test_a_read_only_output_folder_is_named(tmp_path):
    x, y = table()
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        if writable(out):
            pytest.skip("this process writes to a folder of mode 555 (it runs as root): unwritable_out, a folder "
                        "whose parent is a file, covers an output folder that cannot be written")
        message = refused(custom(save(tmp_path / "data.npz", X=x, y=y), out))
        assert message == f"error: cannot write to {out}: Permission denied"
    finally:
        out.chmod(0o755)
