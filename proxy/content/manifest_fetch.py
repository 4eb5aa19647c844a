"""Manifests from the upstream: one GET for every request that wants the same answer at
once (peers' included), checked to be a manifest Detour serves, verified against its digest,
and stored with the tag's record.

A manifest is read whole (over a real link it arrives in many reads) under
``MANIFEST_MAX_BYTES``; one whose bytes don't match the digest asked for, or announced, is
refused and counted. A manifest fetched with the client's own credentials is for that client
alone: never stored, never joined.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import NoReturn

from proxy.cache.store import CacheStore, TagRecord, cache_write_failed
from proxy.content.outcome import Sharing
from proxy.errors import ManifestUnknown, UpstreamInvalid
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.oci import (
    INDEX_TYPES,
    MANIFEST_MAX_BYTES,
    SCHEMA1_TYPES,
    Accept,
    StoredManifest,
    check_manifest,
    schema1_refused,
)
from proxy.reference import Digest
from proxy.upstream.client import UpstreamClient
from proxy.upstream.response import UpstreamResponse
from proxy.upstream.rules import Route

log = get_logger("detour.manifests")


def upstream_digest(answer: UpstreamResponse) -> Digest | None:
    header = answer.headers.get("Docker-Content-Digest")
    if header is None:
        return None
    try:
        return Digest.parse(header.strip())
    except ValueError:
        raise UpstreamInvalid(
            "upstream sent an invalid Docker-Content-Digest", {"upstream": answer.where}
        ) from None


def confirmed_at(answer: UpstreamResponse) -> float:
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


def unknown(reference: str) -> ManifestUnknown:
    return ManifestUnknown("manifest unknown to upstream", {"reference": reference})


@dataclass(frozen=True, slots=True)
class Fetched:
    manifest: StoredManifest
    where: str  # the upstream that answered
    private: bool  # fetched with the client's own credentials: never stored
    peer: bool  # the site's owner of it answered (proxy.cluster.peering)


class ManifestFetches:
    """The manifest downloads under way, by (upstreams, reference, Accept)."""

    def __init__(
        self, store: CacheStore, upstream: UpstreamClient, metrics: Metrics, sharing: Sharing
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self._sharing = sharing
        self._flights: dict[tuple[object, str, str], asyncio.Future[Fetched]] = {}

    async def fetch(
        self, route: Route, reference: str | Digest, accept: Accept, client_auth: str | None
    ) -> tuple[Fetched, bool]:
        """The manifest, and whether this request joined another's download."""
        if not self._sharing.shared(client_auth):
            return await self._download(route, reference, accept, client_auth), False
        # Requests that would fetch from the same sources share one flight; the peers asked
        # last, for a copy they hold, are no source of their own (the owner's client's route
        # has them, its peers' requests don't).
        sources = tuple(u for u in route.upstreams if not u.cached_only)
        key = (sources, str(reference), accept.upstream)
        flight = self._flights.get(key)
        joined = flight is not None
        if flight is None:
            flight = asyncio.ensure_future(self._download(route, reference, accept, None))
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(flight), joined

    async def write(self, write: Awaitable[None], kind: str, **fields: str) -> bool:
        """Whether a cache write went through. A disk that refuses it is counted and logged,
        and the client is answered all the same, without caching."""
        try:
            await write
        except OSError as exc:
            cache_write_failed(self._metrics, exc, kind, "served without caching", **fields)
            return False
        return True

    def _landed(self, key: tuple[object, str, str], flight: asyncio.Future[Fetched]) -> None:
        self._flights.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # seen, even when every client that wanted it has gone

    async def _download(
        self, route: Route, reference: str | Digest, accept: Accept, client_auth: str | None
    ) -> Fetched:
        answer = await self._upstream.open(
            route,
            "GET",
            f"manifests/{reference}",
            headers={"Accept": accept.upstream},
            client_auth=client_auth,
        )
        async with answer:
            content_type = self.check_answer(answer, reference)
            body = await answer.read(MANIFEST_MAX_BYTES, "manifest")
        media_type = check_manifest(content_type, body, answer.where)
        # By digest, the digest asked for; by tag, the upstream's, or (none sent) its own hash.
        digest = reference if isinstance(reference, Digest) else upstream_digest(answer)
        algorithm = digest.algorithm if digest is not None else "sha256"
        manifest = StoredManifest(Digest.of(body, algorithm), media_type, body)
        if digest is not None and manifest.digest != digest:
            self._mismatch(answer, digest)
        fetched = Fetched(manifest, answer.where, answer.private, answer.upstream.peer)
        if not self._sharing.kept(answer.private):
            return fetched
        storing = self._store.put_manifest(manifest)
        stored = await self.write(storing, "manifest", digest=str(manifest.digest))
        # A tag record is no use without its manifest: not written when that could not be.
        if stored and isinstance(reference, str):
            # An index is what the tag means; a single manifest may be one platform's,
            # narrowed for a client that takes no index: kept for that Accept only.
            variant = None if media_type in INDEX_TYPES else accept.variant
            record = TagRecord(manifest.digest, media_type, confirmed_at(answer))
            recording = self._store.put_tag(route.name, reference, record, variant)
            await self.write(recording, "tag", name=str(route.name), tag=reference)
        return fetched

    def check_answer(self, answer: UpstreamResponse, reference: str | Digest) -> str:
        """The answer's Content-Type, once it is a 200 of a manifest we serve, whose announced
        digest (if any) is the one asked for."""
        if answer.status != 200:
            raise answer.refusal(unknown(str(reference)))
        content_type = answer.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip() in SCHEMA1_TYPES:
            raise schema1_refused(content_type)
        announced = upstream_digest(answer)
        if isinstance(reference, Digest) and announced not in (None, reference):
            self._mismatch(answer, reference)
        return content_type

    def _mismatch(self, answer: UpstreamResponse, expected: Digest) -> NoReturn:
        registry = self._metrics.registry_label(answer.upstream.registry)
        self._metrics.verify_failures.labels("manifest", registry).inc()
        log.error("manifest_digest_mismatch", expected=str(expected), upstream=answer.where)
        raise UpstreamInvalid(
            "upstream manifest does not match its digest",
            {"digest": str(expected), "upstream": answer.where},
        )
