"""The ``detour`` command: its arguments, parsed, and the run of the one command they name
(:mod:`proxy.tools.commands`), whose errors are printed as ``detour: ...`` lines."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.settings import ConfigError
from proxy.tools.cache_commands import add_cache_commands, add_dir_arguments
from proxy.tools.commands import (
    BAD_REFERENCE,
    cache_verify_command,
    containerd_hosts_command,
    peer_secret_command,
    print_error,
    registries_conf_command,
    resolve_command,
    serve_command,
    warm_command,
    webhook_certs_command,
    webhook_command,
)


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

    command("serve", "Run the caching proxy.").set_defaults(func=serve_command)
    command("webhook", "Run the mutating admission webhook.").set_defaults(func=webhook_command)
    resolve = command(
        "resolve",
        "Show where an image is fetched from, in order, and how path mode spells it.",
    )
    resolve.add_argument(
        "image",
        help="an image reference, e.g. nats:2.10.26-alpine, or one the webhook rewrote",
    )
    resolve.set_defaults(func=resolve_command)
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
    hosts.set_defaults(func=containerd_hosts_command)
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
    conf.set_defaults(func=registries_conf_command)
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
    certs.set_defaults(func=webhook_certs_command)
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
    warm.set_defaults(func=warm_command)
    commands.add_parser(
        "peer-secret",
        help="Print a new secret for the peers of a site (cluster.secret_dir).",
        description="Print 32 random bytes in hex: the content of cluster.secret_dir's file "
        "'current' (or 'accepted', while rotating), e.g. kubectl -n detour create secret "
        "generic detour-peer-secret --from-literal=current=$(detour peer-secret).",
    ).set_defaults(func=peer_secret_command)
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
    verify.set_defaults(func=cache_verify_command)
    add_cache_commands(cache_commands)  # ls, rm, prune (proxy.tools.cache_commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. A configuration or start-up error, or a bad image
    reference, is printed as ``detour: ...`` lines (no traceback) and exits 2."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print_error(str(exc))
        return 2
    except BAD_REFERENCE as exc:  # an image reference on the command line
        print_error(str(exc))
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
