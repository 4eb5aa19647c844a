"""The on-disk cache: blobs and manifests by digest, tags mapped to digests.

Layout under ``cache.dir``::

    blobs/sha256/ab/ab12…        verified blob bytes
    manifests/sha256/ab/ab12…    "<media type>\\n<manifest bytes>"
    tags/<sha256 of name:tag>    JSON TagRecord
    tmp/                         files being written; emptied at start-up, never served

Every file is written under ``tmp/`` in the same file system, fsynced, and moved into place
with ``os.replace``, so a reader sees a whole verified file or none. Paths are built only from
validated digests and from hashes of names, never from request text.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from proxy.core.blob_writer import BlobWriter, BlobWrites, Checksums
from proxy.core.cache_index import CacheIndex
from proxy.errors import UpstreamInvalid
from proxy.files import write_atomic
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.oci import MANIFEST_MAX_BYTES, StoredManifest
from proxy.reference import Digest, ImageName

log = get_logger("detour.cache")


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: Digest
    media_type: str
    checked_at: float  # time.time() when the upstream last confirmed it

    def age(self) -> float:
        return time.time() - self.checked_at


def delete_files(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):  # gone already, or a read-only disk
            path.unlink()


def write_failure_reason(exc: OSError) -> str:
    """The ``reason`` a cache write the disk refused is counted under."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    if exc.errno == errno.EROFS:
        return "read_only"
    return "io_error"


def cache_write_failed(
    metrics: Metrics, exc: OSError, kind: str, action: str, **fields: str
) -> None:
    """Count and log a write (or removal) the cache's disk refused: full, read-only, failing.

    Never an error for the client: the caller serves what it has without caching it (the
    ``action``), and the next miss tries the disk again, so space coming back is enough.
    """
    reason = write_failure_reason(exc)
    metrics.cache_write_failures.labels(reason).inc()
    log.warning(
        "cache_write_failed",
        kind=kind,
        reason=reason,
        error=exc.strerror or str(exc),
        action=action,
        **fields,
    )


class CacheStore(CacheIndex):
    """The files, and (as a :class:`CacheIndex`) the LRU index of the blobs and manifests
    among them, rebuilt from the disk at start-up (recency from mtimes, which hits refresh), so
    it survives a restart or a crash."""

    def __init__(
        self,
        root: Path,
        max_size: int | None = None,
        on_evict: Callable[[list[Path]], None] = lambda paths: delete_files(paths),
    ) -> None:
        super().__init__(max_size, on_evict)
        self.root = root
        self.tmp = root / "tmp"
        self.blob_writes = BlobWrites(root)

    def open(self) -> None:
        """Create the layout, remove what a previous run left half-written, index the rest.

        Blocking: call it from a worker thread.
        """
        for sub in ("blobs", "manifests", "tags", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        found: list[tuple[float, Path, int]] = []
        for kind in ("blobs", "manifests"):
            for path in (self.root / kind).glob("*/*/*"):
                with contextlib.suppress(OSError):
                    stat = path.stat()
                    found.append((stat.st_mtime, path, stat.st_size))
        found.sort()
        self.load((path, size) for _, path, size in found)

    def writable(self) -> bool:
        """Whether a byte can be written and flushed here (a full disk can't)."""
        try:
            with tempfile.NamedTemporaryFile(dir=self.tmp, suffix=".probe") as probe:
                probe.write(b"\0")
                probe.flush()
                os.fsync(probe.fileno())
                return True
        except OSError:
            return False

    # ----------------------------------------------------------------------- blobs

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def begin_blob(self, digest: Digest) -> BlobWriter:
        return BlobWriter(digest, self.blob_path(digest), self.tmp, self.blob_writes)

    async def commit_blob(self, writer: BlobWriter, reserved: int) -> Checksums:
        """Put a blob whose digest matched into the cache: flushed to the disk and moved into
        place in a worker thread, then indexed under the ``reserved`` bytes it was written
        under. ``OSError`` when the disk refuses (the caller keeps the reservation to release
        with the discarded file); the checksums its hits are checked against otherwise."""
        await asyncio.get_running_loop().run_in_executor(None, writer.commit)
        self.admit(writer.final, writer.size, reserved)
        assert writer.checksums is not None
        return writer.checksums

    # ----------------------------------------------------------------------- manifests

    def _manifest_path(self, digest: Digest) -> Path:
        return self.root / "manifests" / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest(self, digest: Digest) -> StoredManifest | None:
        """The stored manifest, re-verified (it is small, and this is what clients trust).

        One that can't be read, or fails its digest, is a miss (and the bad file is removed
        if the disk lets us): the caller fetches it again.
        """
        try:
            raw = self._manifest_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning(
                "cache_read_failed",
                kind="manifest",
                digest=str(digest),
                error=exc.strerror or str(exc),
                action="fetching it again",
            )
            return None
        media_type, sep, body = raw.partition(b"\n")
        if not sep or Digest.of(body, digest.algorithm) != digest:
            with contextlib.suppress(OSError):  # read-only: it stays, and stays a miss
                self._manifest_path(digest).unlink()
            return None
        self.touch(self._manifest_path(digest))
        return StoredManifest(digest, media_type.decode("ascii", "replace"), body)

    async def put_manifest(self, manifest: StoredManifest) -> None:
        """Store a verified manifest: written and fsynced in a worker thread, then indexed.

        ``OSError`` when the disk refuses it (full, read-only, failing): then nothing is
        indexed and no temp file is left (see :func:`cache_write_failed`).
        """
        if Digest.of(manifest.body, manifest.digest.algorithm) != manifest.digest:
            raise UpstreamInvalid("manifest does not match its digest")
        if "\n" in manifest.media_type or not manifest.media_type.isascii():
            raise UpstreamInvalid("invalid manifest media type")
        data = manifest.media_type.encode("ascii") + b"\n" + manifest.body
        path = self._manifest_path(manifest.digest)
        await asyncio.to_thread(write_atomic, path, data, tmp_dir=self.tmp)
        self.admit(path, len(data))

    # ----------------------------------------------------------------------- tags

    def _tag_path(self, name: ImageName, tag: str, variant: str | None) -> Path:
        key_text = f"{name}:{tag}" if variant is None else f"{name}:{tag}#{variant}"
        key = hashlib.sha256(key_text.encode()).hexdigest()
        return self.root / "tags" / key[:2] / key

    def tag(self, name: ImageName, tag: str, variant: str | None = None) -> TagRecord | None:
        """What ``name:tag`` resolved to: the tag's own record, or with ``variant`` the answer
        narrowed for one ``Accept`` (see :attr:`proxy.core.manifests.Accept.variant`)."""
        try:
            data = json.loads(self._tag_path(name, tag, variant).read_bytes())
            if (data["name"], data["tag"], data.get("variant")) != (str(name), tag, variant):
                return None
            return TagRecord(
                Digest.parse(data["digest"]), str(data["media_type"]), float(data["checked_at"])
            )
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    async def put_tag(
        self, name: ImageName, tag: str, record: TagRecord, variant: str | None = None
    ) -> None:
        """Record what ``name:tag`` resolved to (in a worker thread); ``OSError`` when the
        disk refuses it."""
        data = {
            "name": str(name),
            "tag": tag,
            "variant": variant,
            "digest": str(record.digest),
            "media_type": record.media_type,
            "checked_at": record.checked_at,
        }
        path = self._tag_path(name, tag, variant)
        await asyncio.to_thread(write_atomic, path, json.dumps(data).encode(), tmp_dir=self.tmp)

    async def drop_tag(self, name: ImageName, tag: str, variant: str | None = None) -> None:
        """Forget ``name:tag`` (in a worker thread); ``OSError`` when the disk refuses (a
        read-only one)."""
        await asyncio.to_thread(self._tag_path(name, tag, variant).unlink, missing_ok=True)

    def drop(self, path: Path) -> bool:
        """Forget an entry and delete its file (found not to match its digest), so the next
        request for it fetches it again; a reader that has the file open keeps its copy.
        False if the disk would not let go of the file (a read-only one)."""
        self.forget(path)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            return False
        return True

    async def remove(self, paths: Iterable[Path]) -> Removal:
        """Delete files an operator asked to remove (``detour cache rm`` and ``prune``): tag
        records, manifests, blobs, in the order given, each forgotten by the index as it goes.

        A pinned entry is left alone (``busy``): its pin may be a fetch's reader that opens the
        file by its path later. Each other file is first renamed into ``tmp/``, in the event
        loop, with nothing in between its pin check and the rename, so from that moment every
        request is a miss that fetches it again, while a response already sending it keeps its
        open file; the renamed files are then deleted in a worker thread (or, after a crash, at
        the next start). ``total`` drops by what the index counted for each one. The event loop
        is let go every ``_REMOVE_BATCH`` files (a rename takes some 25 µs).
        """
        removal = Removal()
        with contextlib.suppress(OSError):  # then each rename fails, and says why
            self.tmp.mkdir(parents=True, exist_ok=True)
        trash: list[Path] = []
        for done, path in enumerate(paths, start=1):
            if done % _REMOVE_BATCH == 0:
                await asyncio.sleep(0)
            if self.in_use(path):
                removal.busy.append(path)
                continue
            hidden = self.tmp / f"{path.name[:16]}.{os.urandom(6).hex()}.removed"
            try:
                size = path.stat().st_size
                os.rename(path, hidden)
            except FileNotFoundError:
                self.forget(path)  # gone already: forget it too
                continue
            except OSError as exc:
                removal.failed.append((path, exc.strerror or str(exc)))
                continue
            self.forget(path)
            removal.removed.append((path, size))
            trash.append(hidden)
        if trash:
            await asyncio.to_thread(delete_files, trash)
        return removal


_REMOVE_BATCH = 256


@dataclass
class Removal:
    """What :meth:`CacheStore.remove` did: the files removed (with their sizes), those left
    because a reader has them pinned, and those the disk would not let go of."""

    removed: list[tuple[Path, int]] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- detour cache verify

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
    if hasher.hexdigest() != digest.hex:
        return f"does not match its digest ({checked.st_size} bytes)", checked
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
