"""Files written whole or not at all."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write a temporary file beside `path`, renamed to it once the block ends without an error (and
    removed if it does not): a crash never leaves a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFull(error.errno, f"no space left to write {path} ({shutil.disk_usage(path.parent).free} "
                                        f"bytes free there): free some space or write elsewhere; what was there "
                                        f"before is kept") from None
        raise


class DiskFull(OSError):
    """A file could not be written whole for want of space; the file it was to replace is unchanged."""
