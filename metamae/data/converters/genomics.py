"""Genomics OOD (Ren et al. 2019) as shards: 250 bases as tokens A, C, G, T -> 0, 1, 2, 3.

Raw format, either of:

- as published for TFDS (`genomics_ood.zip`, what DABS downloads through `tfds.load('genomics_ood')`):
  tab-separated text with a header `seq, label, seq_info, domain`, `label` a genus name; DABS uses
  `before_2011_in_tr.txt` (TFDS `train`: 10 in-distribution genera, 100,000 sequences each),
  `between_2011-2016_in_val.txt` (`validation`: the same 10 genera, 10,000 each) and
  `between_2011-2016_ood_val.txt` (`validation_ood`: 60 other genera, 10,000 each);
- DABS's own CSV exports of those three splits (`genomicsPretrain.csv`, `genomicsTransferID.csv`,
  `genomicsTransferOOD.csv`, what alinlab/MetaMAE reads): `tfds.as_dataframe(...).to_csv()`, i.e.
  columns `,domain,label,seq,seq_info`, `label` the TFDS class index (0-9 in-distribution, 10-69
  OOD), `seq` written `b'ACGT...'` (hence DABS's `seq[2:252]`).

DABS preprocessing followed (alextamkin/dabs `src/datasets/genomics/genomics.py`, and
alinlab/MetaMAE `data/token.py` with `data/utils.py`): bases A, C, G, T -> 0..3 (token ids, which
no reader standardises), any other base an error; labels the TFDS class index, minus 10 for the OOD
genera (-> 0..59); each file shuffled with `df.sample(frac=1, random_state=42)` and split into its
first ceil(0.9 n) rows (train) and the rest (DABS's val), as `higgs.dabs_train_mask` computes.

Output: `out` is the 10-class dataset: `train`/`test` from the pretraining file (DABS's
GenomicsPretrain train/val), `transfer_train`/`transfer_test` from the in-distribution validation file
(GenomicsTransferID). `out/ood` is a dataset of its own with 60 classes (GenomicsTransferOOD):
`train`/`test`. Within a split rows keep their order in the file; `id` is the row's 0-based index.

From DABS's CSVs the splits are DABS's, row for row. From the published files they are the same
rule applied to the file order, while DABS shuffled the TFDS order (a hash of each row's number):
the same classes and sizes, other rows. Files are streamed in blocks of BLOCK_BYTES, twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

from metamae.data.converters.higgs import dabs_train_mask
from metamae.data.download import Source, unpack
from metamae.data.shards import DEFAULT_SHARD_BYTES, Manifest, ShardWriter
from metamae.modality import TokenSpec

URL = "https://storage.googleapis.com/tfds-data/downloads/genomics_ood/genomics_ood.zip"
SOURCES = [Source(URL, "genomics_ood.zip")]

GENERA_IN = ("Bacillus", "Burkholderia", "Clostridium", "Escherichia", "Mycobacterium", "Pseudomonas",
             "Salmonella", "Staphylococcus", "Streptococcus", "Yersinia")
GENERA_OOD = (                                            # TFDS classes 10-69 (validation_ood)
    "Actinoplanes", "Advenella", "Alicycliphilus", "Altererythrobacter", "Anabaena", "Archangium",
    "Bibersteinia", "Blastochloris", "Calothrix", "Carnobacterium", "Cedecea", "Cellulophaga",
    "Chondromyces", "Chryseobacterium", "Collimonas", "Corallococcus", "Cyclobacterium", "Dehalobacter",
    "Desulfosporosinus", "Devosia", "Dyella", "Elizabethkingia", "Glaciecola", "Granulicella",
    "Haliscomenobacter", "Hymenobacter", "Kibdelosporangium", "Kutzneria", "Labilithrix", "Leptolyngbya",
    "Leptospirillum", "Lysobacter", "Mannheimia", "Massilia", "Methanobacterium", "Microbacterium",
    "Myroides", "Neorhizobium", "Niastella", "Oblitimonas", "Octadecabacter", "Oscillatoria", "Pandoraea",
    "Pelosinus", "Phaeobacter", "Piscirickettsia", "Planococcus", "Pseudonocardia", "Pseudoxanthomonas",
    "Rahnella", "Raoultella", "Rufibacter", "Saccharothrix", "Sandaracinus", "Singulisphaera",
    "Sphaerochaeta", "Sphingobacterium", "Spiroplasma", "Tannerella", "Terriglobus")
GENERA = GENERA_IN + GENERA_OOD                           # position = TFDS class index

# part: (published file, DABS's CSV, first TFDS class, classes, output splits)
PARTS = {
    "pretrain": ("before_2011_in_tr.txt", "genomicsPretrain.csv", 0, 10, ("train", "test")),
    "transfer": ("between_2011-2016_in_val.txt", "genomicsTransferID.csv", 0, 10,
                 ("transfer_train", "transfer_test")),
    "ood": ("between_2011-2016_ood_val.txt", "genomicsTransferOOD.csv", 10, 60, ("train", "test")),
}
SPEC = TokenSpec(vocab=4, length=250)
BASES = "ACGT"
BLOCK_BYTES = 64 * 2**20


def convert(raw: Path, out: Path = Path("data/genomics"), shard_bytes: int = DEFAULT_SHARD_BYTES,
            overwrite: bool = False) -> Manifest:
    files, published = raw_files(Path(raw))
    out = Path(out)
    main = ShardWriter(out, "genomics", SPEC, num_classes=10, metric="accuracy",
                       converter=_parameters(files, published, "pretrain", "transfer"),
                       shard_bytes=shard_bytes, overwrite=overwrite)
    # The main manifest, written last, marks the whole conversion complete: out/ood is rewritten.
    ood = ShardWriter(out / "ood", "genomics_ood", SPEC, num_classes=60, metric="accuracy",
                      converter=_parameters(files, published, "ood"), shard_bytes=shard_bytes, overwrite=True)
    write_part(ood, files["ood"], published, "ood")
    ood.finish()
    for part in ("pretrain", "transfer"):
        write_part(main, files[part], published, part)
    return main.finish()


def _parameters(files: dict[str, Path], published: bool, *parts: str) -> dict:
    return {"source": URL if published else "DABS's tfds.as_dataframe(...).to_csv() of genomics_ood",
            "reference": "alextamkin/dabs src/datasets/genomics/genomics.py; alinlab/MetaMAE data/token.py",
            "files": {p: files[p].name for p in parts},
            "splits": {p: list(PARTS[p][4]) for p in parts},
            "tokens": {b: i for i, b in enumerate(BASES)},
            "labels": {p: f"TFDS class index - {PARTS[p][2]}" for p in parts},
            "split": "per file: rows of np.random.RandomState(42).permutation(n)[:ceil(0.9 n)] train, "
                     "the rest test (pandas df.sample(frac=1, random_state=42))",
            **({"ood_transfer": "ood/ (its own manifest: 60 classes)"} if "pretrain" in parts else {}),
            "ids": "0-based row index in the file"}


def write_part(writer: ShardWriter, path: Path, published: bool, part: str) -> None:
    """One file -> its two splits, rows in file order."""
    first, classes, splits = PARTS[part][2:]
    n = sum(len(labels) for labels, _ in read_blocks(path, published, labels_only=True))
    if n == 0:
        raise ValueError(f"{path} has no rows")
    train = dabs_train_mask(n)
    start = 0
    for labels, tokens in read_blocks(path, published):
        rows = np.arange(start, start + len(labels))
        labels = labels - first
        if labels.min() < 0 or labels.max() >= classes:
            bad = rows[(labels < 0) | (labels >= classes)][0]
            raise ValueError(f"{path}: data row {bad + 1} is of class {labels[bad - start] + first}, not one "
                             f"of the {part} classes {first}-{first + classes - 1}")
        for split, take in zip(splits, (train[rows], ~train[rows])):
            if take.any():
                writer.add(split, tokens[take], labels[take], ids=rows[take])
        start += len(labels)


# --------------------------------------------------------------------------------------------
# Raw files
# --------------------------------------------------------------------------------------------

def raw_files(raw: Path) -> tuple[dict[str, Path], bool]:
    """part -> its file, and whether they are the published files (else DABS's CSVs). A complete
    set of DABS's CSVs is taken first; genomics_ood.zip is unpacked when its files are missing."""
    def find(column: int) -> dict[str, Path]:
        found = {part: next(iter(sorted(raw.rglob(names[column]))), None) for part, names in PARTS.items()}
        return found if all(found.values()) else {}

    if dabs := find(1):
        return dabs, False
    if not find(0) and (raw / SOURCES[0].filename).is_file():
        unpack(raw / SOURCES[0].filename, raw)
    if published := find(0):
        return published, True
    raise FileNotFoundError(
        f"Genomics OOD: {raw} holds neither the published files ({', '.join(p[0] for p in PARTS.values())}: "
        f"download {URL} there, `python -m metamae.data.prepare genomics --download`) nor DABS's CSV "
        f"exports ({', '.join(p[1] for p in PARTS.values())})")


def read_blocks(path: Path, published: bool, labels_only: bool = False):
    """Stream a file -> (labels: B TFDS class indices, tokens: B × 250 int8, or None) per block."""
    label_type = pa.string() if published else pa.int64()
    options = pv.ConvertOptions(column_types={"seq": pa.string(), "label": label_type},
                                include_columns=["label"] if labels_only else ["label", "seq"])
    parse = pv.ParseOptions(delimiter="\t" if published else ",")
    line = 2                                               # line 1 is the header
    try:
        reader = pv.open_csv(str(path), read_options=pv.ReadOptions(block_size=BLOCK_BYTES),
                             parse_options=parse, convert_options=options)
        for batch in reader:
            labels = _labels(batch.column("label"), published, line)
            yield labels, None if labels_only else _tokens(batch.column("seq"), line)
            line += batch.num_rows
    except (pa.ArrowInvalid, KeyError, ValueError) as error:
        layout = ("tab-separated, header seq, label, seq_info, domain" if published
                  else "DABS's CSV export: columns ,domain,label,seq,seq_info")
        raise ValueError(f"{path} is not a Genomics OOD file ({layout}): {error}") from error


def _labels(column: pa.Array, published: bool, line: int) -> np.ndarray:
    """Labels of a block whose first row is on `line` -> B TFDS class indices."""
    if column.null_count:
        raise ValueError(f"line {line + np.flatnonzero(pc.is_null(column).to_numpy(False))[0]} has no label")
    if not published:
        return column.to_numpy()
    index = pc.index_in(column, value_set=pa.array(GENERA))
    if index.null_count:
        row = np.flatnonzero(pc.is_null(index).to_numpy(False))[0]
        raise ValueError(f"line {line + row} has label {column[row]}, none of the 70 genera of TFDS's "
                         f"train/validation splits")
    return index.to_numpy().astype(np.int64)


def _tokens(column: pa.Array, line: int) -> np.ndarray:
    """Sequences of a block whose first row is on `line`, bare or written b'...' -> B × 250 tokens."""
    seqs = pc.replace_substring_regex(column, pattern=r"^b'(.*)'$", replacement=r"\1").to_pylist()
    lengths = np.array([len(s or "") for s in seqs])
    if np.any(lengths != SPEC.length):
        row = int(np.argmax(lengths != SPEC.length))
        raise ValueError(f"line {line + row} has {lengths[row]} bases, not {SPEC.length}")
    codes = np.frombuffer("".join(seqs).encode("ascii", errors="replace"), np.uint8).reshape(-1, SPEC.length)
    lookup = np.full(256, -1, np.int8)
    lookup[np.frombuffer(BASES.encode(), np.uint8)] = np.arange(len(BASES))
    tokens = lookup[codes]                                                        # B × 250
    if np.any(tokens < 0):
        row, col = np.argwhere(tokens < 0)[0]
        raise ValueError(f"line {line + row} has base {seqs[row][col]!r} at position {col + 1}, not one "
                         f"of {', '.join(BASES)}")
    return tokens
