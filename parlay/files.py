"""Writing files so that a reader, or a kill, never sees half of one. The bottom layer."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_lines_atomic(path: str | Path, lines: Iterable[str]) -> None:
    """Replace ``path`` with these lines (each ended by a newline, UTF-8) atomically: a temp file
    in the same folder, fsynced, then renamed over ``path``, so readers see the old or the new
    file. The folder is created if missing; on any error the temp file is removed and the error
    (``OSError``, or whatever iterating ``lines`` raised) propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
