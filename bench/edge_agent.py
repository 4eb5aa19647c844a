"""The helper ``bench/edge.py agent`` runs in each namespace (started with ``ip netns exec``):
one JSON request per stdin line (wait for a URL, push the image, pull it, GET a URL), one JSON
line answered each. Stdlib only on the pull path, so what it measures is the cache, not the
client.

The pull client asks for the manifest by tag, then every blob, ``PULL_PARALLEL`` at a time (as
containerd), checking each blob's sha256 and size and the manifest's digest. With ``retries``,
it retries as the kubelet and containerd do: a failed request is asked again after a back-off
of 1, 2, 4 ... s (at most 10 s), a blob resumed with ``Range: bytes=<held>-`` from the bytes it
already holds (containerd resumes a partial layer so), the manifest asked again whole."""

from __future__ import annotations

import hashlib
import http.client
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from common import (
    ACCEPT,
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    MIRROR_REPO,
    TAG,
    USER_AGENT,
)
from mirror import Pusher, random_chunks

PULL_PARALLEL = 3  # blobs at once per client, containerd's default max_concurrent_downloads
READ_TIMEOUT = 30.0  # longest silence a pull client accepts, by default
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 10.0


class PullError(Exception):
    pass


class Attempts:
    """A pull's retry budget, shared by its requests: ``retries`` failures in all are retried,
    each after its own back-off (1, 2, 4 ... s, at most 10 s, per request)."""

    def __init__(self, retries: int, deadline: float, silence: float = READ_TIMEOUT) -> None:
        self.left = retries
        self.silence = silence
        self.deadline = deadline
        self.used = 0
        self.errors: list[str] = []

    def failed(self, error: PullError, attempt: int) -> None:
        """Sleep out the back-off of a request's ``attempt`` (0: its first failure), or raise
        ``error`` when none is left or the deadline comes first."""
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt)
        if self.left <= 0 or time.monotonic() + delay >= self.deadline:
            raise error
        self.left -= 1
        self.used += 1
        if len(self.errors) < 8:
            self.errors.append(f"{time.time():.2f} {error}")
        time.sleep(delay)


def _get(
    url: str, deadline: float, silence: float, accept: str | None = None, start: int = 0
) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    timeout = max(0.1, min(silence, deadline - time.monotonic()))
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    headers = {"User-Agent": "edge-pull"}
    if accept is not None:
        headers["Accept"] = accept
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        conn.request("GET", parts.path, headers=headers)
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise PullError(f"GET {parts.path}: {type(exc).__name__}: {exc}") from exc
    if response.status not in (200, 206) or (response.status == 206 and not start):
        body = response.read(300)
        conn.close()
        raise PullError(f"GET {parts.path}: {response.status} {body!r}")
    return response


class _Partial:
    """What a pull holds of one blob: the bytes so far, hashed."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.got = 0

    def restart(self) -> None:
        self.hasher, self.got = hashlib.sha256(), 0


def _read_into(url: str, digest: str, size: int | None, attempts: Attempts, held: _Partial) -> None:
    """One GET of the blob from the bytes ``held`` on (a Range if any), into ``held``."""
    deadline = attempts.deadline
    response = _get(url, deadline, attempts.silence, start=held.got)
    if held.got and response.status == 206:
        content_range = response.getheader("Content-Range", "")
        if not content_range.startswith(f"bytes {held.got}-"):
            response.close()
            raise PullError(f"{digest[:19]}: Content-Range {content_range!r} at {held.got}")
    elif held.got:  # a 200 to a Range: the whole blob again
        held.restart()
    try:
        while True:
            if time.monotonic() > deadline:
                raise PullError(f"{digest[:19]}: deadline after {held.got} bytes")
            chunk = response.read(1 << 20)
            if not chunk:
                break
            held.hasher.update(chunk)
            held.got += len(chunk)
    except (OSError, http.client.HTTPException) as exc:
        raise PullError(
            f"{digest[:19]}: {type(exc).__name__} after {held.got} bytes: {exc}"
        ) from exc
    finally:
        response.close()
    if size is not None and held.got != size:
        raise PullError(f"{digest[:19]}: {held.got} bytes, expected {size}")


def _read_checked(
    url: str, digest: str, size: int | None, deadline: float, attempts: Attempts
) -> int:
    """GET ``url`` whole, hashing as it comes, resuming by Range after a failure; the byte
    count, or PullError once the retries are spent."""
    held = _Partial()
    attempt = 0
    while True:
        try:
            _read_into(url, digest, size, attempts, held)
        except PullError as exc:
            if size is not None and held.got > size:  # nothing to resume from
                held.restart()
            attempts.failed(exc, attempt)
            attempt += 1
            continue
        if f"sha256:{held.hasher.hexdigest()}" != digest:
            raise PullError(f"{digest[:19]}: wrong sha256")  # not retried: a wrong image
        return held.got


def _manifest(url: str, deadline: float, attempts: Attempts) -> tuple[str, bytes]:
    attempt = 0
    while True:
        try:
            response = _get(url, deadline, attempts.silence, ACCEPT)
            try:
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                raise PullError(f"manifest: {type(exc).__name__}: {exc}") from exc
            finally:
                response.close()
        except PullError as exc:
            attempts.failed(exc, attempt)
            attempt += 1
            continue
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        header = response.getheader("Docker-Content-Digest")
        if header is not None and header != digest:
            raise PullError(f"manifest: digest {digest}, header says {header}")
        return digest, body


def pull(
    base: str, reference: str, timeout: float, retries: int = 0, silence: float = READ_TIMEOUT
) -> dict[str, Any]:
    """Pull a whole image from ``base`` (``http://host:port/v2/<name>``) and check it: a
    request silent for ``silence`` seconds fails (and is retried, if any are left)."""
    started = time.time()
    deadline = time.monotonic() + timeout
    attempts = Attempts(retries, deadline, silence)
    result: dict[str, Any] = {"start": started, "ok": False, "bytes": 0}

    def blob(descriptor: dict[str, Any]) -> int:
        digest = descriptor["digest"]
        url = f"{base}/blobs/{digest}"
        return _read_checked(url, digest, descriptor["size"], deadline, attempts)

    try:
        digest, body = _manifest(f"{base}/manifests/{reference}", deadline, attempts)
        manifest = json.loads(body)
        with ThreadPoolExecutor(PULL_PARALLEL) as pool:
            sizes = list(pool.map(blob, [manifest["config"], *manifest["layers"]]))
        result.update(ok=True, bytes=len(body) + sum(sizes), manifest=digest)
    except (PullError, ValueError, KeyError, TypeError) as exc:
        result["error"] = str(exc)
    result["end"] = time.time()
    result["retries"] = attempts.used
    result["retried"] = attempts.errors
    return result


def wait_ready(url: str, timeout: float) -> dict[str, Any]:
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=2)
        try:
            conn.request("GET", parts.path, headers={"User-Agent": f"{USER_AGENT}-ready"})
            if conn.getresponse().status in (200, 401):
                return {"ok": True}
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    return {"ok": False, "error": f"{url} not ready in {timeout:g}s"}


def fetch_text(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path, headers={"User-Agent": f"{USER_AGENT}-ready"})
        response = conn.getresponse()
        return {"status": response.status, "text": response.read().decode(errors="replace")}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def push_image(port: int, layers: int, layer_size: int) -> dict[str, Any]:
    """Push ``layers`` random layers and their config as one schema 2 image tagged TAG."""
    pusher = Pusher(port)
    layer_blobs = [pusher.blob(random_chunks(layer_size)) for _ in range(layers)]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layer_blobs]},
        }
    ).encode()
    config_digest, _ = pusher.blob([config])
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": DOCKER_LAYER, "digest": d, "size": s} for d, s in layer_blobs],
        },
        indent=3,
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "PUT",
            f"/v2/{MIRROR_REPO}/manifests/{TAG}",
            body=manifest,
            headers={"User-Agent": USER_AGENT, "Content-Type": DOCKER_MANIFEST},
        )
        response = conn.getresponse()
        text = response.read()
    finally:
        conn.close()
    if response.status != 201:
        raise RuntimeError(f"push: manifest PUT answered {response.status}: {text[:300]!r}")
    return {
        "manifest": f"sha256:{hashlib.sha256(manifest).hexdigest()}",
        "blobs": {config_digest: len(config), **dict(layer_blobs)},
        "bytes": len(manifest) + len(config) + sum(s for _, s in layer_blobs),
    }


def agent_main() -> int:
    """Answer one JSON request per stdin line with one JSON line on stdout."""
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        reply: dict[str, Any]
        try:
            if op == "wait":
                reply = wait_ready(request["url"], request["timeout"])
            elif op == "pull":
                reply = pull(
                    request["base"],
                    request["reference"],
                    request["timeout"],
                    request.get("retries", 0),
                    request.get("silence", READ_TIMEOUT),
                )
            elif op == "get":
                reply = fetch_text(request["url"])
            elif op == "push":
                reply = push_image(request["port"], request["layers"], request["layer_size"])
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # answered, so the orchestrator never waits on a dead agent
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    return 0
