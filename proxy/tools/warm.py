"""``detour warm``: fill the cache with images before an edge site is cut off.

Warming is an ordinary pull through Detour, so it follows the same redirect rules, upstream
auth, verification and cache directory as any client's pull:

* without an endpoint, Detour is started in this process from the settings
  (:func:`proxy.api.app.create_app` on 127.0.0.1, an ephemeral port) and stopped at the end: for
  preloading before the proxy runs (a staging machine, an initContainer);
* with an endpoint (``http://127.0.0.1:7439``), an already running proxy does the work: use
  this while the proxy runs: a second Detour on the same cache directory would delete the
  running one's half-written files when it starts, and the running one's in-memory index of
  the cache (its size and LRU order for ``cache.max_size``) would not see what it wrote.

For each image the manifest is fetched with the usual ``Accept`` list; for an index (or docker
manifest list) the children for the chosen platform, or all of them, are fetched by digest;
then every config and layer blob is read to its end (bodies are discarded: the proxy is what
caches them). Each blob's bytes are hashed and counted here as well and compared with the
manifest's descriptor, so a bad blob is reported by name rather than trusted on a status code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.bodies import read_capped
from proxy.oci import (
    DEFAULT_ACCEPT,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_MAX_BYTES,
    OCI_MANIFEST,
    Descriptor,
    StoredManifest,
    manifest_media_type,
)
from proxy.reference import Digest, ImageName, Reference
from proxy.settings import ConfigError, Settings
from proxy.tools.hosts import check_endpoint
from proxy.tools.humanize import counted, human_bytes
from proxy.tools.platforms import Platform, describe_platform
from proxy.tools.warm_parsing import (
    WarmError,
    parse_digest,
    parse_image_manifest,
    parse_index,
    refusal,
)

CONCURRENCY = 4  # blob downloads in flight per image
CHUNK_BYTES = 1 << 20
ERROR_BODY_MAX_BYTES = 64 * 1024
MAX_INDEX_DEPTH = 2  # an index may name an index once (rare); deeper is refused
USER_AGENT = "detour-warm"
# The proxy may be silent for a while when it retries and resumes upstream; be patient.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)

IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
# Layers that live outside the registry (Windows base layers); a registry does not serve them.
_FOREIGN_MARKERS = ("foreign", "nondistributable")

# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Warmed:
    image: str  # the normalized reference: docker.io/library/nats:2.10.26-alpine
    digest: Digest  # what the tag resolved to (the index's digest for an index)
    platforms: tuple[str, ...]  # the index children warmed; empty for a single manifest
    blobs: int
    bytes: int

    def line(self) -> str:
        where = f"; {', '.join(self.platforms)}" if self.platforms else ""
        return (
            f"warmed {self.image} {self.digest} "
            f"({counted(self.blobs, 'blob')}, {human_bytes(self.bytes)}{where})"
        )


@dataclass(frozen=True, slots=True)
class Failed:
    image: str
    error: str

    def line(self) -> str:
        return f"detour: warm {self.image}: {self.error}"


WarmResult = Warmed | Failed


# --------------------------------------------------------------------------- warming


class _Warmer:
    """Warms images through the proxy at ``base`` (``http://host:port``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: str,
        wanted: Platform | None,
        concurrency: int,
    ) -> None:
        self._session = session
        self._base = base
        self._wanted = wanted  # None: every platform
        self._slots = asyncio.Semaphore(concurrency)

    def _url(self, name: ImageName, kind: str, reference: str) -> str:
        return f"{self._base}/v2/{name.path_form()}/{kind}/{reference}"

    async def reachable(self) -> str | None:
        """None when the proxy answers ``/v2/``; else why not."""
        try:
            async with self._session.get(f"{self._base}/v2/") as response:
                if response.status == 200:
                    return None
                body = await _read_capped(response, ERROR_BODY_MAX_BYTES, "")
                return refusal(response.status, body)
        except (aiohttp.ClientError, WarmError) as exc:
            return _transport(exc) if isinstance(exc, aiohttp.ClientError) else str(exc)

    async def image(self, ref: Reference) -> Warmed:
        top = await self._manifest(ref.name, ref.reference, ref.digest)
        blobs: dict[str, Descriptor] = {}
        platforms: list[str] = []
        await self._collect(ref.name, top, blobs, platforms, depth=0)
        sizes = await self._blobs(ref.name, list(blobs.values()))
        return Warmed(str(ref), top.digest, tuple(platforms), len(sizes), sum(sizes))

    async def _collect(
        self,
        name: ImageName,
        manifest: StoredManifest,
        blobs: dict[str, Descriptor],
        platforms: list[str],
        depth: int,
    ) -> None:
        """Fetch the manifests under ``manifest``; gather the blobs they name into ``blobs``."""
        where = f"manifest {manifest.digest}"
        if manifest.media_type in IMAGE_TYPES:
            doc = parse_image_manifest(manifest.body, where)
            for desc in (doc["config"], *doc["layers"]):
                if not any(marker in desc["mediaType"] for marker in _FOREIGN_MARKERS):
                    blobs.setdefault(desc["digest"], desc)
            return
        if manifest.media_type not in INDEX_TYPES:
            raise WarmError(f"{where}: unsupported media type {manifest.media_type!r}")
        if depth >= MAX_INDEX_DEPTH:
            raise WarmError(f"{where}: indexes nested too deep")
        children = parse_index(manifest.body, where)["manifests"]
        chosen = [child for child in children if self._chosen(child)]
        if not chosen:
            offered = sorted({describe_platform(child) for child in children})
            raise WarmError(
                f"no manifest for {self._wanted} in the index {manifest.digest} "
                f"(it has {', '.join(offered) or 'none'}; try --platform or --all-platforms)"
            )
        for child in chosen:
            digest = parse_digest(child["digest"], where)
            fetched = await self._manifest(name, str(digest), digest, child=True)
            if "platform" in child:
                platforms.append(describe_platform(child))
            await self._collect(name, fetched, blobs, platforms, depth + 1)

    def _chosen(self, child: Descriptor) -> bool:
        if self._wanted is None:
            return True
        spec = child.get("platform")
        return spec is not None and self._wanted.matches(Platform.of(spec))

    async def _manifest(
        self, name: ImageName, reference: str, digest: Digest | None, *, child: bool = False
    ) -> StoredManifest:
        """GET a manifest through the proxy; check its bytes against the digest it claims.

        Errors name the manifest only for an index's children: the image names the top one.
        """
        url = self._url(name, "manifests", reference)
        where = f"manifest {reference}: " if child else ""
        try:
            async with self._session.get(url, headers={"Accept": DEFAULT_ACCEPT}) as response:
                if response.status != 200:
                    body = await _read_capped(response, ERROR_BODY_MAX_BYTES, where)
                    raise WarmError(f"{where}{refusal(response.status, body)}")
                body = await _read_capped(response, MANIFEST_MAX_BYTES, where)
                header = response.headers.get("Docker-Content-Digest")
                content_type = response.headers.get("Content-Type", "")
        except aiohttp.ClientError as exc:
            raise WarmError(f"{where}{_transport(exc)}") from None
        expected = digest or (
            parse_digest(header, f"{where}Docker-Content-Digest") if header else None
        )
        actual = Digest.of(body, expected.algorithm if expected else "sha256")
        if expected is not None and actual != expected:
            raise WarmError(f"{where}the manifest's bytes do not match {expected}")
        return StoredManifest(actual, manifest_media_type(content_type, body), body)

    async def _blobs(self, name: ImageName, descriptors: list[Descriptor]) -> list[int]:
        """Fetch every blob, a few at a time; report how many failed and the first reason."""
        results = await asyncio.gather(*(self._try_blob(name, d) for d in descriptors))
        errors = [r for r in results if isinstance(r, WarmError)]
        if errors:
            many = f" ({len(errors)} of {len(results)} blobs failed)" if len(errors) > 1 else ""
            raise WarmError(f"{errors[0]}{many}")
        return [r for r in results if isinstance(r, int)]

    async def _try_blob(self, name: ImageName, desc: Descriptor) -> int | WarmError:
        try:
            return await self._blob(name, desc)
        except WarmError as exc:
            return exc

    async def _blob(self, name: ImageName, desc: Descriptor) -> int:
        """Read one blob to its end, hashing it; its size and digest must be the descriptor's."""
        digest = parse_digest(desc["digest"], "blob")
        where = f"blob {digest}"
        expected = desc["size"]
        hasher = digest.hasher()
        received = 0
        async with self._slots:
            try:
                async with self._session.get(self._url(name, "blobs", str(digest))) as response:
                    if response.status != 200:
                        body = await _read_capped(response, ERROR_BODY_MAX_BYTES, f"{where}: ")
                        raise WarmError(f"{where}: {refusal(response.status, body)}")
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        hasher.update(chunk)
                        received += len(chunk)
                        if received > expected:
                            raise WarmError(
                                f"{where}: more than the {expected} bytes the manifest says"
                            )
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                # How the proxy answers when the upstream's bytes fail verification mid-stream.
                raise WarmError(
                    f"{where}: the proxy cut the connection after {received} of {expected} bytes "
                    "(it does that when a blob fails verification; see its log)"
                ) from None
            except aiohttp.ClientError as exc:
                raise WarmError(f"{where}: {_transport(exc)}") from None
        if received != expected:
            raise WarmError(f"{where}: got {received} bytes, the manifest says {expected}")
        if hasher.hexdigest() != digest.hex:
            raise WarmError(f"{where}: the bytes received do not match the digest")
        return received


def _transport(exc: aiohttp.ClientError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _read_capped(response: aiohttp.ClientResponse, limit: int, where: str) -> bytes:
    """The whole body (:func:`proxy.bodies.read_capped`); :class:`WarmError` past ``limit``."""
    body = await read_capped(response.content, limit)
    if body is None:
        raise WarmError(f"{where}response larger than {limit} bytes")
    return body


@contextlib.asynccontextmanager
async def _in_process(settings: Settings) -> AsyncIterator[str]:
    """Detour itself, from ``settings``, on 127.0.0.1 at an ephemeral port, for the duration."""
    from proxy.api.app import create_app

    runner = web.AppRunner(create_app(settings), access_log=None, handle_signals=False)
    try:
        await runner.setup()
    except OSError as exc:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        raise ConfigError(f"cannot use cache.dir {settings.cache.dir}: {exc}") from None
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def _reference(text: str) -> Reference:
    try:
        return Reference.parse(text)
    except ValueError as exc:
        raise ValueError(f"invalid image reference {text!r}: {exc}") from None


async def warm(
    images: Sequence[str],
    settings: Settings | None = None,
    *,
    endpoint: str | None = None,
    platform: Platform | None = None,
    all_platforms: bool = False,
    concurrency: int = CONCURRENCY,
    report: Callable[[WarmResult], None] | None = None,
) -> list[WarmResult]:
    """Warm ``images``, one after another, and return what became of each.

    Through the running proxy at ``endpoint``, or else through Detour started in this process
    from ``settings``. Index children are chosen for ``platform`` (default: this machine's),
    or all of them with ``all_platforms``. ``report`` is called with each outcome as it is
    known. Raises ValueError for a bad reference or endpoint (before anything is fetched),
    and :class:`~proxy.settings.ConfigError` when Detour cannot start from ``settings``.
    """
    if platform is not None and all_platforms:
        raise ValueError("give a platform or all platforms, not both")
    refs = [_reference(text) for text in images]  # every typo, before any download
    base = check_endpoint(endpoint) if endpoint is not None else None
    if base is None and settings is None:
        raise ValueError("warming needs settings (to start Detour) or an endpoint")
    wanted = None if all_platforms else (platform or Platform.host())
    outcomes: list[WarmResult] = []
    async with contextlib.AsyncExitStack() as stack:
        if base is None:
            assert settings is not None
            base = await stack.enter_async_context(_in_process(settings))
        session = await stack.enter_async_context(
            aiohttp.ClientSession(
                timeout=CLIENT_TIMEOUT,
                auto_decompress=False,
                headers={"User-Agent": USER_AGENT},
            )
        )
        warmer = _Warmer(session, base, wanted, concurrency)
        down = await warmer.reachable() if endpoint is not None else None
        for ref in refs:
            outcome: WarmResult
            if down is not None:
                outcome = Failed(str(ref), f"cannot reach the proxy at {base}: {down}")
            else:
                try:
                    outcome = await warmer.image(ref)
                except WarmError as exc:
                    outcome = Failed(str(ref), str(exc))
            outcomes.append(outcome)
            if report is not None:
                report(outcome)
    return outcomes
