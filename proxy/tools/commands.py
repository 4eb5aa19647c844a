"""What each ``detour`` command does, once :mod:`proxy.tools.cli` has parsed its arguments:
one function per command, taking the parsed arguments and returning the exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.errors import DigestInvalid, NameInvalid, TagInvalid
from proxy.settings import Settings, load_settings, unknown_environment
from proxy.tools.cache_commands import BadArgument, take_dir

if TYPE_CHECKING:
    from proxy.reference import Reference

# Reference parsing's errors: a bad image reference on the command line.
BAD_REFERENCE = (NameInvalid, TagInvalid, DigestInvalid)


def print_error(message: str) -> None:
    """Each line of ``message`` on stderr, as ``detour: ...``."""
    for line in message.splitlines() or [""]:
        print(f"detour: {line}", file=sys.stderr)


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings from ``--config`` and the environment, after a warning for each
    ``DETOUR_*`` variable that sets nothing (a misspelt one is otherwise silently ignored)."""
    for problem in unknown_environment(os.environ):
        print_error(f"warning: {problem}")
    path: Path | None = args.config
    return load_settings(path)


def serve_command(args: argparse.Namespace) -> int:
    from proxy.api.app import run

    run(settings_from(args))
    return 0


def webhook_command(args: argparse.Namespace) -> int:
    from proxy.webhook import run_webhook

    run_webhook(settings_from(args))
    return 0


def resolve_command(args: argparse.Namespace) -> int:
    from proxy.reference import ImageName, Reference
    from proxy.upstream.rules import describe_resolution
    from proxy.webhook import rewrite_image

    settings = settings_from(args)
    prefix = settings.webhook.prefix
    image: str = args.image
    try:
        reference = Reference.parse(image)
        if image.startswith(prefix + "/"):  # as the webhook wrote it: read it as the proxy will
            name = ImageName.from_path(reference.name.repository)
            reference = Reference(name, reference.tag, reference.digest)
            image = str(reference)
    except BAD_REFERENCE as exc:
        print_error(f"invalid image reference {args.image!r}: {exc}")
        return 2
    print(describe_resolution(settings, image, owners=owners_of(settings, reference)))
    try:
        print(f"path:   {rewrite_image(image, prefix)}")
    except BAD_REFERENCE:  # the rewritten form is no reference: an IPv6 registry literal
        print("path:   (none: an IPv6 registry can't be spelled in path mode)")
    return 0


def owners_of(settings: Settings, reference: Reference) -> list[str] | str | None:
    """With ``cluster.peers``, the peers from the owner of ``reference``'s tag (or manifest
    digest) down; a ``dns:`` set is resolved here, once, and if it does not resolve, a note
    saying so. None without peers."""
    import asyncio

    from proxy.cluster.peering import Peering, manifest_key, rendezvous, tag_key
    from proxy.logs import configure_logging
    from proxy.metrics import Metrics

    spec = settings.cluster.peers
    if not spec:
        return None
    peers: Sequence[str] = spec if isinstance(spec, list) else []
    if isinstance(spec, str):
        configure_logging("error", stream="stderr")  # stdout is the answer
        peering = Peering(settings.cluster, Metrics())
        with contextlib.suppress(TimeoutError):
            asyncio.run(asyncio.wait_for(peering.refresh(), timeout=10))
        if not peering.peers:
            return f"({spec} not resolved here)"
        peers = peering.peers
    if reference.digest is not None:
        key = manifest_key(reference.digest)
    else:
        key = tag_key(reference.name, reference.tag or "latest")
    return rendezvous(peers, key)


def containerd_hosts_command(args: argparse.Namespace) -> int:
    from proxy.tools.hosts import (
        Mode,
        check_endpoint,
        hosts_files,
        remove_hosts_files,
        write_hosts_files,
    )

    out: Path = args.out
    if args.remove:
        try:
            removed = remove_hosts_files(out)
        except OSError as exc:
            print_error(f"cannot remove from {out}: {exc}")
            return 1
        for outcome in removed:
            print(f"{outcome.action} {outcome.path}")
        if not removed:
            print(f"detour: nothing of Detour's in {out}", file=sys.stderr)
        return 0
    try:
        endpoint = check_endpoint(args.endpoint)
    except ValueError as exc:
        print_error(str(exc))
        return 2
    settings = settings_from(args)
    files = hosts_files(settings, endpoint)
    if not files:
        where = args.config or "the settings"
        print_error(
            f"{where}: no redirect rules and no registries, so no registry for containerd to "
            "send to Detour: no hosts.toml written"
        )
        return 1
    mode = Mode.APPEND if args.append else Mode.OVERWRITE if args.overwrite else Mode.KEEP
    try:
        outcomes = write_hosts_files(files, out, mode)
    except OSError as exc:
        print_error(f"cannot write into {out}: {exc}")
        return 1
    kept = 0
    for hosts, outcome in zip(files, outcomes, strict=True):
        if outcome.action == "kept":
            kept += 1
            print_error(
                f"kept {outcome.path}: {outcome.reason}; --append adds Detour to it, "
                "--overwrite replaces it"
            )
        else:
            print(
                f"{outcome.action} {outcome.path}: {hosts.registry} -> {hosts.endpoint}, "
                f"then {hosts.server}"
            )
    return 1 if kept else 0


def registries_conf_command(args: argparse.Namespace) -> int:
    from proxy.files import write_atomic
    from proxy.tools.registries_conf import registries_conf

    settings = settings_from(args)
    try:
        text = registries_conf(settings, args.endpoint)
    except ValueError as exc:
        print_error(str(exc))
        return 2
    if args.out is None:
        print(text, end="")
        return 0
    try:
        write_atomic(args.out, text.encode(), mode=0o644, sync_dir=True)
    except OSError as exc:
        print_error(f"cannot write {args.out}: {exc}")
        return 1
    print(f"wrote {args.out}")
    return 0


def webhook_certs_command(args: argparse.Namespace) -> int:
    from proxy.webhook.certs import generate, write

    try:
        # It refuses a namespace or service that is not a DNS label before making any key.
        certs = generate(args.namespace, args.service, days=args.days, ips=args.ip)
    except ValueError as exc:
        print_error(str(exc))
        return 2
    try:
        paths = write(certs, args.out)
    except OSError as exc:
        print(f"detour: cannot write into {args.out}: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    print(f"the serving certificate expires {certs.not_after:%Y-%m-%d}", file=sys.stderr)
    print(certs.ca_bundle)
    return 0


def warm_command(args: argparse.Namespace) -> int:
    """0 when every image was warmed, 1 when any failed (the others are still warmed), 2 for a
    bad reference, platform or endpoint (every one is checked before anything starts)."""
    import asyncio

    from proxy.logs import configure_logging
    from proxy.reference import Reference
    from proxy.tools.hosts import check_endpoint
    from proxy.tools.platforms import Platform
    from proxy.tools.warm import Failed, Warmed, WarmResult, warm

    for image in args.image:
        try:
            Reference.parse(image)
        except BAD_REFERENCE as exc:
            print_error(f"invalid image reference {image!r}: {exc}")
            return 2
    wanted = None
    if args.platform is not None:
        try:
            wanted = Platform.parse(args.platform)
        except ValueError as exc:
            print_error(str(exc))
            return 2
    if args.endpoint is not None:
        try:
            check_endpoint(args.endpoint)
        except ValueError:
            print_error(f"invalid endpoint {args.endpoint!r}: expected e.g. http://127.0.0.1:7439")
            return 2
    settings = settings_from(args)
    if args.endpoint is None:
        configure_logging("warning", stream="stderr")  # stdout: one line per image

    def report(outcome: WarmResult) -> None:
        stream = sys.stdout if isinstance(outcome, Warmed) else sys.stderr
        print(outcome.line(), file=stream, flush=True)

    try:
        outcomes = asyncio.run(
            warm(
                args.image,
                settings,
                endpoint=args.endpoint,
                platform=wanted,
                all_platforms=args.all_platforms,
                report=report,
            )
        )
    except KeyboardInterrupt:
        print_error("warm interrupted")
        return 130
    warmed = sum(outcome.bytes for outcome in outcomes if isinstance(outcome, Warmed))
    warn_evicted(warmed, settings if args.endpoint is None else None)
    failed = sum(isinstance(outcome, Failed) for outcome in outcomes)
    if failed:
        print_error(f"{failed} of {len(outcomes)} images not warmed")
        return 1
    return 0


def warn_evicted(warmed: int, settings: Settings | None) -> None:
    """Warn when Detour, started here from ``settings``, warmed more than its cache keeps."""
    from proxy.tools.humanize import human_bytes

    limit = settings.cache.max_size if settings is not None else None
    if limit is not None and warmed > limit:
        print_error(
            f"warning: warmed {human_bytes(warmed)} but cache.max_size is "
            f"{human_bytes(limit)}: the least recently used blobs, maybe some warmed here, "
            "were evicted"
        )


def cache_verify_command(args: argparse.Namespace) -> int:
    from proxy.cache.check import verify_cache

    try:
        take_dir(args)
    except BadArgument as exc:
        print(f"detour: {exc}", file=sys.stderr)
        return 2
    if args.dir is None:
        print("detour: cache verify: name the cache directory: --dir DIR", file=sys.stderr)
        return 2
    root: Path = args.dir
    if not ((root / "blobs").is_dir() or (root / "manifests").is_dir()):
        print(f"detour: {root} is not a cache directory (no blobs/ or manifests/)", file=sys.stderr)
        return 2
    check = verify_cache(root, threads=args.threads)
    for entry in check.bad:
        action = "dropped" if entry.deleted else "bad"
        print(f"{action} {entry.path.relative_to(root)}: {entry.reason}")
    summary = f"checked {check.blobs} blobs, {check.manifests} manifests; dropped {check.dropped}"
    if len(check.bad) > check.dropped:
        summary += f"; could not delete {len(check.bad) - check.dropped}"
    if check.leftovers:
        summary += f"; removed {len(check.leftovers)} leftover temp files"
    print(summary)
    return 1 if check.bad else 0


def peer_secret_command(_: argparse.Namespace) -> int:
    from proxy.upstream.peer_auth import new_secret

    print(new_secret())
    return 0
