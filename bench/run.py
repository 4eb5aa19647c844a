#!/usr/bin/env python3
"""Detour benchmark: Detour, distribution's pull-through proxy and the mirror, side by side.

One run starts, on 127.0.0.1 with temp dirs:

* the MIRROR: the real distribution registry (``docker-registry``, i.e. ``registry:2``),
  filesystem storage, access log on. Its access log is the honest count of upstream requests
  made by both caches;
* the PEER: distribution in proxy mode (``proxy.remoteurl`` = the mirror). It mirrors the whole
  registry, so it is asked for ``/v2/docker-mirror/library/bench/...`` directly;
* DETOUR: ``python -m proxy serve``, redirecting ``docker.io/`` to
  ``<mirror>/docker-mirror/``, asked for ``/v2/docker.io/library/bench/...``.

It pushes random content into the mirror through the registry API, then measures cold and hit
blob throughput, a herd of concurrent cold pulls of one blob (upstream GETs, wall time, every
client's sha256), manifest requests/s with wrk (by digest and by tag) and peak RSS while
streaming big blobs. Every measurement is repeated ``--repeat`` times and the median reported.

    .venv/bin/python bench/run.py --quick          # smoke run, ~1-2 minutes
    .venv/bin/python bench/run.py --json out.json  # full run
    .venv/bin/python bench/run.py --help

Needs ``docker-registry`` and ``wrk`` (Debian packages); ``curl`` and ``openssl`` for the curl
client (optional); ``py-spy`` only for ``--profile``. Every process and temp dir is removed on
exit, Ctrl-C and errors included (``--keep`` keeps the temp dir with all logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp

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

TargetKey = Literal["detour", "base", "peer", "mirror"]
CACHES: tuple[TargetKey, ...] = ("detour", "peer")
ALL_TARGETS: tuple[TargetKey, ...] = ("detour", "peer", "mirror")
DETOURS: tuple[TargetKey, ...] = ("detour", "base")  # this tree's, and --baseline's
LABELS: dict[TargetKey, str] = {
    "detour": "Detour",
    "base": "Detour baseline",
    "peer": "distribution proxy",
    "mirror": "mirror direct",
}
PHASES = ("blob", "herd", "manifest", "rss")

# Every child started with asyncio (curl, openssl, wrk, py-spy): killed by pid on the way out.
CHILDREN: set[int] = set()


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- processes


class Service:
    """A server subprocess in its own session, its output in ``log_path``."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, *, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, f"{self.name} not started"
        return self._proc.pid

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.cwd,
                start_new_session=True,
            )

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait_ready(self, url: str, timeout: float = 20.0) -> None:
        """Until ``GET url`` answers 200 (or 401), or fail with the log's tail."""
        parts = urlsplit(url)
        deadline = time.monotonic() + timeout
        while True:
            code = self.exit_code()
            if code is not None:
                raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=2)
            try:
                conn.request("GET", parts.path, headers={"User-Agent": f"{USER_AGENT}-ready"})
                if conn.getresponse().status in (200, 401):
                    return
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, grace: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group is its pid
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def status_kib(self, key: str) -> int | None:
        """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM), None once gone."""
        if self._proc is None:
            return None
        try:
            text = Path(f"/proc/{self._proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match[1]) if match else None

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM (``echo 5 > /proc/<pid>/clear_refs``, Linux >= 4.0)."""
        if self._proc is None:
            return False
        try:
            Path(f"/proc/{self._proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def spawn(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*argv, **kwargs)
    CHILDREN.add(proc.pid)
    return proc


async def reap(proc: asyncio.subprocess.Process) -> tuple[int, bytes, bytes]:
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        CHILDREN.discard(proc.pid)
    assert proc.returncode is not None
    return proc.returncode, out or b"", err or b""


def kill_children() -> None:
    for pid in list(CHILDREN):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    CHILDREN.clear()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_speed(directory: Path, size: int) -> float:
    """GB/s of writing ``size`` new bytes to a file (1 MiB writes, no fsync): the ceiling for a
    cache that writes a blob to disk as it serves it. On VMs that back guest memory lazily,
    page cache in pages the guest has not touched lately is much slower than on bare metal."""
    chunk = os.urandom(MIB)
    path = directory / "write-speed.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(max(1, size // MIB)):
            os.write(fd, chunk)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return max(1, size // MIB) * MIB / elapsed / GB


def first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout or done.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unavailable"


def tree_revision(tree: Path) -> str:
    """The short commit of a source tree (``+`` if its proxy/ has changes), or, for a tree
    that is not a git checkout (a ``git archive`` export), its directory's name."""

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                ["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "--short", "HEAD")
    if head is None or head.returncode != 0:
        return tree.name
    status = git("status", "--porcelain", "--", "proxy")
    return head.stdout.strip() + ("+" if status is not None and status.stdout.strip() else "")


# ------------------------------------------------------------------------------- mirror access log

_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[[^\]]+\] "(?P<method>\S+) (?P<path>\S+) [^"]+" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "[^"]*" "(?P<agent>[^"]*)"$'
)


@dataclass(frozen=True, slots=True)
class Access:
    method: str
    path: str
    status: int
    agent: str


class AccessLog:
    """The mirror's access log (combined format, one line once a response is finished)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._entries: list[Access] = []

    def entries(self) -> list[Access]:
        try:
            with self.path.open("rb") as log_file:
                log_file.seek(self._offset)
                chunk = log_file.read()
        except FileNotFoundError:
            chunk = b""
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            match = _ACCESS_LINE.match(line)
            if match is None or match["agent"].startswith(f"{USER_AGENT}-ready"):
                continue
            self._entries.append(
                Access(match["method"], match["path"], int(match["status"]), match["agent"])
            )
        return self._entries

    def mark(self) -> int:
        return len(self.entries())

    async def settle(self, mark: int, *, quiet: float = 0.3, limit: float = 30.0) -> list[Access]:
        """The entries after ``mark`` once none arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + limit
        count = -1
        while True:
            now = len(self.entries())
            if now == count or time.monotonic() > deadline:
                return self._entries[mark:]
            count = now
            await asyncio.sleep(quiet)


def blob_requests(entries: Iterable[Access], digest: str) -> tuple[int, int]:
    """(GETs, HEADs) the mirror answered for this blob, to others than the bench's clients."""
    path = f"/v2/{MIRROR_REPO}/blobs/{digest}"
    mine = [e for e in entries if e.path == path and not e.agent.startswith(USER_AGENT)]
    return sum(e.method == "GET" for e in mine), sum(e.method == "HEAD" for e in mine)


# ------------------------------------------------------------------------------- pushing content


def _keystream() -> Callable[[bytes], bytes] | None:
    """AES-CTR under a fresh random key: random bytes faster than os.urandom, when available."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        return None
    cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16)))
    return cipher.encryptor().update


def random_chunks(size: int, chunk: int = PUSH_CHUNK) -> Iterator[bytes]:
    encrypt = _keystream()
    zeros = bytes(min(chunk, size))
    remaining = size
    while remaining > 0:
        n = min(chunk, remaining)
        yield encrypt(zeros[:n]) if encrypt is not None else os.urandom(n)
        remaining -= n


def _path_of(location: str) -> str:
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


class Pusher:
    """Pushes to the mirror through the registry API (http.client, synchronous)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _send(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        expect: int,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        conn.request(method, path, body=body, headers={"User-Agent": USER_AGENT, **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        if response.status != expect:
            raise RuntimeError(f"push: {method} {path} answered {response.status}: {data[:500]!r}")
        return response

    def blob(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Stream ``chunks`` as one blob (a chunked PATCH, hashed on the way); (digest, size)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        hasher = hashlib.sha256()
        size = 0

        def body() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                hasher.update(chunk)
                size += len(chunk)
                yield chunk

        try:
            started = self._send(conn, "POST", f"/v2/{MIRROR_REPO}/blobs/uploads/", 202, b"", {})
            location = _path_of(started.getheader("Location") or "")
            patched = self._send(
                conn,
                "PATCH",
                location,
                202,
                body(),  # an iterable without Content-Length: sent chunked, never held whole
                {"Content-Type": "application/octet-stream"},
            )
            location = _path_of(patched.getheader("Location") or "")
            digest = f"sha256:{hasher.hexdigest()}"
            sep = "&" if "?" in location else "?"
            self._send(conn, "PUT", f"{location}{sep}digest={digest}", 201, b"")
        finally:
            conn.close()
        return digest, size

    def random_blob(self, size: int) -> str:
        digest, pushed = self.blob(random_chunks(size))
        assert pushed == size
        return digest

    def image(self) -> str:
        """A small schema 2 image (config + two layers) tagged ``TAG``; its manifest digest."""
        layers = [self.blob([os.urandom(2048 + i)]) for i in range(2)]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]},
            }
        ).encode()
        config_digest, _ = self.blob([config])
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {
                    "mediaType": DOCKER_CONFIG,
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [{"mediaType": DOCKER_LAYER, "digest": d, "size": s} for d, s in layers],
            },
            indent=3,
        ).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            response = self._send(
                conn,
                "PUT",
                f"/v2/{MIRROR_REPO}/manifests/{TAG}",
                201,
                manifest,
                {"Content-Type": DOCKER_MANIFEST},
            )
        finally:
            conn.close()
        digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        if response.getheader("Docker-Content-Digest") != digest:
            raise RuntimeError("push: the mirror stored the manifest under another digest")
        return digest


# ------------------------------------------------------------------------------- clients


@dataclass(slots=True)
class Fetch:
    status: int
    size: int
    seconds: float
    sha256: str | None = None
    error: str | None = None

    def ok(self, size: int, digest: str | None = None) -> bool:
        return (
            self.error is None
            and self.status == 200
            and self.size == size
            and (digest is None or self.sha256 == digest)
        )

    def problem(self, size: int, digest: str | None = None) -> str:
        if self.error is not None:
            return self.error
        if self.status != 200:
            return f"HTTP {self.status}"
        if self.size != size:
            return f"{self.size} bytes, expected {size}"
        if digest is not None and self.sha256 != digest:
            return f"sha256 {self.sha256}, expected {digest}"
        return ""


class Client(Protocol):
    name: str

    async def fetch(self, url: str, *, verify: bool) -> Fetch: ...


def _hash_all(hasher: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        hasher.update(chunk)  # hashlib releases the GIL on big buffers


class AiohttpClient:
    """aiohttp, reading whatever the socket delivered (up to 4 MiB buffers); sha256 of the
    body in a worker thread when asked to verify."""

    name = "aiohttp"

    def __init__(self) -> None:
        self._session = aiohttp.ClientSession(
            read_bufsize=4 * MIB,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
            connector=aiohttp.TCPConnector(limit=0),
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hash")

    async def close(self) -> None:
        await self._session.close()
        self._pool.shutdown(wait=False)

    async def fetch(self, url: str, *, verify: bool) -> Fetch:
        loop = asyncio.get_running_loop()
        hasher = hashlib.sha256() if verify else None
        pending: list[bytes] = []
        pending_bytes = size = status = 0
        started = time.perf_counter()
        try:
            async with self._session.get(url) as response:
                status = response.status
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    if hasher is None:
                        continue
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= HASH_BATCH:
                        await loop.run_in_executor(self._pool, _hash_all, hasher, pending)
                        pending, pending_bytes = [], 0
            if hasher is not None and pending:
                await loop.run_in_executor(self._pool, _hash_all, hasher, pending)
        except (aiohttp.ClientError, TimeoutError) as exc:
            elapsed = time.perf_counter() - started
            return Fetch(status, size, elapsed, error=f"{type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - started
        digest = f"sha256:{hasher.hexdigest()}" if hasher is not None else None
        return Fetch(status, size, elapsed, digest)


class CurlClient:
    """``curl -o /dev/null``; to verify, ``curl -o - | openssl dgst -sha256`` (OpenSSL's
    sha256 uses the CPU's SHA extensions; coreutils' sha256sum is ~4x slower here)."""

    name = "curl"
    _FORMAT = "%{http_code} %{size_download} %{time_total}\n"

    @staticmethod
    def _parse(code: int, text: bytes, elapsed: float | None) -> Fetch:
        lines = text.decode(errors="replace").strip().splitlines()
        fields = lines[-1].split() if lines else []
        if len(fields) != 3:
            return Fetch(0, 0, elapsed or 0.0, error=f"curl exit {code}: {' '.join(lines)}")
        status, size, total = int(fields[0]), int(fields[1]), float(fields[2])
        error = None if code == 0 else f"curl exit {code}: {' '.join(lines[:-1])}"
        return Fetch(status, size, total if elapsed is None else elapsed, error=error)

    async def fetch(self, url: str, *, verify: bool) -> Fetch:
        base = ["curl", "-sS", "-A", USER_AGENT]
        if not verify:
            proc = await spawn(
                *base,
                "-o",
                "/dev/null",
                "-w",
                self._FORMAT,
                url,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            code, out, err = await reap(proc)
            return self._parse(code, out + err, None)
        started = time.perf_counter()
        read_end, write_end = os.pipe()
        try:
            curl = await spawn(
                *base,
                "-o",
                "-",
                "-w",
                "%{stderr}" + self._FORMAT,
                url,
                stdout=write_end,
                stderr=asyncio.subprocess.PIPE,
            )
            digest = await spawn(
                "openssl", "dgst", "-sha256", "-r", stdin=read_end, stdout=asyncio.subprocess.PIPE
            )
        finally:
            os.close(read_end)
            os.close(write_end)
        (code, _, err), (_, hashed, _) = await asyncio.gather(reap(curl), reap(digest))
        result = self._parse(code, err, time.perf_counter() - started)
        hex_digest = hashed.decode().split()[0] if hashed.strip() else ""
        result.sha256 = f"sha256:{hex_digest}"
        return result


# ------------------------------------------------------------------------------- wrk


@dataclass(slots=True)
class WrkResult:
    rps: float
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int
    socket_errors: int
    upstream_requests: int | None = None


_LATENCY_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(text: str, percentile: str) -> float | None:
    match = re.search(rf"^\s*{percentile}%\s+([0-9.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    return float(match[1]) * _LATENCY_UNITS[match[2]] if match else None


def parse_wrk(text: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in", text, re.MULTILINE)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return WrkResult(
        rps=float(rps[1]),
        requests=int(total[1]),
        p50_ms=_latency_ms(text, "50"),
        p99_ms=_latency_ms(text, "99"),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
    )


# ------------------------------------------------------------------------------- the bench


@dataclass(frozen=True, slots=True)
class Target:
    key: TargetKey
    base: str  # http://127.0.0.1:PORT/v2/<name>

    def blob(self, digest: str) -> str:
        return f"{self.base}/blobs/{digest}"

    def manifest(self, reference: str) -> str:
        return f"{self.base}/manifests/{reference}"


@dataclass
class Content:
    image: str = ""
    mirror_blob: str = ""
    mirror_herd: str = ""
    cold: dict[str, list[str]] = field(default_factory=dict)
    herd: dict[str, list[str]] = field(default_factory=dict)
    rss_cold: dict[str, str] = field(default_factory=dict)
    rss_warm: dict[str, str] = field(default_factory=dict)


@dataclass
class Options:
    blob_mib: int
    herd_mib: int
    herd_clients: int
    rss_clients: int
    repeat: int
    wrk_duration: int
    wrk_connections: int
    wrk_threads: int
    client: str
    phases: tuple[str, ...]
    profile: Path | None
    json_path: Path | None = None
    keep: bool = False
    baseline: Path | None = None  # another source tree's Detour, run beside this one
    baseline_ramfs: bool = False  # its cache on a ramfs, which refuses O_DIRECT

    @property
    def blob_size(self) -> int:
        return self.blob_mib * MIB

    @property
    def herd_size(self) -> int:
        return self.herd_mib * MIB


Samples = dict[str, dict[str, list[float]]]  # metric → target → one value per repeat


def rotated(keys: Sequence[TargetKey], shift: int) -> list[TargetKey]:
    """The same targets in another order each repeat, so none always goes first."""
    shift %= len(keys)
    return [*keys[shift:], *keys[:shift]]


class Bench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.o = options
        self.dir = workdir
        self.mirror_port, self.peer_port, self.detour_port = (free_port() for _ in range(3))
        self.base_port = free_port()
        self.peer_root = workdir / "peer-storage"
        self.detour_cache = workdir / "detour-cache"
        self.base_cache = workdir / "base-cache"
        self.ramfs: Path | None = None
        self.caches: tuple[TargetKey, ...] = CACHES
        if options.baseline is not None:
            self.caches = ("detour", "base", "peer")
        self.all_targets: tuple[TargetKey, ...] = (*self.caches, "mirror")
        self.mirror = Service(
            "mirror",
            ["docker-registry", "serve", str(self._registry_config("mirror", self.mirror_port))],
            workdir / "mirror.log",
        )
        self.peer = Service(
            "peer",
            [
                "docker-registry",
                "serve",
                str(self._registry_config("peer", self.peer_port, self.mirror_port)),
            ],
            workdir / "peer.log",
        )
        self.detour = Service(
            "detour",
            [sys.executable, "-m", "proxy", "serve", "--config", str(self._detour_config())],
            workdir / "detour.log",
            cwd=REPO_ROOT,
        )
        self.services = [self.mirror, self.peer, self.detour]
        self.base: Service | None = None
        if options.baseline is not None:
            # python -m proxy from the baseline's directory imports the baseline's package.
            config = self._detour_config("base", self.base_port, self.base_cache)
            self.base = Service(
                "base",
                [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                workdir / "base.log",
                cwd=options.baseline,
            )
            self.services.append(self.base)
        self.mirror_log = AccessLog(self.mirror.log_path)
        self.targets: dict[TargetKey, Target] = {
            "detour": Target("detour", f"http://127.0.0.1:{self.detour_port}/v2/{DETOUR_NAME}"),
            "base": Target("base", f"http://127.0.0.1:{self.base_port}/v2/{DETOUR_NAME}"),
            "peer": Target("peer", f"http://127.0.0.1:{self.peer_port}/v2/{MIRROR_REPO}"),
            "mirror": Target("mirror", f"http://127.0.0.1:{self.mirror_port}/v2/{MIRROR_REPO}"),
        }
        self.content = Content()
        self.samples: Samples = {}
        self.details: dict[str, Any] = {"errors": [], "checks": {}}
        self.client: Client | None = None

    # --------------------------------------------------------------------- setup

    def _registry_config(self, name: str, port: int, remote_port: int | None = None) -> Path:
        """registry:2's default config (inmemory blob descriptor cache, info logs, access log
        on), filesystem storage in our temp dir; the peer adds ``proxy.remoteurl``."""
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
                "filesystem": {"rootdirectory": str(self.dir / f"{name}-storage")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": f"bench-{name}"},
        }
        if remote_port is not None:
            config["proxy"] = {"remoteurl": f"http://127.0.0.1:{remote_port}"}
        path = self.dir / f"{name}.yml"
        path.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON
        return path

    def _detour_config(
        self, name: str = "detour", port: int | None = None, cache: Path | None = None
    ) -> Path:
        mirror = f"127.0.0.1:{self.mirror_port}"
        config = {
            "listen": f"127.0.0.1:{port or self.detour_port}",
            "cache": {"dir": str(cache or self.detour_cache), "tag_ttl": "5m"},
            "redirects": [{"src": "docker.io/", "to": f"{mirror}/docker-mirror/"}],
            "registries": {mirror: {"insecure": True}},
        }
        path = self.dir / f"{name}.yml"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self) -> None:
        self.mirror.start()
        self.mirror.wait_ready(f"http://127.0.0.1:{self.mirror_port}/v2/")
        self.push()
        self.peer.start()
        self.peer.wait_ready(f"http://127.0.0.1:{self.peer_port}/v2/")
        self.detour.start()
        self.detour.wait_ready(f"http://127.0.0.1:{self.detour_port}/healthz")
        log(
            f"mirror pid {self.mirror.pid} :{self.mirror_port}, "
            f"peer pid {self.peer.pid} :{self.peer_port}, "
            f"detour pid {self.detour.pid} :{self.detour_port}; logs in {self.dir}"
        )
        if self.base is not None:
            if self.o.baseline_ramfs:
                self.ramfs = self.dir / "ramfs"
                self.ramfs.mkdir()
                subprocess.run(["mount", "-t", "ramfs", "ramfs", str(self.ramfs)], check=True)
                self.base_cache.symlink_to(self.ramfs)
            self.base.start()
            self.base.wait_ready(f"http://127.0.0.1:{self.base_port}/healthz")
            log(f"baseline detour pid {self.base.pid} :{self.base_port} ({self.o.baseline})")

    def unmount(self) -> None:
        if self.ramfs is not None:
            subprocess.run(["umount", "-l", str(self.ramfs)], check=False)
            self.ramfs = None

    def push(self) -> None:
        o, c = self.o, self.content
        pusher = Pusher(self.mirror_port)
        started = time.perf_counter()
        total = 0

        def blob(size: int) -> str:
            nonlocal total
            total += size
            return pusher.random_blob(size)

        c.image = pusher.image()
        c.mirror_blob = blob(o.blob_size)
        for key in self.caches:
            c.cold[key] = [blob(o.blob_size) for _ in range(o.repeat)] if "blob" in o.phases else []
            c.herd[key] = [blob(o.herd_size) for _ in range(o.repeat)] if "herd" in o.phases else []
            if "rss" in o.phases:
                c.rss_cold[key] = blob(o.blob_size)
                c.rss_warm[key] = blob(o.blob_size)
        if "herd" in o.phases:
            c.mirror_herd = blob(o.herd_size)
        elapsed = time.perf_counter() - started
        log(f"pushed {total / MIB:.0f} MiB to the mirror in {elapsed:.1f}s")

    # --------------------------------------------------------------------- helpers

    def record(self, metric: str, key: TargetKey, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(key, []).append(value)

    def error(self, where: str, message: str) -> None:
        self.details["errors"].append(f"{where}: {message}")
        log(f"ERROR {where}: {message}")

    def cached_path(self, key: TargetKey, digest: str) -> Path:
        hex_digest = digest.split(":", 1)[1]
        if key in DETOURS:
            cache = self.detour_cache if key == "detour" else self.base_cache
            return cache / "blobs" / "sha256" / hex_digest[:2] / hex_digest
        return (
            self.peer_root
            / "docker/registry/v2/blobs/sha256"
            / hex_digest[:2]
            / hex_digest
            / "data"
        )

    def _is_cached(self, key: TargetKey, digest: str) -> bool:
        return self.cached_path(key, digest).is_file()

    async def wait_cached(self, key: TargetKey, digest: str, limit: float = 120.0) -> bool:
        """Until the cache has committed the blob to its storage (the peer does it in the
        background, after or while it answers the client)."""
        deadline = time.monotonic() + limit
        while True:
            if self._is_cached(key, digest):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    def check_alive(self) -> None:
        for service in self.services:
            code = service.exit_code()
            if code is not None and not self.details.get(f"{service.name}_died"):
                self.details[f"{service.name}_died"] = code
                self.error(service.name, f"exited with {code}; log tail:\n{service.log_tail()}")

    async def _profiled(self, phase: str) -> asyncio.subprocess.Process | None:
        if self.o.profile is None:
            return None
        py_spy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        if py_spy is None:
            log("--profile: py-spy not found (pip install py-spy); not profiling")
            self.o.profile = None
            return None
        self.o.profile.mkdir(parents=True, exist_ok=True)
        out = self.o.profile / f"detour-{phase}.txt"
        proc = await spawn(
            py_spy,
            "record",
            "--pid",
            str(self.detour.pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)  # let it attach
        return proc

    @staticmethod
    async def _stop_profile(proc: asyncio.subprocess.Process | None) -> None:
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(reap(proc), 30)
        except TimeoutError:
            proc.kill()
            await reap(proc)

    # --------------------------------------------------------------------- measurements

    async def run(self) -> None:
        aio = AiohttpClient()
        clients: dict[str, Client] = {"aiohttp": aio}
        if shutil.which("curl") and shutil.which("openssl"):
            clients["curl"] = CurlClient()
        try:
            self.details["clients"] = await self.choose_client(clients)
            if self.o.baseline is not None:
                self.details["baseline_revision"] = tree_revision(self.o.baseline)
            speed = await asyncio.to_thread(write_speed, self.dir, self.o.blob_size)
            self.details["write_gbps"] = speed
            log(f"writing a new {self.o.blob_mib} MiB file here: {speed:.2f} GB/s")
            for phase in self.o.phases:
                profiler = await self._profiled(phase)
                try:
                    await getattr(self, f"phase_{phase}")()
                finally:
                    await self._stop_profile(profiler)
                self.check_alive()
            await self.finish()
        finally:
            await aio.close()

    async def choose_client(self, clients: dict[str, Client]) -> dict[str, Any]:
        """Fetch the mirror's blob with each client; use the faster one for every target."""
        url = self.targets["mirror"].blob(self.content.mirror_blob)
        rates: dict[str, float] = {}
        for name, client in clients.items():
            if self.o.client not in ("auto", name):
                continue
            await client.fetch(url, verify=False)  # warm-up
            runs = []
            for _ in range(3):
                result = await client.fetch(url, verify=False)
                if not result.ok(self.o.blob_size):
                    raise RuntimeError(
                        f"{name} cannot read the mirror: {result.problem(self.o.blob_size)}"
                    )
                runs.append(result.size / result.seconds / GB)
            rates[name] = statistics.median(runs)
        if not rates:
            raise RuntimeError(f"client {self.o.client} is not available")
        chosen = max(rates, key=lambda n: rates[n])
        self.client = clients[chosen]
        summary = ", ".join(f"{n} {r:.2f} GB/s" for n, r in rates.items())
        log(f"client: {chosen} (mirror blob read: {summary})")
        return {"chosen": chosen, "mirror_gbps": rates}

    async def phase_blob(self) -> None:
        assert self.client is not None
        size = self.o.blob_size
        hits_from_cache: dict[str, list[bool]] = {k: [] for k in self.caches}
        cold_upstream: dict[str, list[int]] = {k: [] for k in self.caches}
        for r in range(self.o.repeat):
            result = await self.client.fetch(
                self.targets["mirror"].blob(self.content.mirror_blob), verify=False
            )
            if result.ok(size):
                self.record("blob_cold_gbps", "mirror", size / result.seconds / GB)
                self.record("blob_hit_gbps", "mirror", size / result.seconds / GB)
                self.record("blob_hit_again_gbps", "mirror", size / result.seconds / GB)
            else:
                self.error("blob mirror", result.problem(size))
            for key in rotated(self.caches, r):
                digest = self.content.cold[key][r]
                url = self.targets[key].blob(digest)
                mark = self.mirror_log.mark()
                cold = await self.client.fetch(url, verify=False)
                if not cold.ok(size):
                    self.error(f"blob cold {key} #{r}", cold.problem(size))
                    continue
                self.record("blob_cold_gbps", key, size / cold.seconds / GB)
                if not await self.wait_cached(key, digest):
                    self.error(f"blob cold {key} #{r}", "blob never appeared in the cache")
                gets, _ = blob_requests(await self.mirror_log.settle(mark), digest)
                cold_upstream[key].append(gets)
                mark = self.mirror_log.mark()
                hit = await self.client.fetch(url, verify=False)
                if not hit.ok(size):
                    self.error(f"blob hit {key} #{r}", hit.problem(size))
                    continue
                self.record("blob_hit_gbps", key, size / hit.seconds / GB)
                # Again: a cache that wrote the blob without the page cache (O_DIRECT) read it
                # from the disk on the first hit; this one it reads from the page cache.
                again = await self.client.fetch(url, verify=False)
                if not again.ok(size):
                    self.error(f"blob hit again {key} #{r}", again.problem(size))
                    continue
                self.record("blob_hit_again_gbps", key, size / again.seconds / GB)
                gets, _ = blob_requests(await self.mirror_log.settle(mark), digest)
                hits_from_cache[key].append(gets == 0)
        self.details["checks"]["blob_cold_upstream_gets"] = cold_upstream
        self.details["checks"]["blob_hit_served_from_cache"] = hits_from_cache

    async def _herd(self, key: TargetKey, digest: str, size: int) -> dict[str, Any]:
        assert self.client is not None
        client = self.client
        url = self.targets[key].blob(digest)
        mark = self.mirror_log.mark()
        started = time.perf_counter()
        results = await asyncio.gather(
            *(client.fetch(url, verify=True) for _ in range(self.o.herd_clients))
        )
        wall = time.perf_counter() - started
        problems = [r.problem(size, digest) for r in results if not r.ok(size, digest)]
        if key != "mirror":
            await self.wait_cached(key, digest)
        gets, heads = blob_requests(await self.mirror_log.settle(mark, quiet=0.5), digest)
        return {"wall": wall, "gets": gets, "heads": heads, "problems": problems}

    async def phase_herd(self) -> None:
        size = self.o.herd_size
        verified: dict[str, list[bool]] = {k: [] for k in self.all_targets}
        for r in range(self.o.repeat):
            for key in rotated(self.all_targets, r):
                digest = self.content.mirror_herd if key == "mirror" else self.content.herd[key][r]
                outcome = await self._herd(key, digest, size)
                self.record("herd_wall_s", key, outcome["wall"])
                if key != "mirror":
                    self.record("herd_upstream_gets", key, outcome["gets"])
                    self.record("herd_upstream_heads", key, outcome["heads"])
                verified[key].append(not outcome["problems"])
                for problem in sorted(set(outcome["problems"])):
                    count = outcome["problems"].count(problem)
                    self.error(f"herd {key} #{r}", f"{count} client(s): {problem}")
                log(
                    f"herd {key} #{r}: {outcome['wall']:.2f}s, upstream GETs {outcome['gets']}, "
                    f"HEADs {outcome['heads']}, bad clients {len(outcome['problems'])}"
                )
        self.details["checks"]["herd_all_verified"] = verified

    async def _check_manifest(self, url: str) -> str | None:
        """One GET: 200 and the image's bytes, or what was wrong."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers={"Accept": ACCEPT, "User-Agent": USER_AGENT}) as response,
        ):
            body = await response.read()
        if response.status != 200:
            return f"HTTP {response.status}: {body[:200]!r}"
        if f"sha256:{hashlib.sha256(body).hexdigest()}" != self.content.image:
            return "manifest bytes do not match the digest"
        return None

    async def _wrk(self, url: str) -> WrkResult:
        o = self.o
        proc = await spawn(
            "wrk",
            f"-t{o.wrk_threads}",
            f"-c{o.wrk_connections}",
            f"-d{o.wrk_duration}s",
            "--latency",
            "-H",
            f"Accept: {ACCEPT}",
            "-H",
            f"User-Agent: {USER_AGENT}-wrk",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        code, out, _ = await reap(proc)
        text = out.decode(errors="replace")
        if code != 0:
            raise RuntimeError(f"wrk exited with {code}:\n{text}")
        return parse_wrk(text)

    async def phase_manifest(self) -> None:
        references = {"digest": self.content.image, "tag": TAG}
        broken: set[tuple[str, str]] = set()
        for key in self.all_targets:  # warm every cache, check what it serves
            for kind, reference in references.items():
                problem = await self._check_manifest(self.targets[key].manifest(reference))
                if problem is not None:
                    broken.add((key, kind))
                    self.error(f"manifest {key} by {kind}", problem)
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in range(self.o.repeat):
            for key in rotated(self.all_targets, r):
                for kind, reference in references.items():
                    if (key, kind) in broken:
                        continue
                    mark = self.mirror_log.mark()
                    result = await self._wrk(self.targets[key].manifest(reference))
                    # Lines from the bench's own clients (lagging ones from a mirror-direct
                    # run included) are not upstream requests.
                    entries = await self.mirror_log.settle(mark)
                    if key != "mirror":
                        result.upstream_requests = sum(
                            1 for e in entries if not e.agent.startswith(USER_AGENT)
                        )
                        per_request = result.upstream_requests / max(1, result.requests)
                        self.record(f"manifest_{kind}_upstream", key, per_request)
                    self.record(f"manifest_{kind}_rps", key, result.rps)
                    if result.p99_ms is not None:
                        self.record(f"manifest_{kind}_p99_ms", key, result.p99_ms)
                    runs.setdefault(f"{key} {kind}", []).append(asdict(result))
                    if result.non_2xx or result.socket_errors:
                        self.error(
                            f"manifest {key} by {kind} #{r}",
                            f"{result.non_2xx} non-2xx, {result.socket_errors} socket errors "
                            f"of {result.requests} requests",
                        )
                    log(
                        f"wrk {key} by {kind} #{r}: {result.rps:.0f} req/s, "
                        f"p99 {result.p99_ms} ms, upstream {result.upstream_requests}"
                    )
        self.details["wrk_runs"] = runs

    async def _sample_rss(self, service: Service, stop: asyncio.Event) -> int:
        peak = 0
        while not stop.is_set():
            peak = max(peak, service.status_kib("VmRSS") or 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
        return peak

    async def phase_rss(self) -> None:
        """``rss_clients`` clients on a cold blob plus as many on a cached one, at once."""
        assert self.client is not None
        client = self.client
        size = self.o.blob_size
        services = {"detour": self.detour, "peer": self.peer}
        if self.base is not None:
            services["base"] = self.base
        phase: dict[str, Any] = {}
        for key in self.caches:
            service = services[key]
            cold, warm = self.content.rss_cold[key], self.content.rss_warm[key]
            first = await client.fetch(self.targets[key].blob(warm), verify=False)
            if not first.ok(size):
                self.error(f"rss warm-up {key}", first.problem(size))
                continue
            await self.wait_cached(key, warm)
            before = service.status_kib("VmRSS")
            reset = service.reset_peak_rss()
            stop = asyncio.Event()
            sampler = asyncio.create_task(self._sample_rss(service, stop))
            started = time.perf_counter()
            urls = [self.targets[key].blob(cold)] * self.o.rss_clients
            urls += [self.targets[key].blob(warm)] * self.o.rss_clients
            digests = [cold] * self.o.rss_clients + [warm] * self.o.rss_clients
            results = await asyncio.gather(*(client.fetch(u, verify=True) for u in urls))
            wall = time.perf_counter() - started
            stop.set()
            sampled = await sampler
            hwm = service.status_kib("VmHWM") if reset else None
            peak_kib = hwm if hwm is not None else sampled
            problems = [
                r.problem(size, d)
                for r, d in zip(results, digests, strict=True)
                if not r.ok(size, d)
            ]
            for problem in sorted(set(problems)):
                self.error(f"rss {key}", f"{problems.count(problem)} client(s): {problem}")
            self.record("rss_peak_mib", key, peak_kib / 1024)
            self.record("rss_aggregate_gbps", key, len(urls) * size / wall / GB)
            phase[key] = {
                "rss_before_mib": (before or 0) / 1024,
                "peak_mib": peak_kib / 1024,
                "peak_from": "VmHWM after clear_refs" if hwm is not None else "sampled VmRSS",
                "sampled_peak_mib": sampled / 1024,
                "wall_s": wall,
                "clients": len(urls),
                "all_verified": not problems,
            }
            log(f"rss {key}: peak {peak_kib / 1024:.0f} MiB, {len(urls)} clients in {wall:.2f}s")
        self.details["rss_phase"] = phase

    async def finish(self) -> None:
        services: dict[TargetKey, Service] = {
            "detour": self.detour,
            "peer": self.peer,
            "mirror": self.mirror,
        }
        if self.base is not None:
            services["base"] = self.base
        for key, service in services.items():
            hwm = service.status_kib("VmHWM")
            if hwm is not None:
                self.record("rss_run_hwm_mib", key, hwm / 1024)
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{self.detour_port}/metrics") as response,
            ):
                text = await response.text()
            self.details["detour_upstream_requests"] = [
                line
                for line in text.splitlines()
                if line.startswith("detour_upstream_requests_total")
            ]
        except aiohttp.ClientError as exc:
            self.details["detour_upstream_requests"] = [f"unavailable: {exc}"]
        for detour in (self.detour, self.base):
            if detour is None:
                continue
            problems = [
                line
                for line in detour.log_path.read_text(errors="replace").splitlines()
                if '"level": "error"' in line or '"level": "warning"' in line or "Traceback" in line
            ]
            self.details[f"{detour.name}_log_problems"] = problems[:50]
            self.details[f"{detour.name}_log_problem_count"] = len(problems)


# ------------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    metric: str
    fmt: str
    better: Literal["higher", "lower", ""]
    targets: tuple[TargetKey, ...] = ("detour", "base", "peer", "mirror")


CACHE_ROW: tuple[TargetKey, ...] = ("detour", "base", "peer")
ROWS = (
    Row("cold blob GET, GB/s", "blob_cold_gbps", ".2f", "higher"),
    Row("hit blob GET, GB/s", "blob_hit_gbps", ".2f", "higher"),
    Row("hit blob GET again, GB/s", "blob_hit_again_gbps", ".2f", "higher"),
    Row("herd: wall time, s", "herd_wall_s", ".2f", "lower"),
    Row("herd: upstream GETs of the blob", "herd_upstream_gets", ".0f", "lower", CACHE_ROW),
    Row("herd: upstream HEADs of the blob", "herd_upstream_heads", ".0f", "lower", CACHE_ROW),
    Row("manifest by digest, req/s", "manifest_digest_rps", ".0f", "higher"),
    Row("manifest by digest, p99 ms", "manifest_digest_p99_ms", ".2f", "lower"),
    Row(
        "manifest by digest: upstream requests per request",
        "manifest_digest_upstream",
        ".2f",
        "lower",
        CACHE_ROW,
    ),
    Row("manifest by tag, req/s", "manifest_tag_rps", ".0f", "higher"),
    Row("manifest by tag, p99 ms", "manifest_tag_p99_ms", ".2f", "lower"),
    Row(
        "manifest by tag: upstream requests per request",
        "manifest_tag_upstream",
        ".2f",
        "lower",
        CACHE_ROW,
    ),
    Row("streaming: peak RSS, MiB", "rss_peak_mib", ".0f", "lower", CACHE_ROW),
    Row("streaming: aggregate GB/s", "rss_aggregate_gbps", ".2f", "higher", CACHE_ROW),
    Row("whole run: VmHWM, MiB", "rss_run_hwm_mib", ".0f", "lower"),
)


def median(samples: Samples, metric: str, key: str) -> float | None:
    values = samples.get(metric, {}).get(key)
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}"


def table(
    samples: Samples,
    options: Options,
    keys: Sequence[TargetKey] = ALL_TARGETS,
    labels: dict[TargetKey, str] = LABELS,
) -> str:
    herd = f"{options.herd_clients}x {options.herd_mib} MiB"
    stream = f"{options.rss_clients} cold + {options.rss_clients} hit, {options.blob_mib} MiB"
    ratios = [("peer", "Detour/peer"), ("mirror", "Detour/mirror")]
    if "base" in keys:
        ratios.insert(0, ("base", "Detour/baseline"))
    lines = [
        f"| metric (median of {options.repeat}) | "
        + " | ".join(labels[k] for k in keys)
        + " | "
        + " | ".join(name for _, name in ratios)
        + " |",
        "|---|" + "---:|" * (len(keys) + len(ratios)),
    ]
    for row in ROWS:
        if row.metric not in samples:
            continue
        values = {k: median(samples, row.metric, k) for k in keys}
        cells = [
            "—" if k not in row.targets or values[k] is None else format(values[k], row.fmt)
            for k in keys
        ]
        cells += [
            ratio(values["detour"], values[k]) if k in row.targets else "—" for k, _ in ratios
        ]
        label = row.label.replace("herd:", f"herd ({herd}):").replace(
            "streaming:", f"streaming ({stream}):"
        )
        if row.better:
            label += f" ({row.better} is better)"
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def environment() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match[1].strip() if match else cpu
    memory = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        memory = f"{int(match[1]) / 1024 / 1024:.1f} GiB" if match else memory
    revision = first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "proxy"])
    if dirty not in ("unavailable", ""):
        revision += " + uncommitted changes in proxy/"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "distribution": first_line(["docker-registry", "--version"]),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
        "curl": first_line(["curl", "--version"]).split(" (")[0],
        "detour": revision,
    }


def report(bench: Bench, env: dict[str, str], options: Options) -> str:
    d = bench.details
    out = ["# Detour benchmark", ""]
    out.append(
        f"Machine: {env['nproc']} CPUs ({env['cpu']}), {env['memory']} RAM, Linux "
        f"{env['kernel']}; Python {env['python']}, aiohttp {env['aiohttp']}; "
        f"{env['distribution']}; {env['wrk']}; {env['curl']}; Detour {env['detour']}."
    )
    clients = d.get("clients", {})
    rates = ", ".join(f"{n} {r:.2f} GB/s" for n, r in clients.get("mirror_gbps", {}).items())
    out.append(
        f"Blob client: {clients.get('chosen', '?')} (reading the mirror directly: {rates}). "
        f"wrk -t{options.wrk_threads} -c{options.wrk_connections} -d{options.wrk_duration}s. "
        f"Blob {options.blob_mib} MiB, herd {options.herd_clients}x {options.herd_mib} MiB."
    )
    if "write_gbps" in d:
        out.append(
            f"Writing a new {options.blob_mib} MiB file in the temp dir (1 MiB writes, no "
            f"fsync): {d['write_gbps']:.2f} GB/s, the ceiling for a cache that writes as it "
            "serves."
        )
    if options.profile is not None:
        out.append("**Profiled run (py-spy attached to Detour): numbers are not comparable.**")
    labels = dict(LABELS)
    if options.baseline is not None:
        labels["base"] = f"Detour {d.get('baseline_revision', 'baseline')}" + (
            " (cache on ramfs: buffered)" if options.baseline_ramfs else ""
        )
        out.append(f"Baseline: {labels['base']}, from {options.baseline}.")
    out += ["", table(bench.samples, options, bench.all_targets, labels), ""]
    checks = d.get("checks", {})
    notes = []
    if "herd_all_verified" in checks:
        verdict = {
            k: "all verified" if v and all(v) else "NOT all verified"
            for k, v in checks["herd_all_verified"].items()
        }
        notes.append(f"herd sha256 of every client's bytes: {verdict}")
    if "blob_cold_upstream_gets" in checks:
        notes.append(f"upstream GETs per cold blob GET: {checks['blob_cold_upstream_gets']}")
    if "blob_hit_served_from_cache" in checks:
        notes.append(f"hit GET made no upstream GET: {checks['blob_hit_served_from_cache']}")
    if "rss_phase" in d:
        for key, phase in d["rss_phase"].items():
            notes.append(
                f"streaming {key}: RSS {phase['rss_before_mib']:.0f} MiB before, peak "
                f"{phase['peak_mib']:.0f} MiB ({phase['peak_from']}), "
                f"{'all verified' if phase['all_verified'] else 'NOT all verified'}"
            )
    if d.get("detour_upstream_requests"):
        notes.append(f"Detour /metrics: {'; '.join(d['detour_upstream_requests'])}")
    notes.append(f"Detour log warnings/errors: {d.get('detour_log_problem_count', 0)}")
    if options.baseline is not None:
        notes.append(f"baseline log warnings/errors: {d.get('base_log_problem_count', 0)}")
    out += [f"- {n}" for n in notes]
    if d["errors"]:
        out += ["", "## Errors", ""] + [f"- {e}" for e in d["errors"]]
    out += ["", "## All samples", ""]
    for metric, per_target in bench.samples.items():
        shown = "; ".join(
            f"{k}: {', '.join(f'{v:.3g}' for v in values)}" for k, values in per_target.items()
        )
        out.append(f"- {metric}: {shown}")
    return "\n".join(out)


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description="Benchmark Detour against distribution's proxy mode and the mirror itself."
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB blobs, 3 s wrk")
    parser.add_argument("--blob-mib", type=int, help="cold/hit/streaming blob size (512)")
    parser.add_argument("--herd-mib", type=int, help="herd blob size (256)")
    parser.add_argument("--herd-clients", type=int, default=16)
    parser.add_argument(
        "--rss-clients", type=int, default=4, help="streaming phase: clients per blob (4)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--wrk-duration", type=int, help="seconds per wrk run (10)")
    parser.add_argument("--wrk-connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument(
        "--client",
        choices=("auto", "aiohttp", "curl"),
        default="auto",
        help="blob client; auto takes the faster at reading the mirror",
    )
    parser.add_argument(
        "--only", nargs="+", choices=PHASES, default=list(PHASES), help="phases to run"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another source tree (a git worktree of HEAD, say) whose Detour runs beside this "
        "one, measured in the same run: an A/B in one table",
    )
    parser.add_argument(
        "--baseline-ramfs",
        action="store_true",
        help="the baseline's cache on a ramfs, which refuses O_DIRECT: with --baseline .  this "
        "tree's buffered writes beside its direct ones (needs root)",
    )
    parser.add_argument("--json", type=Path, help="write every sample and check here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, storage)")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy record Detour per phase into this dir (folded stacks; skews the numbers)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    return Options(
        blob_mib=args.blob_mib or (64 if quick else 512),
        herd_mib=args.herd_mib or (64 if quick else 256),
        herd_clients=args.herd_clients,
        rss_clients=args.rss_clients,
        repeat=max(1, args.repeat),
        wrk_duration=args.wrk_duration or (3 if quick else 10),
        wrk_connections=args.wrk_connections,
        wrk_threads=args.wrk_threads,
        client=args.client,
        phases=tuple(p for p in PHASES if p in args.only),
        profile=args.profile,
        json_path=args.json,
        keep=args.keep,
        baseline=args.baseline.resolve() if args.baseline is not None else None,
        baseline_ramfs=args.baseline_ramfs,
    )


def _raise_interrupt(signum: int, _: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    for tool in ("docker-registry", "wrk"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found (apt-get install docker-registry wrk)", file=sys.stderr)
            return 2
    # Ctrl-C even when started in the background of a script (which ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    env = environment()
    if options.baseline is not None and not (options.baseline / "proxy").is_dir():
        print(f"bench: {options.baseline} holds no proxy/ package", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="detour-bench-"))
    bench = Bench(options, workdir)
    code = 0
    try:
        bench.start()
        asyncio.run(bench.run())
        text = report(bench, env, options)
        print(text)
        json_path = options.json_path
        if json_path is not None:
            data = {
                "environment": env,
                "options": {k: str(v) for k, v in asdict(options).items()},
                "medians": {
                    m: {k: statistics.median(v) for k, v in per.items() if v}
                    for m, per in bench.samples.items()
                },
                "samples": bench.samples,
                "details": bench.details,
                "markdown": text,
            }
            json_path.write_text(json.dumps(data, indent=2, default=str))
            log(f"wrote {json_path}")
        code = 1 if bench.details["errors"] else 0
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    except Exception as exc:
        log(f"failed: {type(exc).__name__}: {exc}")
        for service in bench.services:
            if service.log_path.exists():
                log(f"{service.name} log tail:\n{service.log_tail(15)}")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        kill_children()
        for service in reversed(bench.services):
            service.stop()
        bench.unmount()
        if options.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
