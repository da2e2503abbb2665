"""Which Arrow encoding to store fixed-shape example tensors in: measured, not guessed.

Writes the same PAMAP2-shaped float32 examples (N × 52 × 320) to Parquet three ways and reads
them back into one N × 52 × 320 numpy array:
  - fixed_size_list: FixedSizeList<float32>[C·L], decoded by flattening the column;
  - binary:          one bytes value per example, decoded with numpy.frombuffer over the buffer
                     (metamae.data.shards.Column, what the shards use);
  - tensor:          Arrow's FixedShapeTensorType extension type, decoded by to_numpy_ndarray().
Prints JSON: write and read+decode MB/s, file size, per encoding (median of 5 reads).

    .venv/bin/python bench/encoding.py [--rows 4096]
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metamae.data.shards import Column

SHAPE = (52, 320)
COLUMN = Column("x", SHAPE, "float32")          # the library's encoding, measured as it runs


def encode(kind: str, x: np.ndarray) -> pa.Array:
    flat = pa.array(x.reshape(-1), type=pa.float32())
    if kind == "fixed_size_list":
        return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(SHAPE)))
    if kind == "binary":
        return COLUMN.encode(x)
    storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(SHAPE)))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), SHAPE), storage)


def decode(kind: str, column: pa.ChunkedArray) -> np.ndarray:
    column = column.combine_chunks()
    if kind == "fixed_size_list":
        return column.flatten().to_numpy().reshape(-1, *SHAPE)
    if kind == "binary":
        return COLUMN.decode(column)
    return column.to_numpy_ndarray()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4096)
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, *SHAPE)).astype(np.float32)
    megabytes = x.nbytes / 2**20
    report = {"rows": args.rows, "shape": SHAPE, "raw_mb": round(megabytes, 1), "encodings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("fixed_size_list", "binary", "tensor"):
            path = Path(tmp) / f"{kind}.parquet"
            start = time.perf_counter()
            pq.write_table(pa.table({"x": encode(kind, x)}), path, row_group_size=512, compression="none")
            write_s = time.perf_counter() - start
            reads = []
            for _ in range(5):
                start = time.perf_counter()
                decoded = decode(kind, pq.read_table(path, columns=["x"])["x"])
                reads.append(time.perf_counter() - start)
            assert np.array_equal(decoded, x), kind
            report["encodings"][kind] = {
                "write_mb_per_s": round(megabytes / write_s),
                "read_decode_mb_per_s": round(megabytes / statistics.median(reads)),
                "file_mb": round(path.stat().st_size / 2**20, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
