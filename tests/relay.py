"""A TCP relay in front of a registry, for real-network conditions: a link that drops
mid-blob, a slow one, or a long one.

On loopback a response arrives in one read; through this relay it doesn't. With ``rtt`` each
direction holds every segment for half the round trip and lets at most ``window`` bytes be in
flight, as TCP does over a WAN: a 200 KB body over a 20 ms link arrives in four round trips,
in many reads. With ``rate`` responses trickle at that many bytes per second. ``cut()`` takes
the link down (a WAN cut) until ``mend()``: bytes on their way stop, in both directions, and a
new connection is reset at once; when it comes back the stopped bytes go on.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.registry import Registry

SEGMENT = 16 * 1024


class Relay:
    """Relays connections to ``target``. The first ``cuts`` blob responses are cut after
    ``cut_after`` bytes (the link drops); ``rate`` throttles responses (bytes per second);
    ``rtt`` (seconds) delays every segment each way by half of it, with at most ``window``
    bytes in flight each way."""

    def __init__(
        self,
        target: Registry,
        *,
        cut_after: int = 0,
        cuts: int = 0,
        rate: int | None = None,
        rtt: float = 0.0,
        window: int = 64 * 1024,
    ) -> None:
        self.target = target
        self.cut_after = cut_after
        self.cuts = cuts
        self.rate = rate
        self.rtt = rtt
        self.window = window
        self.server: asyncio.Server | None = None
        self._up = asyncio.Event()
        self._up.set()

    def cut(self) -> None:
        """The link goes down: nothing passes, new connections are reset."""
        self._up.clear()

    def mend(self) -> None:
        self._up.set()

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if not self._up.is_set():
            client_w.transport.abort()  # the link is down
            return
        host, port = self.target.host.split(":")
        up_r, up_w = await asyncio.open_connection(host, int(port))
        request = await client_r.readuntil(b"\r\n\r\n")
        cut = b"/blobs/" in request.split(b"\r\n", 1)[0] and self.cuts > 0
        if cut:
            self.cuts -= 1
        await asyncio.sleep(self.rtt / 2)
        up_w.write(request)
        step = SEGMENT if self.rate is None else max(1024, min(SEGMENT, self.rate // 20))
        limit = self.cut_after if cut else None

        forward = asyncio.create_task(self._pipe(client_r, up_w, step, None, None, close=False))
        with contextlib.suppress(ConnectionError):
            await self._pipe(up_r, client_w, step, limit, self.rate, close=True)
        forward.cancel()
        up_w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        step: int,
        cut_after: int | None,
        rate: int | None,
        *,
        close: bool,
    ) -> None:
        """Copy ``reader`` to ``writer`` through a link of this relay's shape; ``close`` the
        writer at the end of the reader."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        room = asyncio.Semaphore(max(1, self.window // step))  # segments in flight

        async def receive() -> None:
            while True:
                await room.acquire()
                data = await reader.read(step)
                queue.put_nowait((loop.time() + self.rtt / 2, data) if data else None)
                if not data:
                    return

        receiving = asyncio.create_task(receive())
        sent = 0
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._up.wait()  # a cut holds what is on its way
                if cut_after is not None and sent + len(data) > cut_after:
                    writer.write(data[: cut_after - sent])
                    await writer.drain()
                    writer.transport.abort()  # the link drops
                    return
                writer.write(data)
                sent += len(data)
                await writer.drain()
                room.release()
                if rate is not None:
                    await asyncio.sleep(len(data) / rate)
            if close:
                writer.close()
        finally:
            receiving.cancel()
