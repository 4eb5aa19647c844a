"""Writing one blob into the cache: hashed (sha256, and a sum per chunk for its hits) as it
is written to a temp file, moved into place only once verified.

Blob files are written with ``O_DIRECT`` where the file system takes it and the disk keeps up
with the network, through a page-aligned buffer; through the page cache where it doesn't (see
:class:`~proxy.cache.write_mode.BlobWrites`).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from proxy.cache.checksums import Checksums, ChunkSums
from proxy.cache.file_io import (
    SYNC_WAIT_AFTER,
    SYNC_WAIT_BEFORE,
    SYNC_WRITE,
    address_of,
    read_back,
    set_direct,
    sync_file_range,
    write_all,
    write_small,
)
from proxy.cache.write_mode import BlobWrites
from proxy.lane import Chunk
from proxy.logs import get_logger
from proxy.memory import ALIGN, DIRECT_BUFFER_BYTES
from proxy.reference import Digest

log = get_logger("detour.cache")


# Written through the page cache, a blob whose bytes wait for the disk beyond its write_behind
# waits for the disk to take them this many at a time.
WRITE_BEHIND_STEP = 8 << 20


class BlobWriter:
    """A blob being written: hashed as it is written, moved into place only once verified.

    :meth:`write` (to the temp file) and :meth:`update` (the hash) are blocking and touch
    separate state, so two worker threads can run them side by side, each call in the order of
    the bytes. ``path`` may be opened for reading by others while the writer appends: the first
    ``on_disk`` bytes are there.

    With ``O_DIRECT`` (see :class:`~proxy.cache.write_mode.BlobWrites`) each write goes through
    a page-aligned buffer and only whole 4 KiB blocks reach the file; the last partial block is
    held back (``on_disk`` trails the bytes written by less than 4 KiB) until :meth:`finish`
    writes it without ``O_DIRECT``. After :meth:`go_buffered` (the disk fell behind the network)
    the rest goes through the page cache, ``buffered_from`` on, and the disk is waited for when
    more than ``write_behind`` bytes may wait for it (``disk_behind`` while it is).

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
                set_direct(fd, True)
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
                self.on_disk += write_small(self._fd, chunks, self.on_disk)
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
        set_direct(self._fd, False)
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
            flags = SYNC_WAIT_BEFORE | SYNC_WRITE | SYNC_WAIT_AFTER
            sync_file_range(fd, self._synced, behind - self._synced, flags)
            self._synced = behind
        except OSError:
            self._synced = sys.maxsize  # never again for this file
        finally:
            self.disk_behind = False

    def _in_place(self, view: memoryview) -> bool:
        """Whether ``view`` can be written to the file as it is: ``O_DIRECT`` taken, and its
        bytes at addresses congruent to their file offsets modulo 4 KiB (a chunk read into a
        block, see :mod:`proxy.upstream.socket_body`)."""
        return (
            self._direct
            and self.on_disk > 0  # O_DIRECT accepted by a first write
            and self._held < ALIGN
            and (address := address_of(view)) >= 0
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
            self.on_disk += write_all(self._fd, views, self.on_disk)
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
                    set_direct(fd, False)
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
                    set_direct(self._fd, False)
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
        """Flush to the disk, read back into the page cache (see
        :class:`~proxy.cache.write_mode.BlobWrites`), and move into place (blocking: call from
        a worker thread); the caller has checked :meth:`matches`."""
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
