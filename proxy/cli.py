"""The ``detour`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy.settings import ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    path: Path | None = args.config
    return load_settings(path)


def _serve(args: argparse.Namespace) -> int:
    from proxy.app import run

    run(_settings(args))
    return 0


def _webhook(args: argparse.Namespace) -> int:
    from proxy.webhook import run_webhook

    run_webhook(_settings(args))
    return 0


def _resolve(args: argparse.Namespace) -> int:
    from proxy.rules import describe_resolution

    print(describe_resolution(_settings(args), args.image))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detour",
        description="A pull-through registry cache that redirects images to reachable mirrors.",
    )
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
    resolve = command("resolve", "Show where an image is fetched from, in order.")
    resolve.add_argument("image", help="an image reference, e.g. nats:2.10.26-alpine")
    resolve.set_defaults(func=_resolve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"detour: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bad image reference on the command line
        print(f"detour: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
