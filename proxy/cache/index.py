"""The cache's in-memory index: which blobs and manifests it holds, how recently each was
used, and the space they take, reserved included, under ``cache.max_size``.

With ``max_size`` the least recently used entries are evicted whenever the total would go over
it, except entries pinned by a reader; the files are handed to ``on_evict`` to delete.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path


class CacheIndex:
    """Entries (path → size, least recently used first), pins, and the bytes reserved for the
    files being written."""

    def __init__(self, max_size: int | None, on_evict: Callable[[list[Path]], None]) -> None:
        self.max_size = max_size
        # Deletes evicted files; the app hands them to a worker thread.
        self._on_evict = on_evict
        self._entries: OrderedDict[Path, int] = OrderedDict()  # path → size, oldest first
        self._pins: Counter[Path] = Counter()
        self.total = 0
        # Bytes promised to blobs being written (their temp files): they count against
        # max_size like entries, so the disk never holds more than max_size plus one chunk.
        self.reserved = 0

    def load(self, entries: Iterable[tuple[Path, int]]) -> None:
        """Start from ``entries`` (path, size), least recently used first."""
        self._entries = OrderedDict(entries)
        self.total = sum(self._entries.values())

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
        """A hit: the entry becomes the most recently used, also across restarts (its mtime,
        from which the index is rebuilt at start-up)."""
        if path in self._entries:
            self.touch_index(path)
            with contextlib.suppress(OSError):
                os.utime(path)

    def touch_index(self, path: Path) -> None:
        """The entry becomes the most recently used (its mtime is the caller's to refresh)."""
        if path in self._entries:
            self._entries.move_to_end(path)

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
            self.forgotten(path)
        if victims:
            self._on_evict(victims)

    def forget(self, path: Path) -> None:
        """Take an entry out of the index (its file is gone, or going)."""
        self.total -= self._entries.pop(path, 0)
        self.forgotten(path)

    def forgotten(self, path: Path) -> None:
        """An entry left the index (evicted, dropped or removed): what is kept of it elsewhere
        goes too (see :class:`~proxy.cache.store.CacheStore`)."""

    def in_use(self, path: Path) -> bool:
        """Whether a reader has the entry pinned (it is being sent, or will be by a fetch)."""
        return self._pins.get(path, 0) > 0
