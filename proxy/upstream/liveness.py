"""Whether a silent peer is hung or waiting: the LAN-scale watch on the site's other Detours.

A peer (another Detour of the site) is on the LAN, so it connects within
``cluster.connect_timeout`` and, when all is well, answers at once. But an owner may be silent
for good reason: it is fetching the blob over the WAN, getting a token, or waiting out a WAN cut
(``upstream.retry_for``); bypassing it then would send every node to the mirror on its own.
So silence from a peer (before its first byte, or mid-body) is not judged by itself: after
``cluster.read_timeout`` of it the peer is *probed*, ``GET /v2/`` on a new connection under the
same LAN timeouts. An answer means it is alive and waiting for its own upstream: it is waited
on, up to ``upstream.retry_for`` plus three ``upstream.read_timeout`` (as long as that upstream
fetch may take to fail); no answer means it is hung (a stopped process: the kernel still
completes the handshake; a node off the network), and the wait ends with
:class:`~proxy.errors.UpstreamTimeout` of cause ``hung``: the caller marks it down for
``cluster.down_seconds`` and goes on from the byte reached at the next source.

One probe per peer at a time serves every request waiting on it, and an answer counts for
``cluster.read_timeout``. Probes are counted in ``detour_peer_probes_total`` by result, and a
hung peer is logged (``peer_hung``) with how long it was silent and what the probe met.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
from yarl import URL

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.logs import get_logger
from proxy.metrics import Metrics
from proxy.settings import UpstreamSettings
from proxy.upstream.egress import AddressRefused, EgressPolicy
from proxy.upstream.transport import transport_errors

T = TypeVar("T")

log = get_logger("detour.peers")


class PeerWatch:
    """The probes of the peers, and the patient waits on them (see the module)."""

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        egress: EgressPolicy,
        metrics: Metrics,
        *,
        probe_after: float,
        longest: float,
        headers: dict[str, str],
    ) -> None:
        self._session = session  # force_close, LAN timeouts; None: peers are never probed
        self._egress = egress
        self._metrics = metrics
        self.probe_after = probe_after  # cluster.read_timeout
        self.longest = longest  # the most silence from a live peer
        self._headers = headers  # the peer mark, and Via
        self._probes: dict[str, asyncio.Task[str | None]] = {}
        self._answered: dict[str, float] = {}  # peer: when it last answered a probe

    @property
    def enabled(self) -> bool:
        return self._session is not None

    async def patiently(self, peer: str, awaitable: Awaitable[T]) -> T:
        """``awaitable`` (a peer's answer, or the next piece of its body), waited for as long
        as the peer is alive (see :meth:`still_alive`); cancelled when it is not."""
        if self._session is None:
            return await awaitable
        task = asyncio.ensure_future(awaitable)
        began = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.probe_after)
                if done:
                    return task.result()
                await self.still_alive(peer, time.monotonic() - began)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def still_alive(self, peer: str, silent: float) -> None:
        """Return if ``peer``, silent for ``silent`` seconds, is to be waited on further;
        raise :class:`UpstreamTimeout` (cause ``hung``, or ``timeout`` past the longest wait)
        if not."""
        if silent >= self.longest:
            raise UpstreamTimeout(
                f"{peer} sent nothing for {silent:.0f}s, though it answers",
                {"upstream": peer},
                cause="timeout",
                reason=f"sent nothing for {silent:.0f}s, though it answers probes",
            )
        failure = await self._probe(peer)
        if failure is None:
            return
        words = f"silent for {silent:.1f}s, and no answer to a probe on a new connection"
        log.warning("peer_hung", peer=peer, silent=round(silent, 1), probe=failure)
        raise UpstreamTimeout(
            f"{peer} hung: {words} ({failure})", {"upstream": peer}, cause="hung", reason=words
        )

    async def _probe(self, peer: str) -> str | None:
        """None if ``peer`` answered a probe lately or answers one now; else what failed."""
        if time.monotonic() - self._answered.get(peer, -1e9) < self.probe_after:
            return None
        probe = self._probes.get(peer)
        if probe is None:
            probe = self._probes[peer] = asyncio.create_task(self._ask(peer))
            probe.add_done_callback(lambda _: self._probes.pop(peer, None))
        return await asyncio.shield(probe)

    async def _ask(self, peer: str) -> str | None:
        assert self._session is not None
        url = URL(f"http://{peer}/v2/")
        try:
            self._egress.check_url(url)
            with transport_errors(peer):
                async with self._session.get(url, headers=self._headers) as response:
                    await response.read()
        except UpstreamError as exc:
            self._metrics.peer_probes.labels("hung").inc()
            return exc.reason
        except AddressRefused:
            self._metrics.peer_probes.labels("hung").inc()
            return "address refused by the egress policy"
        self._answered[peer] = time.monotonic()
        self._metrics.peer_probes.labels("alive").inc()
        return None


def peer_patience(settings: UpstreamSettings) -> float:
    """The longest silence from a peer that answers probes: as long as its own upstream fetch
    may take to fail (a first attempt silent for ``read_timeout``, then ``retry_for`` of
    retries, the last silent for ``read_timeout`` too), and one more ``read_timeout``."""
    return settings.retry_for + 3 * settings.read_timeout
