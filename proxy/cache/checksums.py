"""A cached blob's per-chunk sums (XXH3-64 of each chunk), taken as its verified bytes go
by and kept with the file, so each hit checks every chunk before sending it."""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from array import array
from dataclasses import dataclass

import xxhash

from proxy.memory import CHECKED_CHUNK_BYTES


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


class ChecksumHasher:
    """Takes the per-chunk sums of :class:`Checksums` from a stream of bytes as it goes by:
    fed like a hashlib hasher (:meth:`update`), the sums had at the end (:meth:`finish`)."""

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
