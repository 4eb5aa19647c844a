"""A peer that hangs costs the site seconds, not ``upstream.read_timeout``; an owner that is
slow because it waits for its own upstream is waited on, not bypassed.

Real ``detour serve`` processes against real distribution: an owner frozen with SIGSTOP (the
kernel still completes the TCP handshake, then nothing answers), before its first byte and in
the middle of a blob; hostile peers of the test's own that send part of a blob and go silent,
answering probes or not; and an owner whose mirror is slow to answer. ``upstream.read_timeout``
stays at its WAN-sized default (30 s) unless said otherwise: what a user sees is the pull
completing in a small part of it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.cluster.peering import blob_key, rendezvous
from tests.images import Blob, push_image, unique_repo
from tests.proxy import Proxy
from tests.registry import Registry
from tests.relay import Relay
from tests.support import free_port

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1024 * 1024
READ_TIMEOUT = 30.0  # upstream.read_timeout's default: what a hung peer used to cost


def node_config(
    mirror_host: str, cache_dir: Path, address: str, peers: list[str], **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": address,
        "cache": {"dir": str(cache_dir)},
        "redirects": [{"src": "docker.io/", "to": f"{mirror_host}/docker-mirror/"}],
        "registries": {mirror_host: {"insecure": True}},
        "cluster": {"peers": peers, "advertise": address},
    }
    config.update(extra)
    return config


async def start_pair(
    detour_process: StartProxy, mirror_host: str, tmp_path: Path, **extra: Any
) -> tuple[list[str], list[Proxy]]:
    """Two peers on 127.0.0.1, on ports of their own (other tests use the 127.0.0.x:7439 sites)."""
    peers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    nodes = []
    for address in peers:
        cache = tmp_path / address.replace(":", "_")
        nodes.append(await detour_process(node_config(mirror_host, cache, address, peers, **extra)))
    return peers, nodes


async def get_blob(node: Proxy, name: str, blob: Blob) -> None:
    async with node.session.get(f"{node.url}/v2/{name}/blobs/{blob.digest}") as response:
        assert response.status == 200, await response.text()
        assert await response.read() == blob.data


def logged(node: Proxy, event: str) -> list[str]:
    return [line for line in node.log_lines() if f'"{event}"' in line]


async def test_a_frozen_owner_costs_seconds_not_the_read_timeout(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    name = unique_repo("frozen").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=6, layer_size=256 * 1024
    )
    peers, (frozen, node) = await start_pair(detour_process, registry.host, tmp_path)
    owned = [b for b in image.blobs if rendezvous(peers, blob_key(b.digest))[0] == peers[0]]
    assert owned, "the frozen peer owns some of the blobs"
    assert frozen.process is not None
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        async with asyncio.timeout(READ_TIMEOUT):
            await asyncio.gather(*(get_blob(node, name, blob) for blob in owned))
        took = time.monotonic() - began
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    # About a second of silence, and a probe that gets no answer within another.
    assert took < READ_TIMEOUT / 3, took
    assert await node.metric("detour_peer_probes_total", result="hung") >= 1
    (hung,) = logged(node, "peer_hung")[:1]
    assert peers[0] in hung
    assert await node.metric("detour_peers_down") == 1


async def test_an_owner_frozen_mid_blob_is_left_at_the_byte_reached(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """The mirror behind a 4 MiB/s link; the owner of a 16 MiB layer is frozen while it
    streams it to the node: the node goes on from the byte reached, from the mirror."""
    name = unique_repo("midfrozen").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=16 * MiB
    )
    layer = image.layers[0]
    async with Relay(registry, rate=4 * MiB) as slow:
        peers, nodes = await start_pair(detour_process, slow.host, tmp_path)
        owner_at = rendezvous(peers, blob_key(layer.digest))[0]
        owner, node = (nodes[0], nodes[1]) if owner_at == peers[0] else (nodes[1], nodes[0])
        pulling = asyncio.create_task(get_blob(node, name, layer))
        await asyncio.sleep(1.5)  # some megabytes through the owner
        assert owner.process is not None
        owner.process.send_signal(signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            async with asyncio.timeout(READ_TIMEOUT):
                await pulling
            took = time.monotonic() - frozen_at
        finally:
            owner.process.send_signal(signal.SIGCONT)
    assert took < READ_TIMEOUT / 2, took
    resumed = logged(node, "blob_resume")
    assert resumed
    assert '"offset": 0,' not in resumed[0]  # the bytes received were kept
    assert await node.metric("detour_peer_probes_total", result="hung") >= 1


@asynccontextmanager
async def hostile_peer(blob: Blob, *, sent: int, answers_probes: bool) -> AsyncIterator[str]:
    """A "peer" that answers a blob GET with its length and its first ``sent`` bytes, then goes
    silent with the connection open; it answers ``GET /v2/`` (a probe) or stays silent too."""

    async def api_root(request: web.Request) -> web.StreamResponse:
        if not answers_probes:
            await asyncio.sleep(3600)
        return web.json_response({})

    async def get(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Docker-Content-Digest": blob.digest})
        response.content_length = len(blob.data)
        await response.prepare(request)
        await response.write(blob.data[:sent])
        await asyncio.sleep(3600)
        return response

    app = web.Application()
    app.router.add_get("/v2/", api_root)
    app.router.add_get("/v2/{tail:.*}", get)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def client_of(
    detour_process: StartProxy, registry: Registry, tmp_path: Path, peer: str, **extra: Any
) -> Proxy:
    """A pure client of a peer set of one (``peer`` owns every key)."""
    config = node_config(registry.host, tmp_path / "cache", f"127.0.0.1:{free_port()}", [peer])
    config["cluster"].pop("advertise")
    config.update(extra)
    return await detour_process(config)


async def test_a_peer_silent_mid_blob_that_answers_no_probe_is_left(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """24 MiB sent at the LAN's pace, then silence: the rest comes from the mirror, by Range."""
    name = unique_repo("silent").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=40 * MiB
    )
    layer = image.layers[0]
    async with hostile_peer(layer, sent=24 * MiB, answers_probes=False) as peer:
        node = await client_of(detour_process, registry, tmp_path, peer)
        began = time.monotonic()
        async with asyncio.timeout(READ_TIMEOUT):
            await get_blob(node, name, layer)
        took = time.monotonic() - began
    assert took < READ_TIMEOUT / 3, took
    (resumed,) = logged(node, "blob_resume")
    assert f'"offset": {24 * MiB}' in resumed
    assert await node.metric("detour_peer_probes_total", result="hung") == 1


async def test_a_silent_peer_that_answers_probes_is_waited_on_up_to_a_bound(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A peer that answers probes is waited on (it may be waiting out a WAN cut), but not for
    ever: past upstream.retry_for plus three upstream.read_timeout, the mirror serves."""
    name = unique_repo("alive").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=MiB)
    layer = image.layers[0]
    upstream = {"read_timeout": "2s", "retry_for": "2s"}  # waited on for 8 s at most
    async with hostile_peer(layer, sent=256 * 1024, answers_probes=True) as peer:
        node = await client_of(detour_process, registry, tmp_path, peer, upstream=upstream)
        began = time.monotonic()
        async with asyncio.timeout(READ_TIMEOUT):
            await get_blob(node, name, layer)
        took = time.monotonic() - began
    assert 7.0 <= took < 20.0, took
    assert await node.metric("detour_peer_probes_total", result="alive") >= 3
    assert await node.metric("detour_peer_probes_total", result="hung") == 0


async def test_an_owner_waiting_for_its_mirror_is_not_bypassed(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """The mirror answers 3 s late (a long, slow WAN): the node asking the owner waits for
    the owner's one fetch, and the mirror is asked for each blob once."""
    name = unique_repo("slowmirror").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=4, layer_size=128 * 1024
    )
    async with Relay(registry, rtt=3.0) as far:
        peers, nodes = await start_pair(detour_process, far.host, tmp_path)
        owners = {
            b.digest: peers.index(rendezvous(peers, blob_key(b.digest))[0]) for b in image.blobs
        }
        mark = registry.mark()
        # Each blob asked of the node that does not own it, all at once.
        async with asyncio.timeout(READ_TIMEOUT * 2):
            await asyncio.gather(
                *(get_blob(nodes[1 - owners[b.digest]], name, b) for b in image.blobs)
            )
    paths = await registry.wait_paths(mark, at_least=len(image.blobs))
    for blob in image.blobs:
        assert sum(1 for p in paths if p.endswith(f"/blobs/{blob.digest}")) == 1, blob.digest
    alive = sum([await node.metric("detour_peer_probes_total", result="alive") for node in nodes])
    hung = sum([await node.metric("detour_peer_probes_total", result="hung") for node in nodes])
    assert alive >= 1
    assert hung == 0


async def test_a_failed_peer_is_skipped_for_cluster_down_seconds(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A peer nothing answers for (every key's owner) fails, is skipped for
    ``cluster.down_seconds`` (here 2 s), then asked again."""
    name = unique_repo("down").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=3, layer_size=512)
    gone = f"127.0.0.1:{free_port()}"
    node = await client_of(
        detour_process, registry, tmp_path, gone, cluster={"peers": [gone], "down_seconds": "2s"}
    )
    first, second, third = image.blobs[:3]
    await get_blob(node, name, first)
    await get_blob(node, name, second)
    failed = await node.metric("detour_peer_requests_total", result="failed")
    skipped = await node.metric("detour_peer_requests_total", result="skipped")
    assert (failed, skipped) == (1, 1)
    await asyncio.sleep(2.5)
    await get_blob(node, name, third)
    assert await node.metric("detour_peer_requests_total", result="failed") == 2
