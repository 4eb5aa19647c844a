"""What failed on the way to an upstream: transport exceptions in the proxy's own words.

Transport exceptions are translated here into :mod:`proxy.errors` types, at this boundary:
nothing from aiohttp's client reaches the handlers. Each carries a ``cause``, one word that says
what failed; every upstream tried is listed in the error's detail with its cause
(:class:`Attempts`), and each failed attempt is logged once, as a warning
(``upstream_attempt_failed``)::

    dns           the host name does not resolve
    refused       nothing listens on the port
    tls           TLS handshake failed: untrusted certificate, wrong host name, not TLS at all
    connect       any other failure to connect (no route to host, network unreachable)
    timeout       no connection within connect_timeout, or silence longer than read_timeout
    hung          a peer silent for cluster.read_timeout that did not answer a probe either
                  (proxy.upstream.liveness)
    disconnected  the connection dropped before the answer was complete
    protocol      the answer was not HTTP that aiohttp could read
    http          the upstream answered 5xx or 429 (the entry has its ``status``)
    down          not tried: it failed less than failover.DOWN_SECONDS ago (a registry, only with
                  ``fallback``), or cluster.down_seconds (a peer)

The words of a failure (an error's ``reason``, an attempt's ``error``) never name a URL: a signed
object-storage URL carries credentials in its query.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, NotRequired, TypedDict, cast

import aiohttp

from proxy.errors import (
    DetourError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.logs import get_logger
from proxy.upstream.egress import AddressRefused

log = get_logger("detour.upstream")

Cause = Literal[
    "dns",
    "refused",
    "tls",
    "connect",
    "timeout",
    "hung",
    "disconnected",
    "protocol",
    "http",
    "down",
]
# What OpenSSL says when the other end answers a TLS handshake in plain HTTP.
_PLAIN_HTTP = ("wrong version number", "packet length too long", "record layer failure")
# OpenSSL's "[SSL: CODE] " before its words and " (_ssl.c:1006)" after them.
_SSL_NOISE = re.compile(r"^\[[A-Za-z0-9_]+: [A-Za-z0-9_]+\]\s*|\s*\(_ssl\.c:\d+\)$")


class Attempt(TypedDict):
    """One upstream tried, in the ``attempts`` of an error's detail."""

    upstream: str  # the registry, as in settings' ``registries`` keys
    cause: Cause
    error: str  # what failed, in words: "certificate verify failed: unable to get ..."
    host: NotRequired[str]  # where, when not the registry itself: a redirect, a token realm
    status: NotRequired[int]  # cause "http": the upstream's status


def tls_words(error: OSError) -> str:
    """A TLS failure in words, without OpenSSL's codes and source line."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    text = str(error.strerror or error)
    return _SSL_NOISE.sub("", text) or type(error).__name__


def os_words(error: OSError) -> str:
    """An operating system's error in words: its message, or its type when it has none."""
    return str(error.strerror or error) or type(error).__name__


def _explain(exc: Exception) -> tuple[Cause, str]:
    """The cause of a transport exception, and what failed in words. Never the URL: a signed
    object-storage URL carries credentials in its query."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timeout", "timed out connecting"
    if isinstance(exc, TimeoutError):  # aiohttp's SocketTimeoutError too
        return "timeout", "timed out waiting for data"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns", os_words(exc.os_error)
    if isinstance(exc, aiohttp.ClientSSLError):
        return "tls", tls_words(exc.os_error)
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "refused", "connection refused"
        return "connect", os_words(exc.os_error)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected", "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "disconnected", "the response body was cut short"
    if isinstance(exc, aiohttp.ClientOSError):
        return "disconnected", os_words(exc)
    if isinstance(exc, aiohttp.ClientResponseError):
        return "protocol", f"invalid HTTP response: {exc.message[:200]}"
    if isinstance(exc, aiohttp.InvalidURL):
        return "protocol", "invalid URL"
    return "protocol", type(exc).__name__


_MESSAGES: dict[Cause, str] = {
    "dns": "cannot resolve {host}: {error}",
    "refused": "{host} refused the connection",
    "tls": "TLS handshake with {host} failed: {error}",
    "connect": "cannot connect to {host}: {error}",
    "timeout": "{host} {error}",
    "disconnected": "{host} dropped the connection: {error}",
    "protocol": "bad reply from {host}: {error}",
}


@contextmanager
def transport_errors(what: str, host: str | None = None) -> Iterator[None]:
    """Turn aiohttp client and timeout exceptions into :class:`UpstreamError` types.

    ``what`` is the upstream (a registry, or registry/repository) and ``host`` the host actually
    contacted, when it is not the upstream's own.
    """
    try:
        yield
    except (TimeoutError, aiohttp.ClientError) as exc:
        refused = getattr(exc, "os_error", None)
        if isinstance(refused, AddressRefused):
            raise refused from None  # the egress policy said no: see proxy.upstream.sender
        cause, error = _explain(exc)
        if cause == "tls" and error in _PLAIN_HTTP:
            registry = (host or what).split("/")[0]
            error += f" (plain HTTP? then set registries.{registry}.insecure: true)"
        detail: dict[str, str] = {"upstream": what, "cause": cause, "error": error}
        if host is not None:
            detail["host"] = host
        message = _MESSAGES.get(cause, "{host}: {error}").format(host=host or what, error=error)
        kind = UpstreamTimeout if cause == "timeout" else UpstreamUnreachable
        raise kind(message, detail, cause=cause, reason=error) from exc


@dataclass
class Attempts:
    """The upstreams one request tried and how each failed: each failure is logged as it
    happens, and all of them are listed in the error raised when none could serve."""

    name: str  # the name asked for (the route's), in the log lines and the error's detail
    entries: list[Attempt] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    timed_out: bool = False
    last_status: int | None = None

    def skipped(self, registry: str, down_seconds: float) -> None:
        """Not tried: it failed less than ``down_seconds`` ago. Not logged again."""
        error = f"failed less than {down_seconds:.0f}s ago; not tried"
        self.entries.append({"upstream": registry, "cause": "down", "error": error})
        self.messages.append(f"{registry} {error}")

    def failed(self, registry: str, exc: UpstreamError) -> None:
        """A transport failure (see :func:`transport_errors`)."""
        self.timed_out = self.timed_out or isinstance(exc, UpstreamTimeout)
        attempt: Attempt = {
            "upstream": registry,
            "cause": cast(Cause, exc.cause),
            "error": exc.reason,
        }
        if isinstance(exc.detail, dict) and isinstance(exc.detail.get("host"), str):
            attempt["host"] = exc.detail["host"]
        self._add(attempt, exc.message)

    def refused_by_peer(self, registry: str, status: int) -> None:
        """A peer answered a 4xx other than "unknown"."""
        self._answered(registry, f"peer answered {status}", status)

    def overloaded(self, registry: str, status: int, reason: str | None, *, named: bool) -> None:
        """A 5xx or a 429. Only a registry the operator ``named`` has its status and reason
        passed on."""
        self.last_status = status
        answered = (
            f"answered {status} {(reason or '')[:100]}".rstrip()
            if named
            else f"answered {status // 100}xx"
        )
        self._answered(registry, answered, status if named else None)

    def _answered(self, registry: str, error: str, status: int | None) -> None:
        attempt: Attempt = {"upstream": registry, "cause": "http", "error": error}
        if status is not None:
            attempt["status"] = status
        self._add(attempt, f"{registry} {error}")

    def _add(self, attempt: Attempt, message: str) -> None:
        log.warning("upstream_attempt_failed", name=self.name, **attempt)
        self.entries.append(attempt)
        self.messages.append(message)

    def error(self) -> DetourError:
        """The error for a request no upstream could serve: with one upstream, its own words
        and cause; with several, each is in the detail."""
        detail = {"name": self.name, "attempts": self.entries}
        if self.last_status == 429 and len(self.entries) == 1:
            return UpstreamRateLimited("upstream rate limit reached", detail, cause="http")
        single = len(self.entries) == 1
        message = self.messages[0] if single else "no upstream could serve the request"
        cause = self.entries[0]["cause"] if single else None
        if self.timed_out and self.last_status is None:
            if not single and all(a["cause"] == "timeout" for a in self.entries):
                message = "every upstream timed out"
            return UpstreamTimeout(message, detail, cause=cause)
        return UpstreamUnreachable(message, detail, cause=cause)
