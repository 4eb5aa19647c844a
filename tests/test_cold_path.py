"""The cold path: blobs written with O_DIRECT where the cache's file system takes it, through the
page cache where it refuses (ramfs here; tmpfs before Linux 6.6, some overlay and network file
systems), and verified, whole cache files either way."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.images import Client, unique_repo
from tests.proxy import Proxy, blob_path, scenario, slow_client_get, wait_cached
from tests.registry import Registry
from tests.relay import Relay

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
KiB = 1024
MiB = 1024 * KiB
# A blob of whole 4 KiB blocks, one with a last partial block, one smaller than a block.
SIZES = (3 * MiB, 3 * MiB + 1234, 100)


def takes_o_direct(directory: Path) -> bool:
    try:
        fd = os.open(directory / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    (directory / ".probe").unlink()
    return True


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mount: a real file system that refuses O_DIRECT (tmpfs takes it since 6.6)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a ramfs needs root")
    mount = tmp_path / "ramfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(params=["direct", "buffered"])
def cache_dir(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    """(the write mode expected, a cache directory on a file system that gives it)."""
    if request.param == "direct":
        if not takes_o_direct(tmp_path):
            pytest.skip(f"{tmp_path} refuses O_DIRECT")
        return "direct", tmp_path / "cache"
    mount: Path = request.getfixturevalue("ramfs")
    assert not takes_o_direct(mount)
    return "buffered", mount / "cache"


def write_modes(proxy: Proxy) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in proxy.log_lines() if line.startswith("{")]
    return [r for r in records if r["event"] == "cache_blob_writes"]


async def test_blobs_are_cached_whole_and_verified_in_either_write_mode(
    detour_process: StartProxy, registry: Registry, cache_dir: tuple[str, Path]
) -> None:
    mode, directory = cache_dir
    repo = f"docker-mirror/library/{unique_repo('cold').split('/')[1]}"
    pusher = Client(registry)
    blobs = [(pusher.push_blob(repo, data), data) for data in map(os.urandom, SIZES)]
    proxy = await detour_process(scenario(registry, directory))
    name = repo.removeprefix("docker-mirror/library/")

    async def get(digest: str) -> tuple[int, bytes]:
        async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{digest}") as response:
            return response.status, await response.read()

    for digest, data in blobs:
        # Four clients at once: one fetch, each of them served whole.
        assert await asyncio.gather(*(get(digest) for _ in range(4))) == [(200, data)] * 4
        assert await wait_cached(directory, digest)
        assert blob_path(directory, digest).read_bytes() == data
        assert await get(digest) == (200, data)  # a hit
    assert list((directory / "tmp").iterdir()) == []
    # The mode is logged once, at info, when the first blob is written.
    assert [(r["mode"], r["level"]) for r in write_modes(proxy)] == [(mode, "info")]
    assert await proxy.metric("detour_cache_requests_total", kind="blob", result="miss") == 3


async def test_a_stalled_client_does_not_hold_the_fetch_back(
    make_proxy: MakeProxy, registry: Registry, cache_dir: tuple[str, Path]
) -> None:
    """The fetch goes on at the upstream's pace while a client stops reading; the client,
    left behind the fetch's window, gets the rest from the file, and every byte right."""
    _, directory = cache_dir
    repo = f"docker-mirror/library/{unique_repo('stall').split('/')[1]}"
    data = os.urandom(16 * MiB)
    digest = Client(registry).push_blob(repo, data)
    proxy = await make_proxy(scenario(registry, directory))
    name = repo.removeprefix("docker-mirror/library/")
    reader, writer, head = await slow_client_get(proxy, f"/v2/{name}/blobs/{digest}")
    assert head.startswith(b"HTTP/1.1 200 "), head
    try:
        got = bytearray(await reader.readexactly(64 * KiB))
        # Stalled: the fetch finishes and the blob is cached meanwhile.
        assert await wait_cached(directory, digest, limit=10)
        got += await reader.readexactly(len(data) - len(got))
    finally:
        writer.close()
    assert bytes(got) == data


async def test_a_client_that_joins_late_catches_up(
    make_proxy: MakeProxy, registry: Registry, cache_dir: tuple[str, Path]
) -> None:
    """A client that joins a fetch 4 MiB in (past the window in memory) reads the start from
    the file and the rest as it arrives; one upstream GET for both."""
    _, directory = cache_dir
    repo = f"docker-mirror/library/{unique_repo('late').split('/')[1]}"
    data = os.urandom(12 * MiB)
    digest = Client(registry).push_blob(repo, data)
    async with Relay(registry, rate=8 * MiB) as relay:
        config = scenario(registry, directory)
        config["redirects"] = [{"src": "docker.io/", "to": f"{relay.host}/docker-mirror/"}]
        config["registries"] = {relay.host: {"insecure": True}}
        proxy = await make_proxy(config)
        name = repo.removeprefix("docker-mirror/library/")
        url = f"{proxy.url}/v2/{name}/blobs/{digest}"
        mark = registry.mark()

        async def first() -> bytes:
            async with proxy.session.get(url) as response:
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) >= 4 * MiB and not joined.is_set():
                        joined.set()
                return bytes(body)

        async def late() -> bytes:
            await joined.wait()
            async with proxy.session.get(url) as response:
                return await response.read()

        joined = asyncio.Event()
        bodies = await asyncio.gather(first(), late())
    assert list(bodies) == [data, data]
    entries = await registry.wait_entries(mark, at_least=1)
    assert [e.method for e in entries if digest in e.path] == ["GET"]
    assert await proxy.metric("detour_cache_requests_total", kind="blob", result="joined") == 1
