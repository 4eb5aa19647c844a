"""A full or read-only cache disk is never an error for a client: manifests and tags, like
blobs, are served without being cached, the failure is counted and logged, and once the disk
takes writes again the next miss is cached."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.images import ACCEPT_ALL, PushedImage, delete_manifest, push_image, unique_repo
from tests.proxy import Proxy, scenario, wait_cached, wait_no_temp_files
from tests.registry import Registry

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
TTL = 0.2  # seconds; the test waits it out


@dataclass
class Disk:
    """A real 8 MiB tmpfs for the cache, that can be made full or read-only and healed."""

    mount: Path
    how: str  # "full" or "read_only"
    filler: Path = field(init=False)

    def __post_init__(self) -> None:
        self.filler = self.mount / "filler"

    @property
    def reason(self) -> str:
        """The reason Detour counts a refused write under."""
        return "disk_full" if self.how == "full" else "read_only"

    def go_bad(self) -> None:
        if self.how == "read_only":
            subprocess.run(["mount", "-o", "remount,ro", str(self.mount)], check=True)
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        chunk = b"\0" * 65536
        try:
            while True:  # partial writes fill the last page; then ENOSPC
                os.write(fd, chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)

    def heal(self) -> None:
        if self.how == "read_only":
            subprocess.run(["mount", "-o", "remount,rw", str(self.mount)], check=True)
        else:
            self.filler.unlink()


@pytest.fixture(params=["full", "read_only"])
def disk(request: pytest.FixtureRequest, tmpfs: Callable[[str], Path]) -> Disk:
    return Disk(tmpfs("8m"), request.param)


@dataclass
class Client:
    proxy: Proxy
    statuses: list[int] = field(default_factory=list)

    async def get(
        self, name: str, kind: str, reference: str, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        url = f"{self.proxy.url}/v2/{name}/{kind}/{reference}"
        async with self.proxy.session.request(
            method, url, headers={"Accept": ACCEPT_ALL}
        ) as response:
            self.statuses.append(response.status)
            return response.status, dict(response.headers), await response.read()

    async def manifest(self, name: str, reference: str, method: str = "GET") -> tuple[int, bytes]:
        status, headers, body = await self.get(name, "manifests", reference, method)
        if status == 200:
            assert headers["Docker-Content-Digest"] != ""
        return status, body


def hub_image(registry: Registry, size: int = 512) -> tuple[str, PushedImage]:
    name = unique_repo("x").split("/")[1]
    repo = f"docker-mirror/library/{name}"
    return name, push_image(registry, repo, "v1", layers=1, layer_size=size)


def manifest_file(cache: Path, digest: str) -> Path:
    hexpart = digest.removeprefix("sha256:")
    return cache / "manifests" / "sha256" / hexpart[:2] / hexpart


async def test_a_bad_disk_serves_manifests_and_tags_uncached_then_recovers(
    make_proxy: MakeProxy,
    registry: Registry,
    disk: Disk,
    logs: Callable[[], list[dict[str, Any]]],
) -> None:
    cache = disk.mount / "cache"
    proxy = await make_proxy(
        scenario(registry, cache, cache={"dir": str(cache), "tag_ttl": f"{TTL}s"})
    )
    client = Client(proxy)

    # Before the disk goes bad: tags (and one image's layer) cached.
    kept_name, kept = hub_image(registry)
    moved_name, _ = hub_image(registry)
    gone_name, gone = hub_image(registry)
    rotten_name, rotten = hub_image(registry)
    for name in (kept_name, moved_name, gone_name, rotten_name):
        assert (await client.manifest(name, "v1"))[0] == 200
    manifest_file(cache, rotten.digest).write_bytes(b"bit rot")
    layer = kept.layers[0]
    assert (await client.get(kept_name, "blobs", layer.digest))[0] == 200
    assert await wait_cached(cache, layer.digest)
    cold_tag_name, cold_tag = hub_image(registry)
    cold_digest_name, cold_digest = hub_image(registry)
    cold_blob_name, cold_blob = hub_image(registry, size=1 << 20)

    disk.go_bad()
    logs()
    moved = push_image(registry, f"docker-mirror/library/{moved_name}", "v1", layer_size=700)
    delete_manifest(registry, f"docker-mirror/library/{gone_name}", gone.digest)
    await asyncio.sleep(TTL)

    # Cold manifests, by tag and by digest: served, not cached.
    assert await client.manifest(cold_tag_name, "v1") == (200, cold_tag.manifest)
    assert await client.manifest(cold_digest_name, cold_digest.digest) == (
        200,
        cold_digest.manifest,
    )
    assert not manifest_file(cache, cold_tag.digest).exists()
    assert not manifest_file(cache, cold_digest.digest).exists()
    # Tags past tag_ttl: revalidated and served, the confirmation not recorded.
    assert await client.manifest(kept_name, "v1") == (200, kept.manifest)
    assert await client.manifest(kept_name, "v1", "HEAD") == (200, b"")
    # A tag that moved upstream meanwhile: the new manifest.
    assert await client.manifest(moved_name, "v1") == (200, moved.manifest)
    # A tag deleted upstream: 404, whether or not its record can be removed.
    assert (await client.manifest(gone_name, "v1"))[0] == 404
    # What was cached still reads: a manifest by digest and a blob; a cold blob streams.
    assert await client.manifest(kept_name, kept.digest) == (200, kept.manifest)
    # One that fails its digest is a miss, whether or not it can be removed: fetched again.
    assert await client.manifest(rotten_name, rotten.digest) == (200, rotten.manifest)
    assert (await client.get(kept_name, "blobs", layer.digest))[::2] == (200, layer.data)
    big = cold_blob.layers[0]
    assert (await client.get(cold_blob_name, "blobs", big.digest))[::2] == (200, big.data)

    assert 500 not in client.statuses
    assert await wait_no_temp_files(cache), list((cache / "tmp").iterdir())
    refused = [
        (line["kind"], line["reason"])
        for line in logs()
        if line["event"] == "cache_write_failed" and line.get("kind") in ("manifest", "tag")
    ]
    # Two cold manifests and the moved one; two revalidations. Read-only, also the rotten
    # manifest (it can't be removed, so it can't be replaced) and the dropped tag; on a full
    # disk, removing the rotten file freed the room its replacement took.
    expected = [("manifest", disk.reason)] * 3 + [("tag", disk.reason)] * 2
    if disk.how == "read_only":
        expected += [("manifest", disk.reason), ("tag", disk.reason)]
    assert sorted(refused) == sorted(expected)
    counted = await proxy.metric("detour_cache_write_failures_total", reason=disk.reason)
    assert counted >= len(expected)

    # Room again: the next miss is cached, and its tag then answered from disk.
    disk.heal()
    after_name, after = hub_image(registry)
    assert await client.manifest(after_name, "v1") == (200, after.manifest)
    assert manifest_file(cache, after.digest).is_file()
    mark = registry.mark()
    assert await client.manifest(after_name, "v1") == (200, after.manifest)
    assert registry.paths_since(mark) == []
    assert await client.manifest(kept_name, "v1") == (200, kept.manifest)  # confirmed again
    assert 500 not in client.statuses
