"""The body of one blob from its upstream, read whole even when the upstream drops mid-blob.

The first ``GET`` is answered with the blob; when the connection drops (or ends short of the
announced length), the body is resumed with a ``Range`` request from the byte reached, a
bounded number of times, so the fetch sees one unbroken stream. A peer (another Detour of the
site) that broke mid-stream is marked down, so the next fetches skip it a while; the peers that
sent any of the bytes are in :attr:`BlobBody.peers`, for the fetch to distrust if the digest
does not match. More bytes than announced, or, with no length announced, more than
``cache.max_blob_size``, end it.

When every upstream fails (no connection, silence, a 5xx: a WAN cut), the request is made again
after a back-off (0.5 s, doubling up to 5 s, with some jitter) for ``upstream.retry_for`` after
the failure, from the byte reached: a cut shorter than that costs the fetch a wait, and its
clients, and the site's nodes that asked this one, keep waiting on this one fetch.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

from proxy.errors import (
    BlobUnknown,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.lane import Chunk
from proxy.logs import get_logger
from proxy.memory import CHUNK_BYTES
from proxy.metrics import Metrics
from proxy.reference import Digest
from proxy.upstream.client import UpstreamClient
from proxy.upstream.response import UpstreamResponse
from proxy.upstream.rules import Route, Upstream

MAX_RESUMES = 3
FIRST_BACKOFF = 0.5  # seconds before the first retry when every upstream failed; doubling
MAX_BACKOFF = 5.0

log = get_logger("detour.blobs")


def blob_unknown(digest: Digest) -> BlobUnknown:
    return BlobUnknown("blob unknown to upstream", {"digest": str(digest)})


class BlobBody:
    """The upstream's answer to a blob ``GET``: :meth:`open` it, then read :meth:`chunks`."""

    def __init__(
        self,
        digest: Digest,
        route: Route,
        client_auth: str | None,
        upstream: UpstreamClient,
        max_unannounced: int,
        *,
        retry_for: float = 0.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.digest = digest
        self._route = route
        self._client_auth = client_auth
        self._upstream = upstream
        self._max_unannounced = max_unannounced
        self._retry_for = retry_for
        self._metrics = metrics
        self._response: UpstreamResponse | None = None
        self.size: int | None = None  # as announced
        self.where = ""  # the upstream that answered
        self.private = False  # fetched with the client's own credentials
        self.received = 0
        self.peers: list[Upstream] = []  # the peers that sent any of its bytes
        self.failing: UpstreamError | None = None  # while retrying: what the last try met

    async def open(self) -> None:
        """Ask for the blob; raise the upstream's refusal (404: BLOB_UNKNOWN)."""
        response = self._response = await self._request(0)
        self.size = response.response.content_length
        self.where = response.where
        self.private = response.private

    async def _request(self, offset: int) -> UpstreamResponse:
        """The blob from byte ``offset``, asked again with back-off while every upstream
        fails, for ``retry_for`` after the first failure."""
        failing_since: float | None = None
        backoff = FIRST_BACKOFF
        attempt = 0
        while True:
            try:
                response = await self._ask(offset)
            except (UpstreamTimeout, UpstreamUnreachable) as exc:
                self.failing = exc
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                left = failing_since + self._retry_for - now
                if left <= 0:
                    raise
                attempt += 1
                wait = min(left, backoff * random.uniform(0.8, 1.2))  # noqa: S311 (jitter)
                log.warning(
                    "blob_fetch_retry",
                    digest=str(self.digest),
                    offset=offset,
                    attempt=attempt,
                    after=round(wait, 2),
                    error=exc.message,
                )
                if self._metrics is not None:
                    self._metrics.fetch_retries.inc()
                await asyncio.sleep(wait)
                backoff = min(backoff * 2, MAX_BACKOFF)
            else:
                self.failing = None
                return response

    async def _ask(self, offset: int) -> UpstreamResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = await self._upstream.open(
            self._route,
            "GET",
            f"blobs/{self.digest}",
            headers=headers,
            client_auth=self._client_auth,
        )
        expected = 206 if offset else 200
        if response.status != expected:
            response.close()
            raise response.refusal(blob_unknown(self.digest))
        if offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            response.close()
            raise UpstreamInvalid("upstream cannot resume", {"upstream": response.where})
        if response.upstream.peer and response.upstream not in self.peers:
            self.peers.append(response.upstream)
        return response

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Every byte of the body, in chunks of at most ``CHUNK_BYTES``, resumed as needed."""
        response = self._response
        assert response is not None, "open() first"
        resumes = 0
        while True:
            try:
                async with response:
                    async for chunk in response.chunks(CHUNK_BYTES, self.received):
                        self._count(len(chunk))
                        yield chunk
            except UpstreamError as exc:
                # Dropped mid-blob: resume from the byte reached, a bounded number of times.
                if isinstance(exc, UpstreamInvalid) or resumes >= MAX_RESUMES:
                    raise
                resumes += 1
                if response.upstream.peer:  # an owner that broke mid-stream: skip it a while
                    self._upstream.mark_down(response.upstream)
                log.warning(
                    "blob_resume",
                    digest=str(self.digest),
                    offset=self.received,
                    attempt=resumes,
                    error=exc.message,
                )
                response = await self._request(self.received)
                continue
            if self.size is not None and self.received < self.size and resumes < MAX_RESUMES:
                resumes += 1
                response = await self._request(self.received)
                continue
            return

    def _count(self, count: int) -> None:
        """Count bytes received, refusing more than announced, or than the cache's largest
        blob when nothing was announced."""
        self.received += count
        if self.size is not None and self.received > self.size:
            raise UpstreamInvalid(
                "upstream sent more bytes than announced", {"upstream": self.where}
            )
        if self.size is None and self.received > self._max_unannounced:
            raise UpstreamInvalid(
                "upstream blob of no announced length is larger than "
                f"cache.max_blob_size ({self._max_unannounced} bytes)",
                {"upstream": self.where},
            )
