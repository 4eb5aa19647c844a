"""A TCP relay in front of a registry, for network faults: a link that drops mid-blob, or a
slow one."""

from __future__ import annotations

import asyncio
import contextlib

from tests.registry import Registry


class Relay:
    """Relays connections to ``target``. The first ``cuts`` blob responses are cut after
    ``cut_after`` bytes (the link drops); with ``rate``, responses trickle at that many bytes
    per second."""

    def __init__(
        self,
        target: Registry,
        *,
        cut_after: int = 0,
        cuts: int = 0,
        rate: int | None = None,
    ) -> None:
        self.target = target
        self.cut_after = cut_after
        self.cuts = cuts
        self.rate = rate
        self.server: asyncio.Server | None = None

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
        host, port = self.target.host.split(":")
        up_r, up_w = await asyncio.open_connection(host, int(port))
        request = await client_r.readuntil(b"\r\n\r\n")
        cut = b"/blobs/" in request.split(b"\r\n", 1)[0] and self.cuts > 0
        if cut:
            self.cuts -= 1
        up_w.write(request)
        step = 65536 if self.rate is None else max(1024, self.rate // 20)

        async def upstream_to_client() -> None:
            sent = 0
            while data := await up_r.read(step):
                if cut and sent + len(data) > self.cut_after:
                    client_w.write(data[: self.cut_after - sent])
                    await client_w.drain()
                    client_w.transport.abort()  # the link drops
                    return
                client_w.write(data)
                sent += len(data)
                await client_w.drain()
                if self.rate is not None:
                    await asyncio.sleep(len(data) / self.rate)
            client_w.close()

        async def client_to_upstream() -> None:
            while data := await client_r.read(65536):
                up_w.write(data)
                await up_w.drain()

        forward = asyncio.create_task(client_to_upstream())
        with contextlib.suppress(ConnectionError):
            await upstream_to_client()
        forward.cancel()
        up_w.close()
