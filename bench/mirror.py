"""The mirror, from the bench's side: filling it with content through the registry API
(:class:`Pusher`) and reading its access log, the honest count of what each cache asked
upstream (:class:`AccessLog`, :func:`blob_requests`)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from common import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    MIRROR_REPO,
    PUSH_CHUNK,
    TAG,
    USER_AGENT,
)

# -- the access log ------------------------------------------------------------------------

_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[[^\]]+\] "(?P<method>\S+) (?P<path>\S+) [^"]+" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "[^"]*" "(?P<agent>[^"]*)"$'
)


@dataclass(frozen=True, slots=True)
class Access:
    method: str
    path: str
    status: int
    agent: str


class AccessLog:
    """The mirror's access log (combined format, one line once a response is finished)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._entries: list[Access] = []

    def entries(self) -> list[Access]:
        try:
            with self.path.open("rb") as log_file:
                log_file.seek(self._offset)
                chunk = log_file.read()
        except FileNotFoundError:
            chunk = b""
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            match = _ACCESS_LINE.match(line)
            if match is None or match["agent"].startswith(f"{USER_AGENT}-ready"):
                continue
            self._entries.append(
                Access(match["method"], match["path"], int(match["status"]), match["agent"])
            )
        return self._entries

    def mark(self) -> int:
        return len(self.entries())

    async def settle(self, mark: int, *, quiet: float = 0.3, limit: float = 30.0) -> list[Access]:
        """The entries after ``mark`` once none arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + limit
        count = -1
        while True:
            now = len(self.entries())
            if now == count or time.monotonic() > deadline:
                return self._entries[mark:]
            count = now
            await asyncio.sleep(quiet)


def blob_requests(entries: Iterable[Access], digest: str) -> tuple[int, int]:
    """(GETs, HEADs) the mirror answered for this blob, to others than the bench's clients."""
    path = f"/v2/{MIRROR_REPO}/blobs/{digest}"
    mine = [e for e in entries if e.path == path and not e.agent.startswith(USER_AGENT)]
    return sum(e.method == "GET" for e in mine), sum(e.method == "HEAD" for e in mine)


# -- pushing content ----------------------------------------------------------------------


def _keystream() -> Callable[[bytes], bytes] | None:
    """AES-CTR under a fresh random key: random bytes faster than os.urandom, when available."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        return None
    cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16)))
    return cipher.encryptor().update


def random_chunks(size: int, chunk: int = PUSH_CHUNK) -> Iterator[bytes]:
    encrypt = _keystream()
    zeros = bytes(min(chunk, size))
    remaining = size
    while remaining > 0:
        n = min(chunk, remaining)
        yield encrypt(zeros[:n]) if encrypt is not None else os.urandom(n)
        remaining -= n


def _path_of(location: str) -> str:
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


class Pusher:
    """Pushes to the mirror through the registry API (http.client, synchronous)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _send(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        expect: int,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        conn.request(method, path, body=body, headers={"User-Agent": USER_AGENT, **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        if response.status != expect:
            raise RuntimeError(f"push: {method} {path} answered {response.status}: {data[:500]!r}")
        return response

    def blob(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Stream ``chunks`` as one blob (a chunked PATCH, hashed on the way); (digest, size)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        hasher = hashlib.sha256()
        size = 0

        def body() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                hasher.update(chunk)
                size += len(chunk)
                yield chunk

        try:
            started = self._send(conn, "POST", f"/v2/{MIRROR_REPO}/blobs/uploads/", 202, b"", {})
            location = _path_of(started.getheader("Location") or "")
            patched = self._send(
                conn,
                "PATCH",
                location,
                202,
                body(),  # an iterable without Content-Length: sent chunked, never held whole
                {"Content-Type": "application/octet-stream"},
            )
            location = _path_of(patched.getheader("Location") or "")
            digest = f"sha256:{hasher.hexdigest()}"
            sep = "&" if "?" in location else "?"
            self._send(conn, "PUT", f"{location}{sep}digest={digest}", 201, b"")
        finally:
            conn.close()
        return digest, size

    def random_blob(self, size: int) -> str:
        digest, pushed = self.blob(random_chunks(size))
        assert pushed == size
        return digest

    def image(self) -> str:
        """A small schema 2 image (config + two layers) tagged ``TAG``; its manifest digest."""
        layers = [self.blob([os.urandom(2048 + i)]) for i in range(2)]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
            }
        ).encode()
        config_digest, _ = self.blob([config])
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {
                    "mediaType": DOCKER_CONFIG,
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [{"mediaType": DOCKER_LAYER, "digest": d, "size": s} for d, s in layers],
            },
            indent=3,
        ).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            response = self._send(
                conn,
                "PUT",
                f"/v2/{MIRROR_REPO}/manifests/{TAG}",
                201,
                manifest,
                {"Content-Type": DOCKER_MANIFEST},
            )
        finally:
            conn.close()
        digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        if response.getheader("Docker-Content-Digest") != digest:
            raise RuntimeError("push: the mirror stored the manifest under another digest")
        return digest
