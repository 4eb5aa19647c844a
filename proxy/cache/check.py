"""``detour cache verify``: every blob and manifest in a cache directory checked against the
digest its file is named for, offline or beside a running proxy; what is wrong is deleted, and
a right blob without its chunk checksums (written before Detour kept them) is given them.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from proxy.cache.checksums import ChecksumHasher, Checksums
from proxy.oci import MANIFEST_MAX_BYTES
from proxy.reference import Digest

TMP_STALE_SECONDS = 3600.0  # a temp file untouched this long is no running write's
_VERIFY_READ_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class BadEntry:
    path: Path
    reason: str
    deleted: bool  # False: the disk refused (read-only)


@dataclass
class CacheCheck:
    """What :func:`verify_cache` found: entries checked, the bad ones, temp files removed."""

    blobs: int = 0
    manifests: int = 0
    bad: list[BadEntry] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return sum(entry.deleted for entry in self.bad)


def _entry_problem(kind: str, path: Path) -> tuple[str, os.stat_result] | None:
    """Why the cache file at ``path`` is wrong, with the file checked, or None if it is right.

    Blocking. ``FileNotFoundError`` if it went away meanwhile (a running proxy evicted it).
    """
    hexpart = path.name
    try:
        digest = Digest.parse(f"{path.parent.parent.name}:{hexpart}")
    except ValueError:
        return "not named for a digest", path.stat()
    if path.parent.name != hexpart[:2]:
        return "not in its digest's directory", path.stat()
    hasher = digest.hasher()
    sums = ChecksumHasher()
    with path.open("rb", buffering=0) as file:
        checked = os.fstat(file.fileno())
        if kind == "manifests":
            media_type, sep, body = file.read(MANIFEST_MAX_BYTES + 1024).partition(b"\n")
            if not sep or not media_type.isascii():
                return "no media type line", checked
            hasher.update(body)
        else:
            while chunk := file.read(_VERIFY_READ_BYTES):
                hasher.update(chunk)
                sums.update(chunk)
        if hasher.hexdigest() != digest.hex:
            return f"does not match its digest ({checked.st_size} bytes)", checked
        if kind == "blobs":
            # Right: its checksums, for hits after a restart, if it has none or wrong ones.
            identity = (checked.st_dev, checked.st_ino)
            taken = Checksums(identity, checked.st_size, sums.finish())
            if Checksums.load(file.fileno()) != taken:
                taken.save(file.fileno())
    return None


def _verify_entry(kind: str, path: Path) -> BadEntry | None:
    """Check one file, deleting it if it is wrong (blocking)."""
    try:
        found = _entry_problem(kind, path)
        if found is None:
            return None
        reason, checked = found
        now = path.stat()
    except FileNotFoundError:
        return None  # gone meanwhile (evicted, or dropped by the proxy)
    except OSError as exc:
        return BadEntry(path, f"unreadable: {exc.strerror or exc}", deleted=False)
    if (now.st_dev, now.st_ino) != (checked.st_dev, checked.st_ino):
        return None  # replaced meanwhile (fetched again): the new file is another's to check
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        return BadEntry(path, f"{reason}; not deleted: {exc.strerror or exc}", deleted=False)
    return BadEntry(path, reason, deleted=True)


def verify_cache(
    root: Path, *, threads: int = 4, stale_tmp: float = TMP_STALE_SECONDS
) -> CacheCheck:
    """Check every blob and manifest under ``root`` against the digest its file is named for,
    deleting each one that does not match, and the files under ``tmp/`` untouched for
    ``stale_tmp`` seconds (left by a run that ended mid-write). Blocking; files are hashed in
    ``threads`` worker threads.

    Safe beside a running proxy: a file deleted here is a miss there, fetched again (its size
    stays in that proxy's accounting until the entry is fetched again or evicted); the temp
    files of the proxy's own writes are younger than ``stale_tmp``; and a file replaced while
    it was being checked (fetched again by the proxy) is left alone.
    """
    check = CacheCheck()
    entries = [
        (kind, path)
        for kind in ("blobs", "manifests")
        for path in sorted((root / kind).glob("*/*/*"))
        if path.is_file()
    ]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(lambda entry: _verify_entry(*entry), entries))
    for (kind, _), bad in zip(entries, results, strict=True):
        if kind == "blobs":
            check.blobs += 1
        else:
            check.manifests += 1
        if bad is not None:
            check.bad.append(bad)
    tmp = root / "tmp"
    if tmp.is_dir():
        horizon = time.time() - stale_tmp
        for leftover in sorted(tmp.iterdir()):
            with contextlib.suppress(OSError):
                if leftover.is_file() and leftover.stat().st_mtime < horizon:
                    leftover.unlink()
                    check.leftovers.append(leftover)
    return check
