"""The running proxy's cache, seen and managed: what ``detour cache ls|rm|prune --endpoint`` ask.

::

    GET    /_detour/cache                       the inventory (proxy.cache.inventory), the index's
                                                total; ?summary=1: only the directory and total
    DELETE /_detour/cache/<image or digest>     remove it (proxy.cache.removals.plan_remove)
    POST   /_detour/cache/prune?older_than=30d  remove what was not used for that long

Removals go through the proxy's own :class:`~proxy.cache.store.CacheStore`, one at a time, so its
index, and with it eviction and ``detour_cache_size_bytes``, stays right, and a file is never
taken from under a reader that has it pinned (see :meth:`CacheStore.remove`).

Only a client on the loopback address is answered; any other gets ``403 DENIED``. In a cluster
that is the proxy's own pod (``kubectl exec``): pulls through the node's hostPort reach the pod
from a node address (portmap masquerades them), and pods and peers from their own.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from aiohttp import web

from proxy.api.services import SERVICES
from proxy.cache.inventory import ADMIN_PATH, scan
from proxy.cache.removals import (
    NotCached,
    check_target,
    execute,
    parse_age,
    plan_prune,
    plan_remove,
)
from proxy.cache.store import CacheStore
from proxy.errors import AdminDenied, BadRequest, DetourError, ManifestUnknown
from proxy.logs import LOG, get_logger

log = get_logger("detour.admin")

ADMIN_LOCK = web.AppKey("admin_lock", asyncio.Lock)
# How long ``rm`` waits for a reader to finish with an entry it removes (a blob being sent);
# one still pinned then is left, and reported busy.
REMOVE_WAIT_SECONDS = 10.0


def from_loopback(remote: str | None) -> bool:
    """Whether a client address (``request.remote``) is a loopback one: 127.0.0.0/8, ::1, or
    127.x written as an IPv4-mapped IPv6 address (a dual-stack listener)."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _store(request: web.Request) -> CacheStore:
    if not from_loopback(request.remote):
        raise AdminDenied(
            "the cache admin endpoints answer only on the loopback address: run detour cache "
            "on the proxy's own machine (kubectl exec into its pod)"
        )
    return request.app[SERVICES].store


def _summary(store: CacheStore) -> dict[str, Any]:
    return {"cache_size": store.total, "max_size": store.max_size, "reserved": store.reserved}


async def listing(request: web.Request) -> web.Response:
    store = _store(request)
    if request.query.get("summary"):
        return web.json_response({"dir": str(store.root), "proxy": _summary(store)})
    document = await asyncio.to_thread(lambda: scan(store.root).document())
    document["proxy"] = _summary(store)
    return web.json_response(document)


async def remove(request: web.Request) -> web.Response:
    store = _store(request)
    target = request.match_info["target"]
    request[LOG]["target"] = target[:300]
    try:
        check_target(target)
    except DetourError:
        raise
    except ValueError as exc:
        raise BadRequest(str(exc), {"target": target[:300]}) from None
    async with request.app[ADMIN_LOCK]:
        inventory = await asyncio.to_thread(scan, store.root)
        try:
            plan = plan_remove(inventory, [target])
        except NotCached as exc:
            raise ManifestUnknown(str(exc), {"target": target[:300]}) from None
        outcome = await execute(store, plan, wait=REMOVE_WAIT_SECONDS)
    _log(outcome)
    return web.json_response(outcome)


async def prune(request: web.Request) -> web.Response:
    store = _store(request)
    text = request.query.get("older_than")
    if text is None:
        raise BadRequest("older_than is required, e.g. ?older_than=30d")
    try:
        age = parse_age(text)
    except ValueError as exc:
        raise BadRequest(str(exc), {"older_than": text[:100]}) from None
    async with request.app[ADMIN_LOCK]:
        inventory = await asyncio.to_thread(scan, store.root)
        plan = plan_prune(inventory, age, in_use=store.in_use)
        outcome = await execute(store, plan)
    _log(outcome)
    return web.json_response(outcome)


def _log(outcome: dict[str, Any]) -> None:
    log.info(
        "cache_removed",
        targets=outcome["targets"][:20],
        files=len(outcome["removed"]),
        freed=outcome["freed"],
        busy=len(outcome["busy"]),
        failed=len(outcome["failed"]),
    )


def add_admin_routes(app: web.Application) -> None:
    """Register the admin endpoints (from :func:`proxy.api.app.create_app`)."""
    app[ADMIN_LOCK] = asyncio.Lock()
    app.router.add_get(ADMIN_PATH, listing)
    app.router.add_post(f"{ADMIN_PATH}/prune", prune)
    app.router.add_delete(ADMIN_PATH + "/{target:.+}", remove)
