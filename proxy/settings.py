"""Settings: a YAML file, overridden by ``DETOUR_*`` environment variables.

Nested keys use ``__`` in the environment: ``DETOUR_CACHE__DIR=/data`` overrides ``cache.dir``;
lists and maps take JSON: ``DETOUR_REDIRECTS='[{"src": "docker.io/", "to": "mirror.local/hub/"}]'``.
A bad file is refused by :func:`load_settings` with :class:`ConfigError`, whose message names
every offending key (how is :mod:`proxy.config_errors`'s part; this module says what the
settings are).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from proxy.config_errors import ConfigError as ConfigError
from proxy.config_errors import (
    KeyLines,
    describe,
    environment_error,
    key_lines,
    unknown_variables,
)
from proxy.memory import WRITE_BUFFER_BYTES
from proxy.reference import ImageName, canonical_registry, validate_repository
from proxy.setting_types import ByteSize, ByteSizeOrZero, Duration, DurationOrZero, Listen


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistrySettings(_Section):
    """How to reach one registry.

    ``ca_file`` is a PEM bundle trusted for this registry's host on top of the system's store
    (a mirror with a private CA); ``tls_verify: false`` accepts any certificate from it. Both
    apply to the registry's own API host; a host it redirects to is verified as usual unless it
    has an entry of its own. The file is read when the proxy starts
    (:func:`proxy.upstream.connections.registry_tls`), not here: the webhook reads the same settings
    without mounting the CA.
    """

    insecure: bool = False  # plain http
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None
    tls_verify: bool = True

    @model_validator(mode="after")
    def _both_or_neither(self) -> RegistrySettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self

    @model_validator(mode="after")
    def _tls_needs_https(self) -> RegistrySettings:
        if self.insecure and (self.ca_file is not None or not self.tls_verify):
            raise ValueError("ca_file and tls_verify are for https; insecure means plain http")
        if self.ca_file is not None and not self.tls_verify:
            raise ValueError("ca_file has no use with tls_verify: false")
        return self


class RedirectRule(_Section):
    """Send names under ``src`` to the mirrors in ``to``, in order."""

    src: str
    to: list[str] = Field(min_length=1)
    fallback_to_origin: bool = False

    @field_validator("to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("src")
    @classmethod
    def _normalize_src(cls, value: str) -> str:
        return normalize_prefix(value, target=False)

    @field_validator("to")
    @classmethod
    def _normalize_to(cls, value: list[str]) -> list[str]:
        return [normalize_prefix(v, target=True) for v in value]


def normalize_prefix(value: str, *, target: bool) -> str:
    """Normalize a rule's reference prefix: ``Docker.io/library/`` → ``docker.io/library``.

    A prefix starts with a registry host. In a ``src`` it must look like one (a ``.`` or ``:``,
    or ``localhost``), as in the normalized names it is matched against; in a ``to`` the first
    component is the host whatever it looks like (``mirror/docker-mirror/``). Trailing slashes
    carry no meaning, since prefixes match whole path components.
    """
    text = value.strip().rstrip("/")
    scheme, found, rest = text.partition("://")
    if found:
        written = rest.strip("/")
        plain = (
            f", and for plain HTTP set registries.{written.split('/')[0]}.insecure: true"
            if scheme.lower() == "http" and target
            else ""
        )
        raise ValueError(f"a rule names host/path without a scheme; write {written}/{plain}")
    host, _, repository = text.partition("/")
    if not host:
        raise ValueError("empty reference prefix")
    if not target and "." not in host and ":" not in host and host != "localhost":
        raise ValueError(
            f"{value!r} must start with a registry host, e.g. docker.io/library/{host}"
        )
    registry = canonical_registry(host)
    return str(ImageName(registry, validate_repository(repository))) if repository else registry


class CacheSettings(_Section):
    dir: Path = Path("/var/cache/detour")
    # The most bytes of blobs and manifests to keep; least recently used go first. None: no limit.
    max_size: ByteSize | None = None
    # A blob larger than this (or than max_size) is streamed to its client but not cached; one
    # that announces no length is cut off here.
    max_blob_size: ByteSize = 10 * 1024**3
    # A blob up to this size, once fetched, written (O_DIRECT, past the page cache) and
    # verified, is read back into the page cache before it enters the cache, so the hits that
    # follow a fetch come from memory. 0: never; hits then read the disk.
    read_back_up_to: ByteSizeOrZero = 1024**3
    # What the fetches' writing threads may fall behind the network by, every fetch's together,
    # held in memory: a disk that stalls a moment holds no client back. Further behind, the disk
    # is slower than the network, and blobs go through the page cache for ten minutes.
    write_buffer: ByteSize = WRITE_BUFFER_BYTES
    # Where the disk is slower than the network, a blob goes through the page cache, and up to
    # this many of its bytes may wait for the disk; further behind, the fetch gives up the
    # blob's cache copy (the client still gets it at the network's pace; fetched again later).
    write_behind: ByteSize = 1024**3
    tag_ttl: Duration = 300.0

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "cache_private" in data:
            raise ValueError(
                "cache.cache_private was removed: content fetched with a client's own "
                "credentials is never cached. To cache a private image for the whole site, "
                "give Detour the credentials (registries.<host> or docker_config)"
            )
        return data


class UpstreamSettings(_Section):
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 30.0
    max_redirects: int = Field(default=5, ge=0, le=20)
    # Blob fetches at once, in all and from one registry; the rest wait their turn, in order.
    max_fetches: int = Field(default=32, ge=1)
    max_fetches_per_registry: int = Field(default=16, ge=1)
    # Connections, in all and to one host (manifests and tokens need some besides the fetches).
    max_connections: int = Field(default=256, ge=1)
    max_connections_per_host: int = Field(default=32, ge=1)
    # A blob fetch no client is waiting for any more ends after this, unless it is 90% done.
    abandon_after: Duration = 30.0
    # A blob fetch slower than this (bytes per second, over each read_timeout) ends.
    min_rate: ByteSize | None = 16 * 1024
    # When a full disk makes a fetch hand its bytes to its clients from memory, a client that
    # keeps the others waiting this long is cut off (it can resume with a Range request).
    slow_client: Duration = 10.0
    # A blob fetch whose upstreams all fail (no connection, silence past read_timeout, a 5xx) is
    # tried again with back-off (0.5s doubling to 5s) for this long after the failure, each
    # time from the byte reached (Range): a WAN cut shorter than this costs a wait, not a failed
    # pull, and the site's nodes keep waiting on this one fetch. 0: no retries.
    retry_for: DurationOrZero = 60.0
    # A blob client that could be sent nothing for this long while the fetch waits for its
    # upstream (slow to answer, or a WAN cut being waited out) gets a 5xx before any byte (the
    # upstreams' last failure, or 504), or, mid-body, its connection closed: the runtime
    # retries (with Range), and the retry joins the same fetch. A peer's request is not cut:
    # the peer watches this one itself (cluster.read_timeout).
    client_wait: Duration = 30.0


def _peer_address(value: str) -> str:
    """``host:port`` of a peer; the port is required (a peer is another Detour)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, such as 10.0.1.2:7439, not {value!r}")
    return f"{host.lower()}:{int(port)}"


class ClusterSettings(_Section):
    """The Detours of a site, each blob, manifest and tag owned by one (proxy.cluster.peering)."""

    # host:port of each peer, or one string "dns:<name>:<port>" whose A/AAAA records are the
    # peers (a headless Service over the DaemonSet's ready pods).
    peers: list[str] | str = []
    # This instance as the peers reach it; not among the peers: a pure client of them.
    advertise: str | None = None
    refresh: Duration = 10.0  # how often a dns: peer set is resolved again
    # A blob from a peer up to this size is verified whole before its first byte goes to a
    # client, so a peer's wrong bytes cost the client nothing; a larger one is sent as it comes.
    verify_peer_blobs_first: ByteSize = 512 * 1024 * 1024
    # The site's shared secret (a mounted Secret): its file "current" signs, "current" and
    # "accepted" are accepted (proxy.upstream.peer_auth). Unset: peers are known by address only.
    secret_dir: Path | None = None
    # A blob wanted by many nodes at once travels down a tree in rendezvous order: the owner
    # serves this many peers, each of them as many more (proxy.cluster.peering). 1: a chain.
    fan_out: int = Field(default=3, ge=1, le=64)
    # The peers asked for a key before the upstream: its parent in the tree and the nodes
    # above it, at most this many (the owner's successor included when the owner fails).
    peers_tried: int = Field(default=2, ge=1, le=16)
    # A peer that failed (connection error, timeout, hung) is not asked again for this long.
    down_seconds: Duration = 30.0
    # Peers are on the LAN: a peer that takes longer to connect is taken as gone, and one
    # silent for read_timeout (before its first byte, or mid-body) is probed (GET /v2/) on a
    # new connection within these same timeouts. No answer: it is hung, marked down and
    # bypassed, the fetch going on from the byte reached. An answer: it is waiting for its own
    # upstream (a WAN cut), and is waited on: up to upstream.retry_for plus three
    # upstream.read_timeout, as long as that upstream fetch may take to fail.
    connect_timeout: Duration = 1.0
    read_timeout: Duration = 1.0
    # When the peers above and every upstream failed (the site offline), the other peers are
    # asked for a copy they already hold (Cache-Control: only-if-cached) before failing.
    ask_all_peers: bool = True

    @field_validator("peers")
    @classmethod
    def _peer_list(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            name, sep, port = value.removeprefix("dns:").rpartition(":")
            if not value.startswith("dns:") or not sep or not name or not port.isdigit():
                raise ValueError("expected a list of host:port, or one string dns:<name>:<port>")
            return value
        return [_peer_address(peer) for peer in value]

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: str | None) -> str | None:
        return None if value is None else _peer_address(value)


class WebhookSettings(_Section):
    """``detour webhook``: the mutating admission webhook (see :mod:`proxy.webhook`)."""

    listen: Listen = "0.0.0.0:8443"
    tls_cert: Path = Path("/tls/tls.crt")
    tls_key: Path = Path("/tls/tls.key")
    # How often the certificate files are checked for a rotation.
    tls_reload_interval: Duration = 5.0
    # The proxy as the nodes' container runtime reaches it: host[:port], no scheme, no path.
    prefix: str = "localhost:7439"
    # Pods here are left alone; so are pods in the webhook's own namespace (below).
    ignore_namespaces: list[str] = ["kube-system"]
    # The webhook's own namespace; unset means the POD_NAMESPACE environment variable.
    namespace: str | None = None
    # Images matching any of these (re.search, as written or normalized) are left alone.
    ignore_images: list[re.Pattern[str]] = []
    # When set, only images matching one of these are rewritten.
    accept_images: list[re.Pattern[str]] = []
    # The largest AdmissionReview read; a larger one gets 413. The API server sends at most about
    # 3 MiB (an object up to etcd's 1.5 MiB, twice on an UPDATE); the rest is headroom.
    max_body: ByteSize = 4 * 1024 * 1024
    # How many reviews over 256 KiB are read and parsed at once; the rest wait their turn with
    # their bodies unread. Smaller ones never wait: aiohttp has buffered them already.
    max_concurrent: int = Field(default=8, ge=1)

    @field_validator("prefix")
    @classmethod
    def _registry_host(cls, value: str) -> str:
        text = value.strip().rstrip("/")
        if "://" in text or "/" in text:
            raise ValueError("expected host[:port] such as localhost:7439, without scheme or path")
        host = canonical_registry(text)
        if "." not in host and ":" not in host and host != "localhost":
            # containerd would read "detour/docker.io/..." as a Docker Hub repository.
            raise ValueError("a registry host needs a '.' or a ':port' (or be localhost)")
        return host


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DETOUR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    listen: Listen = "0.0.0.0:7439"
    # Client connections open at once; past it, a request under /v2/ is answered 503 and its
    # connection closed (probes and /metrics are still answered). An idle connection, or one
    # that never completes a request, is closed after client_idle_timeout.
    max_client_connections: int = Field(default=1024, ge=1)
    client_idle_timeout: Duration = 75.0
    log_level: str = "info"
    cache: CacheSettings = CacheSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    redirects: list[RedirectRule] = []
    registries: dict[str, RegistrySettings] = {}
    # When set, only registries matching one of these globs (or named in redirects or
    # registries) may be contacted for a name a client sends.
    allowed_registries: list[str] = []
    # A docker config.json (a Kubernetes pull secret's .dockerconfigjson) with credentials.
    docker_config: Path | None = None
    webhook: WebhookSettings = WebhookSettings()
    cluster: ClusterSettings = ClusterSettings()

    @model_validator(mode="before")
    @classmethod
    def _accept_kuik_name(cls, data: Any) -> Any:
        """``imageRedirMapping`` is accepted for ``redirects``, the name the kuik proposal used."""
        if isinstance(data, dict) and "imageRedirMapping" in data:
            data = dict(data)
            if "redirects" in data:
                raise ValueError("give redirects or imageRedirMapping, not both")
            data["redirects"] = data.pop("imageRedirMapping")
        return data

    @field_validator("registries")
    @classmethod
    def _canonical_hosts(cls, value: dict[str, RegistrySettings]) -> dict[str, RegistrySettings]:
        return {canonical_registry(host): conf for host, conf in value.items()}

    @field_validator("allowed_registries")
    @classmethod
    def _lower_globs(cls, value: list[str]) -> list[str]:
        return [pattern.strip().lower() for pattern in value]

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error"}:
            raise ValueError("expected one of debug, info, warning, error")
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Later sources lose: init arguments, then DETOUR_* variables, then the YAML file.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def named_registries(settings: Settings) -> frozenset[str]:
    """The registries the operator named: every host a redirect rule sends names from or to,
    and every key of ``registries``."""
    named = set(settings.registries)
    for rule in settings.redirects:
        for prefix in (rule.src, *rule.to):
            named.add(prefix.partition("/")[0])
    return frozenset(named)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (YAML) and the environment; :class:`ConfigError` (see
    :mod:`proxy.config_errors`) names each problem's file and line, or variable."""
    lines: KeyLines = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        lines = key_lines(path)

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=path)

    try:
        return _FromFile(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe(exc, Settings, path, lines)) from None
    except SettingsError as exc:  # a DETOUR_* variable that is not the JSON it must be
        raise environment_error(exc) from None


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """A line for each ``DETOUR_*`` variable that sets nothing, with the nearest setting's
    variable: ``DETOUR_CACHE_DIR`` (one underscore) is otherwise silently ignored."""
    return unknown_variables(Settings, environ)
