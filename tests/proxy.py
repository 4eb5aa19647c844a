"""Running Detour under test: in-process (``aiohttp_server``) or as ``detour serve``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.images import ACCEPT_ALL, PushedImage
from tests.registry import Registry
from tests.support import Daemon, free_port, listening, stop_child


def scenario(mirror: Registry, cache_dir: Path, **extra: Any) -> dict[str, Any]:
    """The issue's edge-site config, with ``mirror`` playing project-a.azurecr.io."""
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "cache": {"dir": str(cache_dir)},
        "redirects": [
            {"src": "docker.io/", "to": f"{mirror.host}/docker-mirror/"},
            {"src": "ghcr.io/", "to": f"{mirror.host}/ghcr-mirror/"},
        ],
        "registries": {mirror.host: {"insecure": True}},
    }
    config.update(extra)
    return config


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@dataclass
class Proxy:
    url: str
    cache_dir: Path
    session: aiohttp.ClientSession
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    async def metric(self, name: str, **labels: str) -> float:
        async with self.session.get(f"{self.url}/metrics") as response:
            text = await response.text()
        wanted = tuple(sorted(labels.items()))
        return parse_metrics(text).get((name, wanted), 0.0)

    def log_lines(self) -> list[str]:
        assert self.log_path is not None
        return self.log_path.read_text().splitlines()


async def start_process(config: dict[str, Any], workdir: Path) -> Proxy:
    """``python -m proxy serve --config FILE`` on its ``listen`` port, or a free one if that is
    missing or 0, ready when /healthz answers."""
    host, _, port_text = str(config.get("listen", "127.0.0.1:0")).rpartition(":")
    host = host if host not in ("", "0.0.0.0") else "127.0.0.1"
    port = int(port_text) or free_port()
    # A fixed port (the compose demo's 7439) that something already listens on: the new
    # process could not bind it, and /healthz would be answered by the other one.
    if int(port_text) and listening(host, port):
        raise RuntimeError(f"{host}:{port} is in use (a detour serve left running?)")
    config = {**config, "listen": f"{host}:{port}"}
    path = workdir / "detour.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = workdir / "detour.log"
    daemon = Daemon(
        "detour",
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        log_path,
        grace=15,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        fresh_log=True,
        own_session=False,
        interval=0.05,
    )
    session = aiohttp.ClientSession()
    url = f"http://{host}:{port}"

    async def healthy() -> bool:
        try:
            async with session.get(f"{url}/healthz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await daemon.start_async(healthy, 20)
    except RuntimeError:
        await session.close()
        raise
    return Proxy(url, Path(config["cache"]["dir"]), session, daemon.proc, log_path)


async def stop_process(proxy: Proxy, sig: int = signal.SIGTERM) -> int:
    """Stop ``detour serve`` with ``sig`` (SIGKILL after 15 s): its exit code."""
    assert proxy.process is not None
    code = await asyncio.to_thread(stop_child, proxy.process, 15, sig)
    await proxy.session.close()
    return code


def blob_path(cache_dir: Path, digest: str) -> Path:
    """Where Detour keeps a verified blob."""
    hexpart = digest.removeprefix("sha256:")
    return cache_dir / "blobs" / "sha256" / hexpart[:2] / hexpart


async def wait_cached(cache_dir: Path, digest: str, limit: float = 5.0) -> bool:
    """Whether the blob reaches the cache within ``limit`` seconds. A client has its last byte
    once the blob is verified; the fsync and rename into the cache come just after."""
    deadline = time.monotonic() + limit
    while not blob_path(cache_dir, digest).is_file():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def wait_no_temp_files(cache_dir: Path, limit: float = 10.0) -> bool:
    """Whether the cache's temp dir is empty within ``limit`` seconds. A blob that is not kept
    loses its temp file once its writing thread is done with what it was given, which may be
    just after its client had the last byte."""
    deadline = time.monotonic() + limit
    while any((cache_dir / "tmp").iterdir()):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def slow_client_get(
    proxy: Proxy, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """GET ``path`` as a client that reads the body at its own pace: its reader and writer,
    and the response head, read.

    The receive buffer is set small (64 KiB) before connecting, which also turns off the
    kernel's autotuning (up to ``tcp_rmem``'s maximum, 32 MiB on some machines): the kernel
    can't take a blob off Detour's hands faster than the client reads it, so Detour is still
    sending for as long as the test does not read.
    """
    host, port = proxy.host.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    request = f"GET {path} HTTP/1.1\r\nHost: {proxy.host}\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def pull_image(
    proxy: Proxy, name: str, image: PushedImage, reference: str = "v1", *, at_once: bool = False
) -> None:
    """A whole pull of ``image`` through the proxy, as a runtime does it: its manifest by
    ``reference``, then every blob (one after the other, or ``at_once``), each answered 200
    with its bytes."""
    url = f"{proxy.url}/v2/{name}/manifests/{reference}"
    async with proxy.session.get(url, headers={"Accept": ACCEPT_ALL}) as response:
        assert response.status == 200, await response.text()
        assert await response.read() == image.manifest

    async def blob(data: bytes, digest: str) -> None:
        async with proxy.session.get(f"{proxy.url}/v2/{name}/blobs/{digest}") as response:
            assert response.status == 200, await response.text()
            assert await response.read() == data

    if at_once:
        await asyncio.gather(*(blob(b.data, b.digest) for b in image.blobs))
    else:
        for b in image.blobs:
            await blob(b.data, b.digest)
