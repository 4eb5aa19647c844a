"""What a peer's answer must be before it is taken: what no Detour of the site would send is a lie.

A peer (another Detour of the site, :mod:`proxy.cluster.peering`) is asked like any registry,
and what it sends is verified like anything else, blobs and manifests against their digests. A
peer that lies is not asked again for a while (:meth:`UpstreamClient.distrust
<proxy.upstream.client.UpstreamClient.distrust>`), counted by reason in
``detour_peers_bypassed_total``, and the request goes on to the next source:

* ``wrong_manifest``: a manifest by digest whose bytes are not that digest's, or too large to be
  one; read and checked here, before the answer is taken;
* ``wrong_blob``: a blob whose bytes are not its digest's (:mod:`proxy.content.receiver`);
* ``redirect``: any 3xx, which a Detour never answers (:mod:`proxy.upstream.sender`);
* ``unproven_tag``: a tag's answer without proof of the site's secret
  (:mod:`proxy.upstream.peer_auth`): a tag can't be checked against anything else.
"""

from __future__ import annotations

from typing import Literal

import aiohttp

from proxy.bodies import read_capped
from proxy.oci import MANIFEST_MAX_BYTES
from proxy.reference import Digest
from proxy.upstream.transport import transport_errors

Lie = Literal["wrong_blob", "wrong_manifest", "redirect", "unproven_tag"]


class PeerLied(Exception):
    """A peer's answer that no Detour of the site gives."""

    def __init__(self, reason: Lie, words: str) -> None:
        super().__init__(words)
        self.reason: Lie = reason
        self.words = words


def manifest_digest(method: str, suffix: str) -> Digest | None:
    """The digest a ``GET manifests/<digest>`` asks for; None for anything else."""
    kind, _, reference = suffix.partition("/")
    if method != "GET" or kind != "manifests" or ":" not in reference:
        return None
    try:
        return Digest.parse(reference)
    except ValueError:
        return None


def is_tag(suffix: str) -> bool:
    """Whether ``suffix`` asks for a manifest by tag (``manifests/<tag>``)."""
    kind, _, reference = suffix.partition("/")
    return kind == "manifests" and ":" not in reference


async def checked_manifest(where: str, digest: Digest, response: aiohttp.ClientResponse) -> bytes:
    """The body of a peer's 200 to ``GET manifests/<digest>``, read whole and verified."""
    with transport_errors(where):
        body = await read_capped(response.content, MANIFEST_MAX_BYTES)
    if body is None:
        raise PeerLied("wrong_manifest", "sent a manifest larger than any Detour serves")
    if Digest.of(body, digest.algorithm) != digest:
        raise PeerLied("wrong_manifest", "sent a manifest that does not match its digest")
    return body
