"""The HTTP face of the proxy: the read side of the OCI distribution API.

``/v2/<name>/manifests/<reference>``, ``/v2/<name>/blobs/<digest>``,
``/v2/<name>/tags/list`` and ``/v2/<name>/referrers/<digest>``, for ``GET`` and ``HEAD``;
every other method is refused with UNSUPPORTED. ``<name>`` is read in path mode
(``/v2/docker.io/library/nats/...``) or, with ``?ns=<registry>``, in containerd's mirror mode
(``/v2/library/nats/...?ns=docker.io``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal
from urllib.parse import urlencode

from aiohttp import web
from yarl import URL

from proxy.api.services import SERVICES
from proxy.cache.store import writable
from proxy.cluster.layers import TREE_HEADER, Place
from proxy.cluster.peering import blob_key, manifest_key, tag_key
from proxy.content.outcome import Outcome
from proxy.errors import (
    BadRequest,
    DetourError,
    ManifestUnknown,
    NameUnknown,
    NotFound,
    PaginationNumberInvalid,
    RegistryDenied,
    TagInvalid,
    Unsupported,
    UpstreamInvalid,
)
from proxy.logs import LOG, get_logger
from proxy.oci import DOCKER_MANIFEST, MANIFEST_MAX_BYTES, OCI_INDEX, OCI_MANIFEST
from proxy.reference import (
    Digest,
    ImageName,
    is_digest,
    parse_json,
    parse_manifest_reference,
    validate_tag,
)
from proxy.upstream.peer_auth import LOOP_HEADER, PEER_HEADER, PROOF_HEADER
from proxy.upstream.rules import Route
from proxy.upstream.sender import INCOMING_VIA

log = get_logger("detour.handlers")

TAGS_LIST_MAX_BYTES = 8 * 1024 * 1024
PEER_PROOF = "detour_peer_proof"  # a proven peer's proof, kept on its request for the answer
_COUNT = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() takes "²" and "٣" too
READ_METHODS = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class ApiPath:
    name: ImageName
    path_name: str  # the name as the client wrote it
    kind: Literal["manifests", "blobs", "tags", "referrers"]
    reference: str | Digest | None


def parse_api_path(tail: str, ns: str | None) -> ApiPath:
    """Split ``<name>/<kind>/<reference>`` and validate every part."""
    parts = tail.split("/")
    if (len(parts) >= 3 and parts[-3:-1] == ["blobs", "uploads"]) or parts[-2:] == [
        "blobs",
        "uploads",
    ]:
        raise Unsupported("Detour is a read-only pull-through cache: no pushes")
    if len(parts) < 3 or parts[-2] not in ("manifests", "blobs", "tags", "referrers"):
        raise NotFound("no such endpoint", {"path": f"/v2/{tail}"[:300]})
    path_name = "/".join(parts[:-2])
    name = ImageName.from_path(path_name, ns)
    kind = parts[-2]
    if kind == "tags":
        if parts[-1] != "list":
            raise NotFound("no such endpoint", {"path": f"/v2/{tail}"[:300]})
        return ApiPath(name, path_name, "tags", None)
    if kind == "blobs":
        return ApiPath(name, path_name, "blobs", Digest.parse(parts[-1]))
    if kind == "referrers":
        return ApiPath(name, path_name, "referrers", Digest.parse(parts[-1]))
    try:
        reference = parse_manifest_reference(parts[-1])
    except TagInvalid as exc:
        # No manifest can have a tag that is not valid: on a pull that is "unknown", as the
        # OCI distribution spec and distribution answer it (TAG_INVALID is for pushes).
        raise ManifestUnknown("manifest unknown: not a valid tag", exc.detail) from exc
    return ApiPath(name, path_name, "manifests", reference)


async def api_root(request: web.Request) -> web.Response:
    if request.method not in READ_METHODS:
        raise Unsupported("Detour is a read-only pull-through cache", {"method": request.method})
    return web.json_response({})


async def api(request: web.Request) -> web.StreamResponse:
    if request.method not in READ_METHODS:
        raise Unsupported(
            "Detour is a read-only pull-through cache",
            {"method": request.method},
            headers={"Allow": "GET, HEAD"},
        )
    services = request.app[SERVICES]
    via = ", ".join(request.headers.getall("Via", []))
    if services.upstream.pseudonym in via:
        raise RegistryDenied(
            "this request has already passed through this Detour: a loop, through a redirect "
            "or a mirror that points back here",
            headers={LOOP_HEADER: "1"},  # a peer that sent it goes on to its next source
        )
    INCOMING_VIA.set(via or None)
    ns = request.query.get("ns")
    path = parse_api_path(request.match_info["tail"], ns)
    fields = request[LOG]
    fields["name"] = str(path.name)
    if path.reference is not None:
        fields["reference"] = str(path.reference)
    route = services.rules.route(path.name)
    client_auth = request.headers.get("Authorization")
    if path.kind == "blobs":
        assert isinstance(path.reference, Digest)
        route = _through_peers(
            request, route, blob_key(path.reference), client_auth, path.reference
        )
    elif path.kind == "manifests":
        key = (
            manifest_key(path.reference)
            if isinstance(path.reference, Digest)
            else tag_key(route.name, str(path.reference))
        )
        route = _through_peers(request, route, key, client_auth)
    if path.kind in ("blobs", "manifests"):
        # What the request came to, filled in as it goes (its cache result counted at once):
        # logged here, also when it fails or the client hangs up.
        outcome = Outcome("blob" if path.kind == "blobs" else "manifest", services.metrics)
        try:
            if path.kind == "blobs":
                assert isinstance(path.reference, Digest)
                blobs = services.blobs
                respond = blobs.head if request.method == "HEAD" else blobs.get
                return await respond(request, route, path.reference, client_auth, outcome)
            assert path.reference is not None
            answer = await services.manifests.get(
                request, route, path.reference, client_auth, outcome
            )
            _prove_answer(request, answer)
            _note_layers(request, answer)
            return answer
        finally:
            outcome.record(fields)
    if path.kind == "referrers":
        return await _referrers(request, path, client_auth)
    return await _tags_list(request, path, ns, client_auth)


def _through_peers(
    request: web.Request,
    route: Route,
    key: str,
    client_auth: str | None,
    blob: Digest | None = None,
) -> Route:
    """The route through the site's peers (see proxy.cluster.peering): a client's request goes
    to the peers ahead of this instance for the key, unless it carries the client's own
    credentials (private content never travels between peers); for a blob, in the tree of the
    layer's place it tells (another Detour's, unproven), else of the one this instance knows. A
    proven peer's request for a blob goes on up the tree (to peers ranked above this one, in
    the tree of the place the peer tells, else of the blob's digest: the asker's tree, and
    never back to the asker); for anything else it is not forwarded again. A peer's
    ``only-if-cached`` request is answered from what this instance holds, never from an
    upstream or a fetch under way."""
    peering = request.app[SERVICES].peering
    if not peering.enabled:
        return route
    marked = request.headers.get(PEER_HEADER)
    told = Place.parse(request.headers.get(TREE_HEADER)) if blob is not None else None
    if marked is not None:
        proof = request.headers.get(PROOF_HEADER)
        if peering.from_peer(request.method, request.raw_path, marked, proof, request.remote):
            request[LOG]["from_peer"] = marked[:100]
            if proof is not None and peering.auth.required:
                request[PEER_PROOF] = proof
            if _only_if_cached(request):
                request[LOG]["only_if_cached"] = True
                return replace(route, upstreams=())
            if blob is None:
                return route
            return peering.relay(route, key, told, asked_by=marked)
        log.debug("peer_mark_ignored", remote=request.remote)  # not a proven peer's
    if not request.app[SERVICES].sharing.shared(client_auth):
        return route
    if blob is None:
        return peering.route(route, key)
    place = told or peering.layers.place(str(blob))
    return peering.route(route, key, tree=True, place=place)


def _note_layers(request: web.Request, answer: web.StreamResponse) -> None:
    """An image manifest served whole: its layers' places, for their trees (cluster.layers).
    An index (or anything else) has no layers, and is not parsed for them."""
    peering = request.app[SERVICES].peering
    image = answer.content_type in (OCI_MANIFEST, DOCKER_MANIFEST)
    if image and peering.enabled and request.method == "GET" and isinstance(answer, web.Response):
        digest = answer.headers.get("Docker-Content-Digest")
        if answer.status == 200 and digest and isinstance(answer.body, bytes):
            peering.layers.note(digest, answer.body)


def _only_if_cached(request: web.Request) -> bool:
    directives = ",".join(request.headers.getall("Cache-Control", []))
    return any(d.strip().lower() == "only-if-cached" for d in directives.split(","))


def _prove_answer(request: web.Request, answer: web.StreamResponse) -> None:
    """A proven peer's request for a manifest: the answer carries proof of the site's secret
    too, which the peer asks of a tag's answer (proxy.upstream.peer_auth)."""
    proof = request.get(PEER_PROOF)
    if proof is not None and not answer.prepared:
        auth = request.app[SERVICES].peering.auth
        answer.headers[PROOF_HEADER] = auth.sign_answer(proof, answer.status, answer.headers)


async def _passed_through(
    request: web.Request,
    path: ApiPath,
    suffix: str,
    client_auth: str | None,
    *,
    not_found: DetourError,
    limit: int,
    what: str,
    headers: Mapping[str, str] | None = None,
) -> tuple[bytes, Mapping[str, str]]:
    """GET ``suffix`` of the repository from its route, for a listing that is never cached:
    its body (at most ``limit`` bytes) and the upstream's headers; ``not_found`` for a 404."""
    services = request.app[SERVICES]
    route = services.rules.route(path.name)
    async with await services.upstream.open(
        route, "GET", suffix, client_auth=client_auth, headers=headers
    ) as answer:
        request[LOG]["upstream"] = answer.where
        if answer.status != 200:
            raise answer.refusal(not_found)
        return await answer.read(limit, what), answer.headers


async def _tags_list(
    request: web.Request, path: ApiPath, ns: str | None, client_auth: str | None
) -> web.Response:
    """Passed through (tags move; this is never cached), with names rewritten to the client's."""
    query: dict[str, str] = {}
    if "n" in request.query:
        if not _COUNT.fullmatch(request.query["n"]):
            raise PaginationNumberInvalid(
                "invalid number of results requested: n must be a whole number",
                {"n": request.query["n"][:50]},
            )
        query["n"] = request.query["n"]
    if "last" in request.query:
        last = request.query["last"]
        query["last"] = last if is_digest(last) else validate_tag(last)
    suffix = "tags/list" + (f"?{urlencode(query)}" if query else "")
    body, answered = await _passed_through(
        request,
        path,
        suffix,
        client_auth,
        not_found=NameUnknown("repository unknown to upstream", {"name": str(path.name)}),
        limit=TAGS_LIST_MAX_BYTES,
        what="tag list",
    )
    link = answered.get("Link")
    try:
        listing = parse_json(body)
        tags = listing.get("tags") or []
    except (ValueError, AttributeError):
        raise UpstreamInvalid("upstream sent an invalid tag list") from None
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise UpstreamInvalid("upstream sent a tag list whose tags are not strings")
    headers: dict[str, str] = {}
    if link is not None:
        headers["Link"] = rewrite_link(link, path.path_name, ns)
    return web.json_response({"name": path.path_name, "tags": tags}, headers=headers)


def rewrite_link(link: str, path_name: str, ns: str | None) -> str:
    """Point a pagination ``Link`` at this proxy's path for the same listing."""
    target = link.split(";", 1)[0].strip().strip("<>")
    query = dict(URL(target).query)
    if ns is not None:
        query["ns"] = ns
    rest = link.split(";", 1)[1] if ";" in link else ' rel="next"'
    return f"</v2/{path_name}/tags/list?{urlencode(query)}>;{rest}"


# The media type grammar of RFC 6838, as an artifactType filter may spell it.
_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
FILTERS_APPLIED = "OCI-Filters-Applied"


async def _referrers(request: web.Request, path: ApiPath, client_auth: str | None) -> web.Response:
    """OCI 1.1 referrers (signatures, SBOMs), passed through the route's mirrors and never
    cached: they are added to an image after it is pushed. An upstream without the API answers
    404, which is relayed so the client falls back to the ``sha256-<hex>`` tag schema."""
    artifact_type = request.query.get("artifactType")
    suffix = f"referrers/{path.reference}"
    if artifact_type is not None:
        if not _MEDIA_TYPE.fullmatch(artifact_type):
            raise BadRequest(
                "artifactType must be a media type", {"artifactType": artifact_type[:100]}
            )
        suffix += f"?{urlencode({'artifactType': artifact_type})}"
    body, answered = await _passed_through(
        request,
        path,
        suffix,
        client_auth,
        not_found=NotFound(
            "the upstream does not offer the referrers API", {"name": str(path.name)}
        ),
        limit=MANIFEST_MAX_BYTES,
        what="referrers list",
        headers={"Accept": OCI_INDEX},
    )
    filtered = FILTERS_APPLIED in answered
    try:
        index = parse_json(body)
        descriptors = index["manifests"]
    except (ValueError, KeyError, TypeError):
        descriptors = None
    if not isinstance(descriptors, list) or not all(isinstance(d, dict) for d in descriptors):
        raise UpstreamInvalid("upstream sent an invalid referrers list")
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type is not None:
        headers[FILTERS_APPLIED] = "artifactType"
        if not filtered:  # the upstream ignored the filter: apply it here
            index["manifests"] = [d for d in descriptors if d.get("artifactType") == artifact_type]
            body = json.dumps(index).encode()
    return web.Response(body=body, headers=headers)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICES].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready = await asyncio.to_thread(writable, request.app[SERVICES].store.tmp)
    return web.json_response(
        {"status": "ready" if ready else "cache directory not writable"},
        status=200 if ready else 503,
    )
