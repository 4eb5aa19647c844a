"""How connections to registries are made: TLS per registry, and the client timeouts.

TLS is per host: ``registries.<host>.ca_file`` adds a PEM bundle to the system's trust store
for that registry's API host, ``tls_verify: false`` turns verification off for it. A redirect to
another host (object storage) or a token realm on another host is verified as usual, unless
that host has a ``registries`` entry of its own (see :class:`proxy.upstream.sender.Sender`).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Literal

import aiohttp
from yarl import URL

from proxy.reference import api_host
from proxy.settings import ConfigError, RegistrySettings
from proxy.upstream.transport import os_words, tls_words

# What aiohttp's per-request ``ssl`` takes: a context, or False for no verification.
TLS = ssl.SSLContext | Literal[False]


def host_key(url: URL) -> tuple[str, int]:
    """(host, port) with the scheme's default port filled in."""
    return url.host or "", url.port or 0


def api_key(registry: str, scheme: str = "https") -> tuple[str, int]:
    """The :func:`host_key` of a registry's API host."""
    return host_key(URL(f"{scheme}://{api_host(registry)}"))


def registry_tls(registries: Mapping[str, RegistrySettings]) -> dict[tuple[str, int], TLS]:
    """The TLS of each registry that sets ``ca_file`` or ``tls_verify``, by its API host and
    port. ``ca_file`` is added to the system's trust store, so a public certificate still
    verifies. Reads the files: call it off the event loop.

    Raises :class:`ConfigError` naming the key when a ``ca_file`` is not a readable PEM bundle.
    """
    contexts: dict[tuple[str, int], TLS] = {}
    for registry, conf in registries.items():
        key = api_key(registry)
        if not conf.tls_verify:
            contexts[key] = False
        elif conf.ca_file is not None:
            context = ssl.create_default_context()
            try:
                context.load_verify_locations(cafile=conf.ca_file)
            except (OSError, ssl.SSLError) as exc:
                words = tls_words(exc) if isinstance(exc, ssl.SSLError) else os_words(exc)
                raise ConfigError(
                    f"registries.{registry}.ca_file: cannot use {conf.ca_file} "
                    f"as a PEM certificate bundle: {words}"
                ) from None
            context.set_alpn_protocols(("http/1.1",))  # as aiohttp's own contexts
            contexts[key] = context
    return contexts


def client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    """No limit on a whole transfer (blobs are big); limits on connecting and on silence."""
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)
