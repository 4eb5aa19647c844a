"""containerd mirror mode: ``hosts.toml`` files that send a registry's pulls to Detour first.

containerd (1.5 and later, with the CRI plugin's ``registry.config_path`` set to
``/etc/containerd/certs.d``) reads ``<config_path>/<registry>/hosts.toml`` on every pull of an
image from ``<registry>``. For each registry the settings name as an origin, Detour writes::

    # Written by `detour containerd-hosts`; ...
    server = "https://registry-1.docker.io"

    [host."http://127.0.0.1:7439"]
      capabilities = ["pull", "resolve"]

containerd then asks the ``host`` (Detour) first, as
``/v2/library/nats/manifests/2.10?ns=docker.io`` (the proxy's mirror mode), and when resolving
there fails (connection refused, or any 4xx/5xx: seen with containerd 1.6.20) it falls back to
``server``, the registry's own API host. So a node whose proxy is not running yet still pulls,
straight from the origin. An ``http://`` endpoint means plain HTTP; there is no certificate to
verify, so no ``skip_verify`` is written.

The registries are those a redirect rule's ``src`` names and the keys of ``registries``, except
a registry named only as a rule's ``to``: that is one of Detour's own upstreams (a mirror), and
a node that pulls from it by name asked for that mirror, not for a redirect (see
:func:`mirrored_registries`).

A ``hosts.toml`` that Detour did not write (its first line is not :data:`MARKER`) is the node's
own, and :func:`write_hosts_files` keeps it unless told otherwise: :attr:`Mode.OVERWRITE`
replaces it, :attr:`Mode.APPEND` adds Detour to it as the first ``host`` between two marker
comments, keeping its ``server`` and hosts (as Spegel's ``appendMirrors``).
:func:`remove_hosts_files` undoes both: it deletes the files Detour wrote and takes its block
out of the files it appended to.

:func:`hosts_files`, :func:`hosts_toml`, :func:`append_host` and :func:`strip_host` are pure;
the writers write each file atomically (a temp file beside it, fsynced, then ``os.replace``),
so containerd never reads half a file, and leave a file whose content is already right
untouched.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from proxy.files import write_atomic
from proxy.reference import api_host, canonical_registry
from proxy.settings import RegistrySettings, Settings

# The first line of every file Detour writes whole; what tells it its own files from the node's.
MARKER = "# Written by `detour containerd-hosts`"
HEADER = f"{MARKER}; edits are overwritten on the next run, `--remove` deletes it.\n"
# Around what --append adds to a file that is not Detour's.
APPEND_BEGIN = "# Added by `detour containerd-hosts --append`; `--remove` takes it out again."
APPEND_END = "# End of what `detour containerd-hosts --append` added."
_TABLE = re.compile(r"^\s*\[")

Action = Literal["wrote", "unchanged", "kept", "replaced", "appended", "removed", "restored"]


class Mode(enum.Enum):
    """What to do with a ``hosts.toml`` that Detour did not write."""

    KEEP = "keep"
    OVERWRITE = "overwrite"
    APPEND = "append"


@dataclass(frozen=True, slots=True)
class HostsFile:
    """One ``<registry>/hosts.toml``: the directory name and the file's text."""

    registry: str  # canonical host[:port]: the directory containerd looks in
    server: str
    endpoint: str
    text: str


@dataclass(frozen=True, slots=True)
class FileResult:
    """What became of one ``hosts.toml``; ``reason`` says why a file was kept."""

    path: Path
    action: Action
    reason: str = ""


def check_endpoint(endpoint: str) -> str:
    """``http(s)://host[:port]``, without a path: where containerd reaches Detour.

    Raises :class:`ValueError` for anything else (containerd would silently mis-route a path).
    """
    text = endpoint.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"endpoint {endpoint!r}: expected http://host:port or https://host:port")
    if not parts.netloc or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(
            f"endpoint {endpoint!r}: expected a scheme and host[:port] only, such as "
            "http://127.0.0.1:7439"
        )
    try:
        _ = parts.port  # a non-numeric or out-of-range port raises here
    except ValueError:
        raise ValueError(f"endpoint {endpoint!r}: invalid port") from None
    return text


def origin_server(registry: str, registries: Mapping[str, RegistrySettings] | None = None) -> str:
    """The URL of ``registry``'s own API: ``https://registry-1.docker.io`` for Docker Hub,
    ``http://`` for a registry the settings mark ``insecure``."""
    conf = (registries or {}).get(registry)
    scheme = "http" if conf is not None and conf.insecure else "https"
    return f"{scheme}://{api_host(registry)}"


def mirrored_registries(settings: Settings) -> list[str]:
    """The registries whose pulls go to Detour, sorted, once each: every registry a rule's
    ``src`` names, and every key of ``registries`` that no rule names as a ``to`` only.

    A ``registries`` entry says how to reach a registry (plain HTTP, credentials, a CA): for an
    origin, that is the operator naming a registry Detour should cache (a private one, with the
    site's credentials). For a rule's ``to`` it is how Detour reaches its own upstream, the
    mirror: an image a node names by the mirror's host was asked of that mirror, and the
    settings say nothing about sending it anywhere else."""
    sources = {canonical_registry(rule.src.partition("/")[0]) for rule in settings.redirects}
    targets = {
        canonical_registry(target.partition("/")[0])
        for rule in settings.redirects
        for target in rule.to
    }
    return sorted(sources | (set(settings.registries) - targets))


def _toml_string(value: str) -> str:
    # A JSON string of ASCII text is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(value, ensure_ascii=True)


def _host_table(endpoint: str) -> str:
    return f"[host.{_toml_string(check_endpoint(endpoint))}]\n" + (
        '  capabilities = ["pull", "resolve"]\n'
    )


def hosts_toml(server: str, endpoint: str) -> str:
    """The text of one ``hosts.toml``: ``endpoint`` for pulls, then ``server``."""
    return HEADER + f"server = {_toml_string(server)}\n" + "\n" + _host_table(endpoint)


def hosts_files(settings: Settings, endpoint: str) -> list[HostsFile]:
    """One file per registry of :func:`mirrored_registries`, sending it to ``endpoint``."""
    endpoint = check_endpoint(endpoint)
    files = []
    for registry in mirrored_registries(settings):
        server = origin_server(registry, settings.registries)
        files.append(HostsFile(registry, server, endpoint, hosts_toml(server, endpoint)))
    return files


def hosts_path(out_dir: Path, registry: str) -> Path:
    """``<out_dir>/<registry>/hosts.toml``, as containerd on Linux looks it up (``host:port``
    kept as is)."""
    return out_dir / registry / "hosts.toml"


def is_detours(text: str) -> bool:
    """Whether Detour wrote this whole file (its first line is :data:`MARKER`)."""
    return text.startswith(MARKER)


def strip_host(text: str) -> str:
    """``text`` without what :func:`append_host` added (unchanged if it added nothing)."""
    lines = text.splitlines(keepends=True)
    begin = next((i for i, line in enumerate(lines) if line.startswith(APPEND_BEGIN)), None)
    if begin is None:
        return text
    end = next((i for i in range(begin, len(lines)) if lines[i].startswith(APPEND_END)), None)
    if end is None:
        return text  # the end marker was edited away: what to take out is not known
    del lines[begin : end + 1]
    # The blank line that separated the block: after it, or before it at the end of the file.
    if begin < len(lines) and not lines[begin].strip():
        del lines[begin]
    elif begin == len(lines) and begin > 0 and not lines[begin - 1].strip():
        del lines[begin - 1]
    return "".join(lines)


def _without_host(parsed: dict[str, Any], endpoint: str) -> dict[str, Any]:
    hosts = {k: v for k, v in parsed.get("host", {}).items() if k != endpoint}
    rest = {k: v for k, v in parsed.items() if k != "host"}
    return {**rest, "host": hosts} if hosts else rest


def append_host(text: str, endpoint: str) -> str:
    """``text`` (a ``hosts.toml`` that is not Detour's) with ``endpoint`` as its first host,
    between :data:`APPEND_BEGIN` and :data:`APPEND_END`; its ``server`` and hosts stay as they
    are. A block from an earlier run is replaced. Raises :class:`ValueError` when the file is
    not TOML, or when the host can't be added as a table that leaves the rest as it was (hosts
    written as an inline table)."""
    endpoint = check_endpoint(endpoint)
    base = strip_host(text)
    try:
        before = tomllib.loads(base)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    hosts = before.get("host", {})
    if isinstance(hosts, dict) and endpoint in hosts:
        return base  # the node's own file already sends pulls to this endpoint
    if base and not base.endswith("\n"):
        base += "\n"
    block = f"{APPEND_BEGIN}\n{_host_table(endpoint)}{APPEND_END}\n"
    lines = base.splitlines(keepends=True)
    # containerd tries hosts in the order of the file: Detour's goes before the first table.
    first = next((i for i, line in enumerate(lines) if _TABLE.match(line)), None)
    while first and lines[first - 1].lstrip().startswith("#"):
        first -= 1  # above the comment that goes with that table
    if first is None:
        new = base + ("\n" if base.strip() else "") + block
    else:
        new = "".join([*lines[:first], block, "\n", *lines[first:]])
    try:
        after = tomllib.loads(new)
    except tomllib.TOMLDecodeError:
        after = {}
    ordered = list(after.get("host", {})) if isinstance(after.get("host"), dict) else []
    if not ordered or ordered[0] != endpoint or _without_host(after, endpoint) != before:
        raise ValueError("Detour's host can't be added to it as a table of its own")
    return new


def _read(path: Path) -> str | None:
    try:
        # Bytes that are not UTF-8 come back as they were when the text is written again.
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return None


def _rewrite(path: Path, text: str) -> None:
    """Replace a file of the node's, keeping its permissions."""
    data = text.encode("utf-8", errors="surrogateescape")
    write_atomic(path, data, mode=path.stat().st_mode & 0o7777, sync_dir=True)


def write_hosts_files(
    files: Sequence[HostsFile], out_dir: Path, mode: Mode = Mode.KEEP
) -> list[FileResult]:
    """Write each file under ``out_dir``, in order. A file that Detour did not write is
    ``kept`` (:attr:`Mode.KEEP`), ``replaced`` or ``appended`` to; if it can't be appended to,
    it is kept, with the reason."""
    outcomes = []
    for hosts in files:
        path = hosts_path(out_dir, hosts.registry)
        existing = _read(path)
        outcome: FileResult
        if existing == hosts.text:
            outcome = FileResult(path, "unchanged")
        elif existing is None or is_detours(existing):
            write_atomic(path, hosts.text.encode(), sync_dir=True)
            outcome = FileResult(path, "wrote")
        elif mode is Mode.OVERWRITE:
            write_atomic(path, hosts.text.encode(), sync_dir=True)
            outcome = FileResult(path, "replaced")
        elif mode is Mode.APPEND:
            try:
                new = append_host(existing, hosts.endpoint)
            except ValueError as exc:
                outcome = FileResult(path, "kept", f"cannot add Detour to it: {exc}")
            else:
                if new == existing:
                    outcome = FileResult(path, "unchanged")
                else:
                    _rewrite(path, new)
                    outcome = FileResult(path, "appended")
        else:
            outcome = FileResult(path, "kept", "not written by Detour")
        outcomes.append(outcome)
    return outcomes


def _hosts_toml_files(out_dir: Path) -> Iterator[Path]:
    if out_dir.is_dir():
        yield from sorted(out_dir.glob("*/hosts.toml"))


def remove_hosts_files(out_dir: Path) -> list[FileResult]:
    """Undo :func:`write_hosts_files` for every registry under ``out_dir``, whatever the
    settings name now: delete each file Detour wrote (and its directory, if that is left empty)
    and take Detour's block out of each file it appended to. Other files are not touched."""
    outcomes = []
    for path in _hosts_toml_files(out_dir):
        text = _read(path)
        if text is None:
            continue
        if is_detours(text):
            path.unlink()
            with contextlib.suppress(OSError):  # other files (certificates) beside it
                path.parent.rmdir()
            outcomes.append(FileResult(path, "removed"))
            continue
        restored = strip_host(text)
        if restored != text:
            _rewrite(path, restored)
            outcomes.append(FileResult(path, "restored"))
    return outcomes
