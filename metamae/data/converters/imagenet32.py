"""ImageNet 32×32 from the downsampled-ImageNet batch files, with DABS/MetaMAE's preprocessing.

Publisher's format (Chrabaszcz, Loshchilov & Hutter 2017, "A Downsampled Variant of ImageNet",
image-net.org "Download downsampled images", an ImageNet account is needed): Imagenet32_train.zip
holds `train_data_batch_1` .. `train_data_batch_10`, Imagenet32_val.zip holds `val_data`; each is
a pickled dict with 'data', an N × 3072 uint8 array whose row is the red plane, then green, then
blue, each 32 × 32 row-major, and 'labels', N class numbers 1..1000 (and 'mean', unused). The files
are read one at a time, with an unpickler that builds numpy arrays and nothing else (pickle can run
code; anything else in the file is refused).

Preprocessing: DABS's natural-image datasets (alextamkin/dabs, src/datasets/natural_images/
imagenet.py, cifar.py) and MetaMAE's `imagenet32` (alinlab/MetaMAE, data/rgbimage.py:
T.Resize((32, 32)), T.CenterCrop((32, 32)), T.ToTensor()) end in ToTensor with no mean/std
normalisation: pixels are uint8 / 255 in [0, 1]. These images are already 32 × 32, so resize and
crop are the identity. MetaMAE downsamples full ImageNet with PIL bilinear itself; the published
32 × 32 files were downsampled with a box filter (their paper), so pixels differ slightly from MetaMAE's.

Output: float32 3 × 32 × 32, labels 0..999 (file label − 1); train = the ten train batches in file
order, test = val_data (ImageNet's validation set; DABS/MetaMAE pretrain only on the train split).
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from metamae.data.download import unpack
from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, ShardWriter
from metamae.modality import ImageSpec

SPEC = ImageSpec(channels=3, height=32, width=32, patch=4)
NUM_CLASSES = 1000
FILES = {"train": [("Imagenet32_train", f"train_data_batch_{i}") for i in range(1, 11)],
         "test": [("Imagenet32_val", "val_data")]}
WRITE_ROWS = 8192
PAGE = "https://image-net.org/download-images.php (Downsampled ImageNet 32x32)"

SOURCES = []          # behind an ImageNet login: download Imagenet32_train.zip and Imagenet32_val.zip by hand


def convert(raw: Path, out: Path = Path("data/imagenet32"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False) -> Manifest:
    raw = Path(raw)
    paths = {split: [_raw_file(raw, folder, name) for folder, name in files] for split, files in FILES.items()}
    writer = ShardWriter(out, "imagenet32", SPEC, num_classes=NUM_CLASSES, metric="accuracy",
                         converter={"source": PAGE, "files": {s: [n for _, n in f] for s, f in FILES.items()},
                                    "layout": "row = R, G, B planes of 32 × 32, row-major",
                                    "scale": "x / 255", "labels": "file label - 1"},
                         shard_bytes=shard_bytes, overwrite=overwrite)
    for split, files in paths.items():
        for path in files:
            data, labels = _read_batch(path)
            for lo in range(0, len(labels), WRITE_ROWS):
                writer.add(split, _images(data[lo:lo + WRITE_ROWS]), labels[lo:lo + WRITE_ROWS])
    return writer.finish()


def _raw_file(raw: Path, folder: str, name: str) -> Path:
    """raw/<folder>/<name> or raw/<name>, unpacking raw/<folder>.zip first if only that is there."""
    candidates = [raw / folder / name, raw / name]
    archive = raw / f"{folder}.zip"
    if not any(p.is_file() for p in candidates) and archive.is_file():
        unpack(archive, raw)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{candidates[0]} not found: download {folder}.zip from {PAGE} into {raw} "
                            f"(it holds {name})")


def _images(rows: np.ndarray) -> np.ndarray:
    """N × 3072 uint8 (R, G, B planes) -> N × 3 × 32 × 32 float32 in [0, 1]."""
    return rows.reshape(-1, 3, 32, 32).astype(np.float32) / 255


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> data N × 3072 uint8, labels N int64 in 0..999."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()     # latin1: Python 2 pickles' arrays
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], np.int64) - 1
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a downsampled-ImageNet batch file ({type(error).__name__}: {error}): "
                         f"download it again from {PAGE}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: 'data' is {data.dtype} {data.shape} with {len(labels)} labels; expected "
                         f"N × 3072 uint8 and N labels (is this the 32 × 32 variant?)")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels lie in [{labels.min() + 1}, {labels.max() + 1}], expected 1..1000")
    return data, labels


# Exactly what pickled numpy arrays need: the reconstructors of the running numpy, by name.
_NUMPY_GLOBALS = {"_reconstruct": np.ndarray(0).__reduce__()[0],            # protocols 0-4
                  "_frombuffer": np.ndarray(0).__reduce_ex__(5)[0],         # protocol 5
                  "scalar": np.float64(0).__reduce__()[0],
                  "ndarray": np.ndarray, "dtype": np.dtype}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[name]
        if (module, name) == ("_codecs", "encode"):                 # bytes in a Python 3 protocol-2 pickle
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a batch file holds only numpy arrays and lists")
