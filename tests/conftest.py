"""Shared fixtures: real registries (three auth modes), a token issuer, a containerd daemon.

The three registries are started once per session (~30 ms each, ~100 ms with token auth) but
handed out through function-scoped fixtures that, after each test, restart a registry the test
stopped, thaw one it froze, and reset the token issuer (its request log is cleared before each
test, and ``expires_in`` / ``token_lifetime`` / prefixes are restored after). Tests share the
storage, so push to unique repository names (:func:`tests.images.unique_repo`).

All fixtures are plain (sync) fixtures and work from ``async def`` tests under pytest-aiohttp.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from proxy.api.app import create_app
from proxy.logs import configure_logging
from proxy.settings import Settings
from tests.containerd import CONTAINERD_BIN, CTR_BIN, Containerd
from tests.kustomize import render_every_layout
from tests.proxy import Proxy, start_process, stop_process
from tests.registry import REGISTRY_BIN, AuthMode, Registry
from tests.support import free_port as _free_port
from tests.token_issuer import TokenIssuer
from tests.webhook_harness import MountedSecret, Pki, Webhook, mount_secret, serve_webhook

_TOOLS = {
    REGISTRY_BIN: "docker-registry",
    "/usr/bin/htpasswd": "apache2-utils",
    "/usr/bin/skopeo": "skopeo",
    CONTAINERD_BIN: "containerd",
    CTR_BIN: "containerd",
}


def _require(*paths: str) -> None:
    missing = sorted({_TOOLS.get(p, p) for p in paths if shutil.which(p) is None})
    if missing:
        pytest.fail(f"missing tools; apt-get install {' '.join(missing)}", pytrace=False)


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a currently free TCP port on 127.0.0.1."""
    return _free_port


def _session_registry(auth: AuthMode) -> Iterator[Registry]:
    _require(REGISTRY_BIN, "/usr/bin/htpasswd")
    registry = Registry(auth)
    try:
        registry.start()
        yield registry
    finally:
        registry.close()


def _heal(registry: Registry) -> Iterator[Registry]:
    issuer = registry.issuer
    saved = None
    if issuer is not None:
        issuer.reset()
        saved = (
            issuer.expires_in,
            issuer.token_lifetime,
            issuer.anonymous_prefix,
            issuer.reader_prefix,
        )
    yield registry
    if registry.running and registry.frozen:
        registry.thaw()
    if not registry.running:
        registry.start()
    if issuer is not None and saved is not None:
        (
            issuer.expires_in,
            issuer.token_lifetime,
            issuer.anonymous_prefix,
            issuer.reader_prefix,
        ) = saved


@pytest.fixture(scope="session")
def _registry_none() -> Iterator[Registry]:
    yield from _session_registry("none")


@pytest.fixture(scope="session")
def _registry_htpasswd() -> Iterator[Registry]:
    yield from _session_registry("htpasswd")


@pytest.fixture(scope="session")
def _registry_token() -> Iterator[Registry]:
    yield from _session_registry("token")


@pytest.fixture
def registry(_registry_none: Registry) -> Iterator[Registry]:
    """A running registry without auth (shared by the session)."""
    yield from _heal(_registry_none)


@pytest.fixture
def htpasswd_registry(_registry_htpasswd: Registry) -> Iterator[Registry]:
    """A running registry with htpasswd auth: ``.username`` / ``.password`` (shared)."""
    yield from _heal(_registry_htpasswd)


@pytest.fixture
def token_registry(_registry_token: Registry) -> Iterator[Registry]:
    """A running registry with token auth; its issuer is ``.issuer`` (shared)."""
    yield from _heal(_registry_token)


@pytest.fixture
def token_issuer(token_registry: Registry) -> TokenIssuer:
    """The issuer behind ``token_registry`` (request log cleared for this test)."""
    assert token_registry.issuer is not None
    return token_registry.issuer


@pytest.fixture
def make_registry() -> Iterator[Callable[..., Registry]]:
    """A factory for private registries (``make_registry("token", port=...)``), all closed at
    the end of the test. Takes :class:`Registry`'s arguments; returns it started."""
    _require(REGISTRY_BIN, "/usr/bin/htpasswd")
    made: list[Registry] = []

    def make(auth: AuthMode = "none", **kwargs: Any) -> Registry:
        registry = Registry(auth, **kwargs)
        made.append(registry)
        registry.start()
        return registry

    yield make
    for registry in made:
        registry.close()


@pytest.fixture(scope="session")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """deploy/kubernetes rendered every way in (see ``tests.kustomize``), once for the
    tests/test_deploy_* modules: ``{"default": objects, "hub": ..., "base+hub": ...}``."""
    return render_every_layout(tmp_path_factory.mktemp("overlays"))


ReadLogs = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Iterator[ReadLogs]:
    """Detour's JSON log lines written since the last call, from an in-process proxy
    (structlog set up as ``detour serve`` does)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("info")

    def read() -> list[dict[str, Any]]:
        out, err = capsys.readouterr()
        lines = (out + err).splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    yield read
    structlog.reset_defaults()
    root.handlers[:], level = saved
    root.setLevel(level)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """A factory of real file systems of a bounded size for the cache (``tmpfs("8m")``), each
    unmounted after the test. Mounting needs root: the test is skipped without it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def make(size: str) -> Path:
        mount = tmp_path / f"tmpfs-{len(mounts)}"
        mount.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True
        )
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    """A fresh containerd daemon (own root/state/socket) for this test."""
    _require(CONTAINERD_BIN, CTR_BIN)
    daemon = Containerd()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
async def make_proxy(
    aiohttp_server: Any, tmp_path: Path
) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Proxy]]]:
    """Start Detour in this test's event loop from a config dict (see ``tests.proxy``)."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(config: dict[str, Any]) -> Proxy:
        settings = Settings.model_validate({k: v for k, v in config.items() if k != "listen"})
        server = await aiohttp_server(create_app(settings), host="127.0.0.1")
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Proxy(f"http://127.0.0.1:{server.port}", settings.cache.dir, session)

    yield make
    for session in sessions:
        await session.close()


@pytest.fixture
async def detour_process(
    tmp_path: Path,
) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Proxy]]]:
    """Start ``detour serve`` as a real process from a config dict."""
    started: list[Proxy] = []

    async def start(config: dict[str, Any]) -> Proxy:
        workdir = tmp_path / f"detour-{len(started)}"
        workdir.mkdir()
        proxy = await start_process(config, workdir)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await stop_process(proxy)


# --- the webhook's tests: a CA and a serving certificate, mounted as a Secret, and the server --


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def secret(tmp_path: Path, pki: Pki) -> MountedSecret:
    return mount_secret(tmp_path, pki)


@pytest.fixture
async def webhook(tmp_path: Path, pki: Pki, secret: MountedSecret) -> AsyncIterator[Webhook]:
    async with serve_webhook(tmp_path, pki, secret) as hook:
        yield hook
