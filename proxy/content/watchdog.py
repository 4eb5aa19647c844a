"""Why a blob fetch should end early: nobody waits for it any more, or the upstream crawls.

``read_timeout`` only limits silence: an upstream that trickles a byte a second would hold its
connection and its fetch slot for ever, and a fetch whose clients all hung up would go on for
nobody. The watchdog ends a fetch with no client left after ``upstream.abandon_after`` (unless
it is nearly done: then it goes on for the cache), and one that receives less than
``upstream.min_rate`` (but some) over a ``rate_window``, while bytes are still coming
(:func:`watched` runs a fetch's work under :func:`watch`, and says why it ended).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.logs import get_logger
from proxy.metrics import Metrics

log = get_logger("detour.blobs")


class Progress(Protocol):
    """What the watchdog reads of a fetch."""

    @property
    def received(self) -> int: ...

    @property
    def receiving(self) -> bool:
        """The upstream answered and bytes are still coming."""
        ...

    @property
    def received_all(self) -> bool: ...

    def interested(self) -> bool:
        """Whether a client still waits for the fetch."""
        ...

    def nearly_done(self) -> bool: ...


class Limits(Protocol):
    @property
    def abandon_after(self) -> float: ...

    @property
    def min_rate(self) -> int | None: ...

    @property
    def rate_window(self) -> float: ...


async def watch(fetch: Progress, limits: Limits) -> tuple[str, str]:
    """The reason (``abandoned`` or ``too_slow``) and its words, once the fetch should end;
    never, once every byte is in."""
    loop = asyncio.get_running_loop()
    tick = min(1.0, limits.abandon_after / 4, limits.rate_window / 4)
    idle_since: float | None = None
    window_start, window_bytes = loop.time(), fetch.received
    while True:
        await asyncio.sleep(tick)
        if fetch.received_all:
            await asyncio.Event().wait()  # done receiving: nothing left to watch
        now = loop.time()
        if fetch.interested():
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= limits.abandon_after and not fetch.nearly_done():
            return "abandoned", f"no client for {limits.abandon_after:g}s"
        if not fetch.receiving:
            window_start, window_bytes = now, fetch.received  # the clock starts with bytes
        elif now - window_start >= limits.rate_window:
            rate = (fetch.received - window_bytes) / (now - window_start)
            # Nothing at all is silence, which the timeouts judge (read_timeout, a peer's
            # probe, a fetch waiting out a WAN cut for upstream.retry_for), not the pace.
            if limits.min_rate is not None and 0 < rate < limits.min_rate:
                return "too_slow", f"{rate:.0f} bytes/s, below upstream.min_rate"
            window_start, window_bytes = now, fetch.received


async def watched(
    work: Callable[[], Coroutine[Any, Any, None]],
    fetch: Progress,
    limits: Limits,
    metrics: Metrics,
    digest: str,
) -> None:
    """Run ``work()`` (the fetch's receiving), ended early when its clients are gone or the
    upstream crawls; ended so, it raises the :class:`UpstreamError` its clients are given."""
    if not fetch.interested():
        raise _ended(metrics, digest, "abandoned", "every client left before the fetch began")
    working = asyncio.create_task(work())
    watching = asyncio.create_task(watch(fetch, limits))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        working.cancel()
        watching.cancel()
        worked, why = await asyncio.gather(working, watching, return_exceptions=True)
    if not isinstance(worked, asyncio.CancelledError):
        if isinstance(worked, BaseException):
            raise worked
        return
    if isinstance(why, BaseException):
        raise why
    raise _ended(metrics, digest, *why)


def _ended(metrics: Metrics, digest: str, reason: str, words: str) -> UpstreamError:
    metrics.ended_fetches.labels(reason).inc()
    log.warning("blob_fetch_ended", digest=digest, reason=reason, detail=words)
    error = UpstreamTimeout if reason == "too_slow" else UpstreamUnreachable
    return error(f"blob fetch ended: {words}", {"digest": digest}, cause=reason)
