"""Converters from each dataset's raw files, as its publisher distributes them, to shards.

Each module here defines

    SOURCES: list[download.Source]       where the raw files are published (empty: nothing to fetch)
    def convert(raw: Path, out: Path, shard_bytes: int, overwrite: bool) -> Manifest

and `python -m metamae.data.prepare NAME --raw DIR --out DIR` runs it.
"""
import importlib

CONVERTERS = {
    "digits": "metamae.data.converters.digits",
    "pamap2": "metamae.data.converters.pamap2",
    "higgs": "metamae.data.converters.higgs",
    "genomics": "metamae.data.converters.genomics",
    "pfam": "metamae.data.converters.pfam",
    "imagenet32": "metamae.data.converters.imagenet32",
    "wafermap": "metamae.data.converters.wafermap",
    "librispeech": "metamae.data.converters.librispeech",
    "mscoco": "metamae.data.converters.mscoco",
    "vqa": "metamae.data.converters.vqa",
}


def converter(name: str):
    if name not in CONVERTERS:
        raise ValueError(f"no converter for {name!r}; known: {sorted(CONVERTERS)} (or 'custom' for your own arrays)")
    return importlib.import_module(CONVERTERS[name])
