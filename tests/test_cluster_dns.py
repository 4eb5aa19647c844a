"""The cluster tier with ``cluster.peers: dns:<name>:<port>``: the peer set is what a real
resolver answers, and it is followed as the records change.

Each test has a network namespace of its own (``ip netns add``), with a loopback of its own,
and ``/etc/netns/<ns>/resolv.conf`` saying ``nameserver 127.0.0.1``: ``ip netns exec``
bind-mounts it over ``/etc/resolv.conf`` for what it runs, so ``detour serve`` resolves through
glibc's ``getaddrinfo`` against :mod:`tests.dns_server`, on 127.0.0.1:53 in the namespace, which
answers from a file the test rewrites. The test's own client code runs in a thread that has
entered the namespace (``setns``), so it reaches the Detours on 127.0.0.x:7439 there, and so
does whatever that thread starts (the mirror, in the ownership test). Nothing listens outside
the namespace; nothing is left behind (processes, namespace, /etc/netns/<ns>), even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

from proxy.cluster.peering import blob_key, rendezvous
from tests.images import PushedImage, build_image, unique_repo, upload_image
from tests.proxy import Proxy, blob_path, stop_process, wait_cached
from tests.registry import Registry
from tests.test_cluster import blob_owner, pull, site_keys

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace of the test's own: root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs ip (iproute2) for ip netns"),
]

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
NAME = "peers.detour.test"
PORT = 7439
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class Namespace:
    """A network namespace with a resolver of its own; see the module docstring."""

    def __init__(self, workdir: Path) -> None:
        self.name = f"detour-dns-{uuid.uuid4().hex[:8]}"
        self.dir = workdir
        self.etc = Path("/etc/netns") / self.name
        self.records = workdir / "records.json"
        self.processes: list[subprocess.Popen[bytes]] = []

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        self.etc.mkdir(parents=True)
        (self.etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1\n")
        self.set_records([])
        log = self.dir / "dns.log"
        self.spawn([sys.executable, "-m", "tests.dns_server", str(self.records)], log)
        deadline = time.monotonic() + 10
        while "listening on" not in log.read_text():
            if self.processes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the DNS server did not start:\n{log.read_text()}")
            time.sleep(0.02)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        subprocess.run(["ip", "netns", "del", self.name], check=False)
        shutil.rmtree(self.etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.etc.parent.rmdir()  # only if no other namespace has files there

    def set_records(self, hosts: list[str]) -> None:
        """``NAME`` has these A records from the next query on (none: NXDOMAIN)."""
        beside = self.records.with_suffix(".new")
        beside.write_text(json.dumps({NAME: hosts}))
        os.replace(beside, self.records)

    def resolve(self, name: str) -> list[str]:
        """The addresses glibc's ``getaddrinfo`` finds for ``name`` in the namespace, called
        as Detour calls it. (Not ``getent ahosts``: its ``AI_ADDRCONFIG`` finds nothing where
        the only interface is the loopback.)"""
        lookup = (
            "import socket, sys; "
            "print(*sorted({i[4][0] for i in socket.getaddrinfo(sys.argv[1], 0, "
            "type=socket.SOCK_STREAM)}))"
        )
        argv = ["ip", "netns", "exec", self.name, sys.executable, "-c", lookup, name]
        found = subprocess.run(argv, capture_output=True, text=True, check=False)
        return found.stdout.split()

    def spawn(self, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Run ``argv`` under ``ip netns exec`` (which execs it: the pid is the program's)."""
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.processes.append(process)
        return process

    def _enter(self) -> None:
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns {self.name}: {os.strerror(errno)}")
        finally:
            os.close(fd)

    def run(self, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``body`` in an event loop of its own, in a thread inside the namespace (its
        sockets, threads and child processes are all in there too)."""

        def inside() -> T:
            self._enter()
            return asyncio.run(body())

        with ThreadPoolExecutor(1, thread_name_prefix=self.name) as thread:
            return thread.submit(inside).result()


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Namespace]:
    namespace = Namespace(tmp_path)
    try:
        namespace.create()
        yield namespace
    finally:
        namespace.close()


class Site:
    """``detour serve`` processes in the namespace, each on its own 127.0.0.x:7439 and
    advertising it, with ``cluster.peers: dns:NAME:7439``; stopped on exit."""

    def __init__(self, netns: Namespace, mirror: str | None = None) -> None:
        self.netns = netns
        self.mirror = mirror
        self.nodes: list[Proxy] = []

    async def start(self, address: str) -> Proxy:
        workdir = self.netns.dir / address.replace(":", "_")
        workdir.mkdir()
        config: dict[str, Any] = {
            "listen": address,
            "cache": {"dir": str(workdir / "cache")},
            "cluster": {"peers": f"dns:{NAME}:{PORT}", "advertise": address, "refresh": "0.5s"},
        }
        if self.mirror is not None:
            config["redirects"] = [{"src": "docker.io/", "to": f"{self.mirror}/docker-mirror/"}]
            config["registries"] = {self.mirror: {"insecure": True}}
        (workdir / "detour.yaml").write_text(yaml.safe_dump(config))
        log_path = workdir / "detour.log"
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(workdir / "detour.yaml")]
        process = self.netns.spawn(argv, log_path)
        session = aiohttp.ClientSession()
        node = Proxy(f"http://{address}", workdir / "cache", session, process, log_path)
        self.nodes.append(node)
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with node.session.get(f"{node.url}/healthz") as response:
                    if response.status == 200:
                        return node
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"detour did not start:\n{log_path.read_text()}")
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Site:
        return self

    async def __aexit__(self, *_: object) -> None:
        for node in self.nodes:
            await stop_process(node)


async def wait_peers(node: Proxy, count: int, limit: float = 10.0) -> None:
    """Until ``detour_peers`` on ``node`` is ``count`` (a refresh is every 0.5 s)."""
    deadline = time.monotonic() + limit
    while (seen := await node.metric("detour_peers")) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.url}: detour_peers is {seen} after {limit}s, not {count}")
        await asyncio.sleep(0.1)


def events(node: Proxy, event: str) -> list[dict[str, Any]]:
    lines = (line for line in node.log_lines() if line.startswith("{"))
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


def peers(*hosts: str) -> list[str]:
    return [f"{host}:{PORT}" for host in hosts]


def test_a_dns_peer_set_is_resolved_and_followed_when_it_changes(netns: Namespace) -> None:
    netns.set_records(["127.0.0.2", "127.0.0.3"])
    assert netns.resolve(NAME) == ["127.0.0.2", "127.0.0.3"]  # glibc, in the namespace

    async def body() -> None:
        async with Site(netns) as site:
            node = await site.start("127.0.0.2:7439")
            await wait_peers(node, 2)
            netns.set_records(["127.0.0.2", "127.0.0.3", "127.0.0.4"])  # a pod became ready
            await wait_peers(node, 3)
            netns.set_records(["127.0.0.2", "127.0.0.4"])  # one went away
            await wait_peers(node, 2)
            changes = [(e["peers"], e["size"]) for e in events(node, "peers_changed")]
            assert changes == [
                (peers("127.0.0.2", "127.0.0.3"), 2),
                (peers("127.0.0.2", "127.0.0.3", "127.0.0.4"), 3),
                (peers("127.0.0.2", "127.0.0.4"), 2),
            ]
            # A lookup that fails (NXDOMAIN) keeps the set as it was.
            netns.set_records([])
            deadline = time.monotonic() + 10
            while not events(node, "peers_not_resolved"):
                assert time.monotonic() < deadline, "no peers_not_resolved in 10 s"
                await asyncio.sleep(0.1)
            assert await node.metric("detour_peers") == 2
            assert len(events(node, "peers_changed")) == 3

    netns.run(body)


def spread(peer_set: list[str], first_seed: int) -> PushedImage:
    """An image (built from the first seed from ``first_seed`` that does it) whose blobs have
    every peer of ``peer_set`` among their owners."""
    for seed in itertools.count(first_seed):
        image = build_image("spread", "v1", layers=3, layer_size=16 * 1024, seed=seed)
        if {blob_owner(peer_set, b.digest, image) for b in image.blobs} == set(peer_set):
            return image
    raise AssertionError("unreachable")


def test_ownership_follows_the_dns_peer_set(netns: Namespace) -> None:
    """Three Detours run throughout, but the peer set is what DNS says: at each step a pull
    on 127.0.0.2 asks exactly the owners of the keys by rendezvous over the current records,
    and each blob lands in its owner's cache and in no other node's but the puller's."""
    two, three, four = peers("127.0.0.2", "127.0.0.3", "127.0.0.4")
    steps = [[two, three], [two, three, four], [two]]  # 4 joins; then 3 and 4 both leave
    netns.set_records(["127.0.0.2", "127.0.0.3"])

    async def body() -> None:
        with Registry() as mirror:  # started from this thread: in the namespace
            async with Site(netns, mirror.host) as site:
                nodes = {address: await site.start(address) for address in (two, three, four)}
                puller = nodes[two]
                pulled: list[tuple[str, PushedImage]] = []
                for step, peer_set in enumerate(steps):
                    netns.set_records([p.rpartition(":")[0] for p in peer_set])
                    for node in nodes.values():
                        await wait_peers(node, len(peer_set))
                    name = unique_repo("dns").split("/")[1]
                    image = spread(peer_set, first_seed=1000 * step)
                    upload_image(mirror, image, f"docker-mirror/library/{name}")
                    served = await puller.metric("detour_peer_requests_total", result="served")
                    await pull(puller, name, image)
                    pulled.append((name, image))

                    owner = {key: rendezvous(peer_set, key)[0] for key in site_keys(name, image)}
                    owner.update(
                        {
                            blob_key(b.digest): blob_owner(peer_set, b.digest, image)
                            for b in image.blobs
                        }
                    )
                    asked = sum(1 for address in owner.values() if address != two)
                    now = await puller.metric("detour_peer_requests_total", result="served")
                    assert now - served == asked, f"step {step}: {peer_set}"
                    for blob in image.blobs:
                        holder = owner[blob_key(blob.digest)]
                        assert await wait_cached(nodes[holder].cache_dir, blob.digest)
                        for address, node in nodes.items():
                            if address not in (holder, two):
                                assert not blob_path(node.cache_dir, blob.digest).exists()
                for result in ("failed", "skipped"):
                    assert await puller.metric("detour_peer_requests_total", result=result) == 0
                # And the owners made the site's one fetch of each blob.
                paths = await mirror.wait_paths()
                wanted = {
                    f"/v2/docker-mirror/library/{name}/blobs/{b.digest}"
                    for name, image in pulled
                    for b in image.blobs
                }
                assert Counter(p for p in paths if p in wanted) == dict.fromkeys(wanted, 1)

    netns.run(body)
