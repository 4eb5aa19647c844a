"""`kill -9` in the middle of writes: the next start removes the leftovers, rebuilds its index
from the disk, and serves nothing unverified."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.images import push_image, unique_repo
from tests.proxy import Proxy, scenario, stop_process
from tests.registry import Registry
from tests.relay import Relay

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1024 * 1024


async def test_restart_after_kill_9_mid_write(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    name = unique_repo("x").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=2, layer_size=8 * MiB
    )
    done, slow = image.layers
    cache = tmp_path / "cache"
    async with Relay(registry, rate=4 * MiB) as relay:  # a slow uplink: 4 MiB/s
        config = {
            "cache": {"dir": str(cache)},
            "redirects": [{"src": "docker.io/", "to": f"{relay.host}/docker-mirror/"}],
            "registries": {relay.host: {"insecure": True}},
        }
        proxy = await detour_process(config)
        async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{done.digest}") as response:
            assert await response.read() == done.data
        async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{slow.digest}") as response:
            await response.content.readexactly(MiB)  # sent from memory as it arrives
            partial = list((cache / "tmp").iterdir())
            assert len(partial) == 1  # mid-write
            # The disk trails the client by up to a handoff of bytes: wait until it has some.
            for _ in range(200):
                if partial[0].stat().st_size:
                    break
                await asyncio.sleep(0.05)
            assert 0 < partial[0].stat().st_size < slow.size
            await stop_process(proxy, signal.SIGKILL)
    assert partial[0].exists()  # what a crash leaves behind

    restarted = await detour_process(scenario(registry, cache))
    assert list((cache / "tmp").iterdir()) == []
    disk = sum(p.stat().st_size for p in (cache / "blobs").rglob("*") if p.is_file())
    assert disk == done.size  # only the verified blob survived
    assert await restarted.metric("detour_cache_size_bytes") == disk
    for blob, result in ((done, "hit"), (slow, "miss")):
        url = f"{restarted.url}/v2/{name}/blobs/{blob.digest}"
        async with restarted.session.get(url) as response:
            assert await response.read() == blob.data
        assert (
            await restarted.metric("detour_cache_requests_total", kind="blob", result=result) == 1
        )
    # The interrupted blob is whole now, and served again from disk.
    async with restarted.session.get(f"{restarted.url}/v2/{name}/blobs/{slow.digest}") as response:
        assert await response.read() == slow.data
    assert await restarted.metric("detour_cache_requests_total", kind="blob", result="hit") == 2
