"""A real containerd 1.6 daemon for pull tests, driven with ``ctr`` without blocking the loop.

Each :class:`Containerd` has its own ``root``, ``state`` and gRPC socket in a short temp dir
under /tmp (unix socket paths must stay under 108 bytes, so not in pytest's ``tmp_path``), and a
generated ``config.toml`` (``version = 2``) that disables the CRI plugin and the snapshotters
and tracing plugins that are useless here. It boots in ~20 ms.

What works in this sandbox (containerd 1.6.20, ctr 1.6.20, as root):

* Path mode: ``ctr images pull --plain-http 127.0.0.1:PORT/repo:tag``. ctr itself (not the
  daemon) talks to the registry: ``HEAD /v2/repo/manifests/tag``, then ``GET`` of the manifest
  by digest (for an index: the index, then the host platform's manifest only), then ``GET`` of
  the config and layer blobs. No ``?ns=``.
* Mirror mode: ``ctr images pull --hosts-dir DIR docker.io/library/x:tag`` with
  ``DIR/docker.io/hosts.toml`` = ``server = "http://127.0.0.1:<dead port>"`` plus
  ``[host."http://127.0.0.1:PORT"]`` ``capabilities = ["pull", "resolve"]`` (see
  :meth:`Containerd.write_hosts`). Every request to the mirror carries ``?ns=<registry host>``,
  URL-encoded (``?ns=docker.io``, ``?ns=registry.local%3A5000``):
  ``HEAD /v2/library/x/manifests/tag?ns=docker.io``, ``GET .../manifests/sha256:..?ns=docker.io``,
  ``GET .../blobs/sha256:..?ns=docker.io``. ctr does NOT normalize names: write
  ``docker.io/library/x:tag`` (``docker.io/x:tag`` asks for ``/v2/x/...``). The hosts dir of a
  ``host:port`` registry is ``DIR/host:port/``. ``--plain-http`` is not needed there (the scheme
  comes from hosts.toml). If the mirror answers 404 or is unreachable, ctr falls back to the
  next host and then ``server`` (dead port → connection refused → the pull fails).
* Manifest requests send ``Accept: application/vnd.docker.distribution.manifest.v2+json,
  application/vnd.docker.distribution.manifest.list.v2+json,
  application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*``.
* Auth: ``--user name:pw`` (``pull(user=...)``). Against a token registry ctr first POSTs
  the OAuth2 form (``grant_type=password``) to the realm, without ``--user`` it GETs the realm
  anonymously; with htpasswd it retries each manifest request after a 401.
* Unpacking works with the default ``overlayfs`` snapshotter (no ``--snapshotter native``
  needed); ``ctr content fetch`` fetches without unpacking.
* Reading back: ``ctr images ls`` prints ``REF TYPE DIGEST SIZE PLATFORMS LABELS``; the DIGEST
  is the pulled target (the index digest for a multi-platform image). ``ctr images check``
  prints ``... STATUS SIZE UNPACKED`` with ``complete (n/n)`` and ``true`` when all is local.
  :meth:`Containerd.image_digest` and :meth:`Containerd.image_status` parse these.
* ctr reuses content already in the namespace's content store (it then only resolves, one
  ``HEAD``); :meth:`Containerd.remove_image` (``images rm --sync``) lets the GC drop it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support import CommandResult, Daemon, free_port, run_command

CONTAINERD_BIN = "/usr/bin/containerd"
CTR_BIN = "/usr/bin/ctr"
NAMESPACE = "detour-test"
CRI_NAMESPACE = "k8s.io"  # where the CRI plugin keeps the kubelet's images

_CRI_PLUGIN = "io.containerd.grpc.v1.cri"
_DISABLED_PLUGINS = (
    _CRI_PLUGIN,
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
)


class Containerd:
    """A containerd daemon subprocess; ``start()`` / ``stop()`` or use as a context manager.

    ``cri=True`` keeps the CRI plugin, as a node's containerd has it: the kubelet's image
    service (``tests/cri.py``), whose images live in the ``k8s.io`` namespace and whose
    registry hosts come from ``hosts_dir`` (``registry.config_path``).
    """

    def __init__(self, namespace: str = NAMESPACE, *, cri: bool = False) -> None:
        self.namespace = CRI_NAMESPACE if cri else namespace
        self.dir = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.address = str(self.dir / "c.sock")
        self.hosts_dir = self.dir / "hosts.d"
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self._daemon = Daemon(
            "containerd",
            [CONTAINERD_BIN, "--config", str(self.config_path)],
            self.log_path,
            grace=10,
        )
        disabled = [p for p in _DISABLED_PLUGINS if not (cri and p == _CRI_PLUGIN)]
        plugins = ", ".join(f'"{p}"' for p in disabled)
        self.config_path.write_text(
            f"""version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = [{plugins}]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""
"""
            + (self._cri_config() if cri else "")
        )

    def _cri_config(self) -> str:
        """The CRI plugin as far as pulling needs it: registry hosts from ``hosts_dir``, and
        no CNI (no pod runs here)."""
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        return f"""
[plugins."{_CRI_PLUGIN}"]
  restrict_oom_score_adj = true
  [plugins."{_CRI_PLUGIN}".registry]
    config_path = "{self.hosts_dir}"
  [plugins."{_CRI_PLUGIN}".cni]
    conf_dir = "{self.dir / "cni"}"
"""

    def start(self, timeout: float = 10.0) -> None:
        """Start the daemon and wait until ``ctr version`` answers (blocking, ~50 ms)."""
        if self._daemon.running:
            return

        def ready() -> bool:
            if not Path(self.address).exists():
                return False
            probe = subprocess.run(
                [CTR_BIN, "--address", self.address, "version"],
                capture_output=True,
                check=False,
                timeout=timeout,
            )
            return probe.returncode == 0

        self._daemon.start(ready, timeout)

    def stop(self) -> None:
        self._daemon.stop()

    def close(self) -> None:
        """Stop the daemon and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_text(self) -> str:
        return self._daemon.log_text()

    # -- ctr --------------------------------------------------------------------------------

    async def ctr(self, *args: str, limit: float = 120.0) -> CommandResult:
        """Run ``ctr --address SOCK --namespace NS *args`` as an asyncio subprocess."""
        return await run_command(
            CTR_BIN, "--address", self.address, "--namespace", self.namespace, *args, limit=limit
        )

    async def pull(
        self,
        ref: str,
        *,
        plain_http: bool = False,
        hosts_dir: Path | None = None,
        platform: str | None = None,
        all_platforms: bool = False,
        user: str | None = None,
        extra: tuple[str, ...] = (),
        limit: float = 120.0,
    ) -> CommandResult:
        """``ctr images pull`` (unpacks). Path mode: ``plain_http=True`` and
        ``ref="127.0.0.1:PORT/repo:tag"``; mirror mode: ``hosts_dir=self.write_hosts(...)`` and
        ``ref="docker.io/library/x:tag"``. ``user`` is ``"name:password"``."""
        args = ["images", "pull"]
        if plain_http:
            args.append("--plain-http")
        if hosts_dir is not None:
            args += ["--hosts-dir", str(hosts_dir)]
        if platform is not None:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if user is not None:
            args += ["--user", user]
        return await self.ctr(*args, *extra, ref, limit=limit)

    def write_hosts(
        self,
        mirror: str,
        registry: str = "docker.io",
        *,
        server: str | None = None,
        capabilities: tuple[str, ...] = ("pull", "resolve"),
        extra: str = "",
    ) -> Path:
        """Write ``<hosts_dir>/<registry>/hosts.toml`` sending ``registry`` to ``mirror``
        (e.g. ``"http://127.0.0.1:PORT"``); ``server`` defaults to a dead local port so nothing
        can reach the real registry. ``extra`` is appended inside the host table (e.g.
        ``'override_path = true'``). Returns the hosts dir, for ``pull(hosts_dir=...)``."""
        if server is None:
            server = f"http://127.0.0.1:{free_port()}"
        caps = ", ".join(f'"{c}"' for c in capabilities)
        directory = self.hosts_dir / registry
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts.toml").write_text(
            f'server = "{server}"\n\n[host."{mirror}"]\n  capabilities = [{caps}]\n'
            + (f"  {extra}\n" if extra else "")
        )
        return self.hosts_dir

    async def images(self) -> dict[str, tuple[str, str]]:
        """``ctr images ls`` as ``{ref: (media type, target digest)}``."""
        result = (await self.ctr("images", "ls")).check()
        out: dict[str, tuple[str, str]] = {}
        for line in result.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3:
                out[fields[0]] = (fields[1], fields[2])
        return out

    async def image_digest(self, ref: str) -> str | None:
        """The target digest ``ref`` was pulled as (index digest for an index), or None."""
        entry = (await self.images()).get(ref)
        return None if entry is None else entry[1]

    async def image_status(self, ref: str) -> tuple[str, bool] | None:
        """From ``ctr images check``: (``"complete (3/3)"``-like status, unpacked?) or None."""
        result = (await self.ctr("images", "check", f"name=={ref}")).check()
        for line in result.stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                # REF TYPE DIGEST STATUS... SIZE UNPACKED; STATUS is "complete (n/n)"
                status = " ".join(fields[3:5])
                return status, fields[-1] == "true"
        return None

    async def content_digests(self) -> set[str]:
        """Digests of every blob in the content store (``ctr content ls -q``)."""
        result = (await self.ctr("content", "ls", "-q")).check()
        return {line.strip() for line in result.stdout.splitlines() if line.strip()}

    async def remove_image(self, *refs: str) -> CommandResult:
        """``ctr images rm --sync``: drop the images and garbage-collect their content."""
        return await self.ctr("images", "rm", "--sync", *refs)
