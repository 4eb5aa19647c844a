"""What run.py and edge.py share: the names content is pushed under and asked for, sizes, the
bench's User-Agent (its own requests are told apart from a cache's in the mirror's access
log by it), and the log line."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
GB = 1e9
MIRROR_REPO = "docker-mirror/library/bench"  # the repository in the mirror (and the peer)
DETOUR_NAME = "docker.io/library/bench"  # what a client asks Detour for (path mode)
TAG = "v1"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        DOCKER_MANIFEST,
    )
)
USER_AGENT = "detour-bench"
HASH_BATCH = 8 * MIB  # the aiohttp client hashes in a worker thread, this much at a time
PUSH_CHUNK = 8 * MIB


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout or done.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unavailable"
