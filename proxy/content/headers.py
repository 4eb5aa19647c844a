"""The response headers of a blob answer: a HEAD, a cold GET streamed as it is fetched, a hit
sent whole or by ``Range``. Written once here, so every way a blob goes out says the same."""

from __future__ import annotations

from proxy.reference import Digest

BLOB_CONTENT_TYPE = "application/octet-stream"


def blob_headers(digest: Digest, size: int | None) -> dict[str, str]:
    """The headers of every blob answer: HEAD, a cold GET, a hit. Every blob takes a Range
    (a cold one once its fetch is verified), so each says so."""
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": BLOB_CONTENT_TYPE,
        "Accept-Ranges": "bytes",
    }
    if size is not None:
        headers["Content-Length"] = str(size)
    return headers


def range_headers(digest: Digest, size: int, first: int, end: int) -> dict[str, str]:
    """A 206's headers: bytes ``[first, end)`` of a blob of ``size`` bytes."""
    headers = blob_headers(digest, end - first)
    headers["Content-Range"] = f"bytes {first}-{end - 1}/{size}"
    return headers


def unsatisfiable_headers(size: int) -> dict[str, str]:
    """A 416's headers: the Range asked for is not within the blob's ``size`` bytes."""
    return {"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"}
