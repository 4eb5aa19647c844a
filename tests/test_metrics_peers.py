"""What the dashboard's peers row reads: the peers in the set, and how many of them are taken as
down now (one that failed is not asked for 30 s), from a real ``detour serve`` whose peer is
not there."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.images import push_image, unique_repo
from tests.proxy import Proxy, scenario
from tests.registry import Registry
from tests.support import free_port

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


async def test_a_peer_that_fails_is_counted_down(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    gone = f"127.0.0.1:{free_port()}"  # a peer nobody answers for: every key's owner
    proxy = await detour_process(scenario(registry, tmp_path / "cache", cluster={"peers": [gone]}))
    name = unique_repo("pd").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=2, layer_size=512)
    assert await proxy.metric("detour_peers") == 1
    assert await proxy.metric("detour_peers_down") == 0

    first, second = image.blobs[:2]
    async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{first.digest}") as response:
        assert response.status == 200  # the upstream served, after the peer failed
        assert await response.read() == first.data
    assert await proxy.metric("detour_peer_requests_total", result="failed") == 1
    assert await proxy.metric("detour_peers_down") == 1

    async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{second.digest}") as response:
        assert response.status == 200
        assert await response.read() == second.data
    assert await proxy.metric("detour_peer_requests_total", result="skipped") == 1
    assert await proxy.metric("detour_peers_down") == 1
