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
(:func:`proxy.core.cache.cache_write_failed`). A tag whose confirmation can't be recorded is
revalidated again on its next request; once the disk takes writes again, the next miss is
cached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import NoReturn

from aiohttp import web

from proxy.core.cache import CacheStore, TagRecord, cache_write_failed
from proxy.core.outcome import Outcome, Sharing
from proxy.core.rules import Route
from proxy.core.upstream import UpstreamClient, UpstreamResponse
from proxy.errors import (
    DetourError,
    ManifestUnknown,
    UpstreamError,
    UpstreamInvalid,
)
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.oci import (
    DEFAULT_ACCEPT,
    INDEX_TYPES,
    MANIFEST_MAX_BYTES,
    SCHEMA1_TYPES,
    StoredManifest,
    check_manifest,
    manifest_media_type,
    schema1_refused,
)
from proxy.reference import Digest, ImageName

log = get_logger("detour.manifests")


@dataclass(frozen=True, slots=True)
class Accept:
    """The manifest media types a client accepts.

    No ``Accept``, or one that admits ``*/*``, admits everything: the upstream is then asked
    with :data:`DEFAULT_ACCEPT` (a registry answers a bare ``*/*`` with schema1).
    """

    header: str | None  # as the client sent it; None when it admits everything
    types: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, values: list[str]) -> Accept:
        types = {
            item.split(";", 1)[0].strip().lower()
            for value in values
            for item in value.split(",")
            if item.strip()
        }
        if not types or types & {"*/*", "application/*"}:
            return cls(None)
        return cls(", ".join(values), frozenset(types))

    def admits(self, media_type: str) -> bool:
        return self.header is None or media_type.split(";", 1)[0].strip().lower() in self.types

    @property
    def upstream(self) -> str:
        """The ``Accept`` to send upstream."""
        return self.header or DEFAULT_ACCEPT

    @property
    def variant(self) -> str | None:
        """Where an answer by tag to this ``Accept`` is kept.

        None (the tag's own record) when the client admits every index type, so the upstream
        would have sent the index if there were one. Otherwise the upstream may have narrowed
        a multi-platform tag to one platform's manifest: that answer is kept only for this
        same ``Accept``, and never stands for the tag.
        """
        if self.header is None or self.types >= INDEX_TYPES:
            return None
        return ",".join(sorted(self.types))


def _upstream_digest(answer: UpstreamResponse) -> Digest | None:
    header = answer.headers.get("Docker-Content-Digest")
    if header is None:
        return None
    try:
        return Digest.parse(header.strip())
    except ValueError:
        raise UpstreamInvalid(
            "upstream sent an invalid Docker-Content-Digest", {"upstream": answer.where}
        ) from None


def _confirmed_at(answer: UpstreamResponse) -> float:
    """When the upstream last confirmed what ``answer`` says of a tag: now, unless the answer
    came from a peer's record (the tag's owner, proxy.cluster.peering) that says how old it is."""
    now = time.time()
    if not answer.upstream.peer:
        return now
    try:
        age = float(answer.headers.get("Age", "0"))
    except ValueError:
        return now
    return now - max(0.0, age)


def manifest_response(manifest: StoredManifest) -> web.Response:
    """The manifest's bytes with its own media type (aiohttp sends no body for HEAD)."""
    return web.Response(
        body=manifest.body,
        headers={
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": str(manifest.digest),
        },
    )


def _unknown(reference: str) -> ManifestUnknown:
    return ManifestUnknown("manifest unknown to upstream", {"reference": reference})


@dataclass(frozen=True, slots=True)
class _Asked:
    """One client's request for a manifest, as the steps of answering it need it."""

    head: bool
    route: Route
    accept: Accept
    client_auth: str | None
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class _Fetched:
    manifest: StoredManifest
    where: str  # the upstream that answered
    private: bool  # fetched with the client's own credentials: never stored
    peer: bool  # the site's owner of it answered (proxy.cluster.peering)


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
        # Downloads under way, by (upstreams, reference, Accept): one upstream GET for all the
        # requests (and peers) that want the same answer at once.
        self._flights: dict[tuple[object, str, str], asyncio.Future[_Fetched]] = {}

    @staticmethod
    def _serve(
        outcome: Outcome, manifest: StoredManifest, source: str, age: float = 0.0
    ) -> web.Response:
        """``age``: for a tag served from its record, seconds since the upstream last confirmed
        it, sent as ``Age`` so that a peer asking its owner keeps the record's real age."""
        outcome.source = source
        response = manifest_response(manifest)
        if age >= 1:
            response.headers["Age"] = str(int(age))
        return response

    async def _write(self, write: Awaitable[None], kind: str, **fields: str) -> bool:
        """Whether a cache write went through. A disk that refuses it is counted and logged,
        and the client is answered all the same, without caching."""
        try:
            await write
        except OSError as exc:
            cache_write_failed(self._metrics, exc, kind, "served without caching", **fields)
            return False
        return True

    async def get(
        self,
        request: web.Request,
        route: Route,
        reference: str | Digest,
        client_auth: str | None,
        outcome: Outcome,
    ) -> web.Response:
        accept = Accept.parse(request.headers.getall("Accept", []))
        asked = _Asked(request.method == "HEAD", route, accept, client_auth, outcome)
        if isinstance(reference, Digest):
            stored = self._store.manifest(reference)
            if stored is not None:
                outcome.count("hit")
                return self._serve(outcome, stored, "cache")
            return await self._fetch(asked, reference)
        return await self._by_tag(asked, reference)

    def _cached_tag(
        self, name: ImageName, tag: str, variant: str | None, accept: Accept
    ) -> tuple[TagRecord, StoredManifest] | None:
        record = self._store.tag(name, tag, variant)
        cached = self._store.manifest(record.digest) if record is not None else None
        if record is None or cached is None or not accept.admits(cached.media_type):
            return None
        return record, cached

    async def _by_tag(self, asked: _Asked, tag: str) -> web.Response:
        route, accept, outcome = asked.route, asked.accept, asked.outcome
        # The tag's own record if the client takes its type; else what this same Accept got.
        variant: str | None = None
        found = self._cached_tag(route.name, tag, None, accept)
        if found is None and accept.variant is not None:
            variant = accept.variant
            found = self._cached_tag(route.name, tag, variant, accept)
        if found is None:
            return await self._fetch(asked, tag)
        record, cached = found
        if record.age() < self._tag_ttl:
            outcome.count("hit")
            return self._serve(outcome, cached, "cache", record.age())

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
            return self._serve(outcome, cached, "cache", record.age())
        async with answer:
            outcome.upstream = answer.where
            if answer.status == 404:
                dropping = self._store.drop_tag(route.name, tag, variant)
                await self._write(dropping, "tag", name=str(route.name), tag=tag)
            if answer.status != 200:
                raise answer.refusal(_unknown(tag))
            digest = _upstream_digest(answer)
        if digest == cached.digest:
            if self._sharing.kept(answer.private):
                record = TagRecord(digest, cached.media_type, _confirmed_at(answer))
                confirming = self._store.put_tag(route.name, tag, record, variant)
                await self._write(confirming, "tag", name=str(route.name), tag=tag)
            outcome.count("revalidated")
            return self._serve(outcome, cached, "cache")
        return await self._fetch(asked, tag)

    async def _fetch(self, asked: _Asked, reference: str | Digest) -> web.Response:
        """A miss: ask upstream (once for all the requests that want the same answer at the
        same time, peers' included), check it is a manifest, verify, store, serve."""
        if asked.head:
            return await self._head(asked, reference)
        route, accept, client_auth, outcome = (
            asked.route,
            asked.accept,
            asked.client_auth,
            asked.outcome,
        )
        result = "miss"
        try:
            if not self._sharing.shared(client_auth):
                fetched = await self._download(route, reference, accept, client_auth)
            else:
                key = (route.upstreams, str(reference), accept.upstream)
                flight = self._flights.get(key)
                if flight is None:
                    flight = asyncio.ensure_future(self._download(route, reference, accept, None))
                    self._flights[key] = flight
                    flight.add_done_callback(lambda done: self._landed(key, done))
                else:
                    result = "joined"
                fetched = await asyncio.shield(flight)
        except DetourError:
            outcome.count(self._sharing.result(result, client_auth))
            raise
        outcome.upstream = fetched.where
        if fetched.peer and result == "miss":
            result = "peer"
        outcome.count(self._sharing.result(result, client_auth, fetched.private))
        return self._serve(outcome, fetched.manifest, "upstream")

    def _landed(self, key: tuple[object, str, str], flight: asyncio.Future[_Fetched]) -> None:
        self._flights.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # seen, even when every client that wanted it has gone

    async def _download(
        self, route: Route, reference: str | Digest, accept: Accept, client_auth: str | None
    ) -> _Fetched:
        answer = await self._upstream.open(
            route,
            "GET",
            f"manifests/{reference}",
            headers={"Accept": accept.upstream},
            client_auth=client_auth,
        )
        async with answer:
            content_type = self._check_answer(answer, reference)
            body = await answer.read(MANIFEST_MAX_BYTES, "manifest")
        media_type = check_manifest(content_type, body, answer.where)
        # By digest, the digest asked for; by tag, the upstream's, or (none sent) its own hash.
        digest = reference if isinstance(reference, Digest) else _upstream_digest(answer)
        algorithm = digest.algorithm if digest is not None else "sha256"
        manifest = StoredManifest(Digest.of(body, algorithm), media_type, body)
        if digest is not None and manifest.digest != digest:
            self._mismatch(answer, digest)
        fetched = _Fetched(manifest, answer.where, answer.private, answer.upstream.peer)
        if not self._sharing.kept(answer.private):
            return fetched
        storing = self._store.put_manifest(manifest)
        stored = await self._write(storing, "manifest", digest=str(manifest.digest))
        # A tag record is no use without its manifest: not written when that could not be.
        if stored and isinstance(reference, str):
            # An index is what the tag means; a single manifest may be one platform's,
            # narrowed for a client that takes no index: kept for that Accept only.
            variant = None if media_type in INDEX_TYPES else accept.variant
            record = TagRecord(manifest.digest, media_type, _confirmed_at(answer))
            recording = self._store.put_tag(route.name, reference, record, variant)
            await self._write(recording, "tag", name=str(route.name), tag=reference)
        return fetched

    def _check_answer(self, answer: UpstreamResponse, reference: str | Digest) -> str:
        """The answer's Content-Type, once it is a 200 of a manifest we serve, whose announced
        digest (if any) is the one asked for."""
        if answer.status != 200:
            raise answer.refusal(_unknown(str(reference)))
        content_type = answer.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip() in SCHEMA1_TYPES:
            raise schema1_refused(content_type)
        announced = _upstream_digest(answer)
        if isinstance(reference, Digest) and announced not in (None, reference):
            self._mismatch(answer, reference)
        return content_type

    async def _head(self, asked: _Asked, reference: str | Digest) -> web.Response:
        """A HEAD miss: the upstream's answer, without a body."""
        async with await self._upstream.open(
            asked.route,
            "HEAD",
            f"manifests/{reference}",
            headers={"Accept": asked.accept.upstream},
            client_auth=asked.client_auth,
        ) as answer:
            asked.outcome.upstream = answer.where
            asked.outcome.count(self._sharing.result("miss", asked.client_auth, answer.private))
            self._check_answer(answer, reference)
            return self._head_from_upstream(answer, reference, _upstream_digest(answer))

    def _head_from_upstream(
        self, answer: UpstreamResponse, reference: str | Digest, announced: Digest | None
    ) -> web.Response:
        digest = reference if isinstance(reference, Digest) else announced
        headers = {
            "Content-Type": manifest_media_type(answer.headers.get("Content-Type", ""), None)
        }
        if digest is not None:
            headers["Docker-Content-Digest"] = str(digest)
        if answer.response.content_length is not None:
            headers["Content-Length"] = str(answer.response.content_length)
        return web.Response(headers=headers)

    def _mismatch(self, answer: UpstreamResponse, expected: Digest) -> NoReturn:
        registry = self._metrics.registry_label(answer.upstream.registry)
        self._metrics.verify_failures.labels("manifest", registry).inc()
        log.error("manifest_digest_mismatch", expected=str(expected), upstream=answer.where)
        raise UpstreamInvalid(
            "upstream manifest does not match its digest",
            {"digest": str(expected), "upstream": answer.where},
        )
