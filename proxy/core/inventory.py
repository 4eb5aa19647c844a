"""What a cache directory holds, by image: ``detour cache ls``, ``rm`` and ``prune``.

Tags are stored hashed on disk (see :mod:`proxy.core.cache`), so the inventory is read back from
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

Removing (:meth:`Inventory.plan_remove`, :meth:`Inventory.plan_prune`) takes the tag records
asked for and every manifest and blob that nothing left behind still reaches, so a blob shared
with another image stays. The plan is carried out by :meth:`CacheStore.remove`: by the running
proxy's own store (``--endpoint``, through :mod:`proxy.core.admin`), so its size accounting stays
right, or on the files of a directory no proxy is serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode
from urllib.request import ProxyHandler, Request, build_opener

from pydantic import TypeAdapter, ValidationError

from proxy.oci import MANIFEST_MAX_BYTES
from proxy.reference import Digest, Reference, parse_json
from proxy.settings import Duration, Settings, load_settings, split_host_port

if TYPE_CHECKING:  # proxy.core.cache (metrics, logging) is imported where it is used: `detour`
    # builds these commands' parser for every command, and starts faster without it.
    from proxy.core.cache import CacheStore, Removal

Kind = Literal["manifest", "blob"]
Key = tuple[Kind, str]  # ("manifest" | "blob", digest): one cache entry

ADMIN_PATH = "/_detour/cache"
# A digest, or the start of one as `ls` shows it (at least 12 hex digits).
_DIGEST_PREFIX = re.compile(r"(?P<algorithm>sha256|sha512):(?P<hex>[a-f0-9]{12,128})")
_SHORT_HEX = 12


@dataclass(frozen=True, slots=True)
class CachedFile:
    path: Path
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class CachedManifest:
    digest: str
    file: CachedFile
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
    file: CachedFile

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


@dataclass(frozen=True, slots=True)
class Plan:
    """The files a removal takes, tag records first, then manifests, then blobs."""

    targets: tuple[str, ...]
    tags: tuple[CachedTag, ...]
    entries: tuple[tuple[Key, CachedFile], ...]

    @property
    def paths(self) -> list[Path]:
        return [tag.file.path for tag in self.tags] + [file.path for _, file in self.entries]

    @property
    def size(self) -> int:
        """Bytes of manifests and blobs (what ``detour_cache_size_bytes`` counts)."""
        return sum(file.size for _, file in self.entries)


class NotCached(LookupError):
    """Nothing in the cache matches what ``rm`` was asked to remove."""


# --------------------------------------------------------------------------- reading the files


def _stat(path: Path) -> CachedFile | None:
    try:
        stat = path.stat()
    except OSError:  # gone meanwhile (a running proxy evicted it)
        return None
    return CachedFile(path, stat.st_size, stat.st_mtime)


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
        CachedFile(path, stat.st_size, stat.st_mtime),
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
            file or CachedFile(path, 0, 0.0),
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
    blobs: dict[str, CachedFile] = {}
    for path in sorted((root / "blobs").glob("*/*/*")):
        digest = _entry_digest(path)
        if digest is not None and (file := _stat(path)) is not None:
            blobs[digest] = file
    return Inventory(root, tags, manifests, blobs)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600`` → seconds (the settings' duration syntax)."""
    try:
        return float(TypeAdapter(Duration).validate_python(text))
    except ValidationError:
        raise ValueError(
            f"invalid duration {text!r}: expected e.g. 30d, 12h or 90m (units ms, s, m, h, d)"
        ) from None


# --------------------------------------------------------------------------- the graph


class Inventory:
    """The images, manifests and blobs of one cache directory, as read by :func:`scan`."""

    def __init__(
        self,
        root: Path,
        tags: Sequence[CachedTag],
        manifests: dict[str, CachedManifest],
        blobs: dict[str, CachedFile],
    ) -> None:
        self.root = root
        self.tags = list(tags)
        self.manifests = manifests
        self.blobs = blobs
        self.groups = self._group()

    def file(self, key: Key) -> CachedFile:
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

    # ----------------------------------------------------------------------- plans

    def _plan(
        self,
        targets: Sequence[str],
        tags: Iterable[CachedTag],
        roots: Iterable[Key],
        *,
        forced: frozenset[Key] = frozenset(),
        dropped_groups: Iterable[Group] = (),
    ) -> Plan:
        """Remove ``tags``, the ``forced`` entries, and what ``roots`` reach that nothing
        staying (the other tag records, the untagged entries not dropped) reaches."""
        tags = list(dict.fromkeys(tags))
        gone_tags = {tag.file.path for tag in tags}
        dropped = {(group.kind, group.key) for group in dropped_groups}
        staying: set[Key] = {
            ("manifest", t.digest) for t in self.tags if t.file.path not in gone_tags
        }
        for group in self.groups:
            if group.kind != "image" and (group.kind, group.key) not in dropped:
                staying |= group.roots
        kept = self.closure(staying, blocked=forced)
        removed = (self.closure(roots) | {k for k in forced if self._cached(k)}) - kept
        order = sorted(removed, key=lambda key: (key[0] != "manifest", key[1]))
        return Plan(
            tuple(targets),
            tuple(sorted(tags, key=lambda t: (t.name, t.tag, t.variant or ""))),
            tuple((key, self.file(key)) for key in order),
        )

    def _cached(self, key: Key) -> bool:
        kind, digest = key
        return digest in (self.manifests if kind == "manifest" else self.blobs)

    def plan_remove(self, targets: Sequence[str]) -> Plan:
        """``rm``: an image (``name:tag``; the tag defaults to ``latest``) loses its tag records
        and the manifests and blobs only it uses. A digest (or its first 12 or more hex digits)
        loses the tag records that point at it, its own file, and what only it uses: an
        image's digest removes that image under every tag. :class:`NotCached` if a target
        matches nothing; ``ValueError`` (a :class:`~proxy.errors.ClientError`) if it is not a
        reference."""
        tags: list[CachedTag] = []
        roots: set[Key] = set()
        forced: set[Key] = set()
        dropped: list[Group] = []
        matched: list[str] = []
        for target in targets:
            digest = self._digest(target)
            if digest is None:
                ref = Reference.parse(target)
                if ref.digest is not None:
                    digest = self._digest(str(ref.digest))
                else:
                    key = f"{ref.name}:{ref.tag}"
                    group = next((g for g in self.groups if g.key == key), None)
                    if group is None:
                        raise NotCached(f"{key} is not in the cache")
                    tags += group.tags
                    roots |= group.roots
                    matched.append(key)
                    continue
            if digest is None:
                raise NotCached(f"{target} is not in the cache")
            candidates: tuple[Key, Key] = (("manifest", digest), ("blob", digest))
            keys = {key for key in candidates if self._cached(key)}
            pointing = [tag for tag in self.tags if tag.digest == digest]
            tags += pointing
            roots |= keys
            forced |= keys
            dropped += [g for g in self.groups if g.kind != "image" and g.roots & keys]
            matched.append(digest)
        return self._plan(matched, tags, roots, forced=frozenset(forced), dropped_groups=dropped)

    def _digest(self, text: str) -> str | None:
        """The cached digest ``text`` names (whole, or its start), None if it is not a digest;
        :class:`NotCached` if no cached digest, or more than one, starts with it."""
        match = _DIGEST_PREFIX.fullmatch(text)
        if match is None:
            return None
        known = {t.digest for t in self.tags} | set(self.manifests) | set(self.blobs)
        found = {digest for digest in known if digest.startswith(text)}
        if len(found) > 1:
            raise NotCached(f"{text} is ambiguous: {len(found)} cached digests start with it")
        if not found:
            raise NotCached(f"{text} is not in the cache")
        return found.pop()

    def plan_prune(
        self, older_than: float, *, now: float | None = None, in_use: Callable[[Path], bool]
    ) -> Plan:
        """``prune``: every image and untagged entry last used more than ``older_than``
        seconds ago, except any with a file ``in_use`` (pinned by a reader of the proxy)."""
        cutoff = (time.time() if now is None else now) - older_than
        old = [
            group
            for group in self.groups
            if self.last_used(group) < cutoff
            and not any(in_use(self.file(key).path) for key in self.closure(group.roots))
        ]
        return self._plan(
            [group.key for group in old],
            [tag for group in old for tag in group.tags],
            {key for group in old for key in group.roots},
            dropped_groups=old,
        )

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


# --------------------------------------------------------------------------- carrying a plan out


async def execute(store: CacheStore, plan: Plan, *, wait: float = 0.0) -> dict[str, Any]:
    """Remove the plan's files through ``store`` and say what became of them (JSON).

    Entries a reader has pinned are waited for, up to ``wait`` seconds (a blob being sent);
    those still pinned then are left (``busy``), to be removed by running the command again.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    # Polled: an unpin signals nothing (a blob's send ends, or its client goes).
    while loop.time() < deadline and any(store.in_use(path) for path in plan.paths):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    removal = await store.remove(plan.paths)
    return result(plan, removal)


def result(plan: Plan, removal: Removal) -> dict[str, Any]:
    what: dict[Path, tuple[str, str]] = {t.file.path: ("tag", t.image) for t in plan.tags}
    what |= {file.path: (kind, digest) for (kind, digest), file in plan.entries}
    removed = []
    for path, size in removal.removed:
        kind, name = what[path]
        removed.append({"kind": kind, "ref": name, "size": size})
    return {
        "targets": list(plan.targets),
        "removed": removed,
        "freed": sum(entry["size"] for entry in removed if entry["kind"] != "tag"),
        "busy": [{"kind": what[p][0], "ref": what[p][1]} for p in removal.busy],
        "failed": [
            {"kind": what[p][0], "ref": what[p][1], "error": error} for p, error in removal.failed
        ],
    }


# --------------------------------------------------------------------------- the commands


class EndpointError(Exception):
    """The running proxy could not be asked, or refused (the message says why; ``status``
    is its HTTP status, None if it did not answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _endpoint_url(endpoint: str) -> str:
    url = endpoint.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or "/" in url.split("://", 1)[1]:
        raise ValueError(f"invalid endpoint {endpoint!r}: expected e.g. http://127.0.0.1:7439")
    return url


def call(endpoint: str, method: str, path: str, *, timeout: float = 120.0) -> dict[str, Any]:
    """One admin request to the proxy at ``endpoint``; its JSON answer, or
    :class:`EndpointError` with the proxy's own message. Never through an HTTP proxy from the
    environment (``HTTP_PROXY``): the endpoint is this machine's."""
    opener = build_opener(ProxyHandler({}))
    request = Request(f"{_endpoint_url(endpoint)}{path}", method=method)  # noqa: S310
    request.add_header("Accept", "application/json")
    try:
        with opener.open(request, timeout=timeout) as answer:
            body: dict[str, Any] = json.loads(answer.read())
            return body
    except HTTPError as exc:
        with exc:
            raise EndpointError(_oci_message(exc.read()), exc.code) from None
    except (URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, URLError) else exc
        raise EndpointError(f"cannot reach the proxy at {endpoint}: {reason}") from None
    except ValueError:
        raise EndpointError(f"the proxy at {endpoint} did not answer JSON") from None


def _oci_message(body: bytes) -> str:
    try:
        error = json.loads(body)["errors"][0]
        return f"{error['message']} ({error['code']})"
    except (ValueError, KeyError, IndexError, TypeError):
        return body[:200].decode(errors="replace")


def _root(args: argparse.Namespace) -> Path:
    """The cache directory: DIR, or the settings' cache.dir."""
    if args.endpoint is not None and args.dir is not None:
        raise ValueError("give DIR or --endpoint, not both")
    root: Path = args.dir if args.dir is not None else _settings(args).cache.dir
    if not ((root / "blobs").is_dir() or (root / "manifests").is_dir()):
        raise ValueError(f"{root} is not a cache directory (no blobs/ or manifests/)")
    return root


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _running_proxy(args: argparse.Namespace, root: Path) -> str | None:
    """The URL of a Detour that answers at the settings' listen address and serves ``root``:
    removing files behind its back would leave its size accounting wrong."""
    host, port = split_host_port(_settings(args).listen, 7439)
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        served = call(url, "GET", f"{ADMIN_PATH}?summary=1", timeout=2.0).get("dir")
    except EndpointError:
        return None
    with contextlib.suppress(OSError):
        if isinstance(served, str) and Path(served).resolve() == root.resolve():
            return url
    return None


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def _short(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:_SHORT_HEX]}"


def format_listing(document: dict[str, Any]) -> str:
    """``ls``'s table: one line per image and untagged entry, then the totals."""
    from proxy.tools.warm import human_bytes

    rows = [("IMAGE", "DIGEST", "SIZE", "UNIQUE", "LAST USED")]
    for entry in document["images"] + document["untagged"]:
        rows.append(
            (
                entry.get("image") or f"(untagged {entry['kind']})",
                _short(entry["digest"]),
                human_bytes(entry["size"]),
                human_bytes(entry["unique_size"]),
                entry["last_used"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[4]])
        for row in rows
    ]
    totals = document["totals"]
    lines.append(
        f"{_count(totals['images'], 'image')}, {totals['untagged']} untagged; "
        f"{_count(totals['manifests'], 'manifest')}, {_count(totals['blobs'], 'blob')}, "
        f"{human_bytes(totals['size'])} in {document['dir']}"
    )
    if document["uncached_tags"]:
        lines.append(
            f"and {_count(len(document['uncached_tags']), 'tag')} whose image was evicted: "
            + ", ".join(document["uncached_tags"][:5])
            + (", ..." if len(document["uncached_tags"]) > 5 else "")
        )
    proxy = document.get("proxy")
    if proxy is not None:
        limit = proxy["max_size"]
        lines.append(
            f"the proxy counts {human_bytes(proxy['cache_size'])} (detour_cache_size_bytes); "
            f"cache.max_size {human_bytes(limit) if limit else 'unbounded'}"
        )
    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def format_result(outcome: dict[str, Any]) -> list[str]:
    """``rm``'s and ``prune``'s report: what was removed, freed, kept."""
    from proxy.tools.warm import human_bytes

    counts = Counter(entry["kind"] for entry in outcome["removed"])
    lines = [f"removed {target}" for target in outcome["targets"]]
    removed = ", ".join(_count(counts[kind], kind) for kind in ("tag", "manifest", "blob"))
    lines.append(f"{removed} removed; {human_bytes(outcome['freed'])} freed")
    lines += [f"in use, kept: {e['kind']} {e['ref']}" for e in outcome["busy"]]
    lines += [f"not removed: {e['kind']} {e['ref']}: {e['error']}" for e in outcome["failed"]]
    return lines


def merge(outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "targets": [t for o in outcomes for t in o["targets"]],
        "removed": [e for o in outcomes for e in o["removed"]],
        "freed": sum(o["freed"] for o in outcomes),
        "busy": [e for o in outcomes for e in o["busy"]],
        "failed": [e for o in outcomes for e in o["failed"]],
    }


def _ls(args: argparse.Namespace) -> int:
    if args.endpoint is not None and args.dir is None:
        document = call(args.endpoint, "GET", ADMIN_PATH)
    else:
        document = scan(_root(args)).document()
    if args.json:
        _print_json(document)
    else:
        print(format_listing(document))
    return 0


Planner = Callable[[Inventory], Plan]


def _carry_out(args: argparse.Namespace, steps: Sequence[tuple[str, str, Planner]]) -> int:
    """Each step through the proxy (``method path``) or on the files (its planner), in turn;
    exit 1 if a target matched nothing, or anything was left in use or refused."""
    root = None
    if args.endpoint is None or args.dir is not None:
        root = _root(args)
        running = _running_proxy(args, root)
        if running is not None:
            raise ValueError(
                f"the Detour at {running} serves {root}: use --endpoint {running}, so that "
                "it removes the files itself and its size accounting stays right"
            )
    from proxy.core.cache import CacheStore

    outcomes: list[dict[str, Any]] = []
    missed = 0
    for method, path, planner in steps:
        try:
            if root is None:
                outcomes.append(call(args.endpoint, method, path))
            else:
                plan = planner(scan(root))
                outcomes.append(asyncio.run(execute(CacheStore(root), plan)))
        except (NotCached, EndpointError) as exc:
            if isinstance(exc, EndpointError) and exc.status != HTTPStatus.NOT_FOUND:
                raise
            print(f"detour: {exc}", file=sys.stderr)
            missed += 1
    outcome = merge(outcomes)
    if args.json:
        _print_json(outcome)
    else:
        for line in format_result(outcome):
            print(line)
    return 1 if missed or outcome["busy"] or outcome["failed"] else 0


def check_target(target: str) -> None:
    """``ValueError`` unless ``target`` is an image reference or a digest (or its start)."""
    if _DIGEST_PREFIX.fullmatch(target) is None:
        Reference.parse(target)


def _removing(target: str) -> Planner:
    return lambda inventory: inventory.plan_remove([target])


def _rm(args: argparse.Namespace) -> int:
    targets: list[str] = args.target
    for target in targets:  # every typo, before anything is removed
        check_target(target)
    return _carry_out(
        args,
        [("DELETE", f"{ADMIN_PATH}/{quote(t, safe='/:@')}", _removing(t)) for t in targets],
    )


def _prune(args: argparse.Namespace) -> int:
    age = parse_age(args.older_than)
    return _carry_out(
        args,
        [
            (
                "POST",
                f"{ADMIN_PATH}/prune?{urlencode({'older_than': args.older_than})}",
                lambda inventory: inventory.plan_prune(age, in_use=lambda _: False),
            )
        ],
    )


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One line on stderr, no traceback: a bad argument exits 2; a proxy that can't be reached
    or refuses, 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except EndpointError as exc:
            print(f"detour: {exc}", file=sys.stderr)
            return 1
        except ValueError as exc:  # a bad reference, age, directory or endpoint
            print(f"detour: {exc}", file=sys.stderr)
            return 2

    return run


def add_cache_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ls``, ``rm`` and ``prune`` to ``detour cache``'s subcommands (``commands``, from
    ``add_subparsers``)."""

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=f"{help_text} {description}")
        sub.add_argument(
            "--endpoint",
            metavar="URL",
            default=None,
            help="the running proxy, e.g. http://127.0.0.1:7439 (only answered from its own "
            "machine's loopback: kubectl exec into the proxy's pod)",
        )
        sub.add_argument(
            "--config",
            "-c",
            type=Path,
            default=None,
            help="YAML settings file (DETOUR_* overrides): its cache.dir is the default DIR",
        )
        sub.add_argument("--json", action="store_true", help="print JSON")
        return sub

    offline = (
        "Without --endpoint it works on the files of DIR (default: cache.dir), for a cache no "
        "proxy is serving; while the proxy runs use --endpoint, so that the proxy removes the "
        "files itself and its size accounting stays right."
    )
    ls = command(
        "ls",
        "List the cached images by name:tag: digest, size, last use; then the totals.",
        "SIZE counts an image's manifests and the blobs of it in the cache; UNIQUE, the bytes "
        "no other image uses (what rm frees). Untagged entries are manifests no tag names "
        "(images pulled by digest) and blobs no manifest names. Without --endpoint it reads "
        "DIR (default: cache.dir).",
    )
    ls.add_argument("dir", type=Path, nargs="?", default=None, metavar="DIR")
    ls.set_defaults(func=_guarded(_ls))

    rm = command(
        "rm",
        "Remove images or entries from the cache; the next pull fetches them again.",
        "IMAGE (name:tag, as pulled) loses its tag and the manifests and blobs no other image "
        "uses; DIGEST (or its first 12+ hex digits, as ls shows) loses the tags pointing at "
        "it, its file, and what only it uses. " + offline + " Exit 0 if all was removed, 1 if "
        "a target is not cached or an entry was in use, 2 for a bad argument.",
    )
    rm.add_argument("target", nargs="+", metavar="IMAGE|DIGEST")
    rm.add_argument("--dir", type=Path, default=None, metavar="DIR", help="the cache directory")
    rm.set_defaults(func=_guarded(_rm))

    prune = command(
        "prune",
        "Remove the images and untagged entries not used for a while.",
        "An image counts as used when any of its files was (a pull refreshes them); blobs it "
        "shares with an image used since are kept, and so is anything being sent. " + offline,
    )
    prune.add_argument(
        "--older-than",
        required=True,
        metavar="AGE",
        help="last used longer ago than this, e.g. 30d, 12h (units s, m, h, d)",
    )
    prune.add_argument("dir", type=Path, nargs="?", default=None, metavar="DIR")
    prune.set_defaults(func=_guarded(_prune))
