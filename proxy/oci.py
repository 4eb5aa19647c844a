"""The OCI (and Docker v2) formats Detour reads: manifest media types, the stored manifest,
the JSON shapes of manifests and indexes, and the check that a body is a manifest Detour serves.

Shared by the proxy (:mod:`proxy.content.manifests`) and the tools (:mod:`proxy.tools.warm`), so
neither imports the other to know what a manifest is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NotRequired, TypedDict

from proxy.errors import ManifestUnsupported, UpstreamInvalid
from proxy.reference import Digest

MANIFEST_MAX_BYTES = 4 * 1024 * 1024  # distribution's own limit

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST}) | INDEX_TYPES
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
    }
)
# What we ask for when the client does not say.
DEFAULT_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    body: bytes


class PlatformSpec(TypedDict):
    architecture: str
    os: str
    variant: NotRequired[str]


class Descriptor(TypedDict):
    mediaType: str
    digest: str
    size: int
    platform: NotRequired[PlatformSpec]
    urls: NotRequired[list[str]]


class ImageManifest(TypedDict):
    schemaVersion: int
    mediaType: NotRequired[str]
    config: Descriptor
    layers: list[Descriptor]


class ImageIndex(TypedDict):
    schemaVersion: int
    mediaType: NotRequired[str]
    manifests: list[Descriptor]


def schema1_refused(media_type: str) -> ManifestUnsupported:
    return ManifestUnsupported(
        "the upstream offers only a schema1 manifest, which Detour does not serve "
        "(its digest cannot be verified); push the image with a current client",
        {"mediaType": media_type},
    )


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
        except (ValueError, AttributeError, RecursionError):
            sniffed = None
        if isinstance(sniffed, str) and sniffed:
            return sniffed
    return declared or "application/json"


def check_manifest(content_type: str, body: bytes, where: str) -> str:
    """The media type of a manifest the upstream sent, once it is known to be one: a JSON
    object of a known manifest media type (or a schema1 manifest, refused)."""
    if content_type.split(";", 1)[0].strip() in SCHEMA1_TYPES:
        raise schema1_refused(content_type)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise UpstreamInvalid(
            "upstream sent a manifest that is not a JSON object", {"upstream": where}
        )
    if document.get("schemaVersion") == 1:
        raise schema1_refused(content_type)
    media_type = manifest_media_type(content_type, body)
    if media_type not in MANIFEST_TYPES:
        # An OCI manifest or index may leave out mediaType and come as application/json.
        if "manifests" in document:
            media_type = OCI_INDEX
        elif "config" in document and "layers" in document:
            media_type = OCI_MANIFEST
        else:
            raise UpstreamInvalid(
                "upstream sent a document of an unknown manifest media type",
                {"upstream": where, "mediaType": media_type[:100]},
            )
    named = document.get("mediaType")
    if named is not None and named != media_type:
        raise UpstreamInvalid(
            "upstream manifest names another media type than its Content-Type",
            {"upstream": where, "mediaType": str(named)[:100], "contentType": media_type[:100]},
        )
    return media_type


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
