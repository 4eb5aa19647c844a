"""The blob clients: aiohttp, or curl (piped to ``openssl dgst`` to verify). The bench reads
the mirror with each at start-up and measures every target with the faster one, so the
client is not what limits a number."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from common import HASH_BATCH, MIB, USER_AGENT
from processes import reap, spawn


@dataclass(slots=True)
class Fetch:
    status: int
    size: int
    seconds: float
    sha256: str | None = None
    error: str | None = None

    def ok(self, size: int, digest: str | None = None) -> bool:
        return (
            self.error is None
            and self.status == 200
            and self.size == size
            and (digest is None or self.sha256 == digest)
        )

    def problem(self, size: int, digest: str | None = None) -> str:
        if self.error is not None:
            return self.error
        if self.status != 200:
            return f"HTTP {self.status}"
        if self.size != size:
            return f"{self.size} bytes, expected {size}"
        if digest is not None and self.sha256 != digest:
            return f"sha256 {self.sha256}, expected {digest}"
        return ""


class Client(Protocol):
    name: str

    async def fetch(self, url: str, *, verify: bool) -> Fetch: ...


def _hash_all(hasher: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        hasher.update(chunk)  # hashlib releases the GIL on big buffers


class AiohttpClient:
    """aiohttp, reading whatever the socket delivered (up to 4 MiB buffers); sha256 of the
    body in a worker thread when asked to verify."""

    name = "aiohttp"

    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(
            read_bufsize=4 * MIB,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
            connector=aiohttp.TCPConnector(limit=0),
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hash")

    async def close(self) -> None:
        await self._session.close()
        self._pool.shutdown(wait=False)

    async def fetch(self, url: str, *, verify: bool) -> Fetch:
        loop = asyncio.get_running_loop()
        hasher = hashlib.sha256() if verify else None
        pending: list[bytes] = []
        pending_bytes = size = status = 0
        started = time.perf_counter()
        try:
            async with self._session.get(url) as response:
                status = response.status
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    if hasher is None:
                        continue
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= HASH_BATCH:
                        await loop.run_in_executor(self._pool, _hash_all, hasher, pending)
                        pending, pending_bytes = [], 0
            if hasher is not None and pending:
                await loop.run_in_executor(self._pool, _hash_all, hasher, pending)
        except (aiohttp.ClientError, TimeoutError) as exc:
            elapsed = time.perf_counter() - started
            return Fetch(status, size, elapsed, error=f"{type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - started
        digest = f"sha256:{hasher.hexdigest()}" if hasher is not None else None
        return Fetch(status, size, elapsed, digest)


class CurlClient:
    """``curl -o /dev/null``; to verify, ``curl -o - | openssl dgst -sha256`` (OpenSSL's
    sha256 uses the CPU's SHA extensions; coreutils' sha256sum is ~4x slower here)."""

    name = "curl"
    _FORMAT = "%{http_code} %{size_download} %{time_total}\n"

    @staticmethod
    def _parse(code: int, text: bytes, elapsed: float | None) -> Fetch:
        lines = text.decode(errors="replace").strip().splitlines()
        fields = lines[-1].split() if lines else []
        if len(fields) != 3:
            return Fetch(0, 0, elapsed or 0.0, error=f"curl exit {code}: {' '.join(lines)}")
        status, size, total = int(fields[0]), int(fields[1]), float(fields[2])
        error = None if code == 0 else f"curl exit {code}: {' '.join(lines[:-1])}"
        return Fetch(status, size, total if elapsed is None else elapsed, error=error)

    async def fetch(self, url: str, *, verify: bool) -> Fetch:
        base = ["curl", "-sS", "-A", USER_AGENT]
        if not verify:
            proc = await spawn(
                *base,
                "-o",
                "/dev/null",
                "-w",
                self._FORMAT,
                url,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            code, out, err = await reap(proc)
            return self._parse(code, out + err, None)
        started = time.perf_counter()
        read_end, write_end = os.pipe()
        try:
            curl = await spawn(
                *base,
                "-o",
                "-",
                "-w",
                "%{stderr}" + self._FORMAT,
                url,
                stdout=write_end,
                stderr=asyncio.subprocess.PIPE,
            )
            digest = await spawn(
                "openssl", "dgst", "-sha256", "-r", stdin=read_end, stdout=asyncio.subprocess.PIPE
            )
        finally:
            os.close(read_end)
            os.close(write_end)
        (code, _, err), (_, hashed, _) = await asyncio.gather(reap(curl), reap(digest))
        result = self._parse(code, err, time.perf_counter() - started)
        hex_digest = hashed.decode().split()[0] if hashed.strip() else ""
        result.sha256 = f"sha256:{hex_digest}"
        return result
