"""What a cache directory holds, by image: the model behind ``detour cache ls`` and the
proxy's ``GET /_detour/cache`` (:mod:`proxy.api.admin`).

Tags are stored hashed on disk (see :mod:`proxy.cache.store`), so the inventory is read back from
the files: each ``tags/`` record names its image (``name:tag``, and for a narrowed answer the
``Accept`` it was kept for) and the digest it resolved to; each manifest names the manifests
(an index's children) and blobs it is made of. From that graph:

* an **image** is every tag record of one ``name:tag``: its manifests, and the blobs they name
  that are in the cache. Its ``size`` is those files' bytes; its ``unique_size``, the bytes no
  other image or untagged entry uses, which is what removing it frees. Its last use is its last
  pull: the newest mtime of its tag records and manifests (hits refresh mtimes, see
  :meth:`CacheStore.touch`), not of its blobs, which images sharing them refresh too.
* **untagged** are manifests that no tag record and no other manifest names (an image pulled by
  digest), and blobs no cached manifest names.

What removing some of it takes (``rm``, ``prune``) is planned and carried out by
:mod:`proxy.cache.removals`; the commands themselves are :mod:`proxy.tools.cache_commands`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from proxy.oci import MANIFEST_MAX_BYTES
from proxy.reference import Digest, parse_json

Kind = Literal["manifest", "blob"]
Key = tuple[Kind, str]  # ("manifest" | "blob", digest): one cache entry

ADMIN_PATH = "/_detour/cache"  # the proxy's admin endpoints, which the commands call


@dataclass(frozen=True, slots=True)
class FileStat:
    """A file of the cache as the listing saw it: where, how large, when last used."""

    path: Path
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class CachedManifest:
    digest: str
    file: FileStat
    media_type: str
    children: tuple[str, ...]  # the manifests an index names
    blobs: tuple[str, ...]  # config and layers


@dataclass(frozen=True, slots=True)
class CachedTag:
    name: str
    tag: str
    variant: str | None  # the Accept a narrowed answer was kept for; None: the tag's own
    digest: str
    media_type: str
    checked_at: float
    file: FileStat

    @property
    def image(self) -> str:
        return f"{self.name}:{self.tag}"


@dataclass(frozen=True, slots=True)
class Group:
    """One line of ``ls``, removed as a whole by ``prune``: an image (the tag records of one
    ``name:tag``), an untagged manifest, or a blob no manifest names."""

    key: str  # "docker.io/library/nats:2.10", or the digest of an untagged entry
    kind: Literal["image", "manifest", "blob"]
    tags: tuple[CachedTag, ...]
    roots: frozenset[Key]


# --------------------------------------------------------------------------- reading the files


def _stat(path: Path) -> FileStat | None:
    try:
        stat = path.stat()
    except OSError:  # gone meanwhile (a running proxy evicted it)
        return None
    return FileStat(path, stat.st_size, stat.st_mtime)


def _entry_digest(path: Path) -> str | None:
    """The digest a ``blobs/`` or ``manifests/`` file is named for, if it is well placed."""
    try:
        digest = Digest.parse(f"{path.parent.parent.name}:{path.name}")
    except ValueError:
        return None
    return str(digest) if path.parent.name == digest.hex[:2] else None


def _references(body: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The digests a manifest names: (child manifests, blobs). Unreadable: none."""
    try:
        document = parse_json(body)
    except ValueError:
        return (), ()
    if not isinstance(document, dict):
        return (), ()

    def digests(descriptors: Any) -> tuple[str, ...]:
        if isinstance(descriptors, dict):
            descriptors = [descriptors]
        if not isinstance(descriptors, list):
            return ()
        return tuple(
            d["digest"]
            for d in descriptors
            if isinstance(d, dict) and isinstance(d.get("digest"), str)
        )

    children = digests(document.get("manifests"))
    blobs = digests(document.get("config")) + digests(document.get("layers"))
    return children, blobs + digests(document.get("blobs"))  # "blobs": OCI artifact manifests


def _read_manifest(path: Path, digest: str) -> CachedManifest | None:
    try:
        with path.open("rb") as file:
            stat = os.fstat(file.fileno())
            raw = file.read(MANIFEST_MAX_BYTES + 1024)
    except OSError:
        return None
    media_type, _, body = raw.partition(b"\n")
    children, blobs = _references(body)
    return CachedManifest(
        digest,
        FileStat(path, stat.st_size, stat.st_mtime),
        media_type.decode("ascii", "replace"),
        children,
        blobs,
    )


def _read_tag(path: Path) -> CachedTag | None:
    file = _stat(path)
    try:
        data = json.loads(path.read_bytes())
        variant = data.get("variant")
        tag = CachedTag(
            str(data["name"]),
            str(data["tag"]),
            None if variant is None else str(variant),
            str(Digest.parse(data["digest"])),
            str(data["media_type"]),
            float(data["checked_at"]),
            file or FileStat(path, 0, 0.0),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable, or gone meanwhile: the proxy does not use it either
    return tag if file is not None else None


def scan(root: Path) -> Inventory:
    """Read the inventory of the cache directory ``root`` (blocking: a worker thread)."""
    tags = [
        tag for path in sorted((root / "tags").glob("*/*")) if (tag := _read_tag(path)) is not None
    ]
    manifests: dict[str, CachedManifest] = {}
    for path in sorted((root / "manifests").glob("*/*/*")):
        digest = _entry_digest(path)
        if digest is not None and (manifest := _read_manifest(path, digest)) is not None:
            manifests[digest] = manifest
    blobs: dict[str, FileStat] = {}
    for path in sorted((root / "blobs").glob("*/*/*")):
        digest = _entry_digest(path)
        if digest is not None and (file := _stat(path)) is not None:
            blobs[digest] = file
    return Inventory(root, tags, manifests, blobs)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- the graph


class Inventory:
    """The images, manifests and blobs of one cache directory, as read by :func:`scan`."""

    def __init__(
        self,
        root: Path,
        tags: Sequence[CachedTag],
        manifests: dict[str, CachedManifest],
        blobs: dict[str, FileStat],
    ) -> None:
        self.root = root
        self.tags = list(tags)
        self.manifests = manifests
        self.blobs = blobs
        self.groups = self._group()

    def file(self, key: Key) -> FileStat:
        kind, digest = key
        return self.manifests[digest].file if kind == "manifest" else self.blobs[digest]

    def closure(self, roots: Iterable[Key], blocked: frozenset[Key] = frozenset()) -> set[Key]:
        """The cached entries ``roots`` reach: themselves, an index's children, a manifest's
        blobs; never through a ``blocked`` entry."""
        seen: set[Key] = set()
        stack = [key for key in roots if key not in blocked]
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            kind, digest = key
            if kind == "blob":
                if digest in self.blobs:
                    seen.add(key)
                continue
            manifest = self.manifests.get(digest)
            if manifest is None:
                continue
            seen.add(key)
            named: list[Key] = [("manifest", child) for child in manifest.children]
            named += [("blob", blob) for blob in manifest.blobs]
            stack.extend(k for k in named if k not in blocked and k not in seen)
        return seen

    def _group(self) -> list[Group]:
        by_image: dict[tuple[str, str], list[CachedTag]] = {}
        for tag in self.tags:
            by_image.setdefault((tag.name, tag.tag), []).append(tag)
        groups = [
            Group(
                f"{name}:{tag}",
                "image",
                tuple(sorted(records, key=lambda r: (r.variant is not None, r.variant or ""))),
                frozenset(("manifest", r.digest) for r in records),
            )
            for (name, tag), records in sorted(by_image.items())
        ]
        targets = {tag.digest for tag in self.tags}
        children = {child for m in self.manifests.values() for child in m.children}
        named_blobs = {blob for m in self.manifests.values() for blob in m.blobs}
        groups += [
            Group(digest, "manifest", (), frozenset({("manifest", digest)}))
            for digest in sorted(self.manifests)
            if digest not in targets and digest not in children
        ]
        groups += [
            Group(digest, "blob", (), frozenset({("blob", digest)}))
            for digest in sorted(self.blobs)
            if digest not in named_blobs
        ]
        return groups

    def last_used(self, group: Group) -> float:
        """When it was last pulled: the newest mtime of its tag records and manifests (every
        pull reads the manifests, and a hit refreshes their mtime). Its blobs' are not
        counted: a base layer is refreshed by every image that shares it. For a blob no
        manifest names, its own."""
        files = [tag.file for tag in group.tags]
        files += [
            self.file(key)
            for key in self.closure(group.roots)
            if key[0] == "manifest" or group.kind == "blob"
        ]
        return max((file.mtime for file in files), default=0.0)

    def cached(self, key: Key) -> bool:
        """Whether ``key`` is one of the cache's entries."""
        kind, digest = key
        return digest in (self.manifests if kind == "manifest" else self.blobs)

    # ----------------------------------------------------------------------- the listing

    def document(self) -> dict[str, Any]:
        """The listing as a stable JSON document: ``images``, ``untagged``, ``totals``, and
        ``uncached_tags``: images whose tag records outlived their manifests (evicted)."""
        reached = [self.closure(group.roots) for group in self.groups]
        users = Counter(key for keys in reached for key in keys)
        images: list[dict[str, Any]] = []
        untagged: list[dict[str, Any]] = []
        uncached: list[str] = []
        for group, keys in zip(self.groups, reached, strict=True):
            if not keys:  # tag records only: the rest was evicted; a pull fetches it again
                uncached.append(group.key)
                continue
            sizes = {key: self.file(key).size for key in keys}
            entry: dict[str, Any] = {
                "size": sum(sizes.values()),
                "unique_size": sum(size for key, size in sizes.items() if users[key] == 1),
                "manifests": sum(kind == "manifest" for kind, _ in keys),
                "blobs": sum(kind == "blob" for kind, _ in keys),
                "missing_blobs": len(
                    {
                        blob
                        for kind, digest in keys
                        if kind == "manifest"
                        for blob in self.manifests[digest].blobs
                        if blob not in self.blobs
                    }
                ),
                "last_used": _iso(self.last_used(group)),
            }
            if group.kind == "image":
                own = group.tags[0]
                images.append(
                    {
                        "image": group.key,
                        "name": own.name,
                        "tag": own.tag,
                        "digest": own.digest,
                        "media_type": own.media_type,
                        **entry,
                        "checked_at": _iso(own.checked_at),
                        "variants": [
                            {"accept": t.variant, "digest": t.digest}
                            for t in group.tags
                            if t.variant is not None
                        ],
                    }
                )
            else:
                media_type = (
                    self.manifests[group.key].media_type if group.kind == "manifest" else None
                )
                untagged.append(
                    {"kind": group.kind, "digest": group.key, "media_type": media_type, **entry}
                )
        return {
            "dir": str(self.root),
            "images": images,
            "untagged": untagged,
            "uncached_tags": uncached,
            "totals": {
                "images": len(images),
                "untagged": len(untagged),
                "manifests": len(self.manifests),
                "blobs": len(self.blobs),
                "size": sum(m.file.size for m in self.manifests.values())
                + sum(b.size for b in self.blobs.values()),
            },
        }
