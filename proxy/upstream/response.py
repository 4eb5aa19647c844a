"""An open response from one upstream, as the handlers read it.

Its body is read through :func:`proxy.upstream.transport.transport_errors`, so a connection that
drops mid-body is an upstream error like any other, and whole reads are capped: a body longer
than the caller's limit is refused without reading more than one byte past it. A peer's body
is waited for as long as the peer answers probes (:mod:`proxy.upstream.liveness`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp

from proxy.bodies import read_capped
from proxy.errors import DetourError, UpstreamDenied, UpstreamInvalid
from proxy.lane import Chunk
from proxy.upstream.liveness import PeerWatch
from proxy.upstream.rules import Upstream
from proxy.upstream.socket_body import SocketReads, read_on
from proxy.upstream.transport import transport_errors


@dataclass
class UpstreamResponse:
    """An open response from one upstream. Close it (``async with``) when done."""

    upstream: Upstream
    response: aiohttp.ClientResponse
    private: bool  # fetched with the client's own credentials: never cache
    socket_reads: SocketReads | None = None  # for a fast blob body (see chunks)
    body: bytes | None = None  # the whole body, when it was read (and checked) already
    watch: PeerWatch | None = None  # a peer's: its silences judged by probes

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self.response.headers

    @property
    def where(self) -> str:
        return f"{self.upstream.registry}/{self.upstream.repository}"

    async def read(self, limit: int, what: str = "response") -> bytes:
        """The whole body, read to its end (a body over a real link arrives in many reads),
        refusing one longer than ``limit`` without reading more than ``limit + 1`` bytes."""
        if self.body is not None:
            if len(self.body) > limit:
                raise self._too_large(what, limit)
            return self.body
        length = self.response.content_length
        if length is not None and length > limit:
            raise self._too_large(what, limit)
        with transport_errors(self.where):
            reading = read_capped(self.response.content, limit)
            if self.watch is not None:
                body = await self.watch.patiently(self.upstream.registry, reading)
            else:
                body = await reading
        if body is None:
            raise self._too_large(what, limit)
        if length is not None and len(body) != length:
            raise UpstreamInvalid(
                f"upstream {what} was cut short",
                {"upstream": self.where, "expected": length, "received": len(body)},
            )
        return body

    def _too_large(self, what: str, limit: int) -> UpstreamInvalid:
        return UpstreamInvalid(
            f"upstream {what} is larger than Detour's limit of {limit} bytes",
            {"upstream": self.where, "limit": limit},
        )

    async def chunks(self, read_size: int, offset: int = 0) -> AsyncIterator[Chunk]:
        """The body (byte ``offset`` on of a blob) as it arrives, read from the socket up to
        ``read_size`` bytes at a time, each piece passed on as the connection delivered it
        (not joined or split: not copied again). Larger reads than asyncio's 256 KiB mean
        fewer trips through the event loop for a blob: a cold GET ran a tenth faster with
        1 MiB. A body that proves fast is read on by Detour itself, with ``socket_reads``
        (:mod:`proxy.upstream.socket_body`)."""
        response = self.response
        connection = response.connection
        if connection is not None and connection.transport is not None:
            with contextlib.suppress(AttributeError):  # a loop whose transports lack it
                connection.transport.max_size = read_size  # type: ignore[attr-defined]
        length = response.content_length
        plain = "Content-Encoding" not in self.headers and "Transfer-Encoding" not in self.headers
        reads = self.socket_reads if plain and length is not None else None
        loop = asyncio.get_running_loop()
        began, received = loop.time(), 0
        pieces: AsyncIterator[tuple[bytes, bool]] = response.content.iter_chunks()
        if self.watch is not None:
            pieces = self._watched(pieces, self.watch)
        with transport_errors(self.where):
            async for chunk, _ in pieces:
                yield chunk
                received += len(chunk)
                if reads is not None and reads.worth_it(
                    received, loop.time() - began, (length or 0) - received
                ):
                    break
            else:
                return
            assert reads is not None
            assert length is not None
            silent = None  # a peer's silence is judged by a probe, after cluster.read_timeout
            if self.watch is not None and self.watch.enabled:
                silent = functools.partial(self.watch.still_alive, self.upstream.registry)
            ahead = length - received
            async for view in read_on(response, offset + received, ahead, reads, silent):
                yield view

    async def _watched(
        self, pieces: AsyncIterator[tuple[bytes, bool]], watch: PeerWatch
    ) -> AsyncIterator[tuple[bytes, bool]]:
        """A peer's body: each next piece waited for as long as the peer is alive."""
        while True:
            try:
                piece = await watch.patiently(self.upstream.registry, anext(pieces))
            except StopAsyncIteration:
                return
            yield piece

    def refusal(self, not_found: DetourError) -> DetourError:
        """The error for an answer other than the one asked for: ``not_found`` for a 404, the
        upstream's own refusal (and its challenge, for the client to answer) for a 401 or 403,
        and a bad reply for anything else."""
        if self.status == 404:
            # The URL asked, so a rule whose path is wrong shows where it sent the request. The
            # first request's, without a query: a redirect's target may be a signed URL.
            first = self.response.history[0] if self.response.history else self.response
            asked = str(first.url.with_user(None).with_query(None).with_fragment(None))
            detail = dict(not_found.detail) if isinstance(not_found.detail, dict) else {}
            return type(not_found)(f"{not_found.message}: {asked}", {**detail, "url": asked})
        if self.status in (401, 403):
            challenge = self.headers.get("WWW-Authenticate")
            return UpstreamDenied(
                self.status,
                "upstream refused access",
                {"upstream": self.where},
                headers={"WWW-Authenticate": challenge} if challenge else None,
            )
        return UpstreamInvalid(
            f"upstream answered {self.status // 100}xx", {"upstream": self.where}, cause="http"
        )

    def close(self) -> None:
        self.response.release()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()
