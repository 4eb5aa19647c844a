"""Where one blob fetch is, as its clients see it, and their waits on it.

The states::

    OPENING ──upstream answers──▶ RUNNING ──every byte, digest matches──▶ VERIFIED ──▶ committed
       │                            │                                      (or not kept)
       └──────────── FAILED ◀───────┘ (refused, cut short past resuming, wrong bytes, ended)

Its clients are sent each byte but the last while it is ``RUNNING``; the last once it is
``VERIFIED``, so no client takes wrong bytes for a whole blob. When every upstream fails, the
fetch tries again for ``upstream.retry_for`` (:mod:`proxy.content.blob_body`); a client that
could be sent nothing meanwhile for ``upstream.client_wait`` is let go of
(:meth:`FetchState.wait_change`), so it retries, and its retry joins this fetch.

A blob from a peer (another Detour of the site) of at most ``cluster.verify_peer_blobs_first``
bytes is *held*: the fetch stays ``OPENING`` for its clients until every byte is verified, and
when the bytes are wrong the peers that sent them are distrusted and the blob is fetched again
from the next peer or the upstream, so the clients get the right blob, a little later. Peers
relaying it down the tree are sent it as it arrives (each hop verifies it before its own clients
see a byte); when it turns out wrong, their responses are cut short. A larger one is sent as it
arrives; wrong bytes then abort its clients (and the peer is distrusted).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import time

from proxy.content.window import Window
from proxy.errors import DetourError


class ClientWaitOver(Exception):
    """A client could be sent nothing for ``upstream.client_wait`` (``patience`` seconds):
    the upstream is slow to answer, or a WAN cut is being waited out."""

    def __init__(self, patience: float) -> None:
        super().__init__(f"nothing to send for {patience:g}s")
        self.patience = patience


class State(enum.Enum):
    OPENING = "opening"  # waiting for the upstream's response headers
    RUNNING = "running"
    VERIFIED = "verified"
    FAILED = "failed"


class FetchState(abc.ABC):
    """Where a fetch is (:class:`State`), what it knows of its blob, and the waits of its
    clients on it; its :class:`~proxy.content.receiver.Receiver` moves it on."""

    def __init__(self, window: Window) -> None:
        self.state = State.OPENING
        self.error: DetourError | None = None
        self.size: int | None = None
        self.where = ""  # the upstream that answered
        self.held = False  # receiving, its clients not sent a byte until it is verified
        self.window = window
        self._done = asyncio.Event()  # verified and committed (or not kept), or failed
        self.last_progress = time.monotonic()  # when the upstream last sent bytes, or began

    @property
    @abc.abstractmethod
    def received(self) -> int:
        """Bytes received from the upstream."""

    @property
    def changed(self) -> asyncio.Event:
        """Set at the fetch's next change; take it before looking, then wait on it."""
        return self.window.changed

    def available(self) -> int:
        """The bytes a client may be sent now: all received, but the last until verified."""
        limit = self.window.end
        if self.state is not State.VERIFIED and self.size is not None:
            limit = min(limit, self.size - 1)
        return limit

    def start_sending(self) -> None:
        """The receiver's word: bytes may go out to the clients as they arrive."""
        self.held = False
        self.state = State.RUNNING
        self.window.notify()

    def verified(self) -> None:
        """The receiver's word: every byte is in and right, so the clients get the last."""
        self.state = State.VERIFIED
        self.window.notify()

    @property
    def receiving(self) -> bool:
        """Bytes are coming: the upstream answered, and the blob is not whole yet."""
        return self.state is State.RUNNING or self.held

    @property
    def received_all(self) -> bool:
        return self.state is State.VERIFIED

    @property
    def awaiting_upstream(self) -> bool:
        """Whether the fetch waits for its upstream's answer or next bytes (not for the disk,
        or for the check of bytes all received)."""
        whole = self.size is not None and self.received >= self.size
        if self.state is State.OPENING:
            return not (self.held and whole)
        return self.state is State.RUNNING and not whole

    async def wait_change(
        self, changed: asyncio.Event, since: float, patience: float | None
    ) -> None:
        """Wait for ``changed`` (this fetch's :attr:`changed`, taken before looking);
        raise :class:`ClientWaitOver` once a client that had nothing since ``since``
        (``time.monotonic()``) has waited ``patience`` seconds while the upstream sent
        nothing. A wait on the disk is not cut."""
        if patience is None:
            await changed.wait()
            return
        while not changed.is_set():
            deadline = max(since, self.last_progress) + patience
            left = deadline - time.monotonic()
            if left <= 0:
                if self.awaiting_upstream:
                    raise ClientWaitOver(patience)
                await changed.wait()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await changed.wait()

    async def headers_ready(self, patience: float | None = None, *, relay: bool = False) -> None:
        """Wait for the upstream's answer; raise its error if it failed before any bytes, or
        :class:`ClientWaitOver` after ``patience`` seconds of nothing from the upstream. A
        ``relay`` (a peer's request, the blob going on down the tree) doesn't wait for a held
        blob to be verified: the node it goes to verifies it before its own clients see a
        byte, and this fetch still sends no last byte before its own check."""
        since = time.monotonic()
        while self.state is State.OPENING and not (relay and self.held):
            await self.wait_change(self.changed, since, patience)
        if self.state is State.FAILED and (self.received == 0 or self.held):
            assert self.error is not None
            raise self.error

    async def finished(self, patience: float | None = None) -> None:
        """Wait for the end of the fetch, commit included; raise its error if it failed, or
        :class:`ClientWaitOver` after ``patience`` seconds of nothing from the upstream."""
        since = time.monotonic()
        while not self._done.is_set():
            await self.wait_change(self.changed, since, patience)
        if self.state is State.FAILED:
            assert self.error is not None
            raise self.error
