"""A slow disk on a fast machine: an ext4 file system on a loop device whose writes the block
layer limits to a rate, as an edge node's eMMC, SD card or busy SATA disk.

The limit is cgroup v1's ``blkio.throttle.write_bps_device`` set in the root blkio cgroup for
the loop device, so it holds every write to it: a process's ``O_DIRECT`` writes, and the
kernel's writeback of page-cache writes (which runs in the root cgroup) alike. ``dd
oflag=direct`` and ``dd conv=fsync`` both run at the rate; a buffered write without a sync
runs at memory speed until the kernel's dirty limits, as on a real slow disk. Needs root.

``written()`` is what reached the device so far (``/sys/block/loopN/stat``), so a test can tell
what a client got before the disk had it.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

BLKIO_WRITE_BPS = Path("/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device")
SECTOR = 512


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


class SlowDisk:
    """``size`` bytes of ext4 mounted at :attr:`path`, written at ``rate`` bytes a second."""

    def __init__(self, rate: int, size: int = 1 << 30) -> None:
        self.rate = rate
        self.dir = Path(tempfile.mkdtemp(prefix="slow-disk-", dir="/var/tmp"))
        self.image = self.dir / "disk.img"
        self.path = self.dir / "mnt"
        self.device = ""
        self.size = size

    def __enter__(self) -> SlowDisk:
        if not BLKIO_WRITE_BPS.exists():
            raise RuntimeError(f"no cgroup v1 blkio throttle here ({BLKIO_WRITE_BPS})")
        with self.image.open("wb") as image:
            image.truncate(self.size)
        # --direct-io: the loop device writes its backing file past the page cache, as a disk
        # writes its media, so a write costs no second copy into memory on the way down.
        self.device = _run("losetup", "--direct-io=on", "--find", "--show", str(self.image)).strip()
        try:
            _run("mkfs.ext4", "-q", "-F", self.device)
            self.path.mkdir()
            _run("mount", self.device, str(self.path))
            BLKIO_WRITE_BPS.write_text(f"{self.numbers} {self.rate}\n")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device:
            BLKIO_WRITE_BPS.write_text(f"{self.numbers} 0\n")
            subprocess.run(["umount", "-l", str(self.path)], check=False, timeout=60)
            subprocess.run(["losetup", "--detach", self.device], check=False, timeout=60)
            self.device = ""
        subprocess.run(["rm", "-rf", str(self.dir)], check=False, timeout=60)

    @property
    def numbers(self) -> str:
        """The device's ``major:minor``."""
        return _run("lsblk", "--nodeps", "--noheadings", "--output", "MAJ:MIN", self.device).strip()

    def written(self) -> int:
        """Bytes written to the device so far."""
        name = Path(self.device).name
        fields = Path(f"/sys/block/{name}/stat").read_text().split()
        return int(fields[6]) * SECTOR  # the seventh field: sectors written
