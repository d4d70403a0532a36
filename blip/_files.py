"""Atomic file writes: a temporary file in the same folder, then a rename.

A reader (or a run resumed after a kill) sees either the old file or the complete new one;
a failed write leaves no partial file behind.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Temporary path next to ``path``; renamed to ``path`` when the block ends without error.

    For writers that want a file name (``savefig``, ``ase.io.write``). The parent folder is
    created if needed; on error the temporary file is removed. ``suffix`` lets writers that
    infer the format from the name (e.g. ".xyz", ".png") see it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_open(path, suffix: str = "", mode: str = "w"):
    """File handle ("w" text or "wb" binary) whose content replaces ``path`` when the block succeeds."""
    with atomic_path(path, suffix) as tmp:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(text)
