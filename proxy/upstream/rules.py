"""Redirect rules: which upstream repositories serve a name, in order.

A rule's ``src`` and ``to`` are reference prefixes that match whole path components of the
fully normalized name, and the longest matching ``src`` wins::

    src: docker.io/library/   to: mirror.local/docker-mirror/
    docker.io/library/nats  →  mirror.local/docker-mirror/nats

A name no rule matches is fetched from its own registry (the origin).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxy.errors import NameInvalid
from proxy.reference import (
    ImageName,
    Reference,
    api_host,
    canonical_registry,
    validate_repository,
)
from proxy.settings import RedirectRule, RegistrySettings, Settings


@dataclass(frozen=True, slots=True)
class Upstream:
    """One repository on one registry that can serve a name."""

    registry: str  # canonical host[:port], as in settings' ``registries`` keys
    repository: str
    insecure: bool = False
    origin: bool = False  # the name's own registry, not a mirror
    peer: bool = False  # another Detour of the site (its registry is the peer's host:port)
    cached_only: bool = False  # a peer asked only for what it holds (Cache-Control: only-if-cached)
    tree: str = ""  # a peer asked for a layer: the layer's place in its image (cluster.layers)

    @property
    def base_url(self) -> str:
        """``https://host/v2/<repository>``, the prefix of every API URL for this repository."""
        scheme = "http" if self.insecure else "https"
        return f"{scheme}://{api_host(self.registry)}/v2/{self.repository}"


@dataclass(frozen=True, slots=True)
class Route:
    name: ImageName
    rule: RedirectRule | None
    upstreams: tuple[Upstream, ...]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + "/")


class Rules:
    def __init__(
        self, rules: Sequence[RedirectRule], registries: Mapping[str, RegistrySettings]
    ) -> None:
        # Longest src first, so the first match is the most specific one.
        self._rules = sorted(rules, key=lambda r: len(r.src), reverse=True)
        self._registries = registries

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(settings.redirects, settings.registries)

    def _upstream(self, registry: str, repository: str, *, origin: bool) -> Upstream:
        conf = self._registries.get(registry)
        return Upstream(registry, repository, insecure=bool(conf and conf.insecure), origin=origin)

    def route(self, name: ImageName) -> Route:
        full = str(name)
        origin = self._upstream(name.registry, name.repository, origin=True)
        for rule in self._rules:
            if not _matches(full, rule.src):
                continue
            remainder = full[len(rule.src) :]
            upstreams = [self._redirect(target + remainder, rule) for target in rule.to]
            if rule.fallback_to_origin:
                upstreams.append(origin)
            return Route(name, rule, tuple(dict.fromkeys(upstreams)))
        return Route(name, None, (origin,))

    def _redirect(self, target: str, rule: RedirectRule) -> Upstream:
        host, _, repository = target.partition("/")
        if not repository:
            raise NameInvalid(
                "redirect rule leaves no repository name",
                {"src": rule.src, "to": rule.to},
            )
        registry = canonical_registry(host)
        name = ImageName(registry, validate_repository(repository))  # checks the total length
        return self._upstream(name.registry, name.repository, origin=False)


def describe_resolution(
    settings: Settings, image: str, *, owners: Sequence[str] | str | None = None
) -> str:
    """The operator's "why did it go there": the normalized name and its upstreams, in order.

    ``owners``, with ``cluster.peers`` set: the peers from the owner of the image's tag (or
    manifest digest, for a reference by digest) down, in rendezvous order
    (:func:`proxy.cluster.peering.rendezvous`), or a note on why they are not known."""
    reference = Reference.parse(image)
    route = Rules.from_settings(settings).route(reference.name)
    lines = [f"image:  {reference}", f"name:   {route.name}"]
    if route.rule is None:
        lines.append("rule:   (none: the origin registry)")
    else:
        lines.append(f"rule:   {route.rule.src}/ -> {', '.join(t + '/' for t in route.rule.to)}")
    if isinstance(owners, str):
        lines.append(f"owner:  {owners}")
    elif owners:
        about = [f"of this {'manifest' if reference.digest is not None else 'tag'}"]
        if owners[0] == settings.cluster.advertise:
            about.append("this instance")
        if len(owners) > 1:
            about.append(f"next in line {owners[1]}")
        lines.append(f"owner:  {owners[0]}  ({'; '.join(about)})")
        lines.append(
            f"        each blob and manifest: the peer its digest ranks first of the {len(owners)}"
        )
    lines.append("upstreams, in order:")
    for index, upstream in enumerate(route.upstreams, 1):
        note = "  (origin)" if upstream.origin else ""
        lines.append(f"  {index}. {upstream.base_url}/manifests/{reference.reference}{note}")
    return "\n".join(lines)
