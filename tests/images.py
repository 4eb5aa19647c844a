"""Build test images and push them to a :class:`tests.registry.Registry` through its HTTP API.

Synchronous (``http.client``): these talk to the registry subprocess, never to an asyncio
server in the test's loop. Call them before starting a proxy, or from ``asyncio.to_thread``.

Each layer is a real gzip-compressed tar holding one file of random bytes, and each config is a
valid image config (``rootfs.diff_ids`` = sha256 of the uncompressed tar), so containerd can
unpack the result. Data is fresh random bytes on every call unless ``seed`` is given (same seed
and arguments → byte-identical blobs and manifests).

Auth follows the registry's mode with :attr:`Registry.push_auth`: nothing, Basic (htpasswd), or
the real 401 → token (as admin, from the realm in the challenge) → retry dance.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import random
import re
import tarfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

from tests.registry import Registry

Media = Literal["oci", "docker"]
Platform = tuple[str, str] | tuple[str, str, str]  # (os, architecture[, variant])

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# What a modern client sends; distribution 2.8 needs the OCI types listed to serve OCI content.
ACCEPT_ALL = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

_MEDIA = {
    "oci": (OCI_MANIFEST, OCI_INDEX, OCI_CONFIG, OCI_LAYER),
    "docker": (DOCKER_MANIFEST, DOCKER_LIST, DOCKER_CONFIG, DOCKER_LAYER),
}
_USER_AGENT = "detour-test-images"


def unique_repo(prefix: str = "test") -> str:
    """A fresh repository name, ``<prefix>/<12 hex>`` (prefix may contain slashes)."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Blob:
    digest: str
    data: bytes
    media_type: str
    diff_id: str | None = None  # layers: sha256 of the uncompressed tar

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class PushedImage:
    repo: str
    tag: str | None  # None: pushed by digest only (an index child)
    manifest: bytes
    digest: str
    media_type: str
    config: Blob
    layers: tuple[Blob, ...]
    platform: Platform

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)

    def descriptor(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.manifest),
        }
        plat = {"architecture": self.platform[1], "os": self.platform[0]}
        if len(self.platform) == 3:
            plat["variant"] = self.platform[2]
        desc["platform"] = plat
        return desc


@dataclass(frozen=True, slots=True)
class PushedIndex:
    repo: str
    tag: str | None
    manifest: bytes  # the index / manifest list bytes
    digest: str
    media_type: str
    children: tuple[PushedImage, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


# -- building -------------------------------------------------------------------------------


def _rng(seed: int | None) -> random.Random | None:
    return None if seed is None else random.Random(seed)


def _random_bytes(rng: random.Random | None, size: int) -> bytes:
    return os.urandom(size) if rng is None else rng.randbytes(size)


def make_layer(size: int = 100 * 1024, *, media: Media = "oci", seed: int | None = None) -> Blob:
    """A gzip'd tar with one file ``detour-test/<random>.bin`` of ``size`` random bytes."""
    return _make_layer(size, _MEDIA[media][3], _rng(seed))


def _make_layer(size: int, media_type: str, rng: random.Random | None) -> Blob:
    payload = _random_bytes(rng, size)
    name = f"detour-test/{_random_bytes(rng, 8).hex()}.bin"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))
    raw = buf.getvalue()
    data = gzip.compress(raw, compresslevel=1, mtime=0)
    return Blob(sha256_digest(data), data, media_type, diff_id=sha256_digest(raw))


def build_image(
    repo: str,
    tag: str | None = "latest",
    *,
    layers: int = 2,
    layer_size: int = 100 * 1024,
    platform: Platform = ("linux", "amd64"),
    media: Media = "oci",
    seed: int | None = None,
) -> PushedImage:
    """An image in memory (nothing pushed); see :func:`push_image`."""
    manifest_type, _, config_type, layer_type = _MEDIA[media]
    rng = _rng(seed)
    blobs = tuple(_make_layer(layer_size, layer_type, rng) for _ in range(layers))
    config_doc: dict[str, Any] = {
        "architecture": platform[1],
        "os": platform[0],
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in blobs]},
        "history": [{"created_by": f"detour-test {_random_bytes(rng, 8).hex()}"} for _ in blobs],
    }
    if len(platform) == 3:
        config_doc["variant"] = platform[2]
    config_bytes = json.dumps(config_doc, indent=2).encode()
    config = Blob(sha256_digest(config_bytes), config_bytes, config_type)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": [b.descriptor() for b in blobs],
    }
    manifest = json.dumps(manifest_doc, indent=2).encode()
    return PushedImage(
        repo, tag, manifest, sha256_digest(manifest), manifest_type, config, blobs, platform
    )


def build_index(
    repo: str,
    tag: str | None = "latest",
    platforms: Sequence[Platform] = (("linux", "amd64"), ("linux", "arm64")),
    *,
    media: Media = "oci",
    layers: int = 1,
    layer_size: int = 100 * 1024,
    seed: int | None = None,
) -> PushedIndex:
    """An index / manifest list over one fresh image per platform (nothing pushed)."""
    _, index_type, _, _ = _MEDIA[media]
    children = tuple(
        build_image(
            repo,
            None,
            layers=layers,
            layer_size=layer_size,
            platform=p,
            media=media,
            seed=None if seed is None else seed + i,
        )
        for i, p in enumerate(platforms)
    )
    doc = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [c.descriptor() for c in children],
    }
    body = json.dumps(doc, indent=2).encode()
    return PushedIndex(repo, tag, body, sha256_digest(body), index_type, children)


# -- pushing --------------------------------------------------------------------------------


def push_image(
    registry: Registry,
    repo: str,
    tag: str | None = "latest",
    *,
    layers: int = 2,
    layer_size: int = 100 * 1024,
    platform: Platform = ("linux", "amd64"),
    media: Media = "oci",
    seed: int | None = None,
) -> PushedImage:
    """Build an image and push its blobs, then its manifest by ``tag`` (by digest if None)."""
    image = build_image(
        repo,
        tag,
        layers=layers,
        layer_size=layer_size,
        platform=platform,
        media=media,
        seed=seed,
    )
    upload_image(registry, image)
    return image


def push_index(
    registry: Registry,
    repo: str,
    tag: str | None = "latest",
    platforms: Sequence[Platform] = (("linux", "amd64"), ("linux", "arm64")),
    *,
    media: Media = "oci",
    layers: int = 1,
    layer_size: int = 100 * 1024,
    seed: int | None = None,
) -> PushedIndex:
    """Push one image per platform by digest, then the index by ``tag``."""
    index = build_index(
        repo, tag, platforms, media=media, layers=layers, layer_size=layer_size, seed=seed
    )
    upload_index(registry, index)
    return index


def upload_image(
    registry: Registry, image: PushedImage, repo: str | None = None, client: Client | None = None
) -> None:
    """Push a built image (to ``repo``, default ``image.repo``)."""
    repo = repo or image.repo
    client = client or Client(registry)
    for blob in image.blobs:
        client.push_blob(repo, blob.data, blob.digest)
    client.put_manifest(repo, image.tag or image.digest, image.manifest, image.media_type)


def upload_index(registry: Registry, index: PushedIndex, repo: str | None = None) -> None:
    """Push a built index: its children by digest, then the index by tag (or digest)."""
    repo = repo or index.repo
    client = Client(registry)
    for child in index.children:
        upload_image(registry, child, repo, client)
    client.put_manifest(repo, index.tag or index.digest, index.manifest, index.media_type)


def put_manifest(registry: Registry, repo: str, ref: str, body: bytes, media_type: str) -> str:
    """PUT a manifest by tag or digest (e.g. to move a tag); returns the digest."""
    return Client(registry).put_manifest(repo, ref, body, media_type)


def get_manifest(
    registry: Registry, repo: str, ref: str, *, accept: str = ACCEPT_ALL, method: str = "GET"
) -> Response:
    """GET (or HEAD) a manifest straight from the registry, as the admin."""
    return Client(registry).request(
        method, f"/v2/{repo}/manifests/{ref}", headers={"Accept": accept}, repo=repo
    )


def delete_manifest(registry: Registry, repo: str, digest: str) -> Response:
    return Client(registry).request(
        "DELETE", f"/v2/{repo}/manifests/{digest}", repo=repo, actions="delete"
    )


class Client:
    """A tiny synchronous registry client doing Basic or Bearer auth with given credentials."""

    def __init__(self, registry: Registry, auth: tuple[str, str] | bool | None = True) -> None:
        """``auth=True``: use ``registry.push_auth``; None/False: anonymous; or (user, pw)."""
        self.registry = registry
        if auth is True:
            self.auth: tuple[str, str] | None = registry.push_auth
        elif auth is False:
            self.auth = None
        else:
            self.auth = auth
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._basic = False
        self.token_fetches = 0

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        repo: str | None = None,
        actions: str = "pull,push",
    ) -> Response:
        scope = f"repository:{repo}:{actions}" if repo else ""
        for _ in range(2):
            hdrs = {"User-Agent": _USER_AGENT, **(headers or {})}
            if scope in self._tokens:
                hdrs["Authorization"] = f"Bearer {self._tokens[scope]}"
            elif self._basic and self.auth is not None:
                hdrs["Authorization"] = (
                    "Basic " + base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
                )
            resp = self._send(method, path, body, hdrs)
            if resp.status != 401 or "Authorization" in hdrs:
                return resp
            challenge = resp.headers.get("www-authenticate", "")
            if challenge.lower().startswith("basic"):
                self._basic = True
            elif challenge.lower().startswith("bearer"):
                self._tokens[scope] = self._fetch_token(challenge)
            else:
                return resp
        return resp

    def _send(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        conn = HTTPConnection("127.0.0.1", self.registry.port, timeout=30)
        try:
            conn.request(
                method,
                path,
                body=body if body or method in ("PUT", "POST") else None,
                headers=headers,
            )
            raw = conn.getresponse()
            data = raw.read()
            return Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, data)
        finally:
            conn.close()

    def _fetch_token(self, challenge: str) -> str:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = urlsplit(params.pop("realm"))
        query = urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
        headers = {"User-Agent": _USER_AGENT}
        if self.auth is not None:
            creds = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {creds}"
        conn = HTTPConnection(realm.hostname or "127.0.0.1", realm.port or 80, timeout=30)
        try:
            conn.request("GET", f"{realm.path}?{query}", headers=headers)
            raw = conn.getresponse()
            data = raw.read()
        finally:
            conn.close()
        if raw.status != 200:
            raise RuntimeError(f"token endpoint said {raw.status}: {data!r}")
        self.token_fetches += 1
        doc = json.loads(data)
        token: str = doc.get("token") or doc["access_token"]
        return token

    def _check(self, resp: Response, expected: int, what: str) -> Response:
        if resp.status != expected:
            raise RuntimeError(f"{what}: HTTP {resp.status} {resp.body[:500]!r}")
        return resp

    def push_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """Monolithic upload: POST .../blobs/uploads/ then PUT <Location>&digest=..."""
        digest = digest or sha256_digest(data)
        resp = self._check(
            self.request("POST", f"/v2/{repo}/blobs/uploads/", repo=repo), 202, "start upload"
        )
        location = urlsplit(resp.headers["location"])
        query = f"{location.query}&" if location.query else ""
        target = f"{location.path}?{query}{urlencode({'digest': digest})}"
        self._check(
            self.request(
                "PUT",
                target,
                body=data,
                headers={"Content-Type": "application/octet-stream"},
                repo=repo,
            ),
            201,
            f"upload {digest}",
        )
        return digest

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        resp = self._check(
            self.request(
                "PUT",
                f"/v2/{repo}/manifests/{ref}",
                body=body,
                headers={"Content-Type": media_type},
                repo=repo,
            ),
            201,
            f"put manifest {repo}:{ref}",
        )
        digest = resp.headers.get("docker-content-digest") or sha256_digest(body)
        if digest != sha256_digest(body):
            raise RuntimeError(f"registry stored {digest}, expected {sha256_digest(body)}")
        return digest
