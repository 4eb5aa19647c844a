"""What an operator reads when an upstream fails, from the transport vocabulary alone: each
aiohttp failure becomes one cause word, a status (502, or 504 for a timeout) and words that
never carry the URL or its host; the error for a request no upstream could serve says what each
one did. End-to-end versions of some of these, against real servers, are in
tests/test_upstream_errors.py."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import (
    DetourError,
    UpstreamDenied,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.upstream.egress import AddressRefused
from proxy.upstream.transport import Attempts, transport_errors
from tests.conftest import ReadLogs

# A signed object-storage URL: its host and query must never reach an error's words.
SIGNED = URL("https://bucket.storage.example/blob?X-Amz-Signature=s3cr3t")
KEY = aiohttp.client_reqrep.ConnectionKey(
    "bucket.storage.example", 443, True, True, None, None, None
)


def _untrusted() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(
        1,
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
        "unable to get local issuer certificate (_ssl.c:1006)",
    )
    error.verify_message = "unable to get local issuer certificate"
    return error


def _bad_status_line() -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(SIGNED, "GET", CIMultiDictProxy(CIMultiDict()), SIGNED)
    return aiohttp.ClientResponseError(info, (), message="Expected HTTP/, RTSP/ or ICE/")


# (what aiohttp raised, cause, the words, the message naming the registry, status)
CASES: list[tuple[Exception, str, str, str, int]] = [
    (
        aiohttp.ConnectionTimeoutError(),
        "timeout",
        "timed out connecting",
        "quay.io timed out connecting",
        504,
    ),
    (
        aiohttp.SocketTimeoutError(),
        "timeout",
        "timed out waiting for data",
        "quay.io timed out waiting for data",
        504,
    ),
    (
        aiohttp.ClientConnectorDNSError(KEY, OSError(-2, "Name or service not known")),
        "dns",
        "Name or service not known",
        "cannot resolve quay.io: Name or service not known",
        502,
    ),
    (
        aiohttp.ClientConnectorCertificateError(KEY, _untrusted()),
        "tls",
        "certificate verify failed: unable to get local issuer certificate",
        "TLS handshake with quay.io failed: certificate verify failed: "
        "unable to get local issuer certificate",
        502,
    ),
    (
        aiohttp.ClientConnectorSSLError(
            KEY, ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
        ),
        "tls",
        "wrong version number (plain HTTP? then set registries.quay.io.insecure: true)",
        "TLS handshake with quay.io failed: wrong version number "
        "(plain HTTP? then set registries.quay.io.insecure: true)",
        502,
    ),
    (
        aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connection refused")),
        "refused",
        "connection refused",
        "quay.io refused the connection",
        502,
    ),
    (
        aiohttp.ClientConnectorError(KEY, OSError(113, "No route to host")),
        "connect",
        "No route to host",
        "cannot connect to quay.io: No route to host",
        502,
    ),
    (
        aiohttp.ServerDisconnectedError(),
        "disconnected",
        "the server closed the connection",
        "quay.io dropped the connection: the server closed the connection",
        502,
    ),
    (
        aiohttp.ClientPayloadError("Response payload is not completed"),
        "disconnected",
        "the response body was cut short",
        "quay.io dropped the connection: the response body was cut short",
        502,
    ),
    (
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        "disconnected",
        "Connection reset by peer",
        "quay.io dropped the connection: Connection reset by peer",
        502,
    ),
    (
        _bad_status_line(),
        "protocol",
        "invalid HTTP response: Expected HTTP/, RTSP/ or ICE/",
        "bad reply from quay.io: invalid HTTP response: Expected HTTP/, RTSP/ or ICE/",
        502,
    ),
    (
        aiohttp.InvalidURL(SIGNED),
        "protocol",
        "invalid URL",
        "bad reply from quay.io: invalid URL",
        502,
    ),
]


@pytest.mark.parametrize(("raised", "cause", "words", "message", "status"), CASES)
def test_each_transport_failure_has_one_cause_and_words_without_the_url(
    raised: Exception, cause: str, words: str, message: str, status: int
) -> None:
    with pytest.raises(UpstreamError) as caught, transport_errors("quay.io"):
        raise raised
    error = caught.value
    assert (error.cause, error.reason, error.message, error.status) == (
        cause,
        words,
        message,
        status,
    )
    assert error.detail == {"upstream": "quay.io", "cause": cause, "error": words}
    assert "storage.example" not in error.reason
    assert "s3cr3t" not in str(error.detail)
    assert error.__cause__ is raised  # the original stays on the traceback, for debugging


def test_a_failure_elsewhere_than_the_registry_names_that_host() -> None:
    with (
        pytest.raises(UpstreamUnreachable) as caught,
        transport_errors("quay.io", "bucket.storage.example"),
    ):
        raise aiohttp.ClientConnectorError(KEY, OSError(113, "No route to host"))
    assert caught.value.message == "cannot connect to bucket.storage.example: No route to host"
    assert caught.value.detail["host"] == "bucket.storage.example"
    assert caught.value.reason == "No route to host"


def test_an_address_the_egress_policy_refused_is_not_a_transport_failure() -> None:
    refused = AddressRefused("metadata.internal", 80, ["169.254.169.254"])
    with pytest.raises(AddressRefused) as caught, transport_errors("quay.io"):
        raise aiohttp.ClientConnectorError(KEY, refused)
    assert caught.value is refused


def _timeout(registry: str) -> UpstreamTimeout:
    with pytest.raises(UpstreamTimeout) as caught, transport_errors(registry):
        raise aiohttp.ConnectionTimeoutError()
    return caught.value


def _error(tried: Attempts) -> dict[str, Any]:
    error = tried.error()
    return {
        "type": type(error).__name__,
        "status": error.status,
        "message": error.message,
        "causes": [attempt["cause"] for attempt in error.detail["attempts"]],
    }


def _one_timeout(tried: Attempts) -> None:
    tried.failed("quay.io", _timeout("quay.io"))


def _two_timeouts(tried: Attempts) -> None:
    tried.failed("mirror.example", _timeout("mirror.example"))
    tried.failed("quay.io", _timeout("quay.io"))


def _named_503(tried: Attempts) -> None:
    tried.overloaded("quay.io", 503, "Service Unavailable", named=True)


def _unnamed_503(tried: Attempts) -> None:
    tried.overloaded("quay.io", 503, "Service Unavailable", named=False)


def _rate_limited(tried: Attempts) -> None:
    tried.overloaded("quay.io", 429, "Too Many Requests", named=True)


def _timeout_then_503(tried: Attempts) -> None:
    tried.failed("mirror.example", _timeout("mirror.example"))
    tried.overloaded("quay.io", 503, "Service Unavailable", named=True)


def _down(tried: Attempts) -> None:
    tried.skipped("quay.io", 30.0)


def _peer_refused(tried: Attempts) -> None:
    tried.refused_by_peer("10.0.0.7:5000", 403)


# (what happened to each upstream, the error the client gets, the causes in its detail)
OUTCOMES = [
    (_one_timeout, "UpstreamTimeout", 504, "quay.io timed out connecting", ["timeout"]),
    (_two_timeouts, "UpstreamTimeout", 504, "every upstream timed out", ["timeout"] * 2),
    (_named_503, "UpstreamUnreachable", 502, "quay.io answered 503 Service Unavailable", ["http"]),
    (_unnamed_503, "UpstreamUnreachable", 502, "quay.io answered 5xx", ["http"]),
    (_rate_limited, "UpstreamRateLimited", 429, "upstream rate limit reached", ["http"]),
    (
        _timeout_then_503,
        "UpstreamUnreachable",
        502,
        "no upstream could serve the request",
        ["timeout", "http"],
    ),
    (_down, "UpstreamUnreachable", 502, "quay.io failed less than 30s ago; not tried", ["down"]),
    (_peer_refused, "UpstreamUnreachable", 502, "10.0.0.7:5000 peer answered 403", ["http"]),
]


@pytest.mark.parametrize(("happened", "kind", "status", "message", "causes"), OUTCOMES)
def test_the_error_when_no_upstream_could_serve_says_what_each_did(
    happened: Any, kind: str, status: int, message: str, causes: list[str]
) -> None:
    tried = Attempts("quay.io/library/alpine")
    happened(tried)
    assert _error(tried) == {"type": kind, "status": status, "message": message, "causes": causes}


def test_every_upstream_tried_is_listed_with_its_cause() -> None:
    tried = Attempts("quay.io/library/alpine")
    tried.skipped("mirror.example", 30.0)
    tried.overloaded("quay.io", 503, "Service Unavailable", named=True)
    tried.overloaded("ghcr.io", 500, "Internal Server Error", named=False)
    tried.refused_by_peer("10.0.0.7:5000", 403)
    error: DetourError = tried.error()
    assert error.detail == {
        "name": "quay.io/library/alpine",
        "attempts": [
            {
                "upstream": "mirror.example",
                "cause": "down",
                "error": "failed less than 30s ago; not tried",
            },
            {
                "upstream": "quay.io",
                "cause": "http",
                "error": "answered 503 Service Unavailable",
                "status": 503,
            },
            {"upstream": "ghcr.io", "cause": "http", "error": "answered 5xx"},
            {
                "upstream": "10.0.0.7:5000",
                "cause": "http",
                "error": "peer answered 403",
                "status": 403,
            },
        ],
    }
    assert not isinstance(error, UpstreamDenied)


def test_each_failure_is_logged_once_and_a_skipped_upstream_not_at_all(logs: ReadLogs) -> None:
    tried = Attempts("quay.io/library/alpine")
    tried.skipped("mirror.example", 30.0)
    tried.failed("quay.io", _timeout("quay.io"))
    lines = [line for line in logs() if line["event"] == "upstream_attempt_failed"]
    assert [(line["level"], line["name"], line["upstream"], line["cause"]) for line in lines] == [
        ("warning", "quay.io/library/alpine", "quay.io", "timeout")
    ]
