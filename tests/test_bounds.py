"""Bounds that hold under hostile upstreams and bursts: the disk, fetches nobody waits for,
one upstream's share of the connections, memory, and a slow client on a full disk.

The hostile upstreams are small aiohttp apps of the tests' own; the healthy ones are the real
distribution registry. Memory is measured as the peak RSS (VmHWM) of a real ``detour serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.memory import CHUNK_BYTES
from tests.images import Blob, Client, push_image, unique_repo
from tests.proxy import Proxy, blob_path, scenario, slow_client_get, wait_no_temp_files
from tests.registry import Registry
from tests.relay import Relay

MakeProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1024 * 1024
CHUNK = CHUNK_BYTES  # the most one read gives: the most a write can go past a reservation


def digest_of(index: int) -> str:
    return "sha256:" + hashlib.sha256(f"hostile-{index}".encode()).hexdigest()


@pytest.fixture
def cache_disk(tmpfs: Callable[[str], Path]) -> Path:
    """A real 64 MiB file system (tmpfs) for the cache."""
    return tmpfs("64m")


class Hostile:
    """Blobs that never end: chunked forever, or announcing 100 GiB; or trickling 1 byte/s."""

    def __init__(self) -> None:
        self.open = 0  # responses being sent now
        self.started = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self.blob)
        return app

    async def blob(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["name"].rsplit("/", 1)[-1]
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if kind == "announced":
            response.content_length = 100 * 1024**3
        elif kind == "trickle":
            response.content_length = 10 * MiB
        else:
            response.enable_chunked_encoding()
        self.open += 1
        self.started += 1
        try:
            await response.prepare(request)
            while True:
                if kind == "trickle":
                    await response.write(b"x")
                    await asyncio.sleep(1)
                else:
                    await response.write(b"\0" * 64 * 1024)
        finally:
            self.open -= 1


@pytest.fixture
async def hostile(aiohttp_server: Any) -> tuple[Hostile, str]:
    upstream = Hostile()
    server = await aiohttp_server(upstream.app(), host="127.0.0.1")
    return upstream, f"127.0.0.1:{server.port}"


def used(mount: Path) -> int:
    return shutil.disk_usage(mount).used


@pytest.mark.parametrize("kind", ["endless", "announced"])
async def test_a_never_ending_blob_stays_inside_max_size(
    make_proxy: MakeProxy,
    hostile: tuple[Hostile, str],
    cache_disk: Path,
    kind: str,
) -> None:
    upstream, host = hostile
    proxy = await make_proxy(
        {
            "cache": {"dir": str(cache_disk / "cache"), "max_size": "16MiB"},
            "redirects": [{"src": "docker.io/", "to": f"{host}/hostile/"}],
            "registries": {host: {"insecure": True}},
            "upstream": {"abandon_after": "1s"},
        }
    )
    baseline = used(cache_disk)
    # A client that asks and hangs up at once.
    url = f"{proxy.url}/v2/x/{kind}/blobs/{digest_of(0)}"
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(0.2), proxy.session.get(url) as response:
            await response.content.read(1)
    peak = 0
    for _ in range(60):  # 3 s: the fetch is cut or abandoned well within
        peak = max(peak, used(cache_disk) - baseline)
        await asyncio.sleep(0.05)
    assert peak <= 16 * MiB + CHUNK
    assert upstream.open == 0  # the fetch ended: nothing is still being received
    assert await wait_no_temp_files(proxy.cache_dir)


async def test_abandoned_trickling_fetches_leave_room_for_healthy_pulls(
    detour_process: StartProxy,
    hostile: tuple[Hostile, str],
    registry: Registry,
    tmp_path: Path,
) -> None:
    """300 clients ask a registry that trickles 1 byte/s and hang up: healthy cold pulls from
    the real mirror go through at once, and the abandoned fetches end."""
    upstream, host = hostile
    config = scenario(registry, tmp_path / "cache", upstream={"abandon_after": "2s"})
    config["redirects"].append({"src": "quay.io/", "to": f"{host}/slow/"})
    config["registries"][host] = {"insecure": True}
    proxy = await detour_process(config)

    async def abandon(index: int) -> None:
        url = f"{proxy.url}/v2/quay.io/x/trickle/blobs/{digest_of(index)}"
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with asyncio.timeout(0.5), proxy.session.get(url) as response:
                await response.content.read(1)

    await asyncio.gather(*(abandon(i) for i in range(300)))
    name = unique_repo("healthy").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=4, layer_size=MiB)

    async def pull(blob: Blob) -> bytes:
        url = f"{proxy.url}/v2/{name}/blobs/{blob.digest}"
        async with proxy.session.get(url) as response:
            assert response.status == 200
            return await response.read()

    async with asyncio.timeout(10):  # a healthy pull waits for no trickling upstream
        got = await asyncio.gather(*(pull(b) for b in image.blobs))
    assert got == [b.data for b in image.blobs]
    assert upstream.started <= 16 + 1  # one registry's share: upstream.max_fetches_per_registry
    async with asyncio.timeout(30):
        while upstream.open or await proxy.metric("detour_queued_blob_fetches"):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    assert await proxy.metric("detour_ended_blob_fetches_total", reason="abandoned") >= 16


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_150_distinct_cold_blobs_at_once_fit_in_bounded_memory(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """Memory is bounded by the settings (upstream.max_fetches and the buffers), not by the
    number of clients: 150 distinct cold blobs at once all arrive whole, VmHWM <= 200 MiB."""
    repo = f"docker-mirror/library/{unique_repo('burst').split('/')[1]}"
    client = Client(registry)
    blobs = []
    for index in range(150):
        data = os.urandom(4 * MiB - index)
        blobs.append((client.push_blob(repo, data), data))
    proxy = await detour_process(scenario(registry, tmp_path / "cache"))
    assert proxy.process is not None
    name = repo.removeprefix("docker-mirror/library/")

    async def pull(digest: str) -> str:
        async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{digest}") as response:
            assert response.status == 200
            hasher = hashlib.sha256()
            async for chunk in response.content.iter_chunked(MiB):
                hasher.update(chunk)
            return "sha256:" + hasher.hexdigest()

    got = await asyncio.gather(*(pull(digest) for digest, _ in blobs))
    assert got == [digest for digest, _ in blobs]
    peak = vm_hwm_kib(proxy.process.pid)
    assert peak <= 200 * 1024, f"VmHWM {peak / 1024:.0f} MiB"


@pytest.fixture
def full_disk(tmpfs: Callable[[str], Path]) -> Path:
    """A 1 MiB file system (tmpfs) for the cache, to be filled by the test."""
    return tmpfs("1m")


async def test_on_a_full_disk_a_slow_client_is_cut_off_and_the_rest_go_on(
    make_proxy: MakeProxy, registry: Registry, full_disk: Path
) -> None:
    """With the cache unable to take a byte, a fetch hands its bytes to its clients from
    memory; one that reads at 256 KiB/s keeps the others waiting only upstream.slow_client."""
    stack = contextlib.AsyncExitStack()
    async with stack:
        await _slow_client_on_a_full_disk(make_proxy, registry, full_disk, stack)


async def _slow_client_on_a_full_disk(
    make_proxy: MakeProxy, registry: Registry, full_disk: Path, stack: contextlib.AsyncExitStack
) -> None:
    mount = full_disk
    # The mirror behind a 200 ms link, so all five clients join the fetch before it spills.
    relay = await stack.enter_async_context(Relay(registry, rtt=0.2, window=64 * MiB))
    config = scenario(registry, mount / "cache", upstream={"slow_client": "0.5s"})
    config["redirects"] = [{"src": "docker.io/", "to": f"{relay.host}/docker-mirror/"}]
    config["registries"] = {relay.host: {"insecure": True}}
    proxy = await make_proxy(config)
    with (mount / "filler").open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 4096)
    name = unique_repo("spill").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=8 * MiB
    )
    layer = image.layers[0]
    url = f"{proxy.url}/v2/{name}/blobs/{layer.digest}"

    async def fast() -> bytes:
        async with proxy.session.get(url) as response:
            return await response.read()

    async def slow() -> int:
        """Reads at 256 KiB/s, through a small receive buffer: the body bytes it got."""
        reader, writer, _ = await slow_client_get(proxy, f"/v2/{name}/blobs/{layer.digest}")
        got = 0
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(64 * 1024):
                got += len(data)
                await asyncio.sleep(0.25)
        writer.close()
        return got

    # All five join one fetch, which spills at its first write.
    slow_task = asyncio.create_task(slow())
    async with asyncio.timeout(10):  # not the 32 s the slow client would take
        results = await asyncio.gather(*(fast() for _ in range(4)))
    assert results == [layer.data] * 4
    assert await slow_task < layer.size  # cut off, never handed a whole 200


async def test_a_range_of_a_blob_too_large_to_cache_is_answered_whole(
    make_proxy: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A Range request for a cold blob over cache.max_blob_size (containerd resuming a big
    layer) gets the whole blob as a 200, a valid answer to a Range request, never a 502."""
    repo = f"docker-mirror/library/{unique_repo('range-big').split('/')[1]}"
    data = os.urandom(3 * MiB)
    digest = Client(registry).push_blob(repo, data)
    config = scenario(registry, tmp_path / "cache")
    config["cache"]["max_blob_size"] = "1MiB"
    proxy = await make_proxy(config)
    name = repo.removeprefix("docker-mirror/library/")
    url = f"{proxy.url}/v2/{name}/blobs/{digest}"
    async with proxy.session.get(url, headers={"Range": f"bytes={MiB}-"}) as response:
        assert response.status == 200, await response.text()
        assert await response.read() == data
    assert not blob_path(tmp_path / "cache", digest).exists()


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def get_once(url: str) -> tuple[int, dict[str, str], bytes]:
    """A GET on a connection of its own, closed after it."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_connections_past_the_limit_are_refused_but_probes_answered(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """Past ``max_client_connections`` a request gets a 503 with an OCI error body and
    Retry-After, and its connection is closed; /healthz is still answered (a refused probe
    would restart the pod); once connections close, requests are served again."""
    proxy = await detour_process(scenario(registry, tmp_path / "cache", max_client_connections=3))
    host, port = host_port(proxy.url)
    idle = [await asyncio.open_connection(host, port) for _ in range(3)]
    try:
        await asyncio.sleep(0.2)  # all three accepted
        status, headers, body = await get_once(f"{proxy.url}/v2/")
        assert status == 503
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNAVAILABLE"
        assert error["detail"] == {"max_client_connections": 3}
        assert headers["Retry-After"] == "1"
        assert headers["Connection"].lower() == "close"
        assert (await get_once(f"{proxy.url}/healthz"))[0] == 200
    finally:
        for _, writer in idle:
            writer.close()
    await asyncio.sleep(0.3)  # their handlers gone
    assert (await get_once(f"{proxy.url}/v2/"))[0] == 200
    refused = {"method": "GET", "kind": "api_root", "status": "503"}
    assert await proxy.metric("detour_http_requests_total", **refused) == 1


async def test_a_connection_that_never_finishes_a_request_is_closed(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A client that opens a connection and sends part of a request (slowloris) holds it for
    ``client_idle_timeout``, no longer."""
    proxy = await detour_process(scenario(registry, tmp_path / "cache", client_idle_timeout="1s"))
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    started = asyncio.get_running_loop().time()
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: detour\r\n")  # the blank line never comes
    await writer.drain()
    try:
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""  # closed by Detour, nothing answered
    finally:
        writer.close()
    assert asyncio.get_running_loop().time() - started >= 0.9
