"""A VM's memory backed for the run, as a machine's is.

A VM whose balloon reports free pages to the host (virtio-balloon free page reporting, the
``page_reporting`` module) gives back every block of 2 MiB the guest frees; the next write to
such a page stops the guest while the host finds and zeroes a page for it. New page cache then
comes at a few hundred MB/s instead of several GB/s, and a cache that writes a blob as it serves
it is held to that pace within the client's GET, while one that fetches the blob a second time
to store it pays it outside. On hardware, and on a node whose memory is in use (its page cache
full, so new pages are recycled ones), it does not arise.

:class:`BackedMemory` switches the reporting off for the run (``page_reporting_order`` above
the largest order: no free block qualifies) and writes every free page once, so that new memory
costs what it costs on hardware; the setting is put back on :meth:`BackedMemory.restore`, and
the host takes free blocks back as before. A run killed before it could put it back leaves the
reporting off (the next run's header says so): ``echo 9 > page_reporting_order`` puts it back. Needs
root.
"""

from __future__ import annotations

import mmap
import re
import time
from pathlib import Path

from common import GB, MIB

PARAMETER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
OFF = "11"  # above MAX_PAGE_ORDER (10): no free block is ever large enough to be reported
MARGIN_BYTES = 1024 * MIB  # left unwritten, for the kernel and whatever runs beside the bench
PIECE_BYTES = 256 * MIB
PAGE = mmap.PAGESIZE


def free_bytes() -> int:
    match = re.search(r"^MemFree:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(match[1]) * 1024 if match else 0


class BackedMemory:
    """Free page reporting off and free memory written once, from :meth:`back` to
    :meth:`restore`."""

    def __init__(self) -> None:
        self.was: str | None = None  # the setting found, None where there is none
        self.changed = False
        self.written = 0  # bytes of free memory written
        self.seconds = 0.0

    def back(self) -> None:
        if PARAMETER.exists():
            self.was = PARAMETER.read_text().strip()
            try:
                PARAMETER.write_text(OFF)
                self.changed = self.was != OFF
            except PermissionError as exc:
                raise RuntimeError(f"--backed-memory needs root: {exc}") from exc
        started = time.perf_counter()
        pieces: list[mmap.mmap] = []
        try:
            # Held until all are written, so that each piece takes pages not yet written.
            for _ in range(max(0, free_bytes() - MARGIN_BYTES) // PIECE_BYTES):
                piece = mmap.mmap(-1, PIECE_BYTES)
                piece[::PAGE] = b"\1" * (PIECE_BYTES // PAGE)
                pieces.append(piece)
                self.written += PIECE_BYTES
        finally:
            for piece in pieces:
                piece.close()
        self.seconds = time.perf_counter() - started

    def restore(self) -> None:
        if self.changed and self.was is not None:
            PARAMETER.write_text(self.was)
            self.changed = False

    def describe(self) -> str:
        if self.was is None:
            reporting = "there is no free page reporting here"
        elif self.was == OFF:
            reporting = f"free page reporting was already off (page_reporting_order {OFF})"
        else:
            reporting = (
                f"free page reporting off for the run (page_reporting_order {self.was} → {OFF})"
            )
        return (
            f"Memory backed as on hardware (--backed-memory): {reporting}, and "
            f"{self.written / GB:.1f} GB of free memory written once ({self.seconds:.0f} s)."
        )
