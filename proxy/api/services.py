"""The proxy's long-lived parts, built when the app starts and closed when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy.cache.store import CacheStore, delete_files
from proxy.cluster.peering import Peering
from proxy.content.blobs import Blobs
from proxy.content.fetch_limits import FetchLimits, FetchSlots
from proxy.content.manifests import Manifests
from proxy.content.outcome import Sharing
from proxy.logs import get_logger
from proxy.memory import READ_BUFFER_BYTES
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.upstream.auth import CredentialStore
from proxy.upstream.client import UpstreamClient
from proxy.upstream.connections import client_timeout, registry_tls
from proxy.upstream.egress import EgressPolicy, GuardedResolver
from proxy.upstream.liveness import peer_patience
from proxy.upstream.peer_auth import PeerAuth
from proxy.upstream.rules import Rules

log = get_logger("detour")


@dataclass(frozen=True)
class Services:
    metrics: Metrics
    store: CacheStore
    rules: Rules
    upstream: UpstreamClient
    blobs: Blobs
    manifests: Manifests
    peering: Peering
    sharing: Sharing


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SERVICES = web.AppKey("services", Services)


async def services_ctx(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` entry: open the cache and the client session; close them at the end."""
    settings = app[SETTINGS]
    metrics = app[METRICS]
    loop = asyncio.get_running_loop()
    # A ca_file that can't be read is a ConfigError, before anything else is opened.
    tls = await asyncio.to_thread(registry_tls, settings.registries)
    for registry, conf in settings.registries.items():
        if not conf.tls_verify:
            log.warning("tls_verify_disabled", registry=registry, certificates="not checked")

    def evicted(paths: list[Path]) -> None:
        metrics.evictions.inc(len(paths))
        deleting = loop.run_in_executor(None, delete_files, paths)
        deleting.add_done_callback(functools.partial(_log_failed_deletion, len(paths)))

    store = CacheStore(
        settings.cache.dir,
        settings.cache.max_size,
        on_evict=evicted,
        read_back_up_to=settings.cache.read_back_up_to,
        write_behind=settings.cache.write_behind,
        write_buffer=settings.cache.write_buffer,
    )
    await asyncio.to_thread(store.open)
    store.trim()  # max_size may have shrunk since the last run
    metrics.cache_size.set_function(lambda: store.total)
    metrics.cache_max_size.set(settings.cache.max_size or 0)
    credentials = CredentialStore(settings.registries, settings.docker_config)
    egress = EgressPolicy.from_settings(settings)
    # Every address connected to passes the egress policy (see proxy.upstream.egress).
    resolver = GuardedResolver(egress)
    session = _session(settings, ttl_dns_cache=300, resolver=resolver)
    peer_auth = PeerAuth(settings.cluster.secret_dir)
    peering = Peering(settings.cluster, metrics, egress, peer_auth)
    if peering.enabled and not peer_auth.required:
        log.warning(
            "peers_known_by_address",
            setting="cluster.secret_dir",
            effect="any process that can send from a peer's address is taken for a peer; "
            "see docs/security.md",
        )
    peer_session = _peer_session(settings, resolver) if peering.enabled else None
    probe_session = _peer_session(settings, resolver, probe=True) if peering.enabled else None
    upstream = UpstreamClient(
        session,
        settings.upstream,
        credentials,
        metrics,
        tls,
        egress,
        peer_session=peer_session,
        peer_name=settings.cluster.advertise or "client",
        resolver=resolver,
        peer_auth=peer_auth,
        cluster=settings.cluster,
        probe_session=probe_session,
    )
    metrics.peers_down.set_function(lambda: upstream.down_among(peering.peers))
    slots = FetchSlots(
        settings.upstream.max_fetches, settings.upstream.max_fetches_per_registry, metrics
    )
    sharing = Sharing()
    blobs = Blobs(store, upstream, metrics, FetchLimits.from_settings(settings), slots, sharing)
    manifests = Manifests(store, upstream, metrics, sharing, tag_ttl=settings.cache.tag_ttl)
    rules = Rules.from_settings(settings)
    app[SERVICES] = Services(metrics, store, rules, upstream, blobs, manifests, peering, sharing)
    try:
        async with peering.running():
            yield
    finally:
        await blobs.close()
        await session.close()
        for peers in (peer_session, probe_session):
            if peers is not None:
                await peers.close()


def _log_failed_deletion(files: int, deleting: asyncio.Future[None]) -> None:
    """Log what went wrong deleting ``files`` evicted files in a worker thread: nothing else
    awaits that, so without this an error there would be lost.

    :func:`~proxy.cache.store.delete_files` ignores an ``OSError`` per file (gone already, or a
    read-only disk), so what lands here is anything else it raises: a bug, or a path the OS
    can't take (``ValueError`` for a NUL byte; the index's paths are built from digests, so
    none has one). The files it had not reached stay on disk, out of the index, until the next
    start indexes them again. One line, without a traceback: this runs on no request's behalf.
    """
    if deleting.cancelled():
        return
    error = deleting.exception()
    if error is not None:
        log.warning(
            "evicted_files_not_deleted",
            files=files,
            error=f"{type(error).__name__}: {error}",
            action="left on disk until the next start",
        )


def _session(
    settings: Settings, timeout: aiohttp.ClientTimeout | None = None, **connector: Any
) -> aiohttp.ClientSession:
    """A client session with the upstream settings' timeouts (unless ``timeout``) and
    connection limits."""
    upstream = settings.upstream
    return aiohttp.ClientSession(
        timeout=timeout or client_timeout(upstream.connect_timeout, upstream.read_timeout),
        auto_decompress=False,
        # With the blob pipeline, what bounds a fetch's memory (proxy.memory).
        read_bufsize=READ_BUFFER_BYTES,
        connector=aiohttp.TCPConnector(
            limit=upstream.max_connections,
            limit_per_host=upstream.max_connections_per_host,
            **connector,
        ),
    )


def _peer_session(
    settings: Settings, resolver: GuardedResolver, *, probe: bool = False
) -> aiohttp.ClientSession:
    """The connections to the site's other Detours: from the advertised address when it is an
    IP address (on a node it is the pod's address anyway), each through the egress policy's
    ``resolver`` like every other connection. Peers are on the LAN: connecting takes
    ``cluster.connect_timeout``; a silence is judged by a probe (proxy.upstream.liveness), and
    bounded here only by the longest wait on a live peer. A ``probe`` session's connections are
    new each time and wait ``cluster.read_timeout`` at most."""
    cluster = settings.cluster
    local: tuple[str, int] | None = None
    if cluster.advertise is not None:
        host = cluster.advertise.rpartition(":")[0].strip("[]")
        with contextlib.suppress(ValueError):
            local = (str(ipaddress.ip_address(host)), 0)
    if probe:
        timeout = client_timeout(cluster.connect_timeout, cluster.read_timeout)
        return _session(settings, timeout, local_addr=local, resolver=resolver, force_close=True)
    timeout = client_timeout(cluster.connect_timeout, peer_patience(settings.upstream))
    return _session(settings, timeout, local_addr=local, resolver=resolver)
