"""The blob fetch's state machine, driven directly: a Fetch against an upstream of the
test's own (an aiohttp app that can cut a body short, send wrong bytes, or refuse), with a
real CacheStore, UpstreamClient and Metrics. What is asserted is what an operator or a client
would see: the state and error the clients get, what is in the cache directory, the space
accounted, and the metrics."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.cache.store import CacheStore
from proxy.content.fetch import Fetch
from proxy.content.fetch_limits import FetchLimits, FetchSlots
from proxy.content.fetch_state import State
from proxy.content.window import Reader
from proxy.errors import BlobUnknown, UpstreamInvalid, UpstreamUnreachable
from proxy.memory import CHECKED_CHUNK_BYTES, MAX_BODIES
from proxy.metrics import Metrics
from proxy.reference import Digest, ImageName
from proxy.settings import Settings
from proxy.upstream.auth import CredentialStore
from proxy.upstream.client import UpstreamClient
from proxy.upstream.connections import registry_tls
from proxy.upstream.egress import EgressPolicy
from proxy.upstream.rules import Route, Upstream
from proxy.upstream.socket_body import TAKE_OVER_AFTER, TAKE_OVER_RATE
from tests.registry import make_certificates

KiB = 1024
MiB = 1024 * KiB
REPOSITORY = "lib/app"


@dataclass
class BlobServer:
    """What the test's upstream serves, and what it was asked."""

    data: bytes
    cut_first_at: int | None = None  # the first answer ends (connection dropped) here
    body: bytes | None = None  # sent instead of ``data`` (wrong bytes)
    chunked: bool = False  # no Content-Length
    status: int = 200
    pause_first_at: int | None = None  # the first answer pauses here a moment
    stall_first_at: int | None = None  # the first answer goes silent here, connection open
    piece: int = 64 * KiB  # bytes per write
    rate: float | None = None  # bytes per second, at most
    ranges: list[str | None] = field(default_factory=list)
    connections: list[object] = field(default_factory=list)  # each request's transport

    async def blob(self, request: web.Request) -> web.StreamResponse:
        wanted = request.headers.get("Range")
        self.ranges.append(wanted)
        self.connections.append(request.transport)
        if self.status != 200:
            return web.Response(status=self.status)
        body = self.data if self.body is None else self.body
        start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0
        response = web.StreamResponse(status=206 if wanted else 200)
        if wanted:
            response.headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        if self.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body) - start
        await response.prepare(request)
        end = len(body)
        if not wanted and self.cut_first_at is not None:
            end = self.cut_first_at
        pause = self.pause_first_at if not wanted else None
        stall = self.stall_first_at if not wanted else None
        for offset in range(start, end, self.piece):
            piece = body[offset : min(end, offset + self.piece)]
            at = offset  # where piece begins in the body
            if pause is not None and at <= pause < at + len(piece):
                await response.write(piece[: pause - at])
                await asyncio.sleep(0.3)
                piece, at = piece[pause - at :], pause
            if stall is not None and at <= stall < at + len(piece):
                await response.write(piece[: stall - at])
                assert request.transport is not None
                for _ in range(200):  # until the client gives up on it
                    if request.transport.is_closing():
                        break
                    await asyncio.sleep(0.05)
                return response
            await response.write(piece)
            if self.rate is not None:
                await asyncio.sleep(len(piece) / self.rate)
        if end < len(body):
            assert request.transport is not None
            request.transport.close()  # dropped mid-blob
        return response


@dataclass
class Site:
    upstream: BlobServer
    server: TestServer
    store: CacheStore
    metrics: Metrics
    client: UpstreamClient
    route: Route
    spilled: list[Fetch] = field(default_factory=list)

    def fetch(self, digest: Digest, *, max_blob_size: int = 1 << 30) -> Fetch:
        limits = FetchLimits(
            max_blob_size=max_blob_size,
            abandon_after=0.2,
            min_rate=None,
            rate_window=30.0,
            slow_client=5.0,
        )
        fetch = Fetch(
            digest,
            self.route,
            None,
            store=self.store,
            upstream=self.client,
            metrics=self.metrics,
            limits=limits,
            slots=FetchSlots(4, 2, self.metrics),
            on_spill=lambda: self.spilled.append(fetch),
        )
        return fetch

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def cached(self) -> list[Path]:
        return sorted(p for p in (self.store.root / "blobs").rglob("*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return sorted(self.store.tmp.iterdir())


MakeSite = Callable[..., Awaitable["Site"]]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[MakeSite]:
    servers: list[TestServer] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(
        upstream: BlobServer,
        *,
        take_over_rate: float = TAKE_OVER_RATE,
        read_timeout: float = 30,
        tls: bool = False,
    ) -> Site:
        """``take_over_rate`` 0: every body long enough is read on by Detour itself. ``tls``:
        served over https, with a private CA the client is given as its ``ca_file``."""
        app = web.Application()
        app.router.add_get(f"/v2/{REPOSITORY}/blobs/{{digest}}", upstream.blob)
        server = TestServer(app, host="127.0.0.1")
        registry: dict[str, object] = {"insecure": True}
        serving = None
        if tls:
            certs = make_certificates(["127.0.0.1"])
            for name, pem in (("ca.pem", certs.ca_pem), ("tls.crt", certs.cert_pem)):
                (tmp_path / name).write_bytes(pem)
            (tmp_path / "tls.key").write_bytes(certs.key_pem)
            serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            serving.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
            registry = {"ca_file": str(tmp_path / "ca.pem")}
        await server.start_server(ssl=serving)
        servers.append(server)
        host = f"127.0.0.1:{server.port}"
        settings = Settings.model_validate(
            {"registries": {host: registry}, "upstream": {"read_timeout": read_timeout}}
        )
        metrics = Metrics(known_registries=frozenset({host}))
        store = CacheStore(tmp_path / "cache")
        await asyncio.to_thread(store.open)
        session = aiohttp.ClientSession()
        sessions.append(session)
        client = UpstreamClient(
            session,
            settings.upstream,
            CredentialStore(settings.registries, None),
            metrics,
            registry_tls(settings.registries),
            egress=EgressPolicy.from_settings(settings),
            take_over_rate=take_over_rate,
        )
        route = Route(
            ImageName.parse(f"{host}/{REPOSITORY}"),
            None,
            (Upstream(host, REPOSITORY, insecure=not tls, origin=True),),
        )
        return Site(upstream, server, store, metrics, client, route)

    yield make
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()


def blob(size: int) -> tuple[bytes, Digest]:
    data = os.urandom(size)
    return data, Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


async def follow(fetch: Fetch, reader: Reader) -> bytes:
    """A client reading the fetch through its window, as fast as bytes come: what it got
    (all of the blob once verified; never the last byte of a blob that failed)."""
    got = bytearray()
    window = fetch.window
    while True:
        changed = window.changed
        limit = fetch.available()
        if window.start <= reader.position < limit:
            for view in window.views(reader.position, limit):
                got += view
                reader.position += len(view)
            window.notify()
        elif fetch.state is State.FAILED or (
            fetch.state is State.VERIFIED and reader.position >= limit
        ):
            return bytes(got)
        else:
            assert reader.position >= window.start, "a client that keeps up fell behind"
            await changed.wait()


async def run(fetch: Fetch) -> bytes:
    """Run the fetch with one client reading it; what the client got."""
    near, far = socket.socketpair()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, near)
    reader = fetch.join(transport)
    try:
        running = asyncio.create_task(fetch.run())
        got = await asyncio.wait_for(follow(fetch, reader), 30)
        await asyncio.wait_for(running, 30)
        return got
    finally:
        fetch.leave(reader)
        transport.close()
        far.close()


async def test_a_whole_blob_is_verified_and_committed(site: MakeSite) -> None:
    data, digest = blob(3 * MiB + 123)
    s = await site(BlobServer(data))
    fetch = s.fetch(digest)
    assert await run(fetch) == data
    assert fetch.state is State.VERIFIED
    assert fetch.committed
    assert s.cached() == [s.store.blob_path(digest)]
    assert s.store.blob_path(digest).read_bytes() == data
    assert (s.store.total, s.store.reserved) == (len(data), 0)
    assert fetch.checksums is not None
    assert len(fetch.checksums.sums) == -(-len(data) // CHECKED_CHUNK_BYTES)
    assert s.temp_files() == []
    assert s.upstream.ranges == [None]


async def test_a_body_cut_short_is_resumed_from_the_byte_reached(
    site: MakeSite,
) -> None:
    data, digest = blob(2 * MiB)
    s = await site(BlobServer(data, cut_first_at=640 * KiB))
    fetch = s.fetch(digest)
    assert await run(fetch) == data  # one unbroken stream for the client
    assert fetch.state is State.VERIFIED, fetch.error
    assert s.store.blob_path(digest).read_bytes() == data
    assert s.upstream.ranges == [None, f"bytes={640 * KiB}-"]


async def test_wrong_bytes_fail_the_fetch_and_nothing_is_kept(
    site: MakeSite,
) -> None:
    data, digest = blob(1 * MiB)
    s = await site(BlobServer(data, body=os.urandom(len(data))))
    fetch = s.fetch(digest)
    assert len(await run(fetch)) < len(data)  # the last byte never went out
    assert fetch.state is State.FAILED
    assert isinstance(fetch.error, UpstreamInvalid)
    assert fetch.error.message == "upstream blob does not match its digest"
    assert not fetch.committed
    assert s.cached() == []
    assert s.temp_files() == []
    assert (s.store.total, s.store.reserved) == (0, 0)
    host = s.route.upstreams[0].registry
    assert s.metric("detour_digest_mismatches_total", kind="blob", registry=host) == 1


async def test_a_blob_over_max_blob_size_is_verified_but_not_kept(
    site: MakeSite,
) -> None:
    data, digest = blob(1 * MiB)
    s = await site(BlobServer(data))
    fetch = s.fetch(digest, max_blob_size=512 * KiB)
    assert await run(fetch) == data  # streamed from memory
    assert fetch.state is State.VERIFIED
    assert fetch.spilled
    assert s.spilled == [fetch]
    assert not fetch.committed
    assert s.cached() == []
    assert s.temp_files() == []
    assert s.metric("detour_cache_write_failures_total", reason="too_large") == 1


async def test_no_length_and_more_than_max_blob_size_is_cut(
    site: MakeSite,
) -> None:
    data, digest = blob(1 * MiB)
    s = await site(BlobServer(data, chunked=True))
    fetch = s.fetch(digest, max_blob_size=256 * KiB)
    await run(fetch)
    assert fetch.state is State.FAILED
    assert isinstance(fetch.error, UpstreamInvalid)
    assert "larger than cache.max_blob_size" in fetch.error.message
    assert s.cached() == []
    assert s.temp_files() == []
    assert s.store.reserved == 0


async def test_a_refusal_reaches_the_clients_before_any_byte(
    site: MakeSite,
) -> None:
    data, digest = blob(4 * KiB)
    s = await site(BlobServer(data, status=404))
    fetch = s.fetch(digest)
    await run(fetch)
    assert fetch.state is State.FAILED
    with pytest.raises(BlobUnknown):
        await fetch.headers_ready()
    assert s.cached() == []
    assert s.temp_files() == []


async def test_a_fetch_nobody_waits_for_ends_before_it_begins(
    site: MakeSite,
) -> None:
    data, digest = blob(4 * KiB)
    s = await site(BlobServer(data))
    fetch = s.fetch(digest)
    await asyncio.wait_for(fetch.run(), 10)  # no client
    assert fetch.state is State.FAILED
    assert isinstance(fetch.error, UpstreamUnreachable)
    assert s.upstream.ranges == []  # the upstream was never asked
    assert s.metric("detour_ended_blob_fetches_total", reason="abandoned") == 1


# Read on by Detour itself (proxy.upstream.socket_body): past its first TAKE_OVER_AFTER bytes, a
# body fast enough (here: any) is read from its connection into page-aligned blocks, which the
# blob writer writes from where they are.


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_a_fast_body_is_read_on_by_detour_and_cached_whole(site: MakeSite, tls: bool) -> None:
    """Every byte right, for the client and in the cache, and the connection closed after the
    body (aiohttp's parser was left mid-body): the next fetch makes a new one."""
    data, digest = blob(24 * MiB + 1234)  # a last partial 4 KiB block
    s = await site(BlobServer(data, piece=1 * MiB), take_over_rate=0, tls=tls)
    for _ in range(2):
        fetch = s.fetch(digest)
        assert await run(fetch) == data
        assert fetch.committed
        assert s.store.blob_path(digest).read_bytes() == data
    assert s.upstream.ranges == [None, None]
    first, second = s.upstream.connections
    assert first is not second
    assert s.temp_files() == []


async def test_a_slow_body_is_not_taken_over_and_its_connection_is_kept(
    site: MakeSite,
) -> None:
    """Below the pace that makes it worth it, the body is read through aiohttp to its end and
    the connection goes back to the pool: the next fetch reuses it."""
    data, digest = blob(TAKE_OVER_AFTER + 9 * MiB)
    s = await site(BlobServer(data, piece=256 * KiB, rate=40e6))
    for _ in range(2):
        fetch = s.fetch(digest)
        assert await run(fetch) == data
        assert fetch.committed
    first, second = s.upstream.connections
    assert first is second


async def test_no_more_fast_bodies_than_max_bodies_are_read_on_at_once(site: MakeSite) -> None:
    """Each body read on holds blocks of its own, so past MAX_BODIES at once the others are
    read through aiohttp to their end, whole, and keep their connections: the next round
    reuses just those."""
    data, digest = blob(16 * MiB)
    s = await site(BlobServer(data, piece=1 * MiB, rate=60e6), take_over_rate=0)
    fetches = MAX_BODIES + 2
    rounds = []
    for _ in range(2):
        got = await asyncio.gather(*(run(s.fetch(digest)) for _ in range(fetches)))
        assert got == [data] * fetches
        rounds.append(s.upstream.connections[-fetches:])
    first, second = ({id(c) for c in r} for r in rounds)
    assert len(first) == len(second) == fetches
    assert len(first & second) == fetches - MAX_BODIES
    assert s.store.blob_path(digest).read_bytes() == data
    assert s.temp_files() == []


async def test_a_fast_body_that_pauses_and_is_cut_is_resumed_and_cached_whole(
    site: MakeSite,
) -> None:
    """A pause mid-block passes the bytes that came on (a client is not held up for a whole
    block), and a cut at a byte that is no multiple of 4 KiB is resumed from there: the
    resumed body, read on in its turn, starts its first block off the page boundary."""
    data, digest = blob(40 * MiB)
    cut = 20 * MiB + 1234
    s = await site(
        BlobServer(data, pause_first_at=9 * MiB + 777, cut_first_at=cut, piece=1 * MiB),
        take_over_rate=0,
    )
    fetch = s.fetch(digest)
    assert await run(fetch) == data
    assert fetch.committed
    assert s.store.blob_path(digest).read_bytes() == data
    assert s.upstream.ranges == [None, f"bytes={cut}-"]


async def test_a_fast_body_gone_silent_is_resumed_after_read_timeout(site: MakeSite) -> None:
    data, digest = blob(24 * MiB)
    stall = 12 * MiB + 99
    s = await site(
        BlobServer(data, stall_first_at=stall, piece=1 * MiB), take_over_rate=0, read_timeout=1
    )
    fetch = s.fetch(digest)
    started = asyncio.get_running_loop().time()
    assert await run(fetch) == data
    took = asyncio.get_running_loop().time() - started
    assert 1 <= took < 5  # it waited out the silence, and no longer
    assert fetch.committed
    assert s.store.blob_path(digest).read_bytes() == data
    assert s.upstream.ranges == [None, f"bytes={stall}-"]
