"""Manifests: by digest from disk forever, by tag through a short-lived tag → digest map.

Manifests are passed through byte for byte (an index's digest never changes) and verified
against their digest before they are stored or served.

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
"""

from __future__ import annotations

import json
import time

from aiohttp import web

from proxy.cache import MANIFEST_MAX_BYTES, CacheStore, StoredManifest, TagRecord
from proxy.errors import (
    ManifestUnknown,
    UpstreamDenied,
    UpstreamError,
    UpstreamInvalid,
)
from proxy.logs import LOG, get_logger
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.rules import Route
from proxy.upstream import UpstreamClient, UpstreamResponse

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# What we ask for when the client does not say.
DEFAULT_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

log = get_logger("detour.manifests")


def accepts(accept: str | None, media_type: str) -> bool:
    """Whether an ``Accept`` header admits ``media_type`` (no header admits everything)."""
    if not accept:
        return True
    wanted = media_type.split(";", 1)[0].strip().lower()
    major = wanted.split("/", 1)[0]
    for item in accept.split(","):
        offered = item.split(";", 1)[0].strip().lower()
        if offered in (wanted, "*/*", f"{major}/*"):
            return True
    return False


def manifest_media_type(content_type: str, body: bytes | None) -> str:
    """A manifest's media type: its ``Content-Type``, unless that is generic and the body
    names its own ``mediaType``."""
    declared = content_type.split(";", 1)[0].strip()
    generic = ("application/json", "text/plain", "application/octet-stream")
    if declared and declared not in generic:
        return declared
    if body is not None:
        try:
            sniffed = json.loads(body).get("mediaType")
        except (ValueError, AttributeError):
            sniffed = None
        if isinstance(sniffed, str) and sniffed:
            return sniffed
    return declared or "application/json"


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


class Manifests:
    def __init__(
        self,
        store: CacheStore,
        upstream: UpstreamClient,
        metrics: Metrics,
        *,
        tag_ttl: float,
        cache_private: bool,
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self._tag_ttl = tag_ttl
        self._cache_private = cache_private

    def _count(self, request: web.Request, result: str) -> None:
        request[LOG]["cache"] = result
        self._metrics.cache_requests.labels("manifest", result).inc()

    def _serve(self, request: web.Request, manifest: StoredManifest, source: str) -> web.Response:
        request[LOG]["source"] = source
        return manifest_response(manifest)

    async def get(
        self,
        request: web.Request,
        route: Route,
        reference: str | Digest,
        client_auth: str | None,
    ) -> web.Response:
        accept = ", ".join(request.headers.getall("Accept", [])) or None
        if isinstance(reference, Digest):
            stored = self._store.manifest(reference)
            if stored is not None:
                self._count(request, "hit")
                return self._serve(request, stored, "cache")
            return await self._fetch(request, route, reference, accept, client_auth)
        return await self._by_tag(request, route, reference, accept, client_auth)

    async def _by_tag(
        self,
        request: web.Request,
        route: Route,
        tag: str,
        accept: str | None,
        client_auth: str | None,
    ) -> web.Response:
        record = self._store.tag(route.name, tag)
        cached = self._store.manifest(record.digest) if record is not None else None
        if cached is not None and not accepts(accept, cached.media_type):
            cached = None  # the client wants another representation: ask upstream
        if record is None or cached is None:
            return await self._fetch(request, route, tag, accept, client_auth)
        if record.age() < self._tag_ttl:
            self._count(request, "hit")
            return self._serve(request, cached, "cache")

        try:
            answer = await self._upstream.open(
                route,
                "HEAD",
                f"manifests/{tag}",
                headers={"Accept": accept or DEFAULT_ACCEPT},
                client_auth=client_auth,
                fallback=True,
            )
        except (UpstreamError, UpstreamDenied) as exc:
            if isinstance(exc, UpstreamDenied) and exc.status != 429:
                raise  # the upstream refused us: relayed, never served stale
            self._count(request, "stale")
            log.warning("tag_served_stale", name=str(route.name), tag=tag, reason=exc.message)
            return self._serve(request, cached, "cache")
        async with answer:
            request[LOG]["upstream"] = answer.where
            if answer.status == 404:
                self._store.drop_tag(route.name, tag)
            if answer.status != 200:
                raise answer.refusal(_unknown(tag))
            digest = _upstream_digest(answer)
        if digest == cached.digest:
            if not answer.private or self._cache_private:
                self._store.put_tag(
                    route.name, tag, TagRecord(digest, cached.media_type, time.time())
                )
            self._count(request, "revalidated")
            return self._serve(request, cached, "cache")
        return await self._fetch(request, route, tag, accept, client_auth)

    async def _fetch(
        self,
        request: web.Request,
        route: Route,
        reference: str | Digest,
        accept: str | None,
        client_auth: str | None,
    ) -> web.Response:
        """A miss: ask upstream, verify, store (unless private), serve."""
        method = request.method
        answer = await self._upstream.open(
            route,
            method,
            f"manifests/{reference}",
            headers={"Accept": accept or DEFAULT_ACCEPT},
            client_auth=client_auth,
        )
        async with answer:
            request[LOG]["upstream"] = answer.where
            private = answer.private and not self._cache_private
            self._count(request, "bypass" if private else "miss")
            if answer.status != 200:
                raise answer.refusal(_unknown(str(reference)))
            announced = _upstream_digest(answer)
            if isinstance(reference, Digest) and announced not in (None, reference):
                self._mismatch(answer, reference)
            if method == "HEAD":
                return self._head_from_upstream(answer, reference, announced)
            body = await answer.read(MANIFEST_MAX_BYTES, "manifest")
        digest = reference if isinstance(reference, Digest) else announced
        algorithm = digest.algorithm if digest is not None else "sha256"
        manifest = StoredManifest(
            Digest.of(body, algorithm),
            manifest_media_type(answer.headers.get("Content-Type", ""), body),
            body,
        )
        if digest is not None and manifest.digest != digest:
            self._mismatch(answer, digest)
        if not private:
            self._store.put_manifest(manifest)
            if isinstance(reference, str):
                record = TagRecord(manifest.digest, manifest.media_type, time.time())
                self._store.put_tag(route.name, reference, record)
        return self._serve(request, manifest, "upstream")

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

    def _mismatch(self, answer: UpstreamResponse, expected: Digest) -> None:
        self._metrics.verify_failures.labels("manifest", answer.upstream.registry).inc()
        log.error("manifest_digest_mismatch", expected=str(expected), upstream=answer.where)
        raise UpstreamInvalid(
            "upstream manifest does not match its digest",
            {"digest": str(expected), "upstream": answer.where},
        )
