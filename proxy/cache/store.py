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
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from proxy.cache.index import CacheIndex
from proxy.cache.write_mode import WriteMode
from proxy.errors import UpstreamInvalid
from proxy.files import write_atomic
from proxy.logs import get_logger
from proxy.memory import RECENT_MANIFEST_BYTES, RECENT_TAGS, WRITE_BUFFER_BYTES
from proxy.metrics import Metrics
from proxy.oci import StoredManifest
from proxy.reference import Digest, ImageName

log = get_logger("detour.cache")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TagRecord:
    digest: Digest
    media_type: str
    checked_at: float  # time.time() when the upstream last confirmed it

    def age(self) -> float:
        return time.time() - self.checked_at


def writable(directory: Path) -> bool:
    """Whether a byte can be written and flushed in ``directory`` (a full disk can't); for
    ``/readyz`` (blocking)."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".probe") as probe:
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())
            return True
    except OSError:
        return False


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


# What was last read from the disk, kept in memory (up to RECENT_MANIFEST_BYTES of manifests
# and RECENT_TAGS tag records): a manifest (verified when read; it is content-addressed, so only
# its leaving the cache can make a kept one wrong to serve) and a tag record (replaced or
# dropped only through this store). A hit by digest, or by a tag within its tag_ttl, then needs
# no disk at all. A change made to the directory behind a running proxy's back (not through its
# /_detour/cache endpoint) is seen once the entry leaves memory.


class Recent(Generic[T]):
    """Values by path, least recently used first, at most ``budget`` of their ``weight``."""

    def __init__(self, budget: int, weight: Callable[[T], int]) -> None:
        self._budget = budget
        self._weight = weight
        self._kept: OrderedDict[Path, T] = OrderedDict()
        self._total = 0

    def get(self, path: Path) -> T | None:
        found = self._kept.get(path)
        if found is not None:
            self._kept.move_to_end(path)
        return found

    def put(self, path: Path, value: T) -> None:
        self.pop(path)
        if self._weight(value) > self._budget:
            return
        self._kept[path] = value
        self._total += self._weight(value)
        while self._total > self._budget:
            _, oldest = self._kept.popitem(last=False)
            self._total -= self._weight(oldest)

    def pop(self, path: Path) -> None:
        gone = self._kept.pop(path, None)
        if gone is not None:
            self._total -= self._weight(gone)


class CacheStore(CacheIndex):
    """The files, and (as a :class:`CacheIndex`) the LRU index of the blobs and manifests
    among them, rebuilt from the disk at start-up (recency from mtimes, which hits refresh), so
    it survives a restart or a crash."""

    def __init__(
        self,
        root: Path,
        max_size: int | None = None,
        on_evict: Callable[[list[Path]], None] = lambda paths: delete_files(paths),
        read_back_up_to: int = 0,
        write_behind: int = 1 << 30,
        write_buffer: int = WRITE_BUFFER_BYTES,
    ) -> None:
        super().__init__(max_size, on_evict)
        self.root = root
        self.tmp = root / "tmp"
        self.write_mode = WriteMode(root, read_back_up_to, write_behind, write_buffer)
        self._manifests: Recent[StoredManifest] = Recent(
            RECENT_MANIFEST_BYTES, lambda manifest: len(manifest.body)
        )
        self._tags: Recent[TagRecord] = Recent(RECENT_TAGS, lambda _: 1)

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

    # ----------------------------------------------------------------------- blobs

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    # ----------------------------------------------------------------------- manifests

    def _manifest_path(self, digest: Digest) -> Path:
        return self.root / "manifests" / digest.algorithm / digest.hex[:2] / digest.hex

    async def manifest(self, digest: Digest) -> StoredManifest | None:
        """The stored manifest: from memory if it was read lately, else read and verified
        against its digest (it is small, and this is what clients trust) in a worker thread.

        One that can't be read, or fails its digest, is a miss (and the bad file is removed
        if the disk lets us): the caller fetches it again.
        """
        path = self._manifest_path(digest)
        found = self._manifests.get(path)
        if found is None:
            found = await asyncio.to_thread(_read_manifest, path, digest)
            if found is not None and path in self._entries:
                self._manifests.put(path, found)
        if found is not None:
            self.touch_index(path)
        return found

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

    def forgotten(self, path: Path) -> None:
        self._manifests.pop(path)

    # ----------------------------------------------------------------------- tags

    def _tag_path(self, name: ImageName, tag: str, variant: str | None) -> Path:
        key_text = f"{name}:{tag}" if variant is None else f"{name}:{tag}#{variant}"
        key = hashlib.sha256(key_text.encode()).hexdigest()
        return self.root / "tags" / key[:2] / key

    async def tag(self, name: ImageName, tag: str, variant: str | None = None) -> TagRecord | None:
        """What ``name:tag`` resolved to: the tag's own record, or with ``variant`` the answer
        narrowed for one ``Accept`` (see :attr:`proxy.oci.Accept.variant`); read in a worker
        thread."""
        path = self._tag_path(name, tag, variant)
        found = self._tags.get(path)
        if found is None:
            found = await asyncio.to_thread(_read_tag, path, (str(name), tag, variant))
            if found is not None:
                self._tags.put(path, found)
        return found

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
        self._tags.pop(path)  # what the disk holds now, if the write fails
        await asyncio.to_thread(write_atomic, path, json.dumps(data).encode(), tmp_dir=self.tmp)
        self._tags.put(path, record)

    async def drop_tag(self, name: ImageName, tag: str, variant: str | None = None) -> None:
        """Forget ``name:tag`` (in a worker thread); ``OSError`` when the disk refuses (a
        read-only one)."""
        path = self._tag_path(name, tag, variant)
        self._tags.pop(path)
        await asyncio.to_thread(path.unlink, missing_ok=True)

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
            self._tags.pop(path)  # a tag record's (the entries' go when they are forgotten)
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


def _read_manifest(path: Path, digest: Digest) -> StoredManifest | None:
    """The manifest file at ``path`` if it matches ``digest`` (blocking), its mtime refreshed
    (recency across restarts); None, and a bad file removed, otherwise."""
    try:
        raw = path.read_bytes()
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
            path.unlink()
        return None
    with contextlib.suppress(OSError):
        os.utime(path)
    return StoredManifest(digest, media_type.decode("ascii", "replace"), body)


def _read_tag(path: Path, key: tuple[str, str, str | None]) -> TagRecord | None:
    """The tag record at ``path`` if it is the one for ``key`` (blocking)."""
    try:
        data = json.loads(path.read_bytes())
        if (data["name"], data["tag"], data.get("variant")) != key:
            return None
        return TagRecord(
            Digest.parse(data["digest"]), str(data["media_type"]), float(data["checked_at"])
        )
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Removal:
    """What :meth:`CacheStore.remove` did: the files removed (with their sizes), those left
    because a reader has them pinned, and those the disk would not let go of."""

    removed: list[tuple[Path, int]] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
