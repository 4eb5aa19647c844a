"""The webhook's TLS: the server context, and its reload when a mounted Secret rotates.

The certificate and key (``webhook.tls_cert``, ``webhook.tls_key``) are polled every
``webhook.tls_reload_interval`` seconds (a mounted Secret is updated by a symlink swap that
file events do not reliably report); when their content changes and the new pair loads, new
connections get the new certificate. A pair that does not load (a half-written rotation, a key
that does not match) is logged and the old one kept. Each look that finds changed files is
counted in ``detour_webhook_tls_reloads_total{result}``.

Of the proxy it imports :mod:`proxy.settings` (the settings, and ``ConfigError`` for a pair
that does not load at start) and :mod:`proxy.logs`.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

from proxy.logs import get_logger
from proxy.settings import ConfigError, WebhookSettings
from proxy.webhook.metrics import WebhookMetrics

_log = get_logger("detour.webhook")


def build_ssl_context(settings: WebhookSettings) -> ssl.SSLContext:
    """A server context with ``tls_cert`` / ``tls_key``; :class:`ConfigError` if they won't load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ConfigError(
            f"webhook.tls_cert / webhook.tls_key: cannot load {settings.tls_cert} and "
            f"{settings.tls_key}: {exc}"
        ) from None
    return context


class CertificateReloader:
    """Poll a certificate and key; load them into a live context when their content changes.

    Mounted Secrets change by an atomic swap of a ``..data`` symlink, which inotify does not
    reliably report, so the content of both files is hashed every ``interval`` seconds. A new
    pair is first loaded into a scratch context, so a half-written or mismatched pair never
    reaches the live one; it is refused, logged and retried when the files change again.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        cert: Path,
        key: Path,
        interval: float,
        metrics: WebhookMetrics | None = None,
    ) -> None:
        self.context = context
        self.cert = cert
        self.key = key
        self.interval = interval
        self.metrics = metrics
        self._seen = self._fingerprint()

    def _fingerprint(self) -> bytes | None:
        digest = hashlib.sha256()
        try:
            for path in (self.cert, self.key):
                data = path.read_bytes()
                digest.update(len(data).to_bytes(8, "big"))
                digest.update(data)
        except OSError:
            return None  # mid-swap or gone: look again next time
        return digest.digest()

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.tls_reloads.labels(result).inc()

    def check(self, fingerprint: bytes | None = None) -> bool:
        """Reload if the files changed since the last look; whether a new pair was loaded."""
        if fingerprint is None:
            fingerprint = self._fingerprint()
        if fingerprint is None or fingerprint == self._seen:
            return False
        self._seen = fingerprint
        try:
            scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            scratch.load_cert_chain(self.cert, self.key)
            self.context.load_cert_chain(self.cert, self.key)
        except OSError as exc:
            _log.warning(
                "tls_reload_failed", cert=str(self.cert), key=str(self.key), error=str(exc)
            )
            self._count("failure")
            return False
        _log.info("tls_reloaded", cert=str(self.cert))
        self._count("success")
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            # Reading runs off the loop; loading stays on it, where handshakes use the context.
            fingerprint = await asyncio.to_thread(self._fingerprint)
            self.check(fingerprint)
