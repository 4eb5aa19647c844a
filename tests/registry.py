"""The real distribution registry (``/usr/bin/docker-registry``, 2.8.2) as a test subprocess.

Listens on 127.0.0.1 with filesystem storage in a temp dir; ``stop()`` / ``start()`` restart it
on the same port and storage, so a test can take the mirror down and bring it back, and
``freeze()`` / ``thaw()`` (SIGSTOP / SIGCONT) make it accept connections but never answer.

Auth modes: ``"none"``; ``"htpasswd"`` (bcrypt, one user: :attr:`Registry.username` /
:attr:`Registry.password`); ``"token"`` (``auth.token`` pointing at a :class:`TokenIssuer`,
:attr:`Registry.issuer`). :attr:`Registry.push_auth` is the (user, password) to push with in
each mode (None for ``"none"``); ``tests.images`` does the Basic / Bearer dance with it.

The registry writes an access log line in combined log format to its output (redirected to
:attr:`Registry.log_path`), e.g.::

    127.0.0.1 - - [24/Nov/2026:20:17:11 +0000] "GET /v2/foo/manifests/x HTTP/1.1" 404 91 "" "curl"

Fields: remote, ``-``, user (always ``-``), time, ``"METHOD PATH PROTO"``, status, bytes,
referer, user agent. The path is exactly as sent, query included (containerd's mirror mode
sends ``?ns=docker.io``, ``?ns=registry.local%3A5000``). HEAD requests are logged too. The
line is written *after* the response has been sent, so a client can see the response before
the line exists: use :meth:`Registry.wait_paths` (or pass ``at_least``) rather than reading the
log instantly.
Readiness probes made by :meth:`Registry.start` are not reported.

TLS: ``Registry(tls=True)`` serves https with a certificate from a throwaway private CA
(:attr:`Registry.ca_path`, PEM), for 127.0.0.1 unless ``tls_names`` says otherwise (IP
addresses become IP SANs, the rest DNS names). :meth:`Registry.client_ssl` is a client context
trusting that CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from proxy.webhook.certs import WebhookCertificates, issue
from tests.support import Daemon, free_port
from tests.token_issuer import TokenIssuer

REGISTRY_BIN = "/usr/bin/docker-registry"
AuthMode = Literal["none", "htpasswd", "token"]

_READY_AGENT = "detour-test-readiness"
_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) '
    r'(?P<proto>[^"]+)" (?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$'
)


def make_certificates(names: Sequence[str] = ("127.0.0.1",)) -> WebhookCertificates:
    """A fresh private CA and a one-day serving certificate it signs for ``names`` (host names
    or IP addresses), as ``detour webhook-certs`` makes them: ``ca_pem``, ``cert_pem``,
    ``key_pem``."""
    return issue("detour test CA", names, days=1)


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """One access-log line."""

    method: str
    path: str  # path + query, as sent
    status: int
    size: int
    agent: str


class Registry:
    """A distribution registry subprocess. Use as a context manager or call ``close()``."""

    def __init__(
        self,
        auth: AuthMode = "none",
        *,
        workdir: Path | None = None,
        port: int | None = None,
        issuer: TokenIssuer | None = None,
        username: str = "admin",
        password: str | None = None,
        tls: bool = False,
        tls_names: Sequence[str] = ("127.0.0.1",),
    ) -> None:
        self.auth: AuthMode = auth
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="detour-registry-")) if workdir is None else workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.dir / "storage"
        self.config_path = self.dir / "config.json"
        self.log_path = self.dir / "registry.log"
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.ca_path = self.dir / "ca.pem"  # tls only
        if tls:
            certs = make_certificates(tls_names)
            self.ca_path.write_bytes(certs.ca_pem)
            (self.dir / "tls.crt").write_bytes(certs.cert_pem)
            (self.dir / "tls.key").write_bytes(certs.key_pem)
        self.username = username
        self.password = password or uuid.uuid4().hex
        self._own_issuer = False
        self.issuer: TokenIssuer | None = None
        if auth == "token":
            if issuer is None:
                issuer = TokenIssuer()
                self._own_issuer = True
            issuer.start()
            self.issuer = issuer
        self._daemon = Daemon(
            "registry", [REGISTRY_BIN, "serve", str(self.config_path)], self.log_path, grace=5
        )
        self._frozen = False
        self._log_offset = 0
        self._entries: list[AccessEntry] = []
        self._write_config()

    # -- configuration ----------------------------------------------------------------------

    @property
    def named_hosts(self) -> dict[str, dict[str, object]]:
        """``registries`` entries naming the hosts this registry sends Detour to besides its
        own (the token issuer, on a loopback port), which Detour otherwise refuses to reach."""
        if self.issuer is None:
            return {}
        return {f"127.0.0.1:{self.issuer.port}": {}}

    @property
    def push_auth(self) -> tuple[str, str] | None:
        """Credentials with push rights: htpasswd user, or the issuer's admin, or None."""
        if self.auth == "htpasswd":
            return (self.username, self.password)
        if self.auth == "token":
            assert self.issuer is not None
            return (self.issuer.admin_user, self.issuer.admin_password)
        return None

    def _write_config(self) -> None:
        serving: dict[str, object] = {"addr": self.host, "secret": "detour-test-secret"}
        if self.tls:
            serving["tls"] = {
                "certificate": str(self.dir / "tls.crt"),
                "key": str(self.dir / "tls.key"),
            }
        config: dict[str, object] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": serving,
        }
        if self.auth == "htpasswd":
            htpasswd = self.dir / "htpasswd"
            line = subprocess.run(
                ["htpasswd", "-Bbn", self.username, self.password],
                check=True,
                capture_output=True,
            ).stdout.strip()
            htpasswd.write_bytes(line + b"\n")
            config["auth"] = {"htpasswd": {"realm": "detour-test", "path": str(htpasswd)}}
        elif self.auth == "token":
            assert self.issuer is not None
            bundle = self.dir / "token-root.pem"
            bundle.write_bytes(self.issuer.cert_pem)
            config["auth"] = {
                "token": {
                    "realm": self.issuer.realm,
                    "service": self.issuer.service,
                    "issuer": self.issuer.issuer,
                    "rootcertbundle": str(bundle),
                }
            }
        self.config_path.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON

    # -- process ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._daemon.running

    @property
    def frozen(self) -> bool:
        return self._frozen

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) on the same port and storage; return once ``GET /v2/`` answers."""
        if self.running:
            return
        self._frozen = False
        self._daemon.start(self._probe, timeout)

    def client_ssl(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        """A client context trusting this registry's CA (and only it)."""
        assert self.tls, "not a TLS registry"
        context = ssl.create_default_context(cafile=str(self.ca_path))
        context.check_hostname = check_hostname
        return context

    def _probe(self) -> bool:
        conn: http.client.HTTPConnection
        if self.tls:  # the certificate may be for another name: only the CA is checked
            context = self.client_ssl(check_hostname=False)
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=1, context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/v2/", headers={"User-Agent": _READY_AGENT})
            status = conn.getresponse().status
        except OSError:
            return False
        finally:
            conn.close()
        return status in (200, 401)

    def stop(self) -> None:
        """Kill the process (connections are refused afterwards). Storage is kept."""
        if self._frozen and self._daemon.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._daemon.send_signal(signal.SIGCONT)
        self._frozen = False
        self._daemon.stop()

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers (upstream timeout)."""
        self._daemon.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        self._daemon.send_signal(signal.SIGCONT)
        self._frozen = False

    def close(self) -> None:
        """Stop the process, the issuer if we made it, and delete our temp dir."""
        self.stop()
        if self._own_issuer and self.issuer is not None:
            self.issuer.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stored_blob(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob's bytes."""
        hexpart = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"

    def log_text(self) -> str:
        return self._daemon.log_text()

    # -- access log -------------------------------------------------------------------------

    def access_log(self) -> list[AccessEntry]:
        """Every request logged so far (across restarts), in order, without readiness probes."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                chunk = log.read()
        except FileNotFoundError:
            chunk = b""
        end = chunk.rfind(b"\n") + 1  # only complete lines; the rest is read next time
        self._log_offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            m = _ACCESS_LINE.match(line)
            if m is None or m["agent"] == _READY_AGENT:
                continue
            size = 0 if m["size"] == "-" else int(m["size"])
            self._entries.append(
                AccessEntry(m["method"], m["path"], int(m["status"]), size, m["agent"])
            )
        return list(self._entries)

    def access_paths(self) -> list[str]:
        """Request paths with query, e.g. ``/v2/docker-mirror/library/nats/manifests/1.0``."""
        return [e.path for e in self.access_log()]

    def mark(self) -> int:
        """A position in the access log; pass it to ``paths_since`` / ``wait_paths``."""
        return len(self.access_log())

    def entries_since(self, mark: int) -> list[AccessEntry]:
        return self.access_log()[mark:]

    def paths_since(self, mark: int) -> list[str]:
        """Paths logged after ``mark``, as of now (see the module docstring about the lag)."""
        return [e.path for e in self.entries_since(mark)]

    async def wait_entries(
        self, mark: int = 0, *, at_least: int = 0, limit: float = 5.0, settle: float = 0.05
    ) -> list[AccessEntry]:
        """Entries after ``mark`` once there are ``at_least`` and none arrived for ``settle`` s.

        Sleeps with ``asyncio.sleep``, so a proxy in the same event loop keeps running.
        """
        deadline = time.monotonic() + limit
        last: list[AccessEntry] | None = None
        while True:
            entries = self.entries_since(mark)
            if len(entries) >= at_least and last is not None and len(entries) == len(last):
                return entries
            if time.monotonic() > deadline:
                if len(entries) >= at_least:
                    return entries
                raise TimeoutError(
                    f"{len(entries)} access-log entries after mark {mark}, wanted {at_least}: "
                    f"{[e.path for e in entries]}"
                )
            last = entries if len(entries) >= at_least else None
            await asyncio.sleep(settle)

    async def wait_paths(
        self, mark: int = 0, *, at_least: int = 0, limit: float = 5.0, settle: float = 0.05
    ) -> list[str]:
        entries = await self.wait_entries(mark, at_least=at_least, limit=limit, settle=settle)
        return [e.path for e in entries]
