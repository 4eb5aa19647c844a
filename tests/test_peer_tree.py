"""The site's peers as a tree, and the last resort of a site offline: several Detours on
127.0.0.x against real distribution.

A blob that every node wants at once leaves its owner ``cluster.fan_out`` times, not once per
node: the others get it from nodes that have it or are receiving it, in an order each node
computes alone. With the uplink down and a node lost, a node still gets what any live node
holds (``cluster.ask_all_peers``).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from proxy.cluster.peering import blob_key, rendezvous
from tests.images import push_image, unique_repo
from tests.proxy import Proxy, blob_path, pull_image, wait_cached
from tests.registry import Registry
from tests.test_cluster import StartProxy, blob_order, node_addresses, start_site

MiB = 1024 * 1024


def parent(order: list[str], peer: str, fan_out: int) -> str | None:
    place = order.index(peer)
    return order[(place - 1) // fan_out] if place else None


def peer_gets(node: Proxy, digest: str) -> list[dict[str, object]]:
    """The requests for blob ``digest`` that ``node`` answered for another peer."""
    found = []
    for line in node.log_lines():
        if '"request"' not in line or digest not in line:
            continue
        entry = json.loads(line)
        if entry.get("event") == "request" and "from_peer" in entry and entry["method"] == "GET":
            found.append(entry)
    return found


@pytest.mark.parametrize(("fan_out", "most"), [(2, 2), (64, 5)], ids=["tree", "owner-serves-all"])
async def test_a_blob_wanted_by_every_node_leaves_each_node_at_most_fan_out_times(
    detour_process: StartProxy, registry: Registry, tmp_path: Path, fan_out: int, most: int
) -> None:
    """Six nodes pull one image at once. With ``fan_out`` 2 no node, the owner included,
    sends a blob to more than two peers, and the mirror still sends each blob once; with a
    fan-out as large as the site, the owner sends it to all five others (as before the tree)."""
    name = unique_repo("tree").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=2, layer_size=MiB)
    peers = node_addresses(6)
    nodes = await start_site(
        detour_process, registry.host, tmp_path, peers, cluster={"fan_out": fan_out}
    )
    mark = registry.mark()
    await asyncio.gather(*(pull_image(node, name, image, at_once=True) for node in nodes))

    blobs = {f"/v2/docker-mirror/library/{name}/blobs/{b.digest}" for b in image.blobs}
    entries = await registry.wait_paths(mark, at_least=len(blobs))
    assert Counter(e for e in entries if e in blobs) == dict.fromkeys(blobs, 1)
    by_peer = dict(zip(peers, nodes, strict=True))
    for blob in image.blobs:
        sent = {peer: len(peer_gets(node, blob.digest)) for peer, node in by_peer.items()}
        owner = blob_order(peers, blob.digest, image, fan_out)[0]
        assert max(sent.values()) <= fan_out, sent
        assert sent[owner] == most, sent  # the owner's upload of this blob, in copies
        assert sum(sent.values()) == len(peers) - 1  # every other node asked one peer, once


async def test_an_images_layers_take_turns_at_being_parents(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """Six nodes, ``fan_out`` 2, an image of six layers pulled by five of them at once. Each
    layer's tree is laid over the image's order, turned layer by layer, so the nodes that pass
    one layer on are leaves of the next: the busiest node sends no more than the image once,
    where trees over each layer's own digest leave it to chance. The sixth node never sees the
    manifest; asked by its children, it relays each layer to its parent in the same tree (the
    place its children tell it), and the mirror still sends each blob once."""
    name = unique_repo("turns").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=6, layer_size=MiB)
    peers = node_addresses(6)
    nodes = await start_site(detour_process, registry.host, tmp_path, peers, cluster={"fan_out": 2})
    by_peer = dict(zip(peers, nodes, strict=True))
    aside = peers[-1]  # pulls nothing itself
    mark = registry.mark()
    await asyncio.gather(
        *(pull_image(node, name, image, at_once=True) for p, node in by_peer.items() if p != aside)
    )

    blobs = {f"/v2/docker-mirror/library/{name}/blobs/{b.digest}" for b in image.blobs}
    entries = await registry.wait_paths(mark, at_least=len(blobs))
    assert Counter(e for e in entries if e in blobs) == dict.fromkeys(blobs, 1)
    sent_in_all = Counter[str]()
    for layer in image.layers:
        order = blob_order(peers, layer.digest, image, 2)
        for peer, node in by_peer.items():
            gets = peer_gets(node, layer.digest)
            sent_in_all[peer] += len(gets)
            for entry in gets:  # every request came from a child of this node in the tree
                child = str(entry["from_peer"])
                assert parent(order, child, 2) == peer, (layer.digest, peer, child, order)
    # Five pulling nodes and the relay: 6 layers x at most 5 copies, spread over 6 nodes.
    assert max(sent_in_all.values()) <= len(image.layers), sent_in_all


async def test_offline_a_lost_owner_loses_nothing_another_node_holds(
    detour_process: StartProxy, registry: Registry, tmp_path: Path
) -> None:
    """Node A pulls an image; the mirror goes down; the owner of one of its blobs is killed,
    and that blob's next peer in line never held it. Every other node still pulls the whole
    image: when the peers ahead and the mirror fail, the others are asked for what they hold,
    and A has it."""
    name = unique_repo("lost").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=6, layer_size=256 * 1024
    )
    peers = node_addresses(4)
    keys = {b.digest: blob_key(b.digest) for b in image.blobs}
    # A is third in line for a blob: that blob's owner gets it, its successor doesn't.
    digest = next(iter(keys))
    ranked = rendezvous(peers, keys[digest])
    a = ranked[2]
    lost = ranked[0]
    nodes = await start_site(detour_process, registry.host, tmp_path, peers)
    by_peer = dict(zip(peers, nodes, strict=True))
    await pull_image(by_peer[a], name, image)
    assert await wait_cached(by_peer[lost].cache_dir, digest)  # the owner held it too
    assert not blob_path(by_peer[ranked[1]].cache_dir, digest).exists()  # the successor: no
    registry.stop()  # the uplink is down (the fixture brings the mirror back)
    victim = by_peer[lost].process
    assert victim is not None
    victim.send_signal(signal.SIGKILL)

    others = [peer for peer in peers if peer not in (a, lost)]
    async with asyncio.timeout(60):
        await asyncio.gather(*(pull_image(by_peer[peer], name, image) for peer in others))
    held = [
        entry
        for entry in peer_gets(by_peer[a], digest)
        if entry.get("only_if_cached") and entry["status"] == 200
    ]
    assert held, "A was asked for the blob only it held, and sent it"
