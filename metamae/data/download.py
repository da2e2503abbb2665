"""Fetch a dataset's raw files from where their publishers host them (needs the internet).

Each file is downloaded under a temporary name and renamed when complete; a file already in place is
kept. Converters never download at run time: `prepare NAME --download` calls this first.
"""
from __future__ import annotations

import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from metamae.data.shards import sha256_of


@dataclass(frozen=True)
class Source:
    url: str
    filename: str
    sha256: Optional[str] = None


def fetch(sources: list[Source], raw: Path) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for source in sources:
        target = raw / source.filename
        if target.exists():
            continue
        partial = target.with_name(target.name + ".part")
        with urllib.request.urlopen(source.url) as response, open(partial, "wb") as f, tqdm(
                total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                desc=source.filename) as bar:
            while chunk := response.read(2**20):
                f.write(chunk)
                bar.update(len(chunk))
        if source.sha256 and sha256_of(partial) != source.sha256:
            partial.unlink()
            raise ValueError(f"{source.url} did not match its expected SHA-256; the download was discarded")
        os.replace(partial, target)


def raw_path(raw: Path, relative: str, source: Source, dataset: str) -> Path:
    """RAW/relative, unpacking `source`'s archive into RAW first when only the archive is there; a
    missing file is an error saying what to download."""
    path, archive = raw / relative, raw / source.filename
    if not path.exists() and archive.is_file():
        unpack(archive, raw)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: download {source.url} into {raw} (it is unpacked there), "
                                f"or run `python -m metamae.data.prepare {dataset} --raw {raw} --download`")
    return path


def unpack(archive: Path, into: Path) -> None:
    """Unpack a .zip/.tar.gz once (a marker file records that it was unpacked)."""
    marker = into / f".unpacked-{archive.name}"
    if not marker.exists():
        shutil.unpack_archive(str(archive), str(into))
        marker.touch()
