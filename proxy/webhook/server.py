"""The mutating admission webhook's server: point every pod's images at Detour in path mode.

``detour webhook --config FILE`` serves ``POST /mutate`` (AdmissionReview
``admission.k8s.io/v1``) over TLS, plus ``GET /healthz`` and ``GET /metrics``. What a review is
and how it is answered is :mod:`proxy.webhook.review`; what is rewritten in a pod, and what is
skipped, :mod:`proxy.webhook.rewrite`; the certificate and its reload, :mod:`proxy.webhook.tls`;
the counters, :mod:`proxy.webhook.metrics`. This module reads the bodies, within bounds, and
answers them.

Failure modes: a body that is not JSON (or is nested deeper than the parser goes), or not an
AdmissionReview with a ``request`` and a ``request.uid``, gets HTTP 400 with a message.
A body over ``webhook.max_body`` gets 413 (at once when its ``Content-Length`` says so, else at
the first byte past the limit), and so does one whose JSON could take more than
``MAX_EXPANSION`` times ``webhook.max_body`` of memory to parse
(:func:`proxy.webhook.review.parse_cost`); a body that takes longer than ``BODY_TIMEOUT`` to
arrive gets 408. The API server then applies the webhook's ``failurePolicy``. A sender that goes
away before its body is read (the API server gave up waiting) is counted and logged at info.
Any internal error still allows the pod, unchanged; it is logged and counted as
``detour_webhook_reviews_total{outcome="error"}``: the webhook must never be the reason a pod
cannot start.

Memory: a killed webhook admits pods un-rewritten, so what it holds at once is bounded. Bodies
over ``SMALL_BODY`` are read inside a semaphore of ``webhook.max_concurrent``: the requests
waiting for it keep their bodies in the kernel, not in the process (smaller bodies are in
aiohttp's read buffer before the handler runs, so they skip the wait). Nothing awaits between
decoding a body and answering it, so only one review at a time is ever in its parsed form.
The peak resident memory is then at most::

    idle + max_concurrent * 1.25 * max_body      bodies being read (bytearray slack)
         + MAX_EXPANSION * max_body              the one review being parsed
         + 1.25 MiB per connection waiting       aiohttp's and TLS's read buffers

about 50 + 40 + 80 MiB with the defaults, plus the connections (tests/test_webhook_command.py
measures it).

Of the proxy it imports :mod:`proxy.reference` (the JSON parser with a nesting limit),
:mod:`proxy.settings` and :mod:`proxy.logs`: the webhook runs as its own Deployment and shares
nothing else with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.logs import configure_logging, get_logger
from proxy.reference import parse_json
from proxy.setting_types import split_host_port
from proxy.settings import ConfigError, Settings, WebhookSettings
from proxy.webhook.metrics import WebhookMetrics
from proxy.webhook.review import (
    AdmissionRequest,
    AdmissionReview,
    Decision,
    MalformedReview,
    parse_cost,
    parse_review,
    review_pod,
)
from proxy.webhook.rewrite import Policy
from proxy.webhook.tls import CertificateReloader, build_ssl_context

# A body this small is in aiohttp's read buffer (256 KiB, its default) before the handler runs:
# making it wait for the semaphore would save no memory, and would queue it behind large ones.
SMALL_BODY: Final = 256 * 1024
# A review is parsed only if parse_cost bounds it by this many times webhook.max_body. It puts
# pods as the API server sends them at about 19 times their size (25 with any non-ASCII text),
# so with max_body at 4 MiB every review up to 3.2 MiB is parsed: the API server sends 3 MiB.
MAX_EXPANSION: Final = 20
# A body must arrive within this many seconds, so a slow sender cannot keep a turn for long; the
# API server gives up after the webhook's timeoutSeconds (5 in the manifests, 30 at most).
BODY_TIMEOUT: Final = 10.0

_log = get_logger("detour.webhook")


class ReviewTooLarge(Exception):
    """The body is over ``webhook.max_body``, or could take too much memory to parse: HTTP 413."""


@dataclass(frozen=True, slots=True)
class Intake:
    """How much of the API server's traffic the webhook holds at once (the module docstring)."""

    max_body: int
    max_cost: int
    gate: asyncio.Semaphore

    @classmethod
    def from_settings(cls, settings: WebhookSettings) -> Intake:
        return cls(
            max_body=settings.max_body,
            max_cost=MAX_EXPANSION * settings.max_body,
            gate=asyncio.Semaphore(settings.max_concurrent),
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


async def _read_body(request: web.Request, limit: int) -> bytearray:
    """The request's body, refused at the first byte past ``limit``."""
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > limit:
            raise ReviewTooLarge(
                f"the AdmissionReview is larger than webhook.max_body ({_mib(limit)})"
            )
    return body


async def receive_review(request: web.Request, intake: Intake) -> AdmissionReview:
    """Read, check and parse the body. Raises :class:`ReviewTooLarge`, :class:`TimeoutError`
    (:data:`BODY_TIMEOUT`), or :class:`ValueError` for a malformed body."""
    async with asyncio.timeout(BODY_TIMEOUT):
        raw = await _read_body(request, intake.max_body)
    cost = parse_cost(raw)
    if cost > intake.max_cost:
        raise ReviewTooLarge(
            f"the AdmissionReview ({_mib(len(raw))}) could take up to {_mib(cost)} to parse, more "
            f"than {MAX_EXPANSION} times webhook.max_body ({_mib(intake.max_cost)})"
        )
    text = raw.decode()
    del raw  # the bytes go before the objects come
    return parse_review(parse_json(text))


POLICY = web.AppKey("detour_webhook_policy", Policy)
METRICS = web.AppKey("detour_webhook_metrics", WebhookMetrics)
RELOADER = web.AppKey("detour_webhook_reloader", CertificateReloader)
INTAKE = web.AppKey("detour_webhook_intake", Intake)


def _refuse(request: web.Request, status: int, outcome: str, message: str) -> web.Response:
    request.app[METRICS].reviews.labels(outcome).inc()
    _log.warning(
        f"review_{outcome}",
        message=message,
        size=request.content_length,
        remote=request.remote,
    )
    return web.json_response({"message": message}, status=status)


def _pod_label(request: AdmissionRequest) -> str:
    pod = request.get("object") or {}
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    name = request.get("name") or metadata.get("name") or f"{metadata.get('generateName', '')}*"
    return f"{request.get('namespace', '')}/{name}"


async def mutate(request: web.Request) -> web.Response:
    intake = request.app[INTAKE]
    size = request.content_length
    if size is not None and size > intake.max_body:  # refused unread
        message = (
            f"the AdmissionReview ({_mib(size)}) is larger than webhook.max_body "
            f"({_mib(intake.max_body)})"
        )
        return _refuse(request, 413, "too_large", message)
    try:
        if size is not None and size <= SMALL_BODY:
            review = await receive_review(request, intake)
        else:
            async with intake.gate:
                review = await receive_review(request, intake)
    except ReviewTooLarge as exc:
        return _refuse(request, 413, "too_large", str(exc))
    except TimeoutError:
        message = f"the AdmissionReview did not arrive within {BODY_TIMEOUT:g}s"
        return _refuse(request, 408, "timeout", message)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        message = str(exc) if isinstance(exc, MalformedReview) else f"invalid JSON: {exc}"
        return _refuse(request, 400, "malformed", message)
    except ConnectionError:  # the sender went away mid-body: no one to answer
        request.app[METRICS].reviews.labels("abandoned").inc()
        _log.info("review_abandoned", size=size, remote=request.remote)
        return web.Response(status=400)
    # Nothing awaits from here to the response, so the review whose turn comes next (the gate
    # is released) is read only after this one's objects are gone.
    return _answer(request, review)


def _answer(request: web.Request, review: AdmissionReview) -> web.Response:
    metrics = request.app[METRICS]
    admission = review["request"]
    uid = admission["uid"]
    try:
        decision = review_pod(admission, request.app[POLICY])
    except Exception:
        _log.exception("review_failed", uid=uid, pod=_pod_label(admission))
        decision = Decision({"uid": uid, "allowed": True}, "error")
    metrics.reviews.labels(decision.outcome).inc()
    plan = decision.plan
    if plan is not None:
        for reason in plan.skip_reasons():
            metrics.skips.labels(reason).inc()
        if decision.outcome == "mutated":
            metrics.images_rewritten.inc(len(plan.rewrites))
            _log.info(
                "pod_mutated",
                uid=uid,
                pod=_pod_label(admission),
                images={r.key: [r.original, r.image] for r in plan.rewrites},
                skipped={f"{s.field}/{s.name}": s.reason for s in plan.skipped_images} or None,
            )
        else:
            _log.debug(
                "pod_unchanged",
                uid=uid,
                pod=_pod_label(admission),
                skip=plan.skip,
                skipped={f"{s.field}/{s.name}": s.reason for s in plan.skipped_images} or None,
            )
    elif decision.note is not None:
        _log.debug("review_ignored", uid=uid, why=decision.note)
    answer: AdmissionReview = {
        "apiVersion": review["apiVersion"],
        "kind": "AdmissionReview",
        "response": decision.response,
    }
    return web.json_response(answer)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _reload_certificates(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[RELOADER].run(), name="detour-webhook-tls-reload")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_webhook_app(
    settings: Settings, *, ssl_context: ssl.SSLContext | None = None
) -> web.Application:
    """The webhook's application: ``POST /mutate``, ``GET /healthz``, ``GET /metrics``.

    With ``ssl_context`` (the one the server is started with) the certificate files named in
    the settings are polled and reloaded into it while the application runs.
    """
    app = web.Application(client_max_size=settings.webhook.max_body)
    metrics = WebhookMetrics()
    app[POLICY] = Policy.from_settings(settings.webhook)
    app[INTAKE] = Intake.from_settings(settings.webhook)
    app[METRICS] = metrics
    if ssl_context is not None:
        hook = settings.webhook
        app[RELOADER] = CertificateReloader(
            ssl_context, hook.tls_cert, hook.tls_key, hook.tls_reload_interval, metrics
        )
        app.cleanup_ctx.append(_reload_certificates)
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app


def run_webhook(settings: Settings) -> None:
    """Serve the webhook over TLS on ``webhook.listen`` until SIGINT or SIGTERM."""
    configure_logging(settings.log_level)
    hook = settings.webhook
    ssl_context = build_ssl_context(hook)
    app = create_webhook_app(settings, ssl_context=ssl_context)
    host, port = split_host_port(hook.listen, 8443)
    policy = app[POLICY]
    _log.info(
        "webhook_listening",
        listen=hook.listen,
        prefix=policy.prefix,
        ignore_namespaces=sorted(policy.ignore_namespaces),
    )
    try:
        web.run_app(
            app,
            host=host,
            port=port,
            ssl_context=ssl_context,
            access_log=None,
            print=None,
        )
    except OSError as exc:
        listening = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)
        if not isinstance(exc, socket.gaierror) and exc.errno not in listening:
            raise  # not the listen address: a bug must not read as bad input
        gai = isinstance(exc, socket.gaierror)
        reason = (exc.strerror or str(exc)) if gai or not exc.errno else os.strerror(exc.errno)
        raise ConfigError(f"cannot listen on {hook.listen}: {reason}") from None
