"""A request aiohttp's HTTP parser refuses gets Detour's OCI 400 and a log line of the right
level, through :func:`proxy.api.app.answer_parser_errors`, which leans on private parts of
aiohttp (it has no supported hook for this). When an aiohttp upgrade takes one away, the first
test here fails and says which, instead of every refused request silently getting aiohttp's
plain-text 400 (or no answer at all)."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.api.app import AccessLog, _ProtocolErrors, answer_parser_errors
from proxy.logs import configure_logging

ReadLogs = Callable[[], list[dict[str, Any]]]
BROKEN = "aiohttp no longer has what proxy.api.app.answer_parser_errors relies on"


@pytest.fixture
async def runner() -> AsyncIterator[web.AppRunner]:
    """A real runner, set up as ``detour serve`` sets up its own."""
    runner = web.AppRunner(web.Application(), access_log_class=AccessLog)
    await runner.setup()
    yield runner
    await runner.cleanup()


async def test_aiohttp_still_has_what_answer_parser_errors_relies_on(
    runner: web.AppRunner,
) -> None:
    server = runner.server
    assert server is not None
    attributes = vars(server)
    assert isinstance(attributes.get("_loop"), asyncio.AbstractEventLoop), f"{BROKEN}: _loop"
    assert isinstance(attributes.get("_kwargs"), dict), f"{BROKEN}: _kwargs"
    assert attributes["_kwargs"].get("access_log_class") is AccessLog, f"{BROKEN}: _kwargs"
    parameters = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert parameters == ["self", "request", "status", "exc", "message"], (
        f"{BROKEN}: RequestHandler.handle_error{parameters}"
    )
    assert callable(getattr(RequestHandler, "data_received", None)), f"{BROKEN}: data_received"

    try:
        answer_parser_errors(server)
    except TypeError as exc:  # web.Server no longer takes a __class__ assignment
        pytest.fail(f"{BROKEN}: {exc}")
    protocol = server()  # what asyncio calls for each connection

    assert type(protocol) is _ProtocolErrors, BROKEN
    assert isinstance(protocol.access_logger, AccessLog), f"{BROKEN}: access_log_class"


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read the answer until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await reader.read()
    writer.close()
    return answer


async def test_a_request_the_parser_refuses_gets_the_oci_400_and_its_log_line(
    runner: web.AppRunner, logs: ReadLogs
) -> None:
    configure_logging("debug")
    assert runner.server is not None
    answer_parser_errors(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    # The first bytes of a TLS handshake record: a client trying TLS first, routine.
    tls = await exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    # Bytes that are not HTTP at all: worth a warning.
    garbage = await exchange(port, b"\x01\x02\x03\r\n\r\n")

    for answer in (tls, garbage):
        assert answer.startswith(b"HTTP/1.0 400 "), answer[:100]
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["errors"][0]["code"] == "UNSUPPORTED"
    records = [r for r in logs() if r["event"] != "request" or "refused" in r]
    assert [(r["event"], r["level"], r.get("refused")) for r in records] == [
        ("tls_on_plain_port", "debug", None),
        ("request", "debug", "tls_on_plain_port"),
        ("request_refused", "warning", None),
        ("request", "info", records[2]["reason"]),
    ]
