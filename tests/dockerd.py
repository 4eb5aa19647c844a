"""A private Docker engine (Debian's dockerd 20.10) for tests, driven with Debian's docker CLI.

Each :class:`Dockerd` has its own data root, exec root, pid file and API socket in a short
temp dir under /tmp, and keeps its containers in containerd namespaces of its own, so several
can run beside each other and beside a node's containerd. It starts with what works in these
VMs: ``--storage-driver=vfs`` (no overlay on overlay), no iptables rules and no default bridge
unless ``bridge=True``. ``mirrors`` and ``insecure`` become ``--registry-mirror`` and
``--insecure-registry``: dockerd's mirror mode, which it uses for Docker Hub names only.
With ``netns=True`` the engine runs in a network namespace of its own (``ip netns add``,
entered with ``nsenter``, which leaves the mounts alone): its bridges, its iptables rules and
the host ports its containers publish (compose's fixed ``127.0.0.1:7439``) stay in there.

What dockerd sends for ``docker pull HOST/name:tag`` (HOST on 127.0.0.0/8 is insecure by
default, so plain HTTP): ``GET /v2/``, ``HEAD /v2/<name>/manifests/<tag>``, ``GET`` of the
manifest by digest (for an index, then the platform's manifest), ``GET`` of the config and
layer blobs. Through ``--registry-mirror`` the same, for ``library/<name>`` with no ``ns``.

``/usr/local/bin/docker`` here is a Docker 28 CLI that this engine is too old for;
:data:`DOCKER_BIN` is Debian's.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.support import CommandResult, Daemon, run_command

DOCKERD_BIN = "/usr/sbin/dockerd"
DOCKER_BIN = "/usr/bin/docker"


class Dockerd:
    """A dockerd subprocess; ``start()`` / ``close()`` or use as a context manager."""

    def __init__(
        self,
        *,
        mirrors: Sequence[str] = (),
        insecure: Sequence[str] = (),
        bridge: bool = False,
        netns: bool = False,
        extra: Sequence[str] = (),
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dkd-", dir="/tmp"))
        self.socket = self.dir / "d.sock"
        self.host = f"unix://{self.socket}"
        # Its containerd namespaces: letters and digits between single separators, no "_".
        name = self.dir.name.replace("_", "0")
        self.netns = name if netns else None
        enter = ["nsenter", f"--net=/run/netns/{name}"] if netns else []
        argv = [
            *enter,
            DOCKERD_BIN,
            "--data-root",
            str(self.dir / "root"),
            "--exec-root",
            str(self.dir / "exec"),
            "--pidfile",
            str(self.dir / "dockerd.pid"),
            "--host",
            self.host,
            "--storage-driver=vfs",
            f"--containerd-namespace={name}",
            f"--containerd-plugins-namespace={name}-plugins",
            "--iptables=false",
            "--ip-masq=false",
        ]
        if not bridge:
            argv.append("--bridge=none")
        argv += [f"--registry-mirror={m}" for m in mirrors]
        argv += [f"--insecure-registry={r}" for r in insecure]
        argv += list(extra)
        self._daemon = Daemon("dockerd", argv, self.dir / "dockerd.log", grace=20)

    def start(self, timeout: float = 60.0) -> None:
        """Start the engine and wait until it answers (blocking; a second or two)."""
        if self._daemon.running:
            return
        if self.netns is not None and not Path(f"/run/netns/{self.netns}").exists():
            subprocess.run(["ip", "netns", "add", self.netns], check=True, timeout=30)
            subprocess.run(
                ["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True, timeout=30
            )

        def ready() -> bool:
            if not self.socket.exists():
                return False
            probe = subprocess.run(
                [DOCKER_BIN, "--host", self.host, "version", "--format", "{{.Server.Version}}"],
                capture_output=True,
                check=False,
                timeout=timeout,
            )
            return probe.returncode == 0

        self._daemon.interval = 0.2
        self._daemon.start(ready, timeout)

    def close(self) -> None:
        """Stop the engine (its containers with it) and delete its directory."""
        self._daemon.stop()
        if self.netns is not None:
            subprocess.run(["ip", "netns", "delete", self.netns], check=False, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Dockerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_text(self) -> str:
        return self._daemon.log_text()

    async def docker(self, *args: str, limit: float = 180.0) -> CommandResult:
        """``docker --host SOCK *args``, without blocking the loop."""
        return await run_command(DOCKER_BIN, "--host", self.host, *args, limit=limit)

    async def image_ids(self) -> list[str]:
        """The IDs of every image in the engine's store."""
        listing = (await self.docker("image", "ls", "--all", "--quiet", "--no-trunc")).check()
        return listing.stdout.split()

    async def empty_store(self) -> None:
        """Remove every image, so the next pull finds nothing local."""
        ids = await self.image_ids()
        if ids:
            (await self.docker("image", "rm", "--force", *ids)).check()
