"""A minimal docker token issuer (the ``auth.token`` realm) for the test registry.

Runs a stdlib ``ThreadingHTTPServer`` in a daemon thread on 127.0.0.1, so it needs no event loop
and keeps answering while a test's loop is blocked or busy.

Protocol (https://distribution.github.io/distribution/spec/auth/token/):

* ``GET /token?service=S&scope=repository:NAME:pull[,push]`` (scope may repeat), with optional
  ``Authorization: Basic``;
* ``POST /token`` with a form ``grant_type=password&username=..&password=..&service=..&scope=..``
  (containerd's OAuth2 path when it has credentials); other grant types get 400, after which
  clients fall back to GET.

Users:

* ``admin_user`` / ``admin_password``: ``pull``, ``push`` (and ``*``) on everything;
* ``reader_user`` / ``reader_password``: ``pull`` on repositories starting with ``reader_prefix``
  (and whatever anonymous may pull);
* anonymous (no Authorization): ``pull`` on repositories starting with ``anonymous_prefix``, or
  nothing when it is ``None`` (a token with an empty ``access`` list, as Docker Hub does).

A wrong password or unknown user gets 401. Scopes a user may not have are silently dropped from
the token, so the registry answers 401 ``insufficient_scope``, like real registries do.

The JWT is RS256, signed by a fresh RSA key whose self-signed certificate is both the registry's
``rootcertbundle`` (see :attr:`TokenIssuer.cert_pem`) and the ``x5c`` header of every token.
``expires_in`` is what the response advertises; the JWT's own ``exp`` is ``iat + token_lifetime``
(defaults to ``expires_in``). Note distribution 2.8 accepts a token for 60 s past its ``exp``
(``token.Leeway``), so to make the registry reject tokens "now", set ``token_lifetime`` to a
negative value below -60 (e.g. -120) while ``expires_in`` stays positive.

Every request served is recorded in :attr:`TokenIssuer.requests` (also failed ones).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ALL_ACTIONS = ("pull", "push", "delete", "*")


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request the issuer served: who asked, for what, and what it answered."""

    user: str | None  # None = anonymous; the claimed user name even when the password was wrong
    scopes: tuple[str, ...]
    service: str
    method: str  # "GET" or "POST"
    status: int
    granted: tuple[tuple[str, tuple[str, ...]], ...] = ()  # ((repository, actions), ...)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _self_signed(key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )


@dataclass
class TokenIssuer:
    """The token server. ``start()`` it, point the registry's ``auth.token`` at it, ``stop()``."""

    service: str = "detour-test-registry"
    issuer: str = "detour-test-issuer"
    admin_user: str = "admin"
    admin_password: str = field(default_factory=lambda: uuid.uuid4().hex)
    reader_user: str = "reader"
    reader_password: str = field(default_factory=lambda: uuid.uuid4().hex)
    reader_prefix: str = "readable/"
    anonymous_prefix: str | None = "public/"
    expires_in: int = 300
    token_lifetime: int | None = None
    requests: list[TokenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._cert = _self_signed(self._key, self.issuer)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- public API -------------------------------------------------------------------------

    @property
    def cert_pem(self) -> bytes:
        """The signing certificate, PEM; write it to the registry's ``rootcertbundle``."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def port(self) -> int:
        assert self._server is not None, "issuer not started"
        return self._server.server_address[1]

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> None:
        if self._server is not None:
            return
        issuer = self

        class Handler(_Handler):
            owner = issuer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="token-issuer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> TokenIssuer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def served(self, status: int | None = 200) -> list[TokenRequest]:
        """A snapshot of the requests so far, only those answered with ``status`` unless None."""
        with self._lock:
            out = list(self.requests)
        return out if status is None else [r for r in out if r.status == status]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def make_token(
        self, user: str | None, access: list[dict[str, Any]], *, lifetime: int | None = None
    ) -> str:
        """Sign a JWT for ``user`` with the given ``access`` claim (also usable by tests)."""
        now = int(time.time())
        life = lifetime if lifetime is not None else self.token_lifetime
        if life is None:
            life = self.expires_in
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + life,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    # -- policy -----------------------------------------------------------------------------

    def _allowed(self, user: str | None, repository: str) -> set[str]:
        if user == self.admin_user:
            return set(ALL_ACTIONS)
        prefixes = [self.anonymous_prefix] if self.anonymous_prefix is not None else []
        if user == self.reader_user:
            prefixes.append(self.reader_prefix)
        return {"pull"} if any(repository.startswith(p) for p in prefixes) else set()

    def _check_password(self, user: str, password: str) -> bool:
        expected = {self.admin_user: self.admin_password, self.reader_user: self.reader_password}
        return user in expected and expected[user] == password

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access: list[dict[str, Any]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions_text = rest.rpartition(":")
            if not name:
                continue
            wanted = [a for a in actions_text.split(",") if a]
            if kind == "repository":
                allowed = self._allowed(user, name)
            elif kind == "registry" and user == self.admin_user:
                allowed = set(ALL_ACTIONS)
            else:
                allowed = set()
            granted = [a for a in wanted if a in allowed]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        return access

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _respond(
        self, user: str | None, password: str | None, scopes: list[str], service: str, method: str
    ) -> tuple[int, dict[str, Any]]:
        if user is not None and not self._check_password(user, password or ""):
            self._record(TokenRequest(user, tuple(scopes), service, method, 401))
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
        access = self._grant(user, scopes)
        granted = tuple((a["name"], tuple(a["actions"])) for a in access)
        token = self.make_token(user, access)
        self._record(TokenRequest(user, tuple(scopes), service, method, 200, granted))
        issued = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued,
        }
        return 200, body


class _Handler(BaseHTTPRequestHandler):
    owner: TokenIssuer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Basic realm="detour-test-issuer"')
        self.end_headers()
        self.wfile.write(data)

    def _basic(self) -> tuple[str | None, str | None]:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None, None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
        user, _, password = decoded.partition(":")
        return user, password

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/token":
            self._send(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        query = parse_qs(url.query)
        user, password = self._basic()
        status, body = self.owner._respond(
            user, password, query.get("scope", []), query.get("service", [""])[0], "GET"
        )
        self._send(status, body)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if url.path != "/token":
            self._send(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        if form.get("grant_type", [""])[0] != "password":
            self._send(400, {"error": "unsupported_grant_type"})
            return
        user = form.get("username", [""])[0]
        password = form.get("password", [""])[0]
        scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
        status, body = self.owner._respond(
            user, password, scopes, form.get("service", [""])[0], "POST"
        )
        self._send(status, body)
