"""Converters from each dataset's raw files, as its publisher distributes them, to shards.

Each module here defines

    SOURCES: list[download.Source]       where the raw files are published (empty: fetch by hand)
    NEEDS_RAW = False                    (optional) for data that comes with a package
    def convert(raw: Path, out: Path, shard_bytes: int, overwrite: bool[, task: str]) -> Manifest

and `python -m metamae.data.prepare NAME --raw DIR --out DIR` runs it. A module that writes several
datasets from one publisher's files (Pfam's protein tasks, WaferMap's labelled and unlabelled
wafers) takes a `task`, and each task has its own name here.
"""
import importlib
from dataclasses import dataclass
from functools import partial
from typing import Callable

from metamae.data.download import Source

CONVERTERS = {                     # name -> "module" or "module:task"
    "digits": "metamae.data.converters.digits",
    "pamap2": "metamae.data.converters.pamap2",
    "higgs": "metamae.data.converters.higgs",
    "genomics": "metamae.data.converters.genomics",
    "pfam": "metamae.data.converters.pfam:pfam",
    "pfam_transfer": "metamae.data.converters.pfam:pfam_transfer",
    "scop": "metamae.data.converters.pfam:scop",
    "secondary_struct": "metamae.data.converters.pfam:secondary_struct",
    "stability": "metamae.data.converters.pfam:stability",
    "fluorescence": "metamae.data.converters.pfam:fluorescence",
    "imagenet32": "metamae.data.converters.imagenet32",
    "wafermap": "metamae.data.converters.wafermap:wafermap",
    "wafermap_pretrain": "metamae.data.converters.wafermap:wafermap_pretrain",
    "librispeech": "metamae.data.converters.librispeech",
    "mscoco": "metamae.data.converters.mscoco",
    "vqa": "metamae.data.converters.vqa",
}


@dataclass
class Converter:
    sources: list[Source]
    convert: Callable
    needs_raw: bool = True           # False: the data comes with a package (the digits)


def converter(name: str) -> Converter:
    if name not in CONVERTERS:
        raise ValueError(f"no converter for {name!r}; known: {sorted(CONVERTERS)} (or 'custom' for your own arrays)")
    module_name, _, task = CONVERTERS[name].partition(":")
    module = importlib.import_module(module_name)
    needs_raw = getattr(module, "NEEDS_RAW", True)
    if not task:
        return Converter(module.SOURCES, module.convert, needs_raw)
    sources = getattr(module, "TASK_SOURCES", {}).get(task, module.SOURCES)
    return Converter(sources, partial(module.convert, task=task), needs_raw)
