"""Reading a whole HTTP body under a cap, for the proxy's upstream client and the tools alike."""

from __future__ import annotations

import aiohttp


async def read_capped(content: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, read to its end (over a real link it arrives in many reads), or None
    once it is longer than ``limit``, having read at most ``limit + 1`` bytes of it."""
    body = bytearray()
    while chunk := await content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
