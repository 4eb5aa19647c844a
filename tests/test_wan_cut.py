"""Through a WAN cut: the fetch waits it out (``upstream.retry_for``), resuming by Range, the
nodes of the site wait on the owner's one fetch, and a client is never left hanging: after
``upstream.client_wait`` with nothing to send it gets a 504 (or, mid-body, its connection
ends), and its retry joins the same fetch.

Real ``detour serve`` processes against real distribution, behind a relay whose link is cut
(:meth:`tests.relay.Relay.cut`: bytes on their way stop, new connections are reset) and mended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.images import Blob, push_image, unique_repo
from tests.proxy import Proxy
from tests.registry import AccessEntry, Registry
from tests.relay import Relay
from tests.support import free_port
from tests.test_peer_hangs import get_blob, logged, node_config

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1024 * 1024


async def start_site(
    detour_process: StartProxy, mirror_host: str, tmp_path: Path, count: int, **extra: Any
) -> tuple[list[str], list[Proxy]]:
    peers = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    nodes = []
    for address in peers:
        cache = tmp_path / address.replace(":", "_")
        nodes.append(await detour_process(node_config(mirror_host, cache, address, peers, **extra)))
    return peers, nodes


async def blob_gets(registry: Registry, mark: int, blob: Blob) -> list[AccessEntry]:
    """The mirror's answers to GETs of ``blob`` since ``mark``."""
    await registry.wait_entries(mark, at_least=1)
    return [
        e
        for e in registry.entries_since(mark)
        if e.method == "GET" and e.path.endswith(f"/blobs/{blob.digest}")
    ]


async def test_a_cut_as_the_rollout_begins_costs_one_fetch_per_blob(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """The link is down when three nodes pull at once, and back 6 s later: every pull
    completes with the right bytes, and the mirror is asked for each blob once."""
    name = unique_repo("cut").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=3, layer_size=512 * 1024
    )
    async with Relay(registry) as wan:
        _, nodes = await start_site(detour_process, wan.host, tmp_path, 3)
        mark = registry.mark()
        wan.cut()
        pulls = asyncio.gather(*(get_blob(n, name, b) for n in nodes for b in image.blobs))
        await asyncio.sleep(6.0)
        wan.mend()
        async with asyncio.timeout(60):
            await pulls
    for blob in image.blobs:
        gets = await blob_gets(registry, mark, blob)
        assert [e.status for e in gets] == [200], blob.digest  # one fetch, for the whole site
    retried = [line for node in nodes for line in logged(node, "blob_fetch_retry")]
    assert retried  # the owners waited the cut out
    hung = [await n.metric("detour_peer_probes_total", result="hung") for n in nodes]
    assert sum(hung) == 0  # the owners were waited on, never bypassed


async def test_a_cut_mid_blob_is_resumed_by_range_after_it(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A 16 MiB layer over a 4 MiB/s link, cut for 6 s after a second and a half: the fetch
    goes on from the byte reached once the link is back, and the client gets every byte."""
    name = unique_repo("midcut").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=16 * MiB
    )
    layer = image.layers[0]
    async with Relay(registry, rate=4 * MiB) as wan:
        _, (node,) = await start_site(
            detour_process, wan.host, tmp_path, 1, upstream={"read_timeout": "2s"}
        )
        mark = registry.mark()
        pulling = asyncio.create_task(get_blob(node, name, layer))
        await asyncio.sleep(1.5)
        wan.cut()
        await asyncio.sleep(6.0)
        wan.mend()
        async with asyncio.timeout(60):
            await pulling
    gets = await blob_gets(registry, mark, layer)
    assert [e.status for e in gets].count(200) == 1  # one fetch ...
    assert 206 in [e.status for e in gets]  # ... resumed by Range
    assert logged(node, "blob_fetch_retry")


async def test_a_client_waiting_through_a_long_cut_gets_a_5xx_and_its_retry_completes(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """With upstream.client_wait at 3 s, a client asking during a 10 s cut is answered a 5xx
    (an OCI error: what the mirror's link did) within the bound, never left hanging; it
    retries as a kubelet does, and the retry after the cut joins the fetch that waited it out:
    one GET at the mirror."""
    name = unique_repo("longcut").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=MiB)
    layer = image.layers[0]
    url_of = f"/v2/{name}/blobs/{layer.digest}"
    answers: list[tuple[int, float]] = []
    async with Relay(registry) as wan:
        _, (node,) = await start_site(
            detour_process, wan.host, tmp_path, 1, upstream={"client_wait": "3s"}
        )
        mark = registry.mark()
        wan.cut()
        mending = asyncio.get_running_loop().call_later(10.0, wan.mend)
        try:
            async with asyncio.timeout(60):
                while True:
                    began = time.monotonic()
                    async with node.session.get(node.url + url_of) as response:
                        body = await response.read()
                        answers.append((response.status, time.monotonic() - began))
                        if response.status == 200:
                            assert body == layer.data
                            break
                        assert response.status in (502, 504)  # what the mirror met, or silence
                        error = (await response.json())["errors"][0]
                        assert error["code"] == "UNAVAILABLE"
                    await asyncio.sleep(1.0)  # a kubelet's back-off, shortened
        finally:
            mending.cancel()
            wan.mend()
    refused = [seconds for status, seconds in answers if status != 200]
    assert refused  # the cut outlasted the bound
    assert all(seconds < 3.0 + 5.0 for seconds in refused), answers  # within it, with room
    gets = await blob_gets(registry, mark, layer)
    assert [e.status for e in gets] == [200]  # the retries joined the one fetch
    assert await node.metric("detour_blob_client_waits_ended_total", where="headers") >= 1


async def test_a_client_cut_off_mid_blob_resumes_with_range(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """Mid-body, a cut longer than upstream.client_wait ends the client's connection (so a
    runtime resumes); its Range requests after it (retried on a 5xx, as a runtime does) get
    the rest, and the bytes add up."""
    name = unique_repo("rangecut").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=16 * MiB
    )
    layer = image.layers[0]
    url = f"/v2/{name}/blobs/{layer.digest}"
    async with Relay(registry, rate=4 * MiB) as wan:
        _, (node,) = await start_site(
            detour_process,
            wan.host,
            tmp_path,
            1,
            upstream={"client_wait": "3s", "read_timeout": "2s"},
        )
        got = bytearray()
        began = time.monotonic()
        cut_at: float | None = None
        try:
            async with asyncio.timeout(60):
                async with node.session.get(node.url + url) as response:
                    assert response.status == 200
                    try:
                        async for piece in response.content.iter_any():
                            got += piece
                            if cut_at is None and len(got) >= 4 * MiB:
                                wan.cut()
                                cut_at = time.monotonic()
                    except aiohttp.ClientPayloadError:
                        pass
            ended = time.monotonic()
            assert cut_at is not None
            assert 0 < len(got) < len(layer.data)
            assert ended - cut_at < 3.0 + 5.0  # let go of within the bound, with room
            await asyncio.sleep(max(0.0, 8.0 - (time.monotonic() - began)))
            wan.mend()
            headers = {"Range": f"bytes={len(got)}-"}
            async with asyncio.timeout(60):
                while True:
                    async with node.session.get(node.url + url, headers=headers) as response:
                        if response.status == 206:
                            got += await response.read()
                            break
                        assert response.status in (502, 504), await response.text()
                    await asyncio.sleep(1.0)
        finally:
            wan.mend()
    assert bytes(got) == layer.data
    assert await node.metric("detour_blob_client_waits_ended_total", where="body") == 1


async def pull_retrying(node: Proxy, name: str, blob: Blob) -> int:
    """GET a blob as a kubelet pulls through containerd: a 5xx is retried after a back-off
    (shortened here). How many 5xx it met."""
    failed = 0
    while True:
        async with node.session.get(f"{node.url}/v2/{name}/blobs/{blob.digest}") as response:
            if response.status == 200:
                assert await response.read() == blob.data
                return failed
            assert response.status in (502, 504), await response.text()
        failed += 1
        await asyncio.sleep(1.0)


async def test_a_cut_longer_than_the_clients_wait_still_costs_one_fetch_per_blob(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """Three nodes pull at once through a 10 s cut, their clients let go of after 3 s and
    retrying: the nodes keep waiting on the owners (a peer's request is not let go of), the
    retries join their fetches, and the mirror is still asked for each blob once."""
    name = unique_repo("longsite").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=3, layer_size=512 * 1024
    )
    async with Relay(registry) as wan:
        _, nodes = await start_site(
            detour_process, wan.host, tmp_path, 3, upstream={"client_wait": "3s"}
        )
        mark = registry.mark()
        wan.cut()
        mending = asyncio.get_running_loop().call_later(10.0, wan.mend)
        try:
            async with asyncio.timeout(90):
                failures = await asyncio.gather(
                    *(pull_retrying(n, name, b) for n in nodes for b in image.blobs)
                )
        finally:
            mending.cancel()
            wan.mend()
    assert all(failed >= 1 for failed in failures)  # every client was let go of, and retried
    for blob in image.blobs:
        gets = await blob_gets(registry, mark, blob)
        assert [e.status for e in gets] == [200], blob.digest
    hung = [await n.metric("detour_peer_probes_total", result="hung") for n in nodes]
    assert sum(hung) == 0
