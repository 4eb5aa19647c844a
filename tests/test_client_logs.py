"""Ordinary client behaviour is logged quietly, and what is wrong still stands out.

podman, docker and skopeo try TLS first on an insecure registry: a ClientHello on the plain port
is a debug line, not a warning. A client that hangs up (kubelet cancels pulls routinely) is one
info line: mid-blob, with the 200 it got and the bytes it was sent; before its answer, a 499.
Never an error with a traceback. Each test runs ``detour serve`` as a real process (the path for
requests the parser refuses exists only there) and reads its log."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.images import push_image, unique_repo
from tests.proxy import Proxy, scenario, slow_client_get, wait_cached
from tests.registry import Registry

DetourProcess = Callable[[dict[str, Any]], Awaitable[Proxy]]
MiB = 1024 * 1024
QUIET_LEVELS = ("debug", "info")


def client_hello() -> bytes:
    """The first flight of a real TLS handshake, as the ``ssl`` module sends it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a handshake record
    return hello


async def exchange(proxy: Proxy, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read the answer until the proxy closes it."""
    host, port = proxy.host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    answer = await reader.read()
    writer.close()
    return answer


def log_records(proxy: Proxy) -> list[dict[str, Any]]:
    """The process's log, every line a JSON object (a traceback would not be)."""
    return [json.loads(line) for line in proxy.log_lines() if line.strip()]


async def access_line(proxy: Proxy, path: str) -> dict[str, Any]:
    """The access log line for ``path``, once the process has written it."""
    deadline = time.monotonic() + 10
    while True:
        lines = [r for r in log_records(proxy) if r["event"] == "request" and r["path"] == path]
        if lines:
            (line,) = lines
            return line
        assert time.monotonic() < deadline, f"no access line for {path}"
        await asyncio.sleep(0.05)


async def hang_up_mid_body(proxy: Proxy, path: str, keep: int) -> tuple[int, int]:
    """GET ``path``, read the head and ``keep`` body bytes, and hang up: (status, size)."""
    reader, writer, head = await slow_client_get(proxy, path)
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    await reader.readexactly(keep)
    writer.close()  # unread bytes in the receive buffer: the kernel resets the connection
    await writer.wait_closed()
    return int(status_line.split()[1]), int(headers["content-length"])


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_tls_on_the_plain_port_is_a_debug_line(
    detour_process: DetourProcess,
    registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    parser: str,
) -> None:
    if parser == "python":
        monkeypatch.setenv("AIOHTTP_NO_EXTENSIONS", "1")  # aiohttp's pure-Python HTTP parser
    config = scenario(registry, tmp_path / "cache", log_level="debug")
    proxy = await detour_process(config)

    answer = await exchange(proxy, client_hello())

    # A plain HTTP 400 (a TLS client can't read it, but a Go client then knows to use HTTP).
    assert answer.startswith(b"HTTP/1.0 400 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["errors"][0]["code"] == "UNSUPPORTED"
    records = log_records(proxy)
    assert [r["level"] for r in records if r["event"] == "tls_on_plain_port"] == ["debug"]
    assert [r for r in records if r["level"] not in QUIET_LEVELS] == []
    assert [r for r in records if r["event"] == "request" and r["level"] != "debug"] == []

    # Other bytes the parser refuses are still worth a warning, and an access line.
    answer = await exchange(proxy, b"\x01\x02\x03\r\n\r\n")

    assert answer.startswith(b"HTTP/1.0 400 ")
    records = log_records(proxy)
    refused = [r for r in records if r["event"] == "request_refused"]
    assert [r["level"] for r in refused] == ["warning"]
    requests = [r for r in records if r["event"] == "request" and r["status"] == 400]
    assert [(r["level"], r["refused"]) for r in requests] == [
        ("debug", "tls_on_plain_port"),
        ("info", refused[0]["reason"]),
    ]


async def test_skopeo_trying_tls_first_leaves_no_warning(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path
) -> None:
    name = unique_repo("x").split("/")[1]
    push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=1024)
    proxy = await detour_process(scenario(registry, tmp_path / "cache"))
    # --tls-verify=false: skopeo tries HTTPS, is answered in plain HTTP, and falls back to it.
    skopeo = await asyncio.create_subprocess_exec(
        "skopeo",
        "inspect",
        "--raw",
        "--tls-verify=false",
        f"docker://{proxy.host}/{name}:v1",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(skopeo.communicate(), 60)
    assert skopeo.returncode == 0, err.decode()
    records = log_records(proxy)
    assert [r for r in records if r["level"] not in QUIET_LEVELS] == []
    assert [r for r in records if r["event"] == "request" and r["status"] == 400] == []
    assert [r for r in records if r["event"] == "request" and r["status"] == 200]


@pytest.mark.parametrize("cache", ["miss", "hit"])
async def test_a_client_hanging_up_mid_blob_is_an_info_line(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path, cache: str
) -> None:
    name = unique_repo("x").split("/")[1]
    image = push_image(
        registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=24 * MiB
    )
    layer = image.layers[0]
    proxy = await detour_process(scenario(registry, tmp_path / "cache"))
    path = f"/v2/{name}/blobs/{layer.digest}"
    if cache == "hit":
        async with proxy.session.get(f"{proxy.url}{path}") as response:
            assert await response.read() == layer.data
        assert await wait_cached(proxy.cache_dir, layer.digest)
        path = f"/v2/library/{name}/blobs/{layer.digest}"  # another path: its own log line

    status, size = await hang_up_mid_body(proxy, path, keep=256 * 1024)

    assert (status, size) == (200, layer.size)
    line = await access_line(proxy, path)
    assert line["level"] == "info"
    assert line["status"] == 200  # what the client got, headers and all
    assert line["cache"] == cache
    assert line["aborted"] == "client disconnected"
    assert 256 * 1024 <= line["bytes"] < layer.size
    records = log_records(proxy)
    assert [r for r in records if r["level"] not in QUIET_LEVELS] == []
    assert not [r for r in records if "exception" in r]
    if cache == "miss":
        # The fetch went on without its client: the blob is cached for the next pull.
        assert await wait_cached(proxy.cache_dir, layer.digest)


async def test_a_client_hanging_up_before_its_answer_is_an_info_line(
    detour_process: DetourProcess, registry: Registry, tmp_path: Path
) -> None:
    name = unique_repo("x").split("/")[1]
    image = push_image(registry, f"docker-mirror/library/{name}", "v1", layers=1, layer_size=MiB)
    layer = image.layers[0]
    proxy = await detour_process(scenario(registry, tmp_path / "cache"))
    path = f"/v2/{name}/blobs/{layer.digest}"
    registry.freeze()  # the upstream takes the connection and says nothing, for now
    host, port = proxy.host.split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode())
    deadline = time.monotonic() + 10
    while not await proxy.metric("detour_cache_requests_total", kind="blob", result="miss"):
        assert time.monotonic() < deadline, "the request never reached the blob handler"
        await asyncio.sleep(0.02)
    writer.close()  # kubelet gives up on a slow pull
    await writer.wait_closed()  # closed: the proxy has the FIN before the upstream answers
    registry.thaw()

    line = await access_line(proxy, path)
    assert line["level"] == "info"
    assert line["status"] == 499  # nginx's "client closed request": nothing was sent
    assert line["aborted"] == "client disconnected"
    assert line["bytes"] == 0
    records = log_records(proxy)
    assert [r for r in records if r["level"] not in QUIET_LEVELS] == []
    assert not [r for r in records if "exception" in r]
    # The fetch went on without its client: the blob is cached for the next pull.
    assert await wait_cached(proxy.cache_dir, layer.digest)
