"""``detour cache ls``, ``rm`` and ``prune``: the command-line side of the cache inventory.

Each works on the files of a cache directory no proxy is serving (DIR, or the settings'
``cache.dir``), reading them with :func:`proxy.cache.inventory.scan` and removing through a
:class:`~proxy.cache.store.CacheStore` of its own; or, with ``--endpoint``, asks the running
proxy's loopback admin endpoints (:mod:`proxy.api.admin`), so that the proxy removes the files
itself and its size accounting stays right. Here are the arguments, the calls to the proxy, and
the tables and reports printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode
from urllib.request import ProxyHandler, Request, build_opener

from proxy.cache.inventory import ADMIN_PATH, Inventory, scan
from proxy.cache.removals import (
    NotCached,
    Plan,
    check_target,
    execute,
    parse_age,
    plan_prune,
    plan_remove,
)
from proxy.setting_types import split_host_port
from proxy.settings import Settings, load_settings
from proxy.tools.hosts import check_endpoint
from proxy.tools.humanize import counted, human_bytes

_SHORT_HEX = 12  # the digits of a digest ``ls`` shows


class BadArgument(Exception):
    """What the command line asked for can't be done as asked (exit 2): a bad image reference,
    digest, age, directory or endpoint. Raised only where such an argument is read, so that a
    ``ValueError`` from anywhere else, a bug, keeps its traceback."""


class EndpointError(Exception):
    """The running proxy could not be asked, or refused (the message says why; ``status``
    is its HTTP status, None if it did not answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _endpoint_url(endpoint: str) -> str:
    """``--endpoint``, checked as ``containerd-hosts`` checks it; one message for any fault."""
    try:
        return check_endpoint(endpoint)
    except ValueError:
        raise BadArgument(
            f"invalid endpoint {endpoint!r}: expected e.g. http://127.0.0.1:7439"
        ) from None


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
    """The cache directory: --dir (or DIR), or the settings' cache.dir."""
    if args.endpoint is not None and args.dir is not None:
        raise BadArgument("give --dir or --endpoint, not both")
    root: Path = args.dir if args.dir is not None else _settings(args).cache.dir
    if not ((root / "blobs").is_dir() or (root / "manifests").is_dir()):
        where = "" if args.dir is not None else " (cache.dir)"
        raise BadArgument(
            f"{root}{where} is not a cache directory (no blobs/ or manifests/); name one with "
            "--dir DIR, or ask the running proxy: --endpoint http://127.0.0.1:7439"
        )
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
        f"{counted(totals['images'], 'image')}, {totals['untagged']} untagged; "
        f"{counted(totals['manifests'], 'manifest')}, {counted(totals['blobs'], 'blob')}, "
        f"{human_bytes(totals['size'])} in {document['dir']}"
    )
    if document["uncached_tags"]:
        lines.append(
            f"and {counted(len(document['uncached_tags']), 'tag')} whose image was evicted: "
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


def format_result(outcome: dict[str, Any]) -> list[str]:
    """``rm``'s and ``prune``'s report: what was removed, freed, kept."""
    counts = Counter(entry["kind"] for entry in outcome["removed"])
    lines = [f"removed {target}" for target in outcome["targets"]]
    removed = ", ".join(counted(counts[kind], kind) for kind in ("tag", "manifest", "blob"))
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
            raise BadArgument(
                f"the Detour at {running} serves {root}: use --endpoint {running}, so that "
                "it removes the files itself and its size accounting stays right"
            )
    from proxy.cache.store import CacheStore

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


def _removing(target: str) -> Planner:
    return lambda inventory: plan_remove(inventory, [target])


def _rm(args: argparse.Namespace) -> int:
    targets: list[str] = args.target
    for target in targets:  # every typo, before anything is removed
        try:
            check_target(target)
        except ValueError as exc:  # the reference's NameInvalid, TagInvalid, DigestInvalid
            raise BadArgument(str(exc)) from None
    return _carry_out(
        args,
        [("DELETE", f"{ADMIN_PATH}/{quote(t, safe='/:@')}", _removing(t)) for t in targets],
    )


def _prune(args: argparse.Namespace) -> int:
    try:
        age = parse_age(args.older_than)
    except ValueError as exc:
        raise BadArgument(str(exc)) from None
    return _carry_out(
        args,
        [
            (
                "POST",
                f"{ADMIN_PATH}/prune?{urlencode({'older_than': args.older_than})}",
                lambda inventory: plan_prune(inventory, age, in_use=lambda _: False),
            )
        ],
    )


def add_dir_arguments(sub: argparse.ArgumentParser, *, positional: bool = True) -> None:
    """``--dir DIR``, the same in every ``detour cache`` command; where no other argument is
    positional, a bare ``DIR`` means the same (see :func:`take_dir`)."""
    sub.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the cache directory (default: cache.dir, from --config or the environment)",
    )
    if positional:
        sub.add_argument(
            "dir_arg", type=Path, nargs="?", default=None, metavar="DIR", help="same as --dir"
        )


def take_dir(args: argparse.Namespace) -> None:
    """Fold a bare DIR into ``args.dir``."""
    given = getattr(args, "dir_arg", None)
    if given is not None:
        if args.dir is not None:
            raise BadArgument("give DIR or --dir, not both")
        args.dir = given


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One line on stderr, no traceback: a bad argument exits 2; a proxy that can't be reached
    or refuses, 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            take_dir(args)
            return func(args)
        except EndpointError as exc:
            print(f"detour: {exc}", file=sys.stderr)
            return 1
        except BadArgument as exc:
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
        add_dir_arguments(sub, positional=name != "rm")
        return sub

    offline = (
        "Without --endpoint it works on the files of --dir DIR (default: cache.dir), for a "
        "cache no proxy is serving; while the proxy runs use --endpoint, so that the proxy "
        "removes the files itself and its size accounting stays right."
    )
    ls = command(
        "ls",
        "List the cached images by name:tag: digest, size, last use; then the totals.",
        "SIZE counts an image's manifests and the blobs of it in the cache; UNIQUE, the bytes "
        "no other image uses (what rm frees). Untagged entries are manifests no tag names "
        "(images pulled by digest) and blobs no manifest names. Without --endpoint it reads "
        "--dir DIR (default: cache.dir).",
    )
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
    prune.set_defaults(func=_guarded(_prune))
