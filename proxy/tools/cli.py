"""The ``detour`` command."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.errors import DigestInvalid, NameInvalid, TagInvalid
from proxy.settings import ConfigError, Settings, load_settings, unknown_environment
from proxy.tools.cache_commands import BadArgument, add_cache_commands, add_dir_arguments, take_dir

if TYPE_CHECKING:
    from proxy.reference import Reference

# Reference parsing's errors: a bad image reference on the command line.
_BAD_REFERENCE = (NameInvalid, TagInvalid, DigestInvalid)


def _error(message: str) -> None:
    """Each line of ``message`` on stderr, as ``detour: ...``."""
    for line in message.splitlines() or [""]:
        print(f"detour: {line}", file=sys.stderr)


def _settings(args: argparse.Namespace) -> Settings:
    """The settings from ``--config`` and the environment, after a warning for each
    ``DETOUR_*`` variable that sets nothing (a misspelt one is otherwise silently ignored)."""
    for problem in unknown_environment(os.environ):
        _error(f"warning: {problem}")
    path: Path | None = args.config
    return load_settings(path)


def _serve(args: argparse.Namespace) -> int:
    from proxy.api.app import run

    run(_settings(args))
    return 0


def _webhook(args: argparse.Namespace) -> int:
    from proxy.webhook import run_webhook

    run_webhook(_settings(args))
    return 0


def _resolve(args: argparse.Namespace) -> int:
    from proxy.reference import ImageName, Reference
    from proxy.upstream.rules import describe_resolution
    from proxy.webhook import rewrite_image

    settings = _settings(args)
    prefix = settings.webhook.prefix
    image: str = args.image
    try:
        reference = Reference.parse(image)
        if image.startswith(prefix + "/"):  # as the webhook wrote it: read it as the proxy will
            name = ImageName.from_path(reference.name.repository)
            reference = Reference(name, reference.tag, reference.digest)
            image = str(reference)
    except _BAD_REFERENCE as exc:
        _error(f"invalid image reference {args.image!r}: {exc}")
        return 2
    print(describe_resolution(settings, image, owners=_owners(settings, reference)))
    try:
        print(f"path:   {rewrite_image(image, prefix)}")
    except _BAD_REFERENCE:  # the rewritten form is no reference: an IPv6 registry literal
        print("path:   (none: an IPv6 registry can't be spelled in path mode)")
    return 0


def _owners(settings: Settings, reference: Reference) -> list[str] | str | None:
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


def _containerd_hosts(args: argparse.Namespace) -> int:
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
            _error(f"cannot remove from {out}: {exc}")
            return 1
        for outcome in removed:
            print(f"{outcome.action} {outcome.path}")
        if not removed:
            print(f"detour: nothing of Detour's in {out}", file=sys.stderr)
        return 0
    try:
        endpoint = check_endpoint(args.endpoint)
    except ValueError as exc:
        _error(str(exc))
        return 2
    settings = _settings(args)
    files = hosts_files(settings, endpoint)
    if not files:
        where = args.config or "the settings"
        _error(
            f"{where}: no redirect rules and no registries, so no registry for containerd to "
            "send to Detour: no hosts.toml written"
        )
        return 1
    mode = Mode.APPEND if args.append else Mode.OVERWRITE if args.overwrite else Mode.KEEP
    try:
        outcomes = write_hosts_files(files, out, mode)
    except OSError as exc:
        _error(f"cannot write into {out}: {exc}")
        return 1
    kept = 0
    for hosts, outcome in zip(files, outcomes, strict=True):
        if outcome.action == "kept":
            kept += 1
            _error(
                f"kept {outcome.path}: {outcome.reason}; --append adds Detour to it, "
                "--overwrite replaces it"
            )
        else:
            print(
                f"{outcome.action} {outcome.path}: {hosts.registry} -> {hosts.endpoint}, "
                f"then {hosts.server}"
            )
    return 1 if kept else 0


def _registries_conf(args: argparse.Namespace) -> int:
    from proxy.files import write_atomic
    from proxy.tools.registries_conf import registries_conf

    settings = _settings(args)
    try:
        text = registries_conf(settings, args.endpoint)
    except ValueError as exc:
        _error(str(exc))
        return 2
    if args.out is None:
        print(text, end="")
        return 0
    try:
        write_atomic(args.out, text.encode(), mode=0o644, sync_dir=True)
    except OSError as exc:
        _error(f"cannot write {args.out}: {exc}")
        return 1
    print(f"wrote {args.out}")
    return 0


def _webhook_certs(args: argparse.Namespace) -> int:
    from proxy.webhook.certs import generate, write

    try:
        # It refuses a namespace or service that is not a DNS label before making any key.
        certs = generate(args.namespace, args.service, days=args.days, ips=args.ip)
    except ValueError as exc:
        _error(str(exc))
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


def _warm(args: argparse.Namespace) -> int:
    """0 when every image was warmed, 1 when any failed (the others are still warmed), 2 for a
    bad reference, platform or endpoint (every one is checked before anything starts)."""
    import asyncio

    from proxy.logs import configure_logging
    from proxy.reference import Reference
    from proxy.tools.hosts import check_endpoint
    from proxy.tools.platforms import Platform
    from proxy.tools.warm import Failed, Outcome, Warmed, warm

    for image in args.image:
        try:
            Reference.parse(image)
        except _BAD_REFERENCE as exc:
            _error(f"invalid image reference {image!r}: {exc}")
            return 2
    wanted = None
    if args.platform is not None:
        try:
            wanted = Platform.parse(args.platform)
        except ValueError as exc:
            _error(str(exc))
            return 2
    if args.endpoint is not None:
        try:
            check_endpoint(args.endpoint)
        except ValueError:
            _error(f"invalid endpoint {args.endpoint!r}: expected e.g. http://127.0.0.1:7439")
            return 2
    settings = _settings(args)
    if args.endpoint is None:
        configure_logging("warning", stream="stderr")  # stdout: one line per image

    def report(outcome: Outcome) -> None:
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
        _error("warm interrupted")
        return 130
    warmed = sum(outcome.bytes for outcome in outcomes if isinstance(outcome, Warmed))
    _warn_evicted(warmed, settings if args.endpoint is None else None)
    failed = sum(isinstance(outcome, Failed) for outcome in outcomes)
    if failed:
        _error(f"{failed} of {len(outcomes)} images not warmed")
        return 1
    return 0


def _warn_evicted(warmed: int, settings: Settings | None) -> None:
    """Warn when Detour, started here from ``settings``, warmed more than its cache keeps."""
    from proxy.tools.humanize import human_bytes

    limit = settings.cache.max_size if settings is not None else None
    if limit is not None and warmed > limit:
        _error(
            f"warning: warmed {human_bytes(warmed)} but cache.max_size is "
            f"{human_bytes(limit)}: the least recently used blobs, maybe some warmed here, "
            "were evicted"
        )


def _cache_verify(args: argparse.Namespace) -> int:
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


def _peer_secret(_: argparse.Namespace) -> int:
    from proxy.upstream.peer_auth import new_secret

    print(new_secret())
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detour",
        description="A pull-through registry cache that redirects images to reachable mirrors.",
    )
    parser.add_argument("--version", action="version", version=f"detour {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--config",
            "-c",
            type=Path,
            default=None,
            help="YAML settings file (DETOUR_* overrides)",
        )
        return sub

    command("serve", "Run the caching proxy.").set_defaults(func=_serve)
    command("webhook", "Run the mutating admission webhook.").set_defaults(func=_webhook)
    resolve = command(
        "resolve",
        "Show where an image is fetched from, in order, and how path mode spells it.",
    )
    resolve.add_argument(
        "image",
        help="an image reference, e.g. nats:2.10.26-alpine, or one the webhook rewrote",
    )
    resolve.set_defaults(func=_resolve)
    hosts = command(
        "containerd-hosts",
        "Write containerd hosts.toml files sending each registry a rule's src or registries "
        "names to the proxy, then to the registry itself.",
    )
    hosts.add_argument(
        "--endpoint",
        default="http://127.0.0.1:7439",
        help="the proxy as containerd reaches it (default: %(default)s)",
    )
    hosts.add_argument(
        "--out",
        type=Path,
        required=True,
        help="containerd's registry config_path, e.g. /etc/containerd/certs.d",
    )
    existing = hosts.add_mutually_exclusive_group()
    existing.add_argument(
        "--append",
        action="store_true",
        help="add the proxy as the first host of a hosts.toml that Detour did not write, "
        "keeping its server and hosts (default: keep such a file as it is, and exit 1)",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a hosts.toml that Detour did not write",
    )
    existing.add_argument(
        "--remove",
        action="store_true",
        help="delete every hosts.toml under --out that Detour wrote and take out what "
        "--append added, whatever the settings name now (for uninstalling)",
    )
    hosts.set_defaults(func=_containerd_hosts)
    conf = command(
        "registries-conf",
        "Write a registries.conf drop-in (CRI-O, podman) sending each registry a rule's src "
        "or registries names to the proxy, then to the registry itself.",
    )
    conf.add_argument(
        "--endpoint",
        default="http://127.0.0.1:7439",
        help="the proxy as the node reaches it (default: %(default)s)",
    )
    conf.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the file to write, e.g. /etc/containers/registries.conf.d/50-detour.conf "
        "(default: standard output)",
    )
    conf.set_defaults(func=_registries_conf)
    certs = commands.add_parser(
        "webhook-certs",
        help="Make a CA and a serving certificate for the webhook; print the caBundle.",
        description="Write ca.crt, tls.crt and tls.key for the webhook's Service into --out "
        "and print the base64 caBundle for the MutatingWebhookConfiguration.",
    )
    certs.add_argument("--namespace", default="detour", help="default: %(default)s")
    certs.add_argument("--service", default="detour-webhook", help="default: %(default)s")
    certs.add_argument("--out", type=Path, required=True, help="directory to write into")
    certs.add_argument(
        "--days", type=int, default=365, help="serving certificate lifetime (default: %(default)s)"
    )
    certs.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="also valid for this IP address (repeatable), for a webhook the API server reaches "
        "by clientConfig.url at an address, e.g. --ip 127.0.0.1",
    )
    certs.set_defaults(func=_webhook_certs)
    warm = command(
        "warm",
        "Fill the cache with images, through the same rules, e.g. before an edge site is cut off.",
    )
    warm.add_argument(
        "--endpoint",
        default=None,
        metavar="URL",
        help="warm through this running proxy, e.g. http://127.0.0.1:7439 (default: start "
        "Detour in-process from --config; don't do that beside a running proxy)",
    )
    which = warm.add_mutually_exclusive_group()
    which.add_argument(
        "--platform",
        default=None,
        metavar="OS/ARCH[/VARIANT]",
        help="the platform to take from a multi-arch index (default: this machine's)",
    )
    which.add_argument(
        "--all-platforms", action="store_true", help="take every platform of an index"
    )
    warm.add_argument(
        "image", nargs="+", metavar="IMAGE", help="image references, e.g. nats:2.10.26-alpine"
    )
    warm.set_defaults(func=_warm)
    commands.add_parser(
        "peer-secret",
        help="Print a new secret for the peers of a site (cluster.secret_dir).",
        description="Print 32 random bytes in hex: the content of cluster.secret_dir's file "
        "'current' (or 'accepted', while rotating), e.g. kubectl -n detour create secret "
        "generic detour-peer-secret --from-literal=current=$(detour peer-secret).",
    ).set_defaults(func=_peer_secret)
    cache = commands.add_parser(
        "cache",
        help="Look after the cache: list, remove, prune, verify.",
        description="Look after the cache: list, remove, prune, verify.",
    )
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    verify = cache_commands.add_parser(
        "verify",
        help="Check every blob and manifest against its digest; delete what is wrong.",
        description="Hash every blob and manifest under DIR (cache.dir) against the digest it "
        "is named for, delete each that does not match, and temp files left by an interrupted "
        "run. Safe while the proxy runs: what it deletes is a miss there, fetched again. "
        "Exit 0 if all was good, 1 if anything was dropped, 2 for a bad argument.",
    )
    add_dir_arguments(verify)  # --dir DIR, or DIR, as in ls, rm and prune
    verify.add_argument(
        "--threads",
        type=_positive,
        default=4,
        help="files hashed at once (default: %(default)s)",
    )
    verify.set_defaults(func=_cache_verify)
    add_cache_commands(cache_commands)  # ls, rm, prune (proxy.tools.cache_commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. A configuration or start-up error, or a bad image
    reference, is printed as ``detour: ...`` lines (no traceback) and exits 2."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        _error(str(exc))
        return 2
    except _BAD_REFERENCE as exc:  # an image reference on the command line
        _error(str(exc))
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
