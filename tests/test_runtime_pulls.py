"""Every runtime a node pulls with, online and offline: the client-behaviour matrix.

Each cell is one real client with its own image store (skopeo, podman, containerd's ``ctr``,
the kubelet's CRI call to containerd, dockerd) in one mode (path or mirror), pulling
``docker.io/library/nats:2.10.26-alpine`` by tag through a real ``detour serve`` from a real
registry (the mirror), through the states an edge node lives through:

1. cold: the client's own request sequence, served (recorded below, so that a change that
   stops serving one of them fails by the client's name);
2. warm, a second node (an empty store): no request reaches the mirror;
3. the mirror stopped, an empty store, within ``cache.tag_ttl``: pulled from disk;
4. the same past ``tag_ttl`` (Detour restarted with a tiny one): served stale;
5. the tag moved upstream: within ``tag_ttl`` the old image, past it the new one.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.images import PushedIndex, push_index
from tests.proxy import Proxy, scenario, start_process, stop_process
from tests.registry import AccessEntry, Registry
from tests.runtimes import RUNTIMES, Mode, Runtime, _ContainersImage
from tests.support import free_port, run_command

REPOSITORY = "library/nats"
TAG = "2.10.26-alpine"
LONG_TTL = "1h"
PAST_TTL = "1ms"

# What each client asks Detour for, in the order of first asking (blobs: config and layers).
HEAD_THEN_DIGEST = ("HEAD manifests/<tag>", "GET manifests/<digest>", "GET blobs/<digest>")
SEQUENCES: dict[str, tuple[str, ...]] = {
    "skopeo": ("GET /v2/", "GET manifests/<tag>", "GET manifests/<digest>", "GET blobs/<digest>"),
    "podman": ("GET /v2/", "GET manifests/<tag>", "GET manifests/<digest>", "GET blobs/<digest>"),
    "ctr": HEAD_THEN_DIGEST,
    "cri": HEAD_THEN_DIGEST,
    "docker": ("GET /v2/", *HEAD_THEN_DIGEST),
}

CELLS = [(name, mode) for name, runtime in RUNTIMES.items() for mode in runtime.modes]


def pulled(runtime: Runtime, image: PushedIndex) -> str:
    """The digest a pull of ``image`` leaves in ``runtime``'s store."""
    return image.digest if runtime.keeps_index else image.children[0].digest


def step(line: dict[str, Any]) -> str:
    """One request of Detour's log as a step of a client's sequence."""
    method, path = line["method"], line["path"].split("?", 1)[0]
    if path == "/v2/":
        return f"{method} /v2/"
    kind, reference = path.rsplit("/", 2)[-2:]
    return f"{method} {kind}/{'<digest>' if ':' in reference else '<tag>'}"


class Node:
    """Detour on a fixed port over one cache directory, restarted with another ``tag_ttl``."""

    def __init__(self, mirror: Registry, workdir: Path) -> None:
        self.mirror = mirror
        self.workdir = workdir
        self.config = scenario(mirror, workdir / "cache", listen=f"127.0.0.1:{free_port()}")
        self.proxy: Proxy | None = None
        self.starts = 0
        self.settings = workdir / "settings.yaml"
        self.settings.write_text(yaml.safe_dump(self.config))

    @property
    def url(self) -> str:
        return f"http://{self.config['listen']}"

    async def start(self, tag_ttl: str) -> Proxy:
        await self.stop()
        self.starts += 1
        run = self.workdir / f"run-{self.starts}"
        run.mkdir()
        config = {**self.config, "cache": {**self.config["cache"], "tag_ttl": tag_ttl}}
        self.proxy = await start_process(config, run)
        return self.proxy

    async def stop(self) -> None:
        if self.proxy is not None:
            await stop_process(self.proxy)
            self.proxy = None

    def requests(self) -> list[dict[str, Any]]:
        assert self.proxy is not None
        return [json.loads(line) for line in self.proxy.log_lines() if '"request"' in line]


async def mirror_requests(mirror: Registry, mark: int) -> list[AccessEntry]:
    """What reached the mirror since ``mark``: everything its access log holds before a request
    of the test's own, sent now and waited for (the log is written a little later)."""
    sentinel = f"/v2/sentinel-{free_port()}/tags/list"
    with pytest.raises(urllib.error.HTTPError):
        await asyncio.to_thread(urllib.request.urlopen, f"{mirror.url}{sentinel}", timeout=10)
    entries = await mirror.wait_entries(mark, at_least=1, limit=10)
    while entries[-1].path != sentinel:
        entries = await mirror.wait_entries(mark, at_least=len(entries) + 1, limit=10)
    return entries[:-1]


@pytest.fixture
async def node(make_registry: Callable[..., Registry], tmp_path: Path) -> AsyncIterator[Node]:
    node = Node(make_registry(), tmp_path)
    yield node
    await node.stop()


@pytest.mark.parametrize(("client", "mode"), CELLS, ids=[f"{c}-{m}" for c, m in CELLS])
async def test_a_runtime_pulls_by_tag_online_and_offline(
    node: Node, client: str, mode: Mode
) -> None:
    image = push_index(node.mirror, f"docker-mirror/{REPOSITORY}", TAG, layers=2)
    proxy = await node.start(LONG_TTL)
    runtime: Runtime = RUNTIMES[client](node.url)
    try:
        if isinstance(runtime, _ContainersImage):
            await runtime.write_config(node.settings)

        async def pull(what: str) -> str:
            try:
                return await runtime.pull(mode, REPOSITORY, TAG)
            except Exception as exc:
                raise AssertionError(f"{client} in {mode} mode, {what}: {exc}") from exc

        # 1. Cold: the client's own sequence, every step served.
        assert await pull("cold") == pulled(runtime, image)
        seen = [step(line) for line in node.requests()]
        assert all(line["status"] == 200 for line in node.requests()), node.requests()
        assert tuple(dict.fromkeys(seen)) == SEQUENCES[client], seen
        # The tag is kept, whichever way the client resolved it (HEAD or GET).
        listing = await run_command(
            sys.executable, "-m", "proxy", "cache", "ls", "--endpoint", node.url, "--json"
        )
        images = json.loads(listing.check().stdout)["images"]
        assert f"docker.io/{REPOSITORY}:{TAG}" in [entry["image"] for entry in images]

        # 2. A second node within tag_ttl: nothing reaches the mirror, not even the tag.
        await runtime.empty()
        mark = node.mirror.mark()
        assert await pull("warm, empty store") == pulled(runtime, image)
        assert await mirror_requests(node.mirror, mark) == []
        # Cold: the index (asked by tag) and this platform's manifest were the misses; warm,
        # every manifest and blob a hit.
        hits = await proxy.metric("detour_cache_requests_total", kind="manifest", result="hit")
        assert hits >= 2
        assert (
            await proxy.metric("detour_cache_requests_total", kind="manifest", result="miss") == 2
        )

        # 3. The mirror stopped; a new node, within tag_ttl: all from disk.
        node.mirror.stop()
        await runtime.empty()
        assert await pull("mirror stopped, within tag_ttl") == pulled(runtime, image)

        # 4. The same past tag_ttl: the tag can't be revalidated, so it is served stale.
        proxy = await node.start(PAST_TTL)
        await runtime.empty()
        assert await pull("mirror stopped, past tag_ttl") == pulled(runtime, image)
        assert await proxy.metric("detour_cache_requests_total", kind="manifest", result="stale")

        # 5. The tag moves upstream: not seen within tag_ttl, seen past it.
        node.mirror.start()
        moved = push_index(node.mirror, f"docker-mirror/{REPOSITORY}", TAG, layers=2)
        await node.start(LONG_TTL)
        await runtime.empty()
        assert await pull("tag moved, within tag_ttl") == pulled(runtime, image)
        await node.start(PAST_TTL)
        await runtime.empty()
        assert await pull("tag moved, past tag_ttl") == pulled(runtime, moved)
    finally:
        runtime.close()
