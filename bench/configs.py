"""The config files of the servers measured, written into the bench's temp dir: registry:2's
default config for the mirror and distribution's proxy mode (run.py's and edge.py's alike), and
Detour's, redirecting ``docker.io/`` to the mirror's ``docker-mirror/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON
    return path


def registry_config(directory: Path, name: str, listen: str, remote: str | None = None) -> Path:
    """registry:2's default config (inmemory blob descriptor cache, info logs, access log
    on), filesystem storage in ``directory``; with ``remote``, distribution's proxy mode
    (``proxy.remoteurl``). Written to ``directory/<name>.yml``."""
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {
            "level": "info",
            "formatter": "text",
            "accesslog": {"disabled": False},
            "fields": {"service": name},
        },
        "storage": {
            "cache": {"blobdescriptor": "inmemory"},
            "filesystem": {"rootdirectory": str(directory / f"{name}-storage")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": listen, "secret": f"bench-{name}"},
    }
    if remote is not None:
        config["proxy"] = {"remoteurl": remote}
    return write_config(directory / f"{name}.yml", config)


def detour_config(mirror: str, listen: str, cache: Path) -> dict[str, Any]:
    """Detour on ``listen`` with its cache in ``cache``, sending ``docker.io/`` to
    ``<mirror>/docker-mirror/`` over plain http, tags kept for 5 minutes."""
    return {
        "listen": listen,
        "cache": {"dir": str(cache), "tag_ttl": "5m"},
        "redirects": [{"src": "docker.io/", "to": f"{mirror}/docker-mirror/"}],
        "registries": {mirror: {"insecure": True}},
    }
