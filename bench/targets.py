"""What is measured, started and stopped: the mirror, distribution's proxy mode in front of it
(the "peer"), this tree's Detour and, with ``--baseline``, another tree's, each on a free port
of 127.0.0.1 with its storage in the bench's temp dir; their URLs; and where each keeps a
blob it has cached (the bench waits for it before counting a hit)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common import DETOUR_NAME, MIRROR_REPO, REPO_ROOT, log
from configs import detour_config, registry_config, write_config
from guest_memory import BackedMemory
from mirror import AccessLog
from processes import Service, free_port
from uplink import Uplink

sys.path.insert(0, str(REPO_ROOT))  # the tests' slow disk, for --slow-disk
from tests.slow_disk import SlowDisk

SLOW_DISK_BYTES = 64 << 30  # sparse: only what the caches write takes room

TargetKey = Literal["detour", "base", "peer", "mirror"]
CACHES: tuple[TargetKey, ...] = ("detour", "peer")
ALL_TARGETS: tuple[TargetKey, ...] = ("detour", "peer", "mirror")
DETOURS: tuple[TargetKey, ...] = ("detour", "base")  # this tree's, and --baseline's
LABELS: dict[TargetKey, str] = {
    "detour": "Detour",
    "base": "Detour baseline",
    "peer": "distribution proxy",
    "mirror": "mirror direct",
}


@dataclass(frozen=True, slots=True)
class Target:
    key: TargetKey
    base: str  # http://127.0.0.1:PORT/v2/<name>

    def blob(self, digest: str) -> str:
        return f"{self.base}/blobs/{digest}"

    def manifest(self, reference: str) -> str:
        return f"{self.base}/manifests/{reference}"


def rotated(keys: Sequence[TargetKey], shift: int) -> list[TargetKey]:
    """The same targets in another order each repeat, so none always goes first."""
    shift %= len(keys)
    return [*keys[shift:], *keys[:shift]]


class Targets:
    """The servers measured. ``targets[key]`` is a target's URLs; :attr:`services` every
    process, stopped in reverse by :meth:`stop`."""

    def __init__(
        self,
        workdir: Path,
        baseline: Path | None = None,
        baseline_ramfs: bool = False,
        slow_disk: int | None = None,
        uplink_mbit: float | None = None,
        backed_memory: bool = False,
    ) -> None:
        self.dir = workdir
        self.baseline = baseline
        self.baseline_ramfs = baseline_ramfs
        self.slow_disk = slow_disk
        self.slow_disks: list[SlowDisk] = []
        self.mirror_port, self.peer_port, self.detour_port = (free_port() for _ in range(3))
        self.uplink = None if uplink_mbit is None else Uplink(self.mirror_port, uplink_mbit)
        self.memory = BackedMemory() if backed_memory else None
        self.base_port = free_port()
        self.peer_root = workdir / "peer-storage"
        self.detour_cache = workdir / "detour-cache"
        self.base_cache = workdir / "base-cache"
        self.ramfs: Path | None = None
        self.caches: tuple[TargetKey, ...] = CACHES
        if baseline is not None:
            self.caches = ("detour", "base", "peer")
        self.all_targets: tuple[TargetKey, ...] = (*self.caches, "mirror")
        mirror_config = registry_config(workdir, "mirror", f"127.0.0.1:{self.mirror_port}")
        self.mirror = Service(
            "mirror", ["docker-registry", "serve", str(mirror_config)], workdir / "mirror.log"
        )
        peer_config = registry_config(
            workdir,
            "peer",
            f"127.0.0.1:{self.peer_port}",
            f"http://127.0.0.1:{self.mirror_port}",
        )
        self.peer = Service(
            "peer", ["docker-registry", "serve", str(peer_config)], workdir / "peer.log"
        )
        self.detour = Service(
            "detour",
            [sys.executable, "-m", "proxy", "serve", "--config", str(self._detour_config())],
            workdir / "detour.log",
            cwd=REPO_ROOT,
        )
        self.services = [self.mirror, self.peer, self.detour]
        self.base: Service | None = None
        if baseline is not None:
            # python -m proxy from the baseline's directory imports the baseline's package.
            config = self._detour_config("base", self.base_port, self.base_cache)
            self.base = Service(
                "base",
                [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                workdir / "base.log",
                cwd=baseline,
            )
            self.services.append(self.base)
        self.mirror_log = AccessLog(self.mirror.log_path)
        self._urls: dict[TargetKey, Target] = {
            "detour": Target("detour", f"http://127.0.0.1:{self.detour_port}/v2/{DETOUR_NAME}"),
            "base": Target("base", f"http://127.0.0.1:{self.base_port}/v2/{DETOUR_NAME}"),
            "peer": Target("peer", f"http://127.0.0.1:{self.peer_port}/v2/{MIRROR_REPO}"),
            "mirror": Target("mirror", f"http://127.0.0.1:{self.mirror_port}/v2/{MIRROR_REPO}"),
        }

    def __getitem__(self, key: TargetKey) -> Target:
        return self._urls[key]

    def _detour_config(
        self, name: str = "detour", port: int | None = None, cache: Path | None = None
    ) -> Path:
        config = detour_config(
            f"127.0.0.1:{self.mirror_port}",
            f"127.0.0.1:{port or self.detour_port}",
            cache or self.detour_cache,
        )
        return write_config(self.dir / f"{name}.yml", config)

    def service(self, key: TargetKey) -> Service:
        """The process behind a target."""
        services = {"detour": self.detour, "peer": self.peer, "mirror": self.mirror}
        if key == "base":
            assert self.base is not None, "no --baseline"
            return self.base
        return services[key]

    # --------------------------------------------------------------------- start and stop

    def start_mirror(self) -> None:
        if self.memory is not None:
            self.memory.back()
            log(self.memory.describe())
        self.mirror.start()
        self.mirror.wait_ready(f"http://127.0.0.1:{self.mirror_port}/v2/")

    def start_caches(self) -> None:
        """The peer and the Detours, once the mirror holds the content."""
        if self.slow_disk is not None:
            for storage in (self.peer_root, self.detour_cache, self.base_cache):
                disk = SlowDisk(self.slow_disk, size=SLOW_DISK_BYTES).__enter__()
                self.slow_disks.append(disk)
                storage.symlink_to(disk.path)
            log(f"each cache's storage on a disk written at {self.slow_disk / 1e6:.0f} MB/s")
        if self.uplink is not None:
            self.uplink.apply()
            log(f"what the mirror sends held to {self.uplink.mbit:g} Mbit/s")
        self.peer.start()
        self.peer.wait_ready(f"http://127.0.0.1:{self.peer_port}/v2/")
        self.detour.start()
        self.detour.wait_ready(f"http://127.0.0.1:{self.detour_port}/healthz")
        log(
            f"mirror pid {self.mirror.pid} :{self.mirror_port}, "
            f"peer pid {self.peer.pid} :{self.peer_port}, "
            f"detour pid {self.detour.pid} :{self.detour_port}; logs in {self.dir}"
        )
        if self.base is not None:
            if self.baseline_ramfs:
                self.ramfs = self.dir / "ramfs"
                self.ramfs.mkdir()
                subprocess.run(["mount", "-t", "ramfs", "ramfs", str(self.ramfs)], check=True)
                self.base_cache.symlink_to(self.ramfs)
            self.base.start()
            self.base.wait_ready(f"http://127.0.0.1:{self.base_port}/healthz")
            log(f"baseline detour pid {self.base.pid} :{self.base_port} ({self.baseline})")

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.unmount()

    def unmount(self) -> None:
        if self.memory is not None:
            self.memory.restore()
        if self.uplink is not None:
            self.uplink.remove()
        for disk in self.slow_disks:
            disk.__exit__()
        self.slow_disks = []
        if self.ramfs is not None:
            subprocess.run(["umount", "-l", str(self.ramfs)], check=False)
            self.ramfs = None

    # --------------------------------------------------------------------- cached blobs

    def cached_path(self, key: TargetKey, digest: str) -> Path:
        hex_digest = digest.split(":", 1)[1]
        if key in DETOURS:
            cache = self.detour_cache if key == "detour" else self.base_cache
            return cache / "blobs" / "sha256" / hex_digest[:2] / hex_digest
        return (
            self.peer_root
            / "docker/registry/v2/blobs/sha256"
            / hex_digest[:2]
            / hex_digest
            / "data"
        )

    def _is_cached(self, key: TargetKey, digest: str) -> bool:
        return self.cached_path(key, digest).is_file()

    async def wait_cached(self, key: TargetKey, digest: str, limit: float = 120.0) -> bool:
        """Until the cache has committed the blob to its storage (the peer does it in the
        background, after or while it answers the client)."""
        deadline = time.monotonic() + limit
        while True:
            if self._is_cached(key, digest):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
