"""Taking images and entries out of the cache: the plans behind ``detour cache rm`` and ``prune``,
and carrying them out.

A plan (:func:`plan_remove`, :func:`plan_prune`) is read off an :class:`~proxy.cache.inventory.
Inventory`: it takes the tag records asked for and every manifest and blob that nothing left
behind still reaches, so a blob shared with another image stays. :func:`execute` carries it out
through :meth:`CacheStore.remove`: the running proxy's own store (``--endpoint``, through
:mod:`proxy.api.admin`), so its size accounting stays right, or one on the files of a directory
no proxy is serving.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from proxy.cache.inventory import CachedTag, FileStat, Group, Inventory, Key
from proxy.reference import Reference
from proxy.setting_types import Duration

if TYPE_CHECKING:  # proxy.cache.store (metrics, logging) is imported where it is used: `detour`
    # builds the cache commands' parser for every command, and starts faster without it.
    from proxy.cache.store import CacheStore, Removal

# A digest, or the start of one as `ls` shows it (at least 12 hex digits).
_DIGEST_PREFIX = re.compile(r"(?P<algorithm>sha256|sha512):(?P<hex>[a-f0-9]{12,128})")


@dataclass(frozen=True, slots=True)
class Plan:
    """The files a removal takes, tag records first, then manifests, then blobs."""

    targets: tuple[str, ...]
    tags: tuple[CachedTag, ...]
    entries: tuple[tuple[Key, FileStat], ...]

    @property
    def paths(self) -> list[Path]:
        return [tag.file.path for tag in self.tags] + [file.path for _, file in self.entries]

    @property
    def size(self) -> int:
        """Bytes of manifests and blobs (what ``detour_cache_size_bytes`` counts)."""
        return sum(file.size for _, file in self.entries)


class NotCached(LookupError):
    """Nothing in the cache matches what ``rm`` was asked to remove."""


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600`` → seconds (the settings' duration syntax)."""
    try:
        return float(TypeAdapter(Duration).validate_python(text))
    except ValidationError:
        raise ValueError(
            f"invalid duration {text!r}: expected e.g. 30d, 12h or 90m (units ms, s, m, h, d)"
        ) from None


def check_target(target: str) -> None:
    """``ValueError`` unless ``target`` is an image reference or a digest (or its start)."""
    if _DIGEST_PREFIX.fullmatch(target) is None:
        Reference.parse(target)


# --------------------------------------------------------------------------- plans


def _plan(
    inventory: Inventory,
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
        ("manifest", t.digest) for t in inventory.tags if t.file.path not in gone_tags
    }
    for group in inventory.groups:
        if group.kind != "image" and (group.kind, group.key) not in dropped:
            staying |= group.roots
    kept = inventory.closure(staying, blocked=forced)
    removed = (inventory.closure(roots) | {k for k in forced if inventory.cached(k)}) - kept
    order = sorted(removed, key=lambda key: (key[0] != "manifest", key[1]))
    return Plan(
        tuple(targets),
        tuple(sorted(tags, key=lambda t: (t.name, t.tag, t.variant or ""))),
        tuple((key, inventory.file(key)) for key in order),
    )


def plan_remove(inventory: Inventory, targets: Sequence[str]) -> Plan:
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
        digest = _cached_digest(inventory, target)
        if digest is None:
            ref = Reference.parse(target)
            if ref.digest is not None:
                digest = _cached_digest(inventory, str(ref.digest))
            else:
                key = f"{ref.name}:{ref.tag}"
                group = next((g for g in inventory.groups if g.key == key), None)
                if group is None:
                    raise NotCached(f"{key} is not in the cache")
                tags += group.tags
                roots |= group.roots
                matched.append(key)
                continue
        if digest is None:
            raise NotCached(f"{target} is not in the cache")
        candidates: tuple[Key, Key] = (("manifest", digest), ("blob", digest))
        keys = {key for key in candidates if inventory.cached(key)}
        pointing = [tag for tag in inventory.tags if tag.digest == digest]
        tags += pointing
        roots |= keys
        forced |= keys
        dropped += [g for g in inventory.groups if g.kind != "image" and g.roots & keys]
        matched.append(digest)
    return _plan(inventory, matched, tags, roots, forced=frozenset(forced), dropped_groups=dropped)


def _cached_digest(inventory: Inventory, text: str) -> str | None:
    """The cached digest ``text`` names (whole, or its start), None if it is not a digest;
    :class:`NotCached` if no cached digest, or more than one, starts with it."""
    match = _DIGEST_PREFIX.fullmatch(text)
    if match is None:
        return None
    known = {t.digest for t in inventory.tags} | set(inventory.manifests) | set(inventory.blobs)
    found = {digest for digest in known if digest.startswith(text)}
    if len(found) > 1:
        raise NotCached(f"{text} is ambiguous: {len(found)} cached digests start with it")
    if not found:
        raise NotCached(f"{text} is not in the cache")
    return found.pop()


def plan_prune(
    inventory: Inventory,
    older_than: float,
    *,
    now: float | None = None,
    in_use: Callable[[Path], bool],
) -> Plan:
    """``prune``: every image and untagged entry last used more than ``older_than``
    seconds ago, except any with a file ``in_use`` (pinned by a reader of the proxy)."""
    cutoff = (time.time() if now is None else now) - older_than
    old = [
        group
        for group in inventory.groups
        if inventory.last_used(group) < cutoff
        and not any(in_use(inventory.file(key).path) for key in inventory.closure(group.roots))
    ]
    return _plan(
        inventory,
        [group.key for group in old],
        [tag for group in old for tag in group.tags],
        {key for group in old for key in group.roots},
        dropped_groups=old,
    )


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
