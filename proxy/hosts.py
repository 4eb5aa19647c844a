"""containerd mirror mode: ``hosts.toml`` files that send a registry's pulls to Detour first.

containerd (1.5 and later, with the CRI plugin's ``registry.config_path`` set to
``/etc/containerd/certs.d``) reads ``<config_path>/<registry>/hosts.toml`` on every pull of an
image from ``<registry>``. For each registry named by a redirect rule's ``src``, Detour writes::

    server = "https://registry-1.docker.io"

    [host."http://127.0.0.1:7439"]
      capabilities = ["pull", "resolve"]

containerd then asks the ``host`` (Detour) first, as
``/v2/library/nats/manifests/2.10?ns=docker.io`` (the proxy's mirror mode), and when resolving
there fails (connection refused, or any 4xx/5xx: seen with containerd 1.6.20) it falls back to
``server``, the registry's own API host. So a node whose proxy is not running yet still pulls,
straight from the origin. An ``http://`` endpoint means plain HTTP; there is no certificate to
verify, so no ``skip_verify`` is written.

:func:`hosts_files` and :func:`hosts_toml` are pure; :func:`write_hosts_files` writes each file
atomically (a temp file beside it, fsynced, then ``os.replace``), so containerd never reads half
a file, and leaves a file whose content is already right untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from proxy.files import write_atomic
from proxy.reference import api_host, canonical_registry
from proxy.settings import RedirectRule, RegistrySettings, Settings

HEADER = "# Written by `detour containerd-hosts`; edits are overwritten on the next run.\n"


@dataclass(frozen=True, slots=True)
class HostsFile:
    """One ``<registry>/hosts.toml``: the directory name and the file's text."""

    registry: str  # canonical host[:port]: the directory containerd looks in
    server: str
    endpoint: str
    text: str


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


def mirrored_registries(rules: Iterable[RedirectRule]) -> list[str]:
    """The registries named by the rules' ``src`` (their first component), sorted, once each."""
    return sorted({canonical_registry(rule.src.partition("/")[0]) for rule in rules})


def _toml_string(value: str) -> str:
    # A JSON string of ASCII text is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(value, ensure_ascii=True)


def hosts_toml(server: str, endpoint: str) -> str:
    """The text of one ``hosts.toml``: ``endpoint`` for pulls, then ``server``."""
    return (
        HEADER
        + f"server = {_toml_string(server)}\n"
        + "\n"
        + f"[host.{_toml_string(check_endpoint(endpoint))}]\n"
        + '  capabilities = ["pull", "resolve"]\n'
    )


def hosts_files(settings: Settings, endpoint: str) -> list[HostsFile]:
    """One file per registry a redirect rule's ``src`` names, sending it to ``endpoint``."""
    endpoint = check_endpoint(endpoint)
    files = []
    for registry in mirrored_registries(settings.redirects):
        server = origin_server(registry, settings.registries)
        files.append(HostsFile(registry, server, endpoint, hosts_toml(server, endpoint)))
    return files


def hosts_path(out_dir: Path, registry: str) -> Path:
    """``<out_dir>/<registry>/hosts.toml``, as containerd on Linux looks it up (``host:port``
    kept as is)."""
    return out_dir / registry / "hosts.toml"


def write_hosts_files(files: Sequence[HostsFile], out_dir: Path) -> list[tuple[Path, bool]]:
    """Write each file under ``out_dir``; returns ``(path, changed)`` for each, in order."""
    written = []
    for hosts in files:
        path = hosts_path(out_dir, hosts.registry)
        try:
            changed = path.read_text(encoding="utf-8") != hosts.text
        except (FileNotFoundError, UnicodeDecodeError):
            changed = True
        if changed:
            write_atomic(path, hosts.text.encode(), sync_dir=True)
        written.append((path, changed))
    return written
