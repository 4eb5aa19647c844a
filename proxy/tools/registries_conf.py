"""CRI-O and podman mirror mode: a ``registries.conf`` drop-in that sends pulls to Detour.

CRI-O, podman, buildah and skopeo resolve images with containers/image, which reads
``/etc/containers/registries.conf`` and then every file of ``registries.conf.d/`` (a later
``[[registry]]`` with the same ``prefix`` replaces an earlier one). A ``[[registry.mirror]]``
is tried before the registry's own ``location``. containers/image has no ``?ns=``, but a
mirror's location may carry a path, so the mirror is Detour's path mode: for each registry the
settings name as an origin (:func:`proxy.tools.hosts.mirrored_registries`, as for containerd),
``detour registries-conf`` writes::

    [[registry]]
    prefix = "docker.io"
    location = "docker.io"

    [[registry.mirror]]
    location = "127.0.0.1:7439/docker.io"
    insecure = true

and ``docker.io/library/nats:2.10`` is then asked of Detour as
``/v2/docker.io/library/nats/manifests/2.10``. When Detour can't answer (not running yet, or
an error), containers/image goes on to ``location``, the registry itself. ``insecure`` is
plain HTTP, for an ``http://`` endpoint (and for an origin the settings mark ``insecure``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from proxy.reference import encode_port
from proxy.settings import Settings
from proxy.tools.hosts import check_endpoint, mirrored_registries

MARKER = "# Written by `detour registries-conf`"
HEADER = f"{MARKER}: each registry's pulls go to Detour first (path mode), then to the registry.\n"


def _string(value: str) -> str:
    # TOML basic string; registry names and host:port never need escapes beyond these.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def registries_conf(settings: Settings, endpoint: str) -> str:
    """The drop-in's text: one ``[[registry]]`` with Detour as its mirror per registry.
    Raises :class:`ValueError` for an endpoint that is not ``http(s)://host[:port]``."""
    parts = urlsplit(check_endpoint(endpoint))
    insecure_proxy = parts.scheme == "http"
    blocks = [HEADER]
    for registry in mirrored_registries(settings):
        if registry.startswith("["):
            continue  # an IPv6 literal can't be spelled in path mode
        own = settings.registries.get(registry)
        lines = [
            "[[registry]]",
            f"prefix = {_string(registry)}",
            f"location = {_string(registry)}",
        ]
        if own is not None and own.insecure:
            lines.append("insecure = true")
        lines += [
            "",
            "[[registry.mirror]]",
            f"location = {_string(f'{parts.netloc}/{encode_port(registry)}')}",
        ]
        if insecure_proxy:
            lines.append("insecure = true")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
