"""Detour's exception tree.

Every error a request can meet is one of these; ``proxy.api.app``'s error middleware is the one
place that turns them into the OCI error body ``{"errors": [{"code", "message", "detail"}]}``::

    DetourError                      status  code
    ├── ClientError                  4xx     (the client asked for something wrong or absent)
    │   ├── NameInvalid              400     NAME_INVALID      also a ValueError
    │   ├── TagInvalid               400     TAG_INVALID       also a ValueError (a pull's
    │   │                                                       is MANIFEST_UNKNOWN)
    │   ├── DigestInvalid            400     DIGEST_INVALID    also a ValueError
    │   ├── PaginationNumberInvalid  400     PAGINATION_NUMBER_INVALID  (tags/list?n=abc)
    │   ├── NameUnknown              404     NAME_UNKNOWN
    │   ├── ManifestUnknown          404     MANIFEST_UNKNOWN
    │   ├── BlobUnknown              404     BLOB_UNKNOWN
    │   ├── ManifestUnsupported      406     UNSUPPORTED       (schema1: no verifiable form)
    │   ├── Unsupported              405     UNSUPPORTED       (push and delete methods)
    │   ├── NotFound                 404     UNSUPPORTED       (no such endpoint)
    │   ├── BadRequest               4xx     UNSUPPORTED       (HTTP the parser refused)
    │   ├── UpstreamDenied           401/403 as the upstream said, challenge relayed
    │   ├── RegistryDenied           403     DENIED            (a registry or address the
    │   │                                                       operator did not allow)
    │   └── AdminDenied              403     DENIED            (cache admin, not from loopback)
    ├── NotHeld                      504     UNAVAILABLE       (a peer's only-if-cached: not here)
    └── UpstreamError                5xx     (the upstream failed us; never the client's fault)
        ├── UpstreamUnreachable      502     UNAVAILABLE       (dns, refused, tls, connect, ...)
        ├── UpstreamTimeout          504     UNAVAILABLE       (timeout)
        ├── UpstreamRateLimited      429     TOOMANYREQUESTS   (the only upstream said 429)
        └── UpstreamInvalid          502     UNAVAILABLE       (wrong digest, oversize, bad reply)

An :class:`UpstreamError` carries a ``cause``, one short stable word for what failed (the words
are listed in :mod:`proxy.upstream.transport`), and a ``reason``, the failure in words without host
names.
When every upstream of a request failed, the detail lists each one tried: ``{"name", "attempts":
[{"upstream", "cause", "error"[, "host"][, "status"]}, ...]}``.

Reference parsing raises the three ``*Invalid`` errors, which are ``ValueError`` too, so that
code outside the proxy (the webhook, the CLI) can treat them as plain bad values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class DetourError(Exception):
    status: int = 500
    code: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        detail: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})


class ClientError(DetourError):
    status = 400


class NameInvalid(ClientError, ValueError):
    code = "NAME_INVALID"


class TagInvalid(ClientError, ValueError):
    code = "TAG_INVALID"


class DigestInvalid(ClientError, ValueError):
    code = "DIGEST_INVALID"


class PaginationNumberInvalid(ClientError):
    """``tags/list?n=`` that is not a whole number; distribution's own code for it."""

    code = "PAGINATION_NUMBER_INVALID"


class NameUnknown(ClientError):
    status = 404
    code = "NAME_UNKNOWN"


class ManifestUnknown(ClientError):
    status = 404
    code = "MANIFEST_UNKNOWN"


class BlobUnknown(ClientError):
    status = 404
    code = "BLOB_UNKNOWN"


class ManifestUnsupported(ClientError):
    """The upstream has the manifest only in a form Detour does not serve (schema1)."""

    status = 406
    code = "UNSUPPORTED"


class Unsupported(ClientError):
    status = 405
    code = "UNSUPPORTED"


class NotFound(ClientError):
    status = 404
    code = "UNSUPPORTED"


class BadRequest(ClientError):
    """A request aiohttp's HTTP parser refused (oversize headers, a bad request line)."""

    code = "UNSUPPORTED"

    def __init__(self, message: str, detail: Any = None, *, status: int = 400) -> None:
        super().__init__(message, detail)
        self.status = status


class UpstreamDenied(ClientError):
    """The upstream refused us (401, 403); its status and challenge go to the client."""

    def __init__(
        self,
        status: int,
        message: str,
        detail: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, detail, headers=headers)
        self.status = status
        self.code = "UNAUTHORIZED" if status == 401 else "DENIED"


class RegistryDenied(ClientError):
    """The client named a registry, or a loop back through this Detour, that the operator's
    settings do not let Detour contact; the message says which setting would."""

    status = 403
    code = "DENIED"


class AdminDenied(ClientError):
    """A cache admin request (``/_detour/cache``) from anywhere but the loopback address."""

    status = 403
    code = "DENIED"


class NotHeld(DetourError):
    """A peer asked only for what this instance holds (``Cache-Control: only-if-cached``, the
    site offline) and it holds none of it: RFC 9111's 504, so the peer asks the next one."""

    status = 504
    code = "UNAVAILABLE"


class TooBusy(DetourError):
    """Detour serves ``max_client_connections`` already: the client is to come back."""

    status = 503
    code = "UNAVAILABLE"


class UpstreamError(DetourError):
    status = 502
    code = "UNAVAILABLE"
    cause = "invalid"

    def __init__(
        self,
        message: str,
        detail: Any = None,
        *,
        cause: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, detail)
        if cause is not None:
            self.cause = cause
        self.reason = reason or message


class UpstreamUnreachable(UpstreamError):
    status = 502
    cause = "connect"


class UpstreamTimeout(UpstreamError):
    status = 504
    cause = "timeout"


class UpstreamRateLimited(UpstreamError):
    """The upstream is limiting our rate: a failure of the upstream, not the client's (a tag
    is served stale meanwhile), whose 429 is relayed so the client backs off."""

    status = 429
    code = "TOOMANYREQUESTS"
    cause = "http"


class UpstreamInvalid(UpstreamError):
    status = 502


def oci_error_body(error: DetourError) -> dict[str, Any]:
    """The OCI distribution error body for ``error``."""
    entry: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        entry["detail"] = error.detail
    return {"errors": [entry]}
