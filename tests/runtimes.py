"""The pull clients a node really has, each with an image store of its own, behind one face.

A :class:`Runtime` pulls an image by tag through Detour in one mode and says which manifest it
got; :meth:`Runtime.empty` leaves its store as a new node's (nothing to reuse, so the next
pull asks for everything again). Path mode names Detour in the reference
(``127.0.0.1:PORT/docker.io/library/x:tag``); mirror mode names the image as the chart does
(``docker.io/library/x:tag``) and the client's own mirror configuration sends it to Detour:

* skopeo and podman (containers/image, as CRI-O): a ``registries.conf`` written by
  ``detour registries-conf``;
* ``ctr`` and the kubelet's CRI call (containerd): ``hosts.toml`` (``?ns=docker.io``);
* dockerd: ``--registry-mirror`` (Docker Hub names only; no ``ns``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

from tests.containerd import Containerd
from tests.cri import ImageService
from tests.dockerd import Dockerd
from tests.support import CommandResult, run_command

Mode = Literal["path", "mirror"]


class Runtime(ABC):
    name: str
    modes: tuple[Mode, ...] = ("path", "mirror")
    # Whether a pull of a multi-platform image keeps the index (as a node's store does) or
    # only this platform's manifest (skopeo into an OCI layout).
    keeps_index = True

    def __init__(self, proxy_url: str) -> None:
        self.proxy_url = proxy_url
        self.proxy_host = proxy_url.removeprefix("http://")

    def reference(self, mode: Mode, repository: str, tag: str) -> str:
        """How this client names ``docker.io/<repository>:<tag>`` in ``mode``."""
        if mode == "path":
            return f"{self.proxy_host}/docker.io/{repository}:{tag}"
        return f"docker.io/{repository}:{tag}"

    @abstractmethod
    async def pull(self, mode: Mode, repository: str, tag: str) -> str:
        """Pull by tag; the digest of the manifest the tag resolved to (an index's own)."""

    @abstractmethod
    async def empty(self) -> None:
        """Leave the image store empty, as a new node's; raise if something stays."""

    def close(self) -> None:  # noqa: B027 (most have nothing to close)
        """Stop what the client runs and delete its files."""


class _ContainersImage(Runtime):
    """skopeo and podman: containers/image with a ``registries.conf`` of Detour's."""

    def __init__(self, proxy_url: str) -> None:
        super().__init__(proxy_url)
        self.dir = Path(tempfile.mkdtemp(prefix="cimg-"))
        self.config = self.dir / "registries.conf"
        self._pulls = 0

    async def write_config(self, settings: Path) -> None:
        """``detour registries-conf`` for ``settings``, as an operator would run it."""
        result = await run_command(
            sys.executable,
            "-m",
            "proxy",
            "registries-conf",
            "--config",
            str(settings),
            "--endpoint",
            self.proxy_url,
            "--out",
            str(self.config),
        )
        result.check()

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(self.config)}

    def fresh_dir(self) -> Path:
        self._pulls += 1
        return self.dir / f"store-{self._pulls}"

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Skopeo(_ContainersImage):
    """``skopeo copy`` into a new OCI layout: every pull starts from an empty store."""

    name = "skopeo"
    keeps_index = False

    async def pull(self, mode: Mode, repository: str, tag: str) -> str:
        layout = self.fresh_dir()
        ref = self.reference(mode, repository, tag)
        (
            await run_command(
                "skopeo",
                "--registries-conf",  # skopeo reads no CONTAINERS_REGISTRIES_CONF
                str(self.config),
                "copy",
                "--src-tls-verify=false",
                f"docker://{ref}",
                f"oci:{layout}:x",
                env=self.env(),
            )
        ).check()
        return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])

    async def empty(self) -> None:
        """Nothing to do: the next pull goes into a layout of its own."""


class Podman(_ContainersImage):
    """``podman pull`` into a store of its own (``--root``), vfs, as root."""

    name = "podman"

    def __init__(self, proxy_url: str) -> None:
        super().__init__(proxy_url)
        self.root = self.fresh_dir()

    async def podman(self, *args: str) -> CommandResult:
        return await run_command(
            "podman",
            "--root",
            str(self.root / "storage"),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
            *args,
            env=self.env(),
        )

    async def pull(self, mode: Mode, repository: str, tag: str) -> str:
        ref = self.reference(mode, repository, tag)
        (await self.podman("pull", "--tls-verify=false", ref)).check()
        listing = await self.podman("image", "inspect", "--format", "{{.Digest}}", ref)
        return listing.check().stdout.strip()

    async def empty(self) -> None:
        (await self.podman("rmi", "--all", "--force")).check()
        left = (await self.podman("images", "--all", "--quiet")).check().stdout.split()
        assert left == [], f"podman still holds {left}"


class Ctr(Runtime):
    """containerd's ``ctr images pull`` (the client resolves; the daemon stores)."""

    name = "ctr"

    def __init__(self, proxy_url: str) -> None:
        super().__init__(proxy_url)
        self.containerd = Containerd()
        self.containerd.start()
        self.hosts = self.containerd.write_hosts(proxy_url, "docker.io")

    async def pull(self, mode: Mode, repository: str, tag: str) -> str:
        ref = self.reference(mode, repository, tag)
        if mode == "path":
            result = await self.containerd.pull(ref, plain_http=True)
        else:
            result = await self.containerd.pull(ref, hosts_dir=self.hosts)
        result.check()
        digest = await self.containerd.image_digest(ref)
        assert digest is not None
        return digest

    async def empty(self) -> None:
        refs = list(await self.containerd.images())
        if refs:
            (await self.containerd.remove_image(*refs)).check()
        left = await self.containerd.content_digests()
        assert not left, f"containerd still holds {left}"

    def close(self) -> None:
        self.containerd.close()


class Cri(Runtime):
    """The kubelet's pull: ``ImageService/PullImage`` to containerd's CRI plugin, whose
    registry ``config_path`` holds the ``hosts.toml`` of mirror mode."""

    name = "cri"

    def __init__(self, proxy_url: str) -> None:
        super().__init__(proxy_url)
        self.containerd = Containerd(cri=True)
        self.containerd.start()
        self.containerd.write_hosts(proxy_url, "docker.io")
        self.service = ImageService(self.containerd.address)

    async def pull(self, mode: Mode, repository: str, tag: str) -> str:
        ref = self.reference(mode, repository, tag)
        image_id = await self.service.pull(ref)
        for image in await self.service.images():
            if image.id == image_id:
                name = ref.rpartition(":")[0]
                return next(d for d in image.repo_digests if d.startswith(name + "@"))[
                    len(name) + 1 :
                ]
        raise AssertionError(f"{ref} pulled as {image_id}, which the CRI does not list")

    async def empty(self) -> None:
        for image in await self.service.images():
            await self.service.remove(image.id)
        # The CRI plugin removes the image; containerd collects its content just after.
        for _ in range(300):
            left = await self.containerd.content_digests()
            if not left:
                break
            await asyncio.sleep(0.1)
        assert not left, f"containerd's CRI namespace still holds {left}"
        assert not await self.service.images()

    def close(self) -> None:
        self.containerd.close()


class Docker(Runtime):
    """dockerd 20.10 with Detour as its registry mirror, pulled with the docker CLI."""

    name = "docker"

    def __init__(self, proxy_url: str) -> None:
        super().__init__(proxy_url)
        self.dockerd = Dockerd(mirrors=[proxy_url])
        self.dockerd.start()

    def reference(self, mode: Mode, repository: str, tag: str) -> str:
        if mode == "mirror":  # as a chart names it: the mirror is for Docker Hub names
            return f"{repository.removeprefix('library/')}:{tag}"
        return super().reference(mode, repository, tag)

    async def pull(self, mode: Mode, repository: str, tag: str) -> str:
        ref = self.reference(mode, repository, tag)
        (await self.dockerd.docker("pull", ref)).check()
        inspect = await self.dockerd.docker(
            "image", "inspect", "--format", "{{json .RepoDigests}}", ref
        )
        (repo_digest,) = json.loads(inspect.check().stdout)
        return str(repo_digest).rpartition("@")[2]

    async def empty(self) -> None:
        await self.dockerd.empty_store()
        left = await self.dockerd.image_ids()
        assert not left, f"dockerd still holds {left}"

    def close(self) -> None:
        self.dockerd.close()


RUNTIMES: dict[str, type[Runtime]] = {r.name: r for r in (Skopeo, Podman, Ctr, Cri, Docker)}
