"""How a blob's bytes reach its temp file: with ``O_DIRECT``, in whole 4 KiB blocks through a
page-aligned buffer (or from where the bytes already are), or through the page cache, with the
bytes that wait for the disk bounded. The blob's lifecycle (hashing, commit, discard) is
:class:`~proxy.cache.writer.BlobWriter`'s; this is only the appending, kept apart so each
strategy can be read on its own.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
from collections.abc import Sequence

from proxy.cache.file_io import (
    SYNC_WAIT_AFTER,
    SYNC_WAIT_BEFORE,
    SYNC_WRITE,
    address_of,
    allocate,
    set_direct,
    sync_file_range,
    write_all,
    write_small,
)
from proxy.cache.write_mode import WriteMode
from proxy.lane import Chunk
from proxy.memory import ALIGN, DIRECT_BUFFER_BYTES

# Written through the page cache, a blob whose bytes wait for the disk beyond its write_behind
# waits for the disk to take them this many at a time.
WRITE_BEHIND_STEP = 8 << 20


class Appender:
    """The bytes of one blob appended to its open temp file ``fd`` (blocking; one call at a
    time, in the order of the bytes), which it owns until :meth:`close`.

    With ``O_DIRECT`` (see :class:`~proxy.cache.write_mode.WriteMode`) each write goes through
    a page-aligned buffer and only whole 4 KiB blocks reach the file; the last partial block is
    held back (``on_disk`` trails the bytes appended by less than 4 KiB) until :meth:`finish`
    writes it without ``O_DIRECT``. After :meth:`go_buffered` (the disk fell behind the network)
    the rest goes through the page cache, ``buffered_from`` on, bounded by :class:`WriteBehind`.
    With the blob's length ``announced`` by its upstream, the first write first takes that
    room on the disk (:func:`~proxy.cache.file_io.allocate`), and raises if there is none.
    """

    def __init__(self, fd: int, mode: WriteMode | None, announced: int | None = None) -> None:
        self.fd = fd
        self._unallocated = announced  # the room to take at the first write
        self.closed = False
        self.on_disk = 0  # bytes in the file
        self._mode = mode
        self._direct = False
        self._buffer: mmap.mmap | None = None  # O_DIRECT: bytes [on_disk, on_disk + _held)
        self._held = 0
        self._buffered_wanted = False  # set on the loop: the rest goes through the page cache
        self.buffered_from = 0  # bytes before it were written with O_DIRECT
        self._behind = None if mode is None else WriteBehind(fd, mode.write_behind)
        if mode is not None and mode.starts_direct:
            try:
                set_direct(fd, True)
            except OSError as exc:
                mode.refused(exc)
            else:
                self._direct = True
                self.buffered_from = -1  # none yet

    @property
    def direct(self) -> bool:
        """Whether this file is being written with ``O_DIRECT``."""
        return self._direct

    @property
    def disk_behind(self) -> bool:
        """Whether a write is waiting for the disk, more than ``write_behind`` behind."""
        return self._behind is not None and self._behind.disk_behind

    def go_buffered(self) -> None:
        """From the loop: write the rest through the page cache (from the next :meth:`write`)."""
        self._buffered_wanted = True

    def write(self, chunks: Sequence[Chunk]) -> None:
        """Append ``chunks`` to the file (blocking)."""
        if self._unallocated:
            size, self._unallocated = self._unallocated, None
            allocate(self.fd, size)
        if self._buffered_wanted and self._direct:
            self._leave_direct()
        if self._buffer is None and not self._direct:
            self.on_disk += write_small(self.fd, chunks, self.on_disk)
            if self._behind is not None:
                self._behind.wrote(self.on_disk)
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

    def finish(self) -> None:
        """Write the last partial block held back by ``O_DIRECT`` (blocking)."""
        if self._held:
            if self._direct:
                set_direct(self.fd, False)
                self._direct = False
            self._write_held()
        self._buffer = None

    def close(self) -> None:
        # The aligned buffer is dropped, never closed: a worker thread may still hold a view.
        self._buffer = None
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def _leave_direct(self) -> None:
        """Go on through the page cache: the bytes held back for a whole block written now."""
        self.buffered_from = max(self.buffered_from, 0) or self.on_disk
        set_direct(self.fd, False)
        self._direct = False
        if self._held:
            self._write_held()
        self._buffer = None
        if self._behind is not None:
            self._behind.synced = self.on_disk

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
            self.on_disk += write_all(self.fd, views, self.on_disk)
        tail = rest[whole:]
        buffer[: len(tail)] = tail
        self._held = len(tail)

    def _write_held(self) -> None:
        """Write the held bytes: the whole blocks of them with ``O_DIRECT``, else all."""
        assert self._buffer is not None
        buffer, fd = self._buffer, self.fd
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
                    if self._mode is not None:
                        self._mode.refused(exc)
                    end = self._held
            if done and self._direct and self._mode is not None:
                self._mode.accepted()
        finally:
            if done:
                buffer.move(0, done, self._held - done)
                self._held -= done
                self.on_disk += done


class WriteBehind:
    """Through the page cache, how many of a file's bytes may wait for the disk: once more
    than ``limit`` of them may, the writer waits for the disk (``disk_behind`` meanwhile) to
    take all but ``limit`` of them, ``WRITE_BEHIND_STEP`` at a time. The rest is the kernel's
    to write back, and the commit's fsync's. A file system without sync_file_range leaves it
    all to those."""

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self.synced = 0  # bytes known to be on the disk
        self.disk_behind = False  # waiting for the disk, more than limit behind

    def wrote(self, on_disk: int) -> None:
        """The file now has ``on_disk`` bytes: wait for the disk if too many may wait for it."""
        behind = on_disk - self._limit
        if behind - self.synced < WRITE_BEHIND_STEP:
            return
        self.disk_behind = True
        try:
            flags = SYNC_WAIT_BEFORE | SYNC_WRITE | SYNC_WAIT_AFTER
            sync_file_range(self._fd, self.synced, behind - self.synced, flags)
            self.synced = behind
        except OSError:
            self.synced = sys.maxsize  # never again for this file
        finally:
            self.disk_behind = False
