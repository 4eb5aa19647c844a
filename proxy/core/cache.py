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
import fcntl
import hashlib
import json
import mmap
import os
import tempfile
import time
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

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


DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, length and file offset, multiples of this
DIRECT_BUFFER_BYTES = 1 << 20  # a blob writer's aligned buffer: the most one write sends


class BlobWrites:
    """How a cache directory's blob files are written, logged once when it is first known.

    Blobs are written with ``O_DIRECT`` where the file system takes it (ext4, xfs, btrfs, tmpfs
    since Linux 6.6): new bytes go to the disk without passing through the page cache, so a
    cold blob is written at the disk's pace rather than at the pace new page cache can be had
    (on a VM that backs its memory lazily, a third of it), and a layer the node's runtime keeps
    a copy of anyway does not crowd the workloads' page cache. Where ``O_DIRECT`` is refused
    (ramfs, some overlay and network file systems), at open or at the first write, blobs are
    written through the page cache from then on.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.direct = True  # until the file system refuses it
        self._logged = False

    def accepted(self) -> None:
        if not self._logged:
            self._logged = True
            log.info("cache_blob_writes", dir=str(self.root), mode="direct")

    def refused(self, exc: OSError) -> None:
        if self.direct:
            self.direct = False
            self._logged = True
            log.info(
                "cache_blob_writes",
                dir=str(self.root),
                mode="buffered",
                reason=f"O_DIRECT refused: {exc.strerror or exc}",
            )


def _set_direct(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)


CHECKED_CHUNK_BYTES = 32 << 20  # a cached blob's bytes are checked on its hits in chunks of this


@dataclass(frozen=True, slots=True)
class Checksums:
    """An XXH3-64 of each ``CHECKED_CHUNK_BYTES`` chunk of one cached file, taken from bytes
    known to be right (those a fetch verified as it wrote them, or a pass whose sha256
    matched); a hit checks each chunk against its sum before sending it."""

    identity: tuple[int, int]  # (st_dev, st_ino): a file fetched again is another file
    size: int
    sums: array[int]


class ChunkSums:
    """The per-chunk sums of :class:`Checksums`, taken as a stream of bytes goes by."""

    def __init__(self) -> None:
        self.sums: array[int] = array("Q")
        self._hash = xxhash.xxh3_64()
        self._in = 0  # bytes of the current chunk hashed

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), CHECKED_CHUNK_BYTES - self._in)
            self._hash.update(view[:take])
            self._in += take
            view = view[take:]
            if self._in == CHECKED_CHUNK_BYTES:
                self.sums.append(self._hash.intdigest())
                self._hash.reset()
                self._in = 0

    def finish(self) -> array[int]:
        """The sums, the last (partial) chunk's included."""
        if self._in:
            self.sums.append(self._hash.intdigest())
            self._hash.reset()
            self._in = 0
        return self.sums


class BlobWriter:
    """A blob being written: hashed as it is written, moved into place only once verified.

    :meth:`write` (to the temp file) and :meth:`update` (the hash) are blocking and touch
    separate state, so two worker threads can run them side by side, each call in the order of
    the bytes. ``path`` may be opened for reading by others while the writer appends: the first
    ``on_disk`` bytes are there.

    With ``O_DIRECT`` (see :class:`BlobWrites`) each write goes through a page-aligned buffer
    and only whole 4 KiB blocks reach the file; the last partial block is held back (``on_disk``
    trails the bytes written by less than 4 KiB) until :meth:`finish` writes it without
    ``O_DIRECT``.

    When the disk refuses (full, or an I/O error), ``write`` raises ``OSError`` and writes
    nothing more; hashing goes on, so the blob can still be verified as it streams by, but it
    will not be cached. ``path`` is None when not even the temp file could be created.
    """

    def __init__(
        self, digest: Digest, final: Path, tmp_dir: Path, writes: BlobWrites | None = None
    ) -> None:
        self.digest = digest
        self.final = final
        self.size = 0  # bytes hashed
        self.on_disk = 0  # bytes in the temp file
        self._hasher = digest.hasher()
        self.chunk_sums = ChunkSums()  # for the hits' checks, once the digest matched
        self.checksums: Checksums | None = None  # once committed
        self._fd: int | None = None
        self.path: Path | None = None
        self.failure: OSError | None = None
        self._writes = writes
        self._direct = False
        self._buffer: mmap.mmap | None = None  # O_DIRECT: bytes [on_disk, on_disk + _held)
        self._held = 0
        try:
            fd, name = tempfile.mkstemp(
                dir=tmp_dir, prefix=f"{digest.hex[:16]}.", suffix=".partial"
            )
        except OSError as exc:
            self.failure = exc
            return
        self._fd, self.path = fd, Path(name)
        if writes is not None and writes.direct:
            try:
                _set_direct(fd, True)
            except OSError as exc:
                writes.refused(exc)
            else:
                self._direct = True

    @property
    def direct(self) -> bool:
        """Whether this file is being written with ``O_DIRECT``."""
        return self._direct

    def write(self, chunks: Sequence[bytes]) -> None:
        """Append ``chunks`` to the file (blocking)."""
        if self._fd is None:
            raise self.failure or OSError("blob writer is closed")
        try:
            if self._buffer is None and not self._direct:
                views = [memoryview(chunk) for chunk in chunks]
                while views:
                    written = os.pwritev(self._fd, views, self.on_disk)
                    self.on_disk += written
                    while views and written >= len(views[0]):
                        written -= len(views.pop(0))
                    if views:
                        views[0] = views[0][written:]
                return
            if self._buffer is None:
                self._buffer = mmap.mmap(-1, DIRECT_BUFFER_BYTES)  # page-aligned
            buffer = self._buffer
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    count = min(len(view), len(buffer) - self._held)
                    buffer[self._held : self._held + count] = view[:count]
                    self._held += count
                    view = view[count:]
                    if self._held == len(buffer):
                        self._write_held()
            self._write_held()
        except OSError as exc:
            self.failure = exc
            raise

    def _write_held(self) -> None:
        """Write the held bytes: the whole blocks of them with ``O_DIRECT``, else all."""
        assert self._fd is not None
        assert self._buffer is not None
        buffer, fd = self._buffer, self._fd
        whole = memoryview(buffer)
        end = self._held - self._held % DIRECT_ALIGN if self._direct else self._held
        done = 0
        try:
            while done < end:
                try:
                    done += os.pwrite(fd, whole[done:end], self.on_disk + done)
                except OSError as exc:
                    # Refused at the first write (the open took the flag): written through
                    # the page cache instead, this file and the next.
                    if exc.errno != errno.EINVAL or not self._direct or self.on_disk + done:
                        raise
                    _set_direct(fd, False)
                    self._direct = False
                    if self._writes is not None:
                        self._writes.refused(exc)
                    end = self._held
            if done and self._direct and self._writes is not None:
                self._writes.accepted()
        finally:
            if done:
                buffer.move(0, done, self._held - done)
                self._held -= done
                self.on_disk += done

    def finish(self) -> None:
        """Write the last partial block held back by ``O_DIRECT`` (blocking): after the last
        :meth:`write`, before :meth:`sync`."""
        if self._fd is None:
            raise self.failure or OSError("blob writer is closed")
        if self._held:
            try:
                if self._direct:
                    _set_direct(self._fd, False)
                    self._direct = False
                self._write_held()
            except OSError as exc:
                self.failure = exc
                raise
        self._buffer = None

    def update(self, chunks: Sequence[bytes]) -> None:
        """Hash ``chunks`` (blocking)."""
        for chunk in chunks:
            self._hasher.update(chunk)
            self.chunk_sums.update(chunk)
            self.size += len(chunk)

    def matches(self, expected_size: int | None = None) -> bool:
        if expected_size is not None and expected_size != self.size:
            return False
        return self._hasher.hexdigest() == self.digest.hex

    @property
    def complete_on_disk(self) -> bool:
        return self.failure is None and self.on_disk == self.size

    def sync(self) -> None:
        """Flush to disk (blocking: call from a worker thread) before :meth:`commit`."""
        assert self._fd is not None
        os.fsync(self._fd)

    def commit(self) -> None:
        """Move into place; the caller has checked :meth:`matches` and called :meth:`sync`."""
        assert self._fd is not None
        assert self.path is not None
        stat = os.fstat(self._fd)
        self.checksums = Checksums((stat.st_dev, stat.st_ino), self.size, self.chunk_sums.finish())
        os.close(self._fd)
        self._fd = None
        self._buffer = None
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, self.final)

    def discard(self) -> None:
        # The aligned buffer is dropped, never closed: a worker thread may still hold a view.
        self._buffer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class CacheStore:
    """The files, and an in-memory LRU index of the blobs and manifests among them.

    The index is rebuilt from the disk at start-up (recency from mtimes, which hits refresh),
    so it survives a restart or a crash. With ``max_size`` the least recently used entries are
    evicted whenever the total goes over it, except entries pinned by a reader.
    """

    def __init__(
        self,
        root: Path,
        max_size: int | None = None,
        on_evict: Callable[[list[Path]], None] = lambda paths: delete_files(paths),
    ) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.max_size = max_size
        self.blob_writes = BlobWrites(root)
        # Deletes evicted files; the app hands them to a worker thread.
        self._on_evict = on_evict
        self._entries: OrderedDict[Path, int] = OrderedDict()  # path → size, oldest first
        self._pins: Counter[Path] = Counter()
        self.total = 0
        # Bytes promised to blobs being written (their temp files): they count against
        # max_size like entries, so the disk never holds more than max_size plus one chunk.
        self.reserved = 0

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
        self._entries = OrderedDict((path, size) for _, path, size in found)
        self.total = sum(self._entries.values())

    # ----------------------------------------------------------------------- the index

    def admit(self, path: Path, size: int, reserved: int = 0) -> None:
        """Record a new entry, evicting the least recently used ones over ``max_size``; the
        ``reserved`` bytes it was written under are released."""
        self.reserved -= reserved
        self.total += size - self._entries.pop(path, 0)
        self._entries[path] = size
        self.trim()

    def reserve(self, size: int) -> bool:
        """Make room for ``size`` more bytes being written, evicting least recently used
        entries; False (nothing reserved) if that would take more than ``max_size`` allows."""
        if self.max_size is not None:
            if size > self.max_size:
                return False
            self.trim(room=size)
            if self.total + self.reserved + size > self.max_size:
                return False
        self.reserved += size
        return True

    def release(self, size: int) -> None:
        """Give back reserved bytes that were never kept (a discarded temp file)."""
        self.reserved -= size

    def touch(self, path: Path) -> None:
        """A hit: the entry becomes the most recently used, also across restarts."""
        if path in self._entries:
            self._entries.move_to_end(path)
            with contextlib.suppress(OSError):
                os.utime(path)

    def pin(self, path: Path) -> None:
        self._pins[path] += 1

    def unpin(self, path: Path) -> None:
        self._pins[path] -= 1
        if self._pins[path] <= 0:
            del self._pins[path]
        self.trim()

    def trim(self, room: int = 0) -> None:
        """Evict least recently used, unpinned entries until the total, with what is reserved
        and ``room`` more, fits ``max_size``."""
        if self.max_size is None:
            return
        limit = self.max_size - self.reserved - room
        if self.total <= limit:
            return
        victims: list[Path] = []
        for path in list(self._entries):
            if self.total <= limit:
                break
            if self._pins[path] > 0:
                continue
            self.total -= self._entries.pop(path)
            victims.append(path)
        if victims:
            self._on_evict(victims)

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
        self.total -= self._entries.pop(path, 0)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            return False
        return True

    def in_use(self, path: Path) -> bool:
        """Whether a reader has the entry pinned (it is being sent, or will be by a fetch)."""
        return self._pins.get(path, 0) > 0

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
                self.total -= self._entries.pop(path, 0)  # gone already: forget it too
                continue
            except OSError as exc:
                removal.failed.append((path, exc.strerror or str(exc)))
                continue
            self.total -= self._entries.pop(path, 0)
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
