"""Image references: parsing, validation and normalization.

Shared by the proxy and the webhook. Everything here is a pure function over strings, and every
name, tag and digest is checked against the distribution spec's grammar before it can reach a
file system path or a URL.

Forms understood:

* an image reference as written in a pod spec: ``nats:2.10``, ``ghcr.io/a/b@sha256:...``,
  ``registry.local:5000/team/app:v1``;
* a path-mode repository, as the proxy sees it in ``/v2/<registry>/<repository>/...``, where a
  port is spelled ``_<port>`` (``registry.local_5000``) because ``:`` is not allowed there. A
  host name never contains ``_`` and a path component may, so this can't be misread:
  ``registry.team-2`` is a host, not ``registry.team:2``. The older ``-<port>`` spelling is
  still read where it can't be a host name: after ``localhost`` or an IPv4 address
  (``127.0.0.1-5000``);
* a containerd mirror-mode repository, ``/v2/<repository>/...?ns=<registry>``.

A port outside 1-65535 is a :class:`NameInvalid`, wherever it is written.

:func:`parse_json` is here too: the one JSON decoder for bodies Detour is sent (manifests, tag
lists, token responses, admission reviews), since both the proxy and the webhook parse them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from proxy.errors import DigestInvalid, NameInvalid, TagInvalid

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
# Names docker itself treats as Docker Hub.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

NAME_TOTAL_MAX = 255  # distribution's limit on "registry/repository"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*"
_HOST = re.compile(rf"(?:{_DOMAIN}|\[[a-fA-F0-9:]+\])(?::(?P<port>[0-9]{{1,5}}))?")
_DOMAIN_ONLY = re.compile(_DOMAIN)
PORT_MAX = 65535
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_HEX = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}
# Path mode's port: ``registry.local_5000``; and the older ``localhost-5000``.
_PORT_SUFFIX = re.compile(r"(?P<host>.+)_(?P<port>[0-9]{1,5})")
_LEGACY_PORT_SUFFIX = re.compile(r"(?P<host>.+)-(?P<port>[0-9]{1,5})")


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest, ``<algorithm>:<hex>``; only algorithms we can verify are accepted."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, hexpart = text.partition(":")
        if not sep:
            raise DigestInvalid("invalid digest", {"digest": text[:200]})
        pattern = _DIGEST_HEX.get(algorithm)
        if pattern is None:
            raise DigestInvalid(
                "unsupported digest algorithm",
                {"digest": text[:200], "supported": sorted(_DIGEST_HEX)},
            )
        if not pattern.fullmatch(hexpart):
            raise DigestInvalid("invalid digest", {"digest": text[:200]})
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def is_digest(reference: str) -> bool:
    """Whether a manifest reference is a digest (rather than a tag)."""
    return ":" in reference


def validate_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise TagInvalid("invalid tag", {"tag": tag[:200]})
    return tag


def canonical_registry(host: str) -> str:
    """Lower-case a registry host and fold Docker Hub's aliases into ``docker.io``."""
    match = _HOST.fullmatch(host)
    if not match:
        raise NameInvalid("invalid registry host", {"registry": host[:200]})
    if match["port"] is not None and not 1 <= int(match["port"]) <= PORT_MAX:
        raise NameInvalid(f"registry port outside 1-{PORT_MAX}", {"registry": host[:200]})
    host = host.lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def api_host(registry: str) -> str:
    """The host that serves a registry's API: Docker Hub's is not ``docker.io`` itself."""
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


def _looks_like_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def validate_repository(repository: str) -> str:
    if not repository:
        raise NameInvalid("missing repository name")
    for component in repository.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise NameInvalid("invalid repository name", {"name": repository[:300]})
    return repository


@dataclass(frozen=True, slots=True)
class ImageName:
    """A fully normalized repository: ``docker.io/library/nats``."""

    registry: str  # canonical host[:port], e.g. "docker.io", "registry.local:5000"
    repository: str  # e.g. "library/nats"

    def __post_init__(self) -> None:
        if len(self.registry) + 1 + len(self.repository) > NAME_TOTAL_MAX:
            raise NameInvalid(
                f"name longer than {NAME_TOTAL_MAX} characters", {"length": len(str(self))}
            )

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"

    @classmethod
    def of(cls, registry: str, repository: str) -> ImageName:
        """Validate and normalize, adding ``library/`` to single-component Docker Hub names."""
        registry = canonical_registry(registry)
        validate_repository(repository)
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        return cls(registry, repository)

    @classmethod
    def parse(cls, text: str) -> ImageName:
        """Parse a name as written in an image reference (``nats``, ``ghcr.io/a/b``)."""
        first, slash, rest = text.partition("/")
        if slash and _looks_like_registry(first):
            return cls.of(first, rest)
        return cls.of(DOCKER_HUB, text)

    @classmethod
    def from_path(cls, path_name: str, ns: str | None = None) -> ImageName:
        """Parse the ``<name>`` of a ``/v2/<name>/...`` path.

        With ``ns`` (containerd's mirror mode) the registry is ``ns`` and the whole path is the
        repository. Otherwise (path mode) a first component with a ``.`` or ``:``, or
        ``localhost``, names the registry, as does one with a port (see :func:`decode_port`).
        """
        if ns is not None:
            return cls.of(ns, path_name)
        first, slash, rest = path_name.partition("/")
        if slash and _looks_like_registry(decode_port(first)):
            return cls.of(decode_port(first), rest)
        return cls.of(DOCKER_HUB, path_name)

    def path_form(self) -> str:
        """This name as path mode spells it: ``registry.local_5000/team/app``."""
        return f"{encode_port(self.registry)}/{self.repository}"


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def decode_port(component: str) -> str:
    """The registry a path-mode first component names, or the component unchanged.

    ``registry.local_5000`` → ``registry.local:5000`` (``_`` is never part of a host name, so a
    single-label host is read too: ``registry_5000`` → ``registry:5000``). The older ``-<port>``
    only after ``localhost`` or an IPv4 address (``127.0.0.1-5000`` → ``127.0.0.1:5000``):
    anywhere else it is part of the host name (``registry.team-2``, ``mirror.corp-01``). The
    port is not range-checked here; :func:`canonical_registry` does that.
    """
    if ":" in component:
        return component
    match = _PORT_SUFFIX.fullmatch(component)
    if match and _DOMAIN_ONLY.fullmatch(match["host"]):
        return f"{match['host']}:{match['port']}"
    match = _LEGACY_PORT_SUFFIX.fullmatch(component)
    if match and (match["host"] == "localhost" or _is_ipv4(match["host"])):
        return f"{match['host']}:{match['port']}"
    return component


def encode_port(host: str) -> str:
    """``registry.local:5000`` → ``registry.local_5000``; anything else unchanged."""
    if host.startswith("["):
        return host  # IPv6 literals keep their form (and can't be spelled in path mode)
    name, sep, port = host.rpartition(":")
    return f"{name}_{port}" if sep else host


def parse_json(data: str | bytes) -> Any:
    """``json.loads``, with a document nested deeper than the decoder recurses (it raises
    :class:`RecursionError`) refused like any other malformed one: :class:`ValueError`."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


@dataclass(frozen=True, slots=True)
class Reference:
    """An image reference: a name with a tag, a digest, or both."""

    name: ImageName
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str, *, default_tag: str | None = "latest") -> Reference:
        """Parse ``[registry/]repository[:tag][@digest]``.

        With neither a tag nor a digest the tag is ``default_tag``, as docker does.
        """
        rest, at, digest_text = text.partition("@")
        digest = Digest.parse(digest_text) if at else None
        tag: str | None = None
        # A ':' after the last '/' starts the tag; one before it belongs to a registry port.
        head, colon, tail = rest.rpartition(":")
        if colon and "/" not in tail:
            rest, tag = head, validate_tag(tail)
        if not rest:
            raise NameInvalid("missing repository name", {"reference": text[:300]})
        if tag is None and digest is None:
            tag = default_tag
        return cls(ImageName.parse(rest), tag, digest)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None
        return self.tag

    def suffix(self) -> str:
        """``:tag``, ``@digest`` or ``:tag@digest``, as written after the name."""
        out = f":{self.tag}" if self.tag else ""
        return out + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return f"{self.name}{self.suffix()}"


def parse_manifest_reference(reference: str) -> str | Digest:
    """The ``<reference>`` of ``/manifests/<reference>``: a tag or a digest."""
    return Digest.parse(reference) if is_digest(reference) else validate_tag(reference)
