"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    tmp_dir: Path | None = None,
    sync_dir: bool = False,
) -> None:
    """Write ``data`` to a unique temp file (in ``tmp_dir``, which must be on the same file
    system, or beside ``path``), fsync it, and move it over ``path``. The mode is set before the
    first byte, so a key is never readable by others. With ``sync_dir`` the rename itself is
    made durable too.

    A disk that refuses (full, read-only, failing) raises its ``OSError``: the temp file is
    removed, and ``path`` is replaced only if every step up to the rename went through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=tmp_dir or path.parent, prefix=f".{path.name}.", suffix=".partial"
    )
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
