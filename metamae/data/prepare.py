"""Prepare a dataset as Parquet shards, or check a prepared one.

    python -m metamae.data.prepare DATASET --raw DIR --out DIR [--download] [--overwrite] [--verify]
    python -m metamae.data.prepare custom (--npz FILE | --csv FILE | --npy-dir DIR)
        --modality timeseries|tabular|tokens|image [--patch P] [--vocab V] [--name NAME]
        [--metric METRIC] [--num-classes K] [--no-standardize] --out DIR
    python -m metamae.data.prepare verify --out DIR

A folder that already holds a complete dataset is kept (pass --overwrite to convert again: the new
dataset is written beside it and replaces it only once complete, so a failed conversion keeps the old
one); one that holds an unfinished conversion is cleared first. --verify re-reads every shard against
the manifest: row counts, SHA-256, schema and shapes, label ranges, finite inputs and token ids inside
the vocabulary.

custom stores float inputs as given, with each channel's mean and std over the train split, which
every reader standardises with (--no-standardize: none, the inputs are read as given). --name names
the dataset: `dataset=custom dataset.path=DIR` runs and sweeps go under it. Class labels run over
0..K-1, K the largest label + 1: a class with no example is refused unless --num-classes K says the
classes are real, and labels of K or more are refused.

Bad input, an unreadable file and an output folder that cannot be written end the run with one line,
`error: ...`, naming the file, array or folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metamae.data import download
from metamae.data.converters import CONVERTERS, converter, custom
from metamae.data.shards import DEFAULT_SHARD_BYTES, MANIFEST, Manifest, check_shards


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m metamae.data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help=f"one of {sorted(CONVERTERS)}, 'custom' or 'verify'")
    parser.add_argument("--out", type=Path, required=True, help="the dataset folder to write or check")
    parser.add_argument("--raw", type=Path, help="the folder holding the publisher's raw files")
    parser.add_argument("--download", action="store_true", help="fetch the raw files into --raw first")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete dataset in --out")
    parser.add_argument("--verify", action="store_true", help="re-read every shard against the manifest")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20, help="target shard size")
    own = parser.add_argument_group("custom: your own arrays")
    own.add_argument("--npz", type=Path, help="arrays X, y [, train_idx, test_idx]")
    own.add_argument("--csv", type=Path, help="a table with a 'label' column (--label-column)")
    own.add_argument("--npy-dir", type=Path, help="a folder of X.npy, y.npy [, train_idx.npy, test_idx.npy]")
    own.add_argument("--label-column", default="label")
    own.add_argument("--modality", choices=custom.MODALITIES)
    own.add_argument("--patch", type=int)
    own.add_argument("--vocab", type=int)
    own.add_argument("--name", default="custom", help="the dataset's name: runs/NAME, sweeps/.../NAME")
    own.add_argument("--no-standardize", dest="standardize", action="store_false",
                     help="store no per-channel statistics: inputs are read as given")
    own.add_argument("--metric", default="accuracy")
    own.add_argument("--num-classes", type=int, help="class labels: K classes, labels 0..K-1, some maybe absent")
    own.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def prepare_custom(args: argparse.Namespace, shard_bytes: int) -> Manifest:
    sources = [s for s in (args.npz, args.csv, args.npy_dir) if s is not None]
    if len(sources) != 1:
        raise SystemExit("custom: give exactly one of --npz, --csv, --npy-dir")
    if args.csv is not None:
        arrays, modality = custom.read_csv(args.csv, args.label_column), args.modality or "tabular"
    else:
        arrays = custom.read_npz(args.npz) if args.npz else custom.read_npy_dir(args.npy_dir)
        modality = args.modality
        if modality is None:
            raise SystemExit("custom: --modality is required for --npz and --npy-dir")
    return custom.convert_arrays(arrays["X"], arrays["y"], modality, args.out, name=args.name, patch=args.patch,
                                 vocab=args.vocab, train_idx=arrays.get("train_idx"),
                                 test_idx=arrays.get("test_idx"), metric=args.metric,
                                 num_classes=args.num_classes, seed=args.seed, source=str(sources[0]),
                                 standardize=args.standardize, shard_bytes=shard_bytes, overwrite=args.overwrite)


def main(argv=None) -> None:
    args = parse(argv)
    try:
        run(args)
    except (OSError, ValueError) as error:          # OSError: a file or folder that cannot be read or written
        sys.exit(f"error: {error}")


def run(args: argparse.Namespace) -> None:
    shard_bytes = int(args.shard_mb * 2**20)
    complete = (args.out / MANIFEST).is_file()
    if args.dataset == "verify" or (complete and args.verify and not args.overwrite):
        pass
    elif args.dataset == "custom":
        prepare_custom(args, shard_bytes)
    else:
        chosen = converter(args.dataset)
        if complete and not args.overwrite:
            sys.exit(f"{args.out} already holds a prepared dataset; pass --overwrite to convert again, "
                     f"or --verify to check it")
        if args.raw is None and chosen.needs_raw:
            sys.exit(f"{args.dataset}: --raw DIR is required (the folder with the publisher's files)")
        if args.download and chosen.sources:          # the digits come with scikit-learn: nothing to fetch
            download.fetch(chosen.sources, args.raw)
        chosen.convert(args.raw, args.out, shard_bytes=shard_bytes, overwrite=args.overwrite)
    if args.verify or args.dataset == "verify":
        manifest = Manifest.load(args.out)
        check_shards(args.out, manifest, full=True)
        print(f"{args.out}: {manifest.name} verified, "
              + ", ".join(f"{split} {manifest.rows(split)} rows in {len(shards)} shards"
                          for split, shards in manifest.splits.items()))


if __name__ == "__main__":
    main()
