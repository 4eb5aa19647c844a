"""The system calls a blob file is written and read back with: its room taken at once
(``fallocate``), whole writes, 256 KiB writes through the page cache, ``O_DIRECT`` on and off,
``sync_file_range``, and the read-back into the page cache."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Callable, Sequence

from proxy.lane import Chunk

# Written through the page cache, a blob goes this many bytes a write (each on this grid of the
# file): the kernel (ext4 since Linux 6.16, xfs) makes a write's page cache of folios as large
# as the write, up to 2 MiB, and on a VM that hands its free memory back to the host (virtio
# free page reporting: Firecracker, Cloud Hypervisor, QEMU with a balloon) free 2 MiB blocks are
# the memory handed back, faulted in again 4 KiB at a time. There, 1 GiB took 2.8 to 3.3
# CPU-seconds in 4 MiB writes, 0.21 in 1 MiB, 0.19 in 64 KiB and 0.13 to 0.16 in 256 KiB; in
# memory the host backs, 512 MiB took 0.065 in 256 KiB writes and 0.086 in 64 KiB
# (docs/disk-writes.md).
PAGE_CACHE_WRITE_BYTES = 256 << 10

# sync_file_range(2), which the os module lacks: start writeback, or wait for it, of a range.
SYNC_WAIT_BEFORE, SYNC_WRITE, SYNC_WAIT_AFTER = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_libc.sync_file_range.restype = ctypes.c_int


def sync_file_range(fd: int, offset: int, count: int, flags: int) -> None:
    if _libc.sync_file_range(fd, offset, count, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# fallocate(2) with FALLOC_FL_KEEP_SIZE, which os.posix_fallocate can't ask for (and glibc's
# posix_fallocate writes zeros where the file system has no fallocate: a second write of it all).
FALLOC_FL_KEEP_SIZE = 1
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def allocate(fd: int, size: int) -> None:
    """Give the file its ``size`` bytes of disk at once, its size (what was written) unchanged:
    a blob too large for the room left is refused here, before any of it fills the disk, and
    its writes fill blocks already allocated, one extent rather than one allocation a block
    (on ext4, 512 MiB in 64 KiB writes took 0.11 CPU-s rather than 0.15, docs/disk-writes.md).
    Raises what the disk refuses (ENOSPC); a file system without fallocate is written as it is.
    """
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code))


def write_all(fd: int, views: list[memoryview], offset: int) -> int:
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


def write_small(fd: int, chunks: Sequence[Chunk], offset: int) -> int:
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
                total += write_all(fd, views, offset + total)
                views, gathered = [], 0
    if views:
        total += write_all(fd, views, offset + total)
    return total


def address_of(view: memoryview) -> int:
    """Where ``view``'s first byte is in memory; -1 for a view that can't tell (read-only, as
    a bytes object's, or empty)."""
    if view.readonly or not view:
        return -1
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def set_direct(fd: int, on: bool) -> None:
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
    set_direct(fd, False)
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
