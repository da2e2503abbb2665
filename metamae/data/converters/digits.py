"""The embedded digits as shards: the same examples and split as metamae.data.digits."""
from pathlib import Path

from metamae.data.digits import digits
from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, ShardWriter

SOURCES = []
NEEDS_RAW = False     # bundled with scikit-learn


def convert(raw: Path = None, out: Path = Path("data/digits"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False) -> Manifest:
    data = digits()
    writer = ShardWriter(out, "digits", data.spec, num_classes=10, metric="accuracy",
                         converter={"source": "sklearn.datasets.load_digits", "scale": "x / 16"},
                         shard_bytes=shard_bytes, overwrite=overwrite)
    writer.add("train", data.train.x, data.train.y)
    writer.add("test", data.test.x, data.test.y)
    return writer.finish()
