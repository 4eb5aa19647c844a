"""``create_app(settings)`` builds the proxy; ``run(settings)`` serves it.

The error middleware here is the one place where :class:`~proxy.errors.DetourError` (and
aiohttp's own HTTP errors) become OCI error JSON; :class:`AccessLog` writes one JSON line per
request once its response is finished, with the fields the handlers put in ``request[LOG]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy import __version__
from proxy.api import allocator, handlers
from proxy.api.admin import add_admin_routes
from proxy.api.services import METRICS, SETTINGS, services_ctx
from proxy.errors import BadRequest, DetourError, NotFound, TooBusy, Unsupported, oci_error_body
from proxy.logs import CLIENT_DISCONNECTED, LOG, configure_logging, get_logger
from proxy.metrics import Metrics
from proxy.setting_types import split_host_port
from proxy.settings import ConfigError, Settings, named_registries, unknown_environment

log = get_logger("detour")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API_VERSION = "registry/2.0"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before the answer
TLS_ON_PLAIN_PORT = "tls_on_plain_port"
_TLS_HANDSHAKE = b"\x16\x03"  # a TLS record's content type (handshake) and major version
_NOT_HTTP = b"\x16 / HTTP/1.1\r\n\r\n"


def error_response(error: DetourError) -> web.Response:
    response = web.json_response(oci_error_body(error), status=error.status)
    response.headers.update(error.headers)
    return response


def body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """The body bytes a response sent: what a streamed one counted as it went (sendfile
    bypasses aiohttp's count), or what the response declared."""
    sent = request.get(LOG, {}).get("bytes")
    if sent is None:
        sent = 0 if request.method == "HEAD" else response.content_length or 0
    return int(sent)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request that reaches the app, by method, endpoint kind and status, with
    its duration (a streamed body's included) and its body bytes by source. (The requests the
    HTTP parser refuses are counted by :class:`_ProtocolErrors`.)"""
    started = time.monotonic()
    metrics = request.app[METRICS]
    try:
        response = await handler(request)  # error_middleware's answer, errors included
    except web.HTTPException as exc:  # one that error_middleware leaves to aiohttp
        metrics.request_finished(
            request.method, request.path, exc.status, time.monotonic() - started, None, 0
        )
        raise
    metrics.request_finished(
        request.method,
        request.path,
        response.status,
        time.monotonic() - started,
        request[LOG].get("source"),
        body_bytes(request, response),
    )
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[LOG] = {}
    try:
        return await handler(request)
    except DetourError as exc:
        request[LOG]["error"] = exc.code
        if isinstance(exc.detail, dict) and isinstance(exc.detail.get("url"), str):
            # The URL an upstream had no answer for: a rule's wrong path shows in the log.
            request[LOG]["upstream_url"] = exc.detail["url"]
        return error_response(exc)
    except web.HTTPException as exc:  # the router's own 404 and 405
        if exc.status == 405:
            return error_response(Unsupported("method not allowed", {"method": request.method}))
        if exc.status == 404:
            return error_response(NotFound("no such endpoint", {"path": request.path[:300]}))
        raise
    except Exception as exc:
        gone = request.transport is None or request.transport.is_closing()
        if isinstance(exc, ConnectionError) and gone:
            # The client hung up before its answer went out (kubelet cancels slow pulls):
            # routine, not an error of ours. The access log says 499, as nginx does; there is
            # no one left to send it to.
            request[LOG]["aborted"] = CLIENT_DISCONNECTED
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        log.exception("unhandled_error", path=request.path[:300], method=request.method)
        return error_response(DetourError("internal error"))


# Answered on every connection, past max_client_connections too: a kubelet probe refused
# would restart the pod, and a flood of connections would then end every pull under way.
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")
RETRY_AFTER_SECONDS = 1


@web.middleware
async def connection_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request on a connection made past ``max_client_connections`` (see :class:`_Server`)
    is answered 503, and the connection closed, unless it is a probe."""
    if getattr(request.protocol, "over_limit", False) and request.path not in PROBE_PATHS:
        limit = request.app[SETTINGS].max_client_connections
        request[LOG]["error"] = TooBusy.code
        response = error_response(
            TooBusy(
                f"Detour serves {limit} client connections already",
                {"max_client_connections": limit},
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        )
        response.force_close()
        return response
    return await handler(request)


async def _api_version_header(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["Docker-Distribution-Api-Version"] = API_VERSION


class AccessLog(AbstractAccessLogger):
    """One structlog line per request: name, reference, cache result, upstream, status, bytes,
    duration. Header values are never logged, so neither are credentials."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_: float) -> None:
        if request.path in PROBE_PATHS:
            return
        fields: dict[str, Any] = dict(request.get(LOG, {}))
        fields.pop("bytes", None)
        # podman, docker and skopeo try TLS first on an insecure registry: routine, so debug.
        emit = log.debug if fields.get("refused") == TLS_ON_PLAIN_PORT else log.info
        emit(
            "request",
            method=request.method,
            path=request.path[:300],
            status=response.status,
            bytes=body_bytes(request, response),
            duration_ms=round(time_ * 1000, 2),
            **fields,
        )

    @property
    def enabled(self) -> bool:
        return True


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, connection_limit_middleware],
        client_max_size=64 * 1024,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics(known_registries=named_registries(settings))
    app.cleanup_ctx.append(services_ctx)
    app.on_response_prepare.append(_api_version_header)
    app.router.add_route("*", "/v2", handlers.api_root)
    app.router.add_route("*", "/v2/", handlers.api_root)
    app.router.add_route("*", "/v2/{tail:.+}", handlers.api)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    add_admin_routes(app)  # /_detour/cache: loopback only
    return app


class _ProtocolErrors(RequestHandler):
    """aiohttp's HTTP parser refuses some requests (a header line over 8 KiB, more than 128
    headers, a request line it can't read) before any handler or middleware runs. This answers
    them with the same OCI error body as every other error, through :func:`error_response`.

    A TLS ClientHello on this plain-HTTP port is routine: podman, docker and skopeo try TLS
    first on an insecure registry. It is recognised by its first bytes (a TLS handshake record),
    logged at debug, and counted apart from the requests (``detour_tls_probes_total``), so a
    dashboard's 4xx line shows only the API's. It still gets the plain 400: that answer is what
    makes a Go client report "server gave HTTP response to HTTPS client" and fall back to HTTP
    at once.
    """

    _first_bytes = True
    _tls = False
    metrics: Metrics | None = None  # the app's, set by _Server: these never reach the app
    over_limit = False  # made past max_client_connections: see connection_limit_middleware

    def data_received(self, data: bytes) -> None:
        if self._first_bytes:
            self._first_bytes = False
            if data.startswith(_TLS_HANDSHAKE):
                self._tls = True
                # aiohttp's C parser refuses a ClientHello at its first byte, but the pure
                # Python one (AIOHTTP_NO_EXTENSIONS) may wait for a line end that never comes:
                # both refuse this request line at once.
                super().data_received(_NOT_HTTP)
        if not self._tls:
            super().data_received(data)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not 400 <= status < 500:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already under way")
        # The parser's message quotes the offending bytes, which may be a credential: only
        # the kind of error is logged, and sent back.
        if self._tls:
            reason = TLS_ON_PLAIN_PORT
            log.debug(TLS_ON_PLAIN_PORT)
        else:
            reason = type(exc).__name__ if exc is not None else "BadHttpMessage"
            log.warning("request_refused", status=status, reason=reason)
        request[LOG] = {"refused": reason}
        answer = error_response(
            BadRequest("the request could not be read", {"reason": reason}, status=status)
        )
        answer.headers["Docker-Distribution-Api-Version"] = API_VERSION
        answer.force_close()
        if self.metrics is not None and self._tls:
            self.metrics.tls_probes.inc()  # a client's routine probe: not a request refused
        elif self.metrics is not None:
            self.metrics.request_finished(
                request.method, request.path, status, 0.0, None, answer.content_length or 0
            )
        return answer


class _Server(web.Server):
    """A :class:`web.Server` whose connections are :class:`_ProtocolErrors`; see
    :func:`answer_parser_errors`, the one place that makes one. A connection made while
    ``max_connections`` are open is marked ``over_limit``."""

    metrics: Metrics | None = None
    max_connections: int | None = None

    def __call__(self) -> RequestHandler:
        handler = _ProtocolErrors(self, loop=self._loop, **self._kwargs)
        handler.metrics = self.metrics
        limit = self.max_connections
        handler.over_limit = limit is not None and len(self.connections) >= limit
        return handler


def answer_parser_errors(
    server: web.Server, metrics: Metrics | None = None, max_connections: int | None = None
) -> None:
    """Make ``server`` (a runner's, after ``setup()``) serve each connection with
    :class:`_ProtocolErrors`, so the requests aiohttp's parser refuses get an OCI error body
    and a log line of the right level, and those made while ``max_connections`` are open are
    marked for :func:`connection_limit_middleware`.

    aiohttp has no supported hook for this: ``web.Application`` builds its ``web.Server``
    itself, ``web.Server.__call__`` (the protocol factory asyncio calls for each connection)
    builds ``RequestHandler`` by name, and ``handler_args`` only passes keyword arguments to
    it. So this swaps ``server``'s class for :class:`_Server`, whose ``__call__`` does what
    aiohttp's does with our class, and relies on what aiohttp does not promise:

    - a ``web.Server`` takes a ``__class__`` assignment (it declares no ``__slots__``);
    - its private ``_loop``, the event loop, passed as ``RequestHandler(loop=...)``;
    - its private ``_kwargs``, the rest of ``RequestHandler``'s keyword arguments
      (``access_log_class``, ``debug`` and any ``handler_args``);
    - ``RequestHandler.data_received(data)`` and ``RequestHandler.handle_error(request, status,
      exc, message)``, overridden by :class:`_ProtocolErrors`.

    tests/test_parser_errors.py checks each of these against the installed aiohttp.
    """
    server.__class__ = _Server
    assert isinstance(server, _Server)
    server.metrics = metrics  # the refused requests are counted with the app's
    server.max_connections = max_connections


async def _serve(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT. A cache directory that can't be
    used, or an address that can't be listened on, is a :class:`ConfigError` of one line."""

    settings = app[SETTINGS]
    runner = web.AppRunner(
        app,
        access_log_class=AccessLog,
        handle_signals=True,
        keepalive_timeout=settings.client_idle_timeout,
    )
    try:
        try:
            await runner.setup()  # services_ctx: the cache directory is opened here
        except OSError as exc:
            error = _cache_dir_error(settings.cache.dir, exc)
            if error is None:
                raise
            raise error from None
        assert runner.server is not None
        answer_parser_errors(runner.server, app[METRICS], settings.max_client_connections)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(f"cannot listen on {address}: {_os_reason(exc)}") from None
        await asyncio.Event().wait()  # until SIGTERM or SIGINT
    finally:
        await runner.cleanup()


def _os_reason(exc: OSError) -> str:
    """The OS's words for ``exc``, without the library's decoration: ``Address already in
    use``."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)


def _cache_dir_error(cache_dir: Path, exc: OSError) -> ConfigError | None:
    """A :class:`ConfigError` naming ``cache.dir`` for a failure under it; None for any other
    (raised as it is: a bug must not read as bad input)."""
    name = exc.filename
    where = Path(os.fsdecode(name)) if isinstance(name, (str, bytes)) else None
    if where is None or not where.is_relative_to(cache_dir):
        return None
    detail = f" ({where})" if where != cache_dir else ""
    return ConfigError(f"cache directory {cache_dir}: {_os_reason(exc)}{detail}")


def run(settings: Settings) -> None:
    allocator.tune()
    configure_logging(settings.log_level)
    host, port = split_host_port(settings.listen, 7439)
    for problem in unknown_environment(os.environ):
        log.warning("environment_ignored", problem=problem)
    fields: dict[str, Any] = {
        "version": __version__,
        "listen": settings.listen,
        "cache_dir": str(settings.cache.dir),
        "cache_max_size": settings.cache.max_size,  # bytes; null: no limit
        "rules": len(settings.redirects),
        "registries": sorted(named_registries(settings)),
    }
    peers = settings.cluster.peers
    if peers:
        fields["peers"] = peers if isinstance(peers, str) else len(peers)
        fields["advertise"] = settings.cluster.advertise
    log.info("starting", **fields)
    started = time.monotonic()
    with contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        asyncio.run(_serve(create_app(settings), host, port))
    log.info("stopped", uptime_s=round(time.monotonic() - started, 1))
