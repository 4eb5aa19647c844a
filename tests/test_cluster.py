"""The cluster tier: several Detours, each on its own 127.0.0.x address and port 7439 as a
DaemonSet's pods would be, against real distribution. Each blob and manifest crosses to the
mirror once however many nodes pull it; an owner that dies mid-stream or hangs costs the site
one attempt, not a failed rollout.
"""

from __future__ import annotations

import asyncio
import base64
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.cluster.peering import Peering, blob_key, rendezvous, tag_key
from proxy.metrics import PEER_RESULTS, Metrics
from proxy.reference import ImageName
from proxy.settings import ClusterSettings
from tests.images import ACCEPT_ALL, PushedImage, get_manifest, push_image, unique_repo
from tests.proxy import Proxy, pull_image, wait_cached
from tests.registry import Registry
from tests.relay import Relay

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1024 * 1024


def node_addresses(count: int) -> list[str]:
    return [f"127.0.0.{2 + i}:7439" for i in range(count)]


def blob_order(
    peers: list[str], digest: str, image: PushedImage | None = None, fan_out: int = 3
) -> list[str]:
    """The order blob ``digest``'s tree is laid over (proxy.cluster.peering), reckoned here:
    on a node that served ``image``'s manifest, a layer's is the image's rendezvous order
    turned by the layer's index times the number of parents in a tree of ``fan_out``
    (proxy.cluster.layers); any other blob's (a config, a blob asked for alone) its own."""
    layers = [layer.digest for layer in image.layers] if image is not None else []
    if image is None or digest not in layers:
        return rendezvous(peers, blob_key(digest))
    order = rendezvous(peers, f"image {image.digest}")
    turn = layers.index(digest) * ((len(peers) - 2) // fan_out + 1) % len(peers)
    return order[turn:] + order[:turn]


def blob_owner(
    peers: list[str], digest: str, image: PushedImage | None = None, fan_out: int = 3
) -> str:
    return blob_order(peers, digest, image, fan_out)[0]


async def start_site(
    detour_process: StartProxy,
    mirror_host: str,
    tmp_path: Path,
    peers: list[str],
    nodes: list[str] | None = None,
    tag_ttl: str | None = None,
    cluster: dict[str, Any] | None = None,
    **upstream: Any,
) -> list[Proxy]:
    """One ``detour serve`` per address of ``nodes`` (default: every peer), each advertising
    its own address, all sending docker.io/ to ``mirror_host``; ``tag_ttl`` is
    ``cache.tag_ttl`` (default: Detour's); ``cluster`` more cluster settings."""
    started = []
    for address in nodes or peers:
        cache: dict[str, Any] = {"dir": str(tmp_path / address.replace(":", "_"))}
        if tag_ttl is not None:
            cache["tag_ttl"] = tag_ttl
        config: dict[str, Any] = {
            "listen": address,
            "cache": cache,
            "redirects": [{"src": "docker.io/", "to": f"{mirror_host}/docker-mirror/"}],
            "registries": {mirror_host: {"insecure": True}},
            "cluster": {"peers": peers, "advertise": address, **(cluster or {})},
        }
        if upstream:
            config["upstream"] = upstream
        started.append(await detour_process(config))
    return started


async def pull(proxy: Proxy, name: str, image: PushedImage) -> None:
    """What a runtime does: the manifest by tag, then every blob at once, each checked."""
    await pull_image(proxy, name, image, at_once=True)


def test_ownership_moves_only_the_share_of_a_peer_that_leaves() -> None:
    peers = [f"10.0.1.{i}:7439" for i in range(2, 8)]
    keys = [blob_key(f"sha256:{i:064x}") for i in range(3000)]
    before = {key: rendezvous(peers, key)[0] for key in keys}
    after = {key: rendezvous(peers[:-1], key)[0] for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert all(before[key] == peers[-1] for key in moved)  # only the leaver's keys move
    share = Counter(before.values())
    assert min(share.values()) > 3000 / 6 * 0.8  # and the keys are spread evenly


def test_a_node_asks_the_owners_ranked_above_it_and_no_one_when_it_owns() -> None:
    peers = node_addresses(4)
    for key in (blob_key(f"sha256:{i:064x}") for i in range(50)):
        ranked = rendezvous(peers, key)
        owner = Peering(ClusterSettings(peers=peers, advertise=ranked[0]), Metrics())
        assert owner.ahead(key) == []
        third = Peering(ClusterSettings(peers=peers, advertise=ranked[2]), Metrics())
        assert third.ahead(key) == ranked[:2]
        client = Peering(ClusterSettings(peers=peers, advertise="10.9.9.9:7439"), Metrics())
        assert client.ahead(key) == ranked[:2]  # a pure client (hub topology): never owner


async def test_every_node_pulling_at_once_costs_the_mirror_one_get_each(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    name = unique_repo("site").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=4, layer_size=MiB)
    peers = node_addresses(4)
    nodes = await start_site(detour_process, registry.host, tmp_path, peers)
    mark = registry.mark()
    await asyncio.gather(*(pull(node, name, image) for node in nodes))

    expected = {f"/v2/docker-mirror/library/{name}/manifests/v1"} | {
        f"/v2/docker-mirror/library/{name}/blobs/{b.digest}" for b in image.blobs
    }
    entries = await registry.wait_paths(mark, at_least=len(expected))
    ours = [e for e in entries if f"/library/{name}/" in e]  # the registry is shared
    gets = Counter(e for e in ours if e in expected)
    assert gets == dict.fromkeys(expected, 1)  # one GET each, for the whole site
    assert len(ours) == len(expected)  # and nothing else went to the mirror
    served = sum(
        [
            await node.metric("detour_cache_requests_total", kind="blob", result="peer")
            for node in nodes
        ]
    )
    assert served >= len(image.blobs)  # the other nodes got their blobs from the owners


async def test_an_owner_killed_mid_stream_costs_no_pull(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """The mirror behind an 8 MiB/s link: the owner of the big layer is killed a second into
    the rollout; every other node finishes with the right bytes (from the next peer or the
    mirror, resuming where it can)."""
    name = unique_repo("kill").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=24 * MiB
    )
    layer = image.layers[0]
    peers = node_addresses(3)
    async with Relay(registry, rate=8 * MiB) as slow:
        nodes = await start_site(detour_process, slow.host, tmp_path, peers)
        owner = blob_owner(peers, layer.digest, image)
        victim = nodes[peers.index(owner)]
        others = [node for node in nodes if node is not victim]
        pulls = asyncio.gather(*(pull(node, name, image) for node in others))
        await asyncio.sleep(1.0)
        assert victim.process is not None
        victim.process.send_signal(signal.SIGKILL)
        async with asyncio.timeout(60):
            await pulls
    # The owner's death was seen (a broken stream, then the owner skipped), and got round.
    seen = [
        await node.metric("detour_peer_requests_total", result=result)
        for node in others
        for result in ("failed", "skipped")
    ]
    assert sum(seen) >= 1
    resumed = [line for node in others for line in node.log_lines() if "blob_resume" in line]
    assert resumed  # mid-stream: the bytes already received were kept


async def test_a_peer_that_hangs_costs_one_timeout_not_one_per_request(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A frozen peer (SIGSTOP: the kernel accepts, nothing answers) is tried once, times out,
    and is then skipped: the rest of the pull goes straight on."""
    name = unique_repo("hang").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=8, layer_size=64 * 1024
    )
    peers = node_addresses(2)
    frozen, node = await start_site(
        detour_process, registry.host, tmp_path, peers, read_timeout="1s"
    )
    assert frozen.process is not None
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        owned = [b for b in image.blobs if rendezvous(peers, blob_key(b.digest))[0] == peers[0]]
        assert owned, "the frozen peer owns some of the blobs"
        for blob in owned:  # one after the other: only the first may wait
            url = f"{node.url}/v2/{name}/blobs/{blob.digest}"
            async with node.session.get(url) as response:
                assert response.status == 200
                assert await response.read() == blob.data
        assert await node.metric("detour_peer_requests_total", result="failed") == 1
        skipped = await node.metric("detour_peer_requests_total", result="skipped")
        assert skipped == len(owned) - 1
    finally:
        frozen.process.send_signal(signal.SIGCONT)


async def test_private_pulls_never_go_to_a_peer(
    detour_process: StartProxy, htpasswd_registry: Registry, tmp_path: Path
) -> None:
    name = unique_repo("private").split("/")[1]
    image = push_image(
        htpasswd_registry, f"docker-mirror/library/{name}", "v1", layers=2, layer_size=4096
    )
    peers = node_addresses(2)
    nodes = await start_site(detour_process, htpasswd_registry.host, tmp_path, peers)
    pair = f"{htpasswd_registry.username}:{htpasswd_registry.password}".encode()
    auth = {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    for node in nodes:
        for blob in image.blobs:
            url = f"{node.url}/v2/{name}/blobs/{blob.digest}"
            async with node.session.get(url, headers=auth) as response:
                assert response.status == 200
                assert await response.read() == blob.data
    for node in nodes:
        for result in PEER_RESULTS:
            assert await node.metric("detour_peer_requests_total", result=result) == 0


@pytest.mark.parametrize("count", [3])
async def test_the_peer_set_is_a_gauge(
    detour_process: StartProxy, registry: Registry, tmp_path: Path, count: int
) -> None:
    peers = node_addresses(count)
    (node,) = await start_site(detour_process, registry.host, tmp_path, peers, nodes=peers[:1])
    assert await node.metric("detour_peers") == count


def site_keys(name: str, image: PushedImage) -> list[str]:
    """What a pull of ``name:v1`` asks the owners for: the tag, then each blob."""
    return [tag_key(ImageName.from_path(name, None), "v1")] + [
        blob_key(b.digest) for b in image.blobs
    ]


@pytest.mark.parametrize("tag_ttl", [None, "1s"], ids=["tag-fresh", "tag-expired"])
async def test_with_the_wan_down_a_node_gets_what_it_lacks_from_the_owners(
    detour_process: StartProxy, registry: Registry, tmp_path: Path, tag_ttl: str | None
) -> None:
    """A pulls; the mirror goes down; C, which never pulled, pulls the same tag and gets
    every byte from the owners' caches. With the tag past ``tag_ttl`` on its owner, the owner
    can't revalidate it and serves it stale: C still pulls."""
    name = unique_repo("offline").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=5, layer_size=256 * 1024
    )
    peers = node_addresses(3)
    nodes = await start_site(detour_process, registry.host, tmp_path, peers, tag_ttl=tag_ttl)
    by_peer = dict(zip(peers, nodes, strict=True))
    keys = site_keys(name, image)
    owner = {key: rendezvous(peers, key)[0] for key in keys}
    owner.update({blob_key(b.digest): blob_owner(peers, b.digest, image) for b in image.blobs})
    tag_owner = owner[keys[0]]
    a, c = (peer for peer in peers if peer != tag_owner)  # neither owns the tag

    await pull(by_peer[a], name, image)
    for blob in image.blobs:  # each owner has its blobs on disk (A too: it cached them all)
        assert await wait_cached(by_peer[owner[blob_key(blob.digest)]].cache_dir, blob.digest)
    if tag_ttl is not None:
        await asyncio.sleep(1.5)  # the tag record is now older than tag_ttl everywhere
    registry.stop()  # the WAN is down (the fixture brings it back)

    await pull(by_peer[c], name, image)
    node_c, owner_node = by_peer[c], by_peer[tag_owner]
    asked = sum(1 for key in keys if owner[key] != c)  # what C did not own was asked for
    assert asked >= 1
    assert await node_c.metric("detour_peer_requests_total", result="served") == asked
    for result in ("failed", "skipped"):
        assert await node_c.metric("detour_peer_requests_total", result=result) == 0
    owned_blobs = sum(1 for b in image.blobs if owner[blob_key(b.digest)] != c)
    served_blobs = await node_c.metric("detour_cache_requests_total", kind="blob", result="peer")
    assert served_blobs == owned_blobs
    # The tag's owner answered from its cache: within tag_ttl a hit, after it stale.
    result = "hit" if tag_ttl is None else "stale"
    served = await owner_node.metric("detour_cache_requests_total", kind="manifest", result=result)
    assert served == 1
    stale = [line for line in owner_node.log_lines() if "tag_served_stale" in line]
    assert len(stale) == (0 if tag_ttl is None else 1)


async def test_a_tag_resolves_the_same_on_every_node_during_a_rollout(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """The tag moves upstream after the first node pulled it: within tag_ttl every other node
    gets the digest the first one got (its owner's), not a mix of old and new."""
    name = unique_repo("rollout").split("/")[1]
    repo = f"docker-mirror/library/{name}"
    first = push_image(registry, repo, "v1", layers=2, layer_size=64 * 1024)
    peers = node_addresses(3)
    nodes = await start_site(detour_process, registry.host, tmp_path, peers, tag_ttl="1h")
    await pull(nodes[0], name, first)
    for blob in first.blobs:  # every blob's owner holds it, as in the tag case below
        owner = nodes[peers.index(blob_owner(peers, blob.digest, first))]
        assert await wait_cached(owner.cache_dir, blob.digest)

    moved = push_image(registry, repo, "v1", layers=2, layer_size=64 * 1024)
    upstream = get_manifest(registry, repo, "v1")
    assert upstream.headers["docker-content-digest"] == moved.digest != first.digest

    mark = registry.mark()
    for node in nodes[1:]:
        await pull(node, name, first)  # the first digest's manifest and blobs, byte for byte
        url = f"{node.url}/v2/{name}/manifests/v1"
        async with node.session.head(url, headers={"Accept": ACCEPT_ALL}) as response:
            assert response.headers["Docker-Content-Digest"] == first.digest
    assert await registry.wait_paths(mark) == []  # nobody asked the mirror what v1 means now


async def test_a_tag_from_its_owner_keeps_its_age(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """A node that gets a tag from its owner keeps the owner's record's age (the ``Age``
    header), so the tag is revalidated tag_ttl after the upstream last confirmed it, not
    tag_ttl after the node first asked: a moved tag reaches every node within tag_ttl."""
    name = unique_repo("age").split("/")[1]
    repo = f"docker-mirror/library/{name}"
    first = push_image(registry, repo, "v1", layers=1, layer_size=4096)
    peers = node_addresses(3)
    owner_address = rendezvous(peers, tag_key(f"docker.io/library/{name}", "v1"))[0]
    nodes = await start_site(detour_process, registry.host, tmp_path, peers, tag_ttl="4s")
    owner = nodes[peers.index(owner_address)]
    late = next(node for node in nodes if node is not owner)
    await pull(owner, name, first)  # the owner's record: confirmed now
    await asyncio.sleep(2.5)
    await pull(late, name, first)  # from the owner's record, 2.5 s old
    moved = push_image(registry, repo, "v1", layers=1, layer_size=4096)
    await asyncio.sleep(2.0)  # 4.5 s after the upstream confirmed it; 2 s after `late` asked
    url = f"{late.url}/v2/{name}/manifests/v1"
    async with late.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == moved.digest
