"""Upstream credentials, ``WWW-Authenticate`` challenges and bearer tokens.

Nothing here logs or formats a secret: :class:`Credentials` hides its password from ``repr``,
and tokens are only ever put into ``Authorization`` headers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from proxy.logs import get_logger
from proxy.reference import DOCKER_HUB, canonical_registry, parse_json
from proxy.settings import ConfigError, RegistrySettings

log = get_logger("detour.auth")

# ---------------------------------------------------------------------------- challenges


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-case: "bearer", "basic"
    params: Mapping[str, str]


class _Scanner:
    """A cursor over a header value, for RFC 7235's ``challenge`` grammar."""

    # RFC 7230's tchar, plus token68's "/" and "=" (the caller decides where "=" may go).
    _TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~/=" + string.ascii_letters + string.digits)

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip(self, chars: str = " \t") -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self, *, allow_equals: bool = False) -> str:
        start = self.pos
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char not in self._TOKEN_CHARS or (char == "=" and not allow_equals):
                break
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        assert self.peek() == '"'
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif char == '"':
                return "".join(out)
            else:
                out.append(char)
        return "".join(out)  # unterminated: take what there is


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into its challenges.

    ``Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"``
    gives one bearer challenge with three parameters. Several challenges may share a header,
    and a ``token68`` credential is kept as the parameter ``token68``. Malformed parts are
    skipped, never raised on: the header comes from a remote server.
    """
    scanner = _Scanner(header)
    challenges: list[Challenge] = []
    while True:
        scanner.skip(" \t,")
        scheme = scanner.token()
        if not scheme:
            return challenges
        params: dict[str, str] = {}
        scanner.skip()
        mark = scanner.pos
        token68 = scanner.token(allow_equals=True)
        scanner.skip()
        if token68 and "=" not in token68.rstrip("=") and scanner.peek() in ("", ","):
            params["token68"] = token68
        else:
            scanner.pos = mark
            while True:
                mark = scanner.pos
                scanner.skip(" \t,")
                key = scanner.token()
                scanner.skip()
                if not key or scanner.peek() != "=":
                    scanner.pos = mark  # the next challenge's scheme, or the end
                    break
                scanner.pos += 1
                scanner.skip()
                if scanner.peek() == '"':
                    params[key.lower()] = scanner.quoted()
                else:
                    params[key.lower()] = scanner.token(allow_equals=True)
        challenges.append(Challenge(scheme.lower(), params))


# ---------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


# Keys docker's config.json uses for Docker Hub.
_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")


def _config_key_to_registry(key: str) -> str | None:
    if key in _DOCKER_HUB_KEYS:
        return DOCKER_HUB
    host = key.removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    try:
        return canonical_registry(host)
    except ValueError:
        return None


def load_docker_config(path: Path) -> dict[str, Credentials]:
    """Read the ``auths`` of a docker ``config.json`` (a pull secret's ``.dockerconfigjson``)."""
    data = parse_json(path.read_text())
    auths = data.get("auths", {}) if isinstance(data, dict) else {}
    found: dict[str, Credentials] = {}
    for key, entry in auths.items():
        registry = _config_key_to_registry(key)
        if registry is None or not isinstance(entry, dict):
            continue
        username, password = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                message = f"{path}: auths[{key!r}].auth is not base64 user:password"
                raise ValueError(message) from None
            username, _, password = decoded.partition(":")
        if isinstance(username, str) and isinstance(password, str) and username:
            found[registry] = Credentials(username, password)
    return found


class CredentialStore:
    """Credentials by registry: the settings' ``registries`` win over the docker config.

    The docker config is a mounted pull secret: it may be absent at first (an optional
    Secret), and it rotates. It is re-read when its file changes, checked at most every
    :data:`RELOAD_SECONDS`. An unreadable file at start is a configuration error; later, the
    last good credentials are kept and the problem is logged.
    """

    RELOAD_SECONDS = 10.0

    def __init__(
        self,
        registries: Mapping[str, RegistrySettings],
        docker_config: Path | None = None,
    ) -> None:
        self._configured = {
            registry: Credentials(conf.username, conf.password.get_secret_value())
            for registry, conf in registries.items()
            if conf.username is not None and conf.password is not None
        }
        self._docker_config = docker_config
        self._from_file: dict[str, Credentials] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        if docker_config is not None:
            try:
                self._reload(docker_config)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"docker_config {docker_config}: {exc}") from None
            if self._stamp is None:
                log.warning("docker_config_missing", path=str(docker_config))

    def lookup(self, registry: str) -> Credentials | None:
        if registry in self._configured:
            return self._configured[registry]
        if self._docker_config is not None and time.monotonic() >= self._checked:
            try:
                self._reload(self._docker_config)
            except (OSError, ValueError) as exc:
                log.warning(
                    "docker_config_unreadable", path=str(self._docker_config), error=str(exc)
                )
        return self._from_file.get(registry)

    def _reload(self, path: Path) -> None:
        self._checked = time.monotonic() + self.RELOAD_SECONDS
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._from_file, self._stamp = {}, None
            return
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._from_file = load_docker_config(path)
            self._stamp = stamp
            log.info("docker_config_loaded", path=str(path), registries=sorted(self._from_file))


# ---------------------------------------------------------------------------- tokens


class TokenResponse(TypedDict, total=False):
    """A token service's answer (distribution's token spec, and OAuth2's ``access_token``)."""

    token: str
    access_token: str
    expires_in: int
    issued_at: str


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # time.monotonic()

    @property
    def fresh(self) -> bool:
        return time.monotonic() < self.expires_at


# The spec's default lifetime when a token response gives none.
DEFAULT_TOKEN_SECONDS = 60
# Refresh a little early, so a token does not expire between our check and the upstream's.
TOKEN_MARGIN_SECONDS = 10


def token_from_response(body: TokenResponse) -> Token | None:
    value = body.get("token") or body.get("access_token")
    if not isinstance(value, str) or not value:
        return None
    lifetime = body.get("expires_in")
    if not isinstance(lifetime, int) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_SECONDS
    lifetime = max(lifetime - TOKEN_MARGIN_SECONDS, lifetime // 2)
    return Token(value, time.monotonic() + lifetime)


class TokenCache:
    """Bearer tokens by (registry, scope), with one refresh at a time per key.

    Concurrent requests that all meet a 401 call :meth:`refresh` with the token they used;
    the first fetches a new one under the key's lock, and the rest find it already replaced
    and take it, so a burst of 401s costs one token request.
    """

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], Token] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def get(self, registry: str, scope: str) -> Token | None:
        token = self._tokens.get((registry, scope))
        return token if token is not None and token.fresh else None

    def lock(self, registry: str, scope: str) -> asyncio.Lock:
        return self._locks.setdefault((registry, scope), asyncio.Lock())

    def replaced(self, registry: str, scope: str, used: Token | None) -> Token | None:
        """A fresh token other than ``used``, if another request already refreshed it."""
        current = self.get(registry, scope)
        return current if current is not None and current is not used else None

    def put(self, registry: str, scope: str, token: Token) -> None:
        self._tokens[(registry, scope)] = token
