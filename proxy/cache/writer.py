"""Writing one blob into the cache: hashed (sha256, and a sum per chunk for its hits) as it
is written to a temp file, moved into place only once verified.

Blob files are written with ``O_DIRECT`` where the file system takes it and the disk keeps up
with the network, through a page-aligned buffer; through the page cache where it doesn't (see
:class:`BlobWrites`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from proxy.lane import Chunk
from proxy.logs import get_logger
from proxy.memory import ALIGN, CHECKED_CHUNK_BYTES, DIRECT_BUFFER_BYTES
from proxy.reference import Digest

log = get_logger("detour.cache")


# A disk that fell behind the network keeps new blobs off O_DIRECT for this long, then is tried
# again (it may have been busy with something else).
SLOW_DISK_SECONDS = 600.0
# Written through the page cache, a blob whose bytes wait for the disk beyond its write_behind
# waits for the disk to take them this many at a time.
WRITE_BEHIND_STEP = 8 << 20
# Written through the page cache, a blob goes this many bytes a write (each on this grid of the
# file): the kernel (ext4 since Linux 6.16, xfs) makes a write's page cache of folios as large
# as the write, up to 2 MiB, and on a VM that hands its free memory back to the host (virtio
# free page reporting: Firecracker, Cloud Hypervisor, QEMU with a balloon) free 2 MiB blocks are
# the memory handed back, faulted in again 4 KiB at a time. There, 4 MiB writes ran at 0.2 to
# 0.6 GB/s and used ten times the processor of 64 KiB writes, which ran at 1 to 3 GB/s
# (docs/disk-writes.md).
PAGE_CACHE_WRITE_BYTES = 64 << 10


class BlobWrites:
    """How a cache directory's blob files are written, logged whenever it changes.

    Blobs are written with ``O_DIRECT`` where the file system takes it (ext4, xfs, btrfs, tmpfs
    since Linux 6.6): new bytes go to the disk without passing through the page cache, so a
    cold blob is written at the disk's pace rather than at the pace new page cache can be had
    (on a VM that backs its memory lazily, a third of it), and a layer the node's runtime keeps
    a copy of anyway does not crowd the workloads' page cache. Where ``O_DIRECT`` is refused
    (ramfs, some overlay and network file systems), at open or at the first write, blobs are
    written through the page cache from then on.

    ``O_DIRECT`` is kept only while the disk keeps up with the network. A fetch whose writes
    hold its clients back (see :class:`proxy.cache.sink.BlobSink`) goes on through the page
    cache, which takes the bytes at memory speed, and so do the blobs fetched in the next
    ``SLOW_DISK_SECONDS``: on a slow disk (eMMC, an SD card, a network block device, a busy
    SATA disk) the client is fed at the network's pace. What waits for the disk is then
    bounded by ``write_behind`` bytes a blob: past that its writer waits for the disk, and the
    fetch gives up the cache copy rather than hold its clients.

    Once verified and flushed, the part of a blob written with ``O_DIRECT`` (the whole blob, on
    a disk that keeps up), if the blob is of at most ``read_back_up_to`` bytes, is read back
    into the page cache before it enters the cache (:func:`read_back`), so the hits that follow
    a fetch (the site's other nodes asking their owner, another pod of the node) come from
    memory, at the pace of a mirror serving from its page cache, not the disk's. The read-back
    yields to the fetches that write: it stops when another blob is being written.
    """

    def __init__(self, root: Path, read_back_up_to: int = 0, write_behind: int = 1 << 30) -> None:
        self.root = root
        self.direct = True  # until the file system refuses it
        self.read_back_up_to = read_back_up_to
        self.write_behind = write_behind
        self.writing = 0  # blob files being written now (see count_writer)
        self._lock = threading.Lock()  # writers end in worker threads
        self._buffered_until = 0.0  # time.monotonic(): till then, new blobs start buffered
        self._logged = False

    @property
    def starts_direct(self) -> bool:
        """Whether a new blob file starts with ``O_DIRECT``."""
        return self.direct and time.monotonic() >= self._buffered_until

    def count_writer(self, step: int) -> None:
        with self._lock:
            self.writing += step

    def others_writing(self) -> bool:
        """Whether a blob other than the one asking is being written."""
        return self.writing > 1

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

    def fell_behind(self) -> None:
        """The disk held a fetch's clients back: new blobs go through the page cache for
        ``SLOW_DISK_SECONDS``."""
        now = time.monotonic()
        if now >= self._buffered_until:
            log.info(
                "cache_blob_writes",
                dir=str(self.root),
                mode="buffered",
                reason="the disk is slower than the network",
                seconds=SLOW_DISK_SECONDS,
            )
        self._buffered_until = now + SLOW_DISK_SECONDS


# sync_file_range(2), which the os module lacks: start writeback, or wait for it, of a range.
_SYNC_WAIT_BEFORE, _SYNC_WRITE, _SYNC_WAIT_AFTER = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_libc.sync_file_range.restype = ctypes.c_int


def _sync_file_range(fd: int, offset: int, count: int, flags: int) -> None:
    if _libc.sync_file_range(fd, offset, count, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _write_all(fd: int, views: list[memoryview], offset: int) -> int:
    """Write ``views`` at ``offset``, all of them (blocking); the bytes written."""
    total = 0
    while views:
        written = os.pwritev(fd, views, offset + total)
        total += written
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]
    return total


def _write_small(fd: int, chunks: Sequence[Chunk], offset: int) -> int:
    """Write ``chunks`` at ``offset`` through the page cache, ``PAGE_CACHE_WRITE_BYTES`` of the
    file's grid a write, all of them (blocking); the bytes written."""
    total = 0
    views: list[memoryview] = []
    gathered = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            room = PAGE_CACHE_WRITE_BYTES - (offset + total + gathered) % PAGE_CACHE_WRITE_BYTES
            views.append(view[:room])
            gathered += len(views[-1])
            view = view[room:]
            if (offset + total + gathered) % PAGE_CACHE_WRITE_BYTES == 0:  # on the grid
                total += _write_all(fd, views, offset + total)
                views, gathered = [], 0
    if views:
        total += _write_all(fd, views, offset + total)
    return total


def _address(view: memoryview) -> int:
    """Where ``view``'s first byte is in memory; -1 for a view that can't tell (read-only, as
    a bytes object's, or empty)."""
    if view.readonly or not view:
        return -1
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _set_direct(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)


READ_AHEAD_STEP = 8 << 20  # the most one POSIX_FADV_WILLNEED reads ahead
READ_BACK_BUFFER_BYTES = 1 << 20


def read_back(fd: int, size: int, yield_to: Callable[[], bool] = lambda: False) -> bool:
    """Read a file's first ``size`` bytes into the page cache and wait until they are there
    (blocking); whether it did, or stopped because ``yield_to()`` said another fetch writes.

    The kernel is asked to read it all ahead first (many requests at once, rather than one
    sequential read after another), then it is read through twice: the first read waits for
    the disk, the second moves its pages to the kernel's active list, which the first hit
    would otherwise do. Through a 1 MiB buffer, which stays in the CPU's cache. Every
    ``READ_AHEAD_STEP`` it asks ``yield_to``: a cold fetch that writes is never kept waiting
    for the disk by a read that only makes hits faster.
    """
    _set_direct(fd, False)
    for offset in range(0, size, READ_AHEAD_STEP):
        if yield_to():
            return False
        os.posix_fadvise(fd, offset, min(READ_AHEAD_STEP, size - offset), os.POSIX_FADV_WILLNEED)
    buffer = mmap.mmap(-1, READ_BACK_BUFFER_BYTES)
    for _ in range(2):
        for offset in range(0, size, READ_BACK_BUFFER_BYTES):
            if offset % READ_AHEAD_STEP == 0 and yield_to():
                return False
            os.preadv(fd, [buffer], offset)
    return True


@dataclass(frozen=True, slots=True)
class Checksums:
    """An XXH3-64 of each ``CHECKED_CHUNK_BYTES`` chunk of one cached file, taken from bytes
    known to be right (those a fetch verified as it wrote them, or a pass whose sha256
    matched); a hit checks each chunk against its sum before sending it."""

    identity: tuple[int, int]  # (st_dev, st_ino): a file fetched again is another file
    size: int
    sums: array[int]

    def save(self, fd: int) -> None:
        """Keep the sums with the file, in an extended attribute, so that after a restart its
        hits are checked chunk by chunk too. Best effort: where the file system takes no user
        attributes, or the sums don't fit in one (ext4: a blob over about 1 GiB), the file
        goes without, and its first hit after a restart is hashed whole instead."""
        sums = array("Q", self.sums)
        if sys.byteorder == "big":
            sums.byteswap()
        value = _SUMS_HEADER.pack(_SUMS_MAGIC, self.size, CHECKED_CHUNK_BYTES) + sums.tobytes()
        with contextlib.suppress(OSError):
            os.setxattr(fd, SUMS_ATTRIBUTE, value)

    @classmethod
    def load(cls, fd: int) -> Checksums | None:
        """The sums :meth:`save` kept with the open file ``fd``, for the size it had then (a
        file that changed size since fails its hit's first check); None if it has none, or
        none that can be read."""
        try:
            value = os.getxattr(fd, SUMS_ATTRIBUTE)
        except OSError:
            return None
        if len(value) < _SUMS_HEADER.size:
            return None
        magic, size, chunk_bytes = _SUMS_HEADER.unpack_from(value)
        body = value[_SUMS_HEADER.size :]
        if magic != _SUMS_MAGIC or chunk_bytes != CHECKED_CHUNK_BYTES or len(body) % 8:
            return None
        sums: array[int] = array("Q")
        sums.frombytes(body)
        if sys.byteorder == "big":
            sums.byteswap()
        if len(sums) != -(-size // CHECKED_CHUNK_BYTES):
            return None
        stat = os.fstat(fd)
        return cls((stat.st_dev, stat.st_ino), size, sums)


SUMS_ATTRIBUTE = "user.detour.xxh3"  # a cached blob's Checksums, kept with it
_SUMS_MAGIC = b"DTR1"
_SUMS_HEADER = struct.Struct("<4sQI")  # magic, the file's size, the chunk size


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
    ``O_DIRECT``. After :meth:`go_buffered` (the disk fell behind the network) the rest goes
    through the page cache, ``buffered_from`` on, and the disk is waited for when more than
    ``write_behind`` bytes may wait for it (``disk_behind`` while it is).

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
        self._buffered_wanted = False  # set on the loop: the rest goes through the page cache
        self.buffered_from = 0  # bytes before it were written with O_DIRECT
        self._synced = 0  # buffered: bytes known to be on the disk
        self.disk_behind = False  # waiting for the disk, more than write_behind behind
        self._counted = False  # in writes.writing
        try:
            fd, name = tempfile.mkstemp(
                dir=tmp_dir, prefix=f"{digest.hex[:16]}.", suffix=".partial"
            )
        except OSError as exc:
            self.failure = exc
            return
        self._fd, self.path = fd, Path(name)
        if writes is None:
            return
        writes.count_writer(1)
        self._counted = True
        if writes.starts_direct:
            try:
                _set_direct(fd, True)
            except OSError as exc:
                writes.refused(exc)
            else:
                self._direct = True
                self.buffered_from = -1  # none yet

    @property
    def direct(self) -> bool:
        """Whether this file is being written with ``O_DIRECT``."""
        return self._direct

    def go_buffered(self) -> None:
        """From the loop: write the rest through the page cache (from the next :meth:`write`)."""
        self._buffered_wanted = True

    def write(self, chunks: Sequence[Chunk]) -> None:
        """Append ``chunks`` to the file (blocking)."""
        if self._fd is None:
            raise self.failure or OSError("blob writer is closed")
        try:
            if self._buffered_wanted and self._direct:
                self._leave_direct()
            if self._buffer is None and not self._direct:
                self.on_disk += _write_small(self._fd, chunks, self.on_disk)
                self._write_behind()
                return
            if self._buffer is None:
                self._buffer = mmap.mmap(-1, DIRECT_BUFFER_BYTES)  # page-aligned
            buffer = self._buffer
            for chunk in chunks:
                view = memoryview(chunk)
                if self._in_place(view):
                    self._write_in_place(view)
                    continue
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

    def _leave_direct(self) -> None:
        """Go on through the page cache: the bytes held back for a whole block written now."""
        assert self._fd is not None
        self.buffered_from = max(self.buffered_from, 0) or self.on_disk
        _set_direct(self._fd, False)
        self._direct = False
        if self._held:
            self._write_held()
        self._buffer = None
        self._synced = self.on_disk

    def _write_behind(self) -> None:
        """Buffered: once more than ``write_behind`` bytes of the file may be waiting for the
        disk, wait for it (``disk_behind`` meanwhile) to take all but ``write_behind`` of them,
        ``WRITE_BEHIND_STEP`` at a time. The rest is the kernel's to write back, and the
        commit's fsync's. A file system without sync_file_range leaves it all to those."""
        writes, fd = self._writes, self._fd
        if writes is None or fd is None:
            return
        behind = self.on_disk - writes.write_behind
        if behind - self._synced < WRITE_BEHIND_STEP:
            return
        self.disk_behind = True
        try:
            flags = _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER
            _sync_file_range(fd, self._synced, behind - self._synced, flags)
            self._synced = behind
        except OSError:
            self._synced = sys.maxsize  # never again for this file
        finally:
            self.disk_behind = False

    def _in_place(self, view: memoryview) -> bool:
        """Whether ``view`` can be written to the file as it is: ``O_DIRECT`` taken, and its
        bytes at addresses congruent to their file offsets modulo 4 KiB (a chunk read into a
        block, see :mod:`proxy.upstream.direct_body`)."""
        return (
            self._direct
            and self.on_disk > 0  # O_DIRECT accepted by a first write
            and self._held < ALIGN
            and (address := _address(view)) >= 0
            and address % ALIGN == self._held
        )

    def _write_in_place(self, view: memoryview) -> None:
        """Write ``view``'s whole 4 KiB blocks from where it is, the first completed from the
        held bytes; hold its last partial block."""
        assert self._fd is not None
        assert self._buffer is not None
        buffer = self._buffer
        top = -self._held % ALIGN  # bytes that complete the held block
        if len(view) < top:
            buffer[self._held : self._held + len(view)] = view
            self._held += len(view)
            return
        views = []
        if top:
            buffer[self._held : ALIGN] = view[:top]
            views.append(memoryview(buffer)[:ALIGN])
        rest = view[top:]
        whole = len(rest) - len(rest) % ALIGN
        if whole:
            views.append(rest[:whole])
        if views:
            self.on_disk += _write_all(self._fd, views, self.on_disk)
        tail = rest[whole:]
        buffer[: len(tail)] = tail
        self._held = len(tail)

    def _write_held(self) -> None:
        """Write the held bytes: the whole blocks of them with ``O_DIRECT``, else all."""
        assert self._fd is not None
        assert self._buffer is not None
        buffer, fd = self._buffer, self._fd
        whole = memoryview(buffer)
        end = self._held - self._held % ALIGN if self._direct else self._held
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
                    self.buffered_from = 0
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

    def update(self, chunks: Sequence[Chunk]) -> None:
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

    def commit(self) -> None:
        """Flush to the disk, read back into the page cache (see :class:`BlobWrites`), and
        move into place (blocking: call from a worker thread); the caller has checked
        :meth:`matches`."""
        assert self._fd is not None
        assert self.path is not None
        os.fsync(self._fd)
        writes = self._writes
        direct_bytes = self.size if self.buffered_from < 0 else self.buffered_from
        if writes is not None and direct_bytes and self.size <= writes.read_back_up_to:
            read_back(self._fd, direct_bytes, writes.others_writing)
        stat = os.fstat(self._fd)
        self.checksums = Checksums((stat.st_dev, stat.st_ino), self.size, self.chunk_sums.finish())
        self.checksums.save(self._fd)
        os.close(self._fd)
        self._fd = None
        self._buffer = None
        self._uncount()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, self.final)

    def _uncount(self) -> None:
        if self._counted and self._writes is not None:
            self._counted = False
            self._writes.count_writer(-1)

    def discard(self) -> None:
        # The aligned buffer is dropped, never closed: a worker thread may still hold a view.
        self._buffer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._uncount()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
