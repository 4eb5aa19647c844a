"""Manifests: by digest from disk forever, by tag through a short-lived tag → digest map.

Manifests are passed through byte for byte (an index's digest never changes), read whole,
checked to be JSON of a known manifest media type, and verified against their digest before
they are stored or served. Schema1 manifests, whose digest is not the hash of their bytes, are
refused (406 UNSUPPORTED).

What a tag means is kept per representation. A client that takes every index type gets the
tag's own record (the index of a multi-platform image). A client that takes no index (only
``…manifest.v2+json``, say) may be answered with one platform's manifest, narrowed by the
upstream: that answer is kept only for that same ``Accept`` and never replaces the index, so
one such request can't make the tag mean amd64 for every other node. ``Accept: */*`` is no
``Accept`` at all.

The tag policy, for ``GET``/``HEAD /v2/<name>/manifests/<tag>``:

* Within ``cache.tag_ttl`` of the upstream last confirming the tag, the cached digest is
  served from disk (``hit``), if its media type is one the client accepts.
* After that the tag is revalidated with a ``HEAD`` upstream (cheap; Docker Hub does not count
  it as a pull). The same digest → served from disk (``revalidated``); another → fetched.
* The upstream unreachable, timing out, or answering 5xx or 429 → the cached digest is served
  (``stale``) and logged: an edge site keeps pulling while its uplink is down.
* The upstream answering 404 → the tag is gone upstream: the mapping is dropped and the client
  gets 404 (the manifest itself stays, reachable by digest).
* The upstream answering 401 or 403 → relayed, never served stale: access that was revoked
  upstream must not live on in the cache.

A disk that refuses a write (full, read-only, failing) is never an error for the client: the
manifest is served without being cached, and the failure counted and logged
(:func:`proxy.cache.store.cache_write_failed`). A tag whose confirmation can't be recorded is
revalidated again on its next request; once the disk takes writes again, the next miss is
cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from proxy.cache.store import CacheStore, TagRecord
from proxy.content.manifest_fetch import (
    ManifestFetches,
    confirmed_at,
    unknown,
    upstream_digest,
)
from proxy.content.outcome import Outcome, Sharing
from proxy.errors import (
    DetourError,
    NotHeld,
    UpstreamError,
)
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.oci import (
    DEFAULT_ACCEPT,
    Accept,
    StoredManifest,
)
from proxy.reference import Digest, ImageName
from proxy.upstream.client import UpstreamClient
from proxy.upstream.rules import Route

log = get_logger("detour.manifests")


def manifest_response(manifest: StoredManifest) -> web.Response:
    """The manifest's bytes with its own media type (aiohttp sends no body for HEAD)."""
    return web.Response(
        body=manifest.body,
        headers={
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": str(manifest.digest),
        },
    )


@dataclass(frozen=True, slots=True)
class _Asked:
    """One client's request for a manifest, as the steps of answering it need it."""

    route: Route
    accept: Accept
    client_auth: str | None
    outcome: Outcome


class Manifests:
    def __init__(
        self,
        store: CacheStore,
        upstream: UpstreamClient,
        metrics: Metrics,
        sharing: Sharing,
        *,
        tag_ttl: float,
    ) -> None:
        self._store = store
        self._sharing = sharing
        self._upstream = upstream
        self._metrics = metrics
        self._tag_ttl = tag_ttl
        # One upstream GET for all the requests (and peers) that want the same answer at once.
        self._fetches = ManifestFetches(store, upstream, metrics, sharing)

    @staticmethod
    def _answer(
        outcome: Outcome, manifest: StoredManifest, source: str, age: float = 0.0
    ) -> web.Response:
        """``age``: for a tag served from its record, seconds since the upstream last confirmed
        it, sent as ``Age`` so that a peer asking its owner keeps the record's real age."""
        outcome.source = source
        response = manifest_response(manifest)
        if age >= 1:
            response.headers["Age"] = str(int(age))
        return response

    async def get(
        self,
        request: web.Request,
        route: Route,
        reference: str | Digest,
        client_auth: str | None,
        outcome: Outcome,
    ) -> web.Response:
        accept = Accept.parse(request.headers.getall("Accept", []))
        asked = _Asked(route, accept, client_auth, outcome)
        if isinstance(reference, Digest):
            stored = await self._store.manifest(reference)
            if stored is not None:
                outcome.count("hit")
                return self._answer(outcome, stored, "cache")
            return await self._fetch(asked, reference)
        return await self._by_tag(asked, reference)

    async def _cached_tag(
        self, name: ImageName, tag: str, variant: str | None, accept: Accept
    ) -> tuple[TagRecord, StoredManifest] | None:
        record = await self._store.tag(name, tag, variant)
        cached = await self._store.manifest(record.digest) if record is not None else None
        if record is None or cached is None or not accept.admits(cached.media_type):
            return None
        return record, cached

    async def _by_tag(self, asked: _Asked, tag: str) -> web.Response:
        route, accept, outcome = asked.route, asked.accept, asked.outcome
        # The tag's own record if the client takes its type; else what this same Accept got.
        variant: str | None = None
        found = await self._cached_tag(route.name, tag, None, accept)
        if found is None and accept.variant is not None:
            variant = accept.variant
            found = await self._cached_tag(route.name, tag, variant, accept)
        if found is None:
            return await self._fetch(asked, tag)
        record, cached = found
        if record.age() < self._tag_ttl:
            outcome.count("hit")
            return self._answer(outcome, cached, "cache", record.age())

        try:
            answer = await self._upstream.open(
                route,
                "HEAD",
                f"manifests/{tag}",
                headers={"Accept": DEFAULT_ACCEPT if variant is None else accept.upstream},
                client_auth=asked.client_auth,
                fallback=True,
            )
        except UpstreamError as exc:  # an UpstreamDenied is relayed, never served stale
            outcome.count("stale")
            log.warning("tag_served_stale", name=str(route.name), tag=tag, reason=exc.message)
            return self._answer(outcome, cached, "cache", record.age())
        async with answer:
            outcome.upstream = answer.where
            if answer.status == 404:
                dropping = self._store.drop_tag(route.name, tag, variant)
                await self._fetches.write(dropping, "tag", name=str(route.name), tag=tag)
            if answer.status != 200:
                raise answer.refusal(unknown(tag))
            digest = upstream_digest(answer)
        if digest == cached.digest:
            if self._sharing.kept(answer.private):
                record = TagRecord(digest, cached.media_type, confirmed_at(answer))
                confirming = self._store.put_tag(route.name, tag, record, variant)
                await self._fetches.write(confirming, "tag", name=str(route.name), tag=tag)
            outcome.count("revalidated")
            return self._answer(outcome, cached, "cache")
        return await self._fetch(asked, tag)

    async def _fetch(self, asked: _Asked, reference: str | Digest) -> web.Response:
        """A miss: ask upstream (once for all the requests that want the same answer at the
        same time, peers' included), check it is a manifest, verify, store, answer.

        A ``HEAD`` is a miss like a ``GET``: containerd, the kubelet and dockerd resolve a tag
        with ``HEAD`` and then ``GET`` the manifest by its digest, so the manifest is fetched
        (one ``GET`` upstream, shared with every request that wants it at the same time) and
        the tag recorded: that ``GET`` is a hit, and the tag resolves from disk when the
        upstream can't be reached. aiohttp sends the headers without the body."""
        route, accept, client_auth, outcome = (
            asked.route,
            asked.accept,
            asked.client_auth,
            asked.outcome,
        )
        if not route.upstreams:  # a peer's only-if-cached request (handlers)
            raise NotHeld("manifest not held here", {"reference": str(reference)})
        result = "miss"
        try:
            fetched, joined = await self._fetches.fetch(route, reference, accept, client_auth)
            result = "joined" if joined else result
        except DetourError:
            outcome.count(self._sharing.result(result, client_auth))
            raise
        outcome.upstream = fetched.where
        if fetched.peer and result == "miss":
            result = "peer"
        outcome.count(self._sharing.result(result, client_auth, fetched.private))
        return self._answer(outcome, fetched.manifest, "upstream")
