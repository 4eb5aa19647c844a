"""Manifests: ``wrk`` by digest and by tag after a warm-up GET whose bytes are checked; req/s,
p99, and upstream requests per client request (from the mirror's access log)."""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from common import ACCEPT, TAG, USER_AGENT, log
from processes import reap, spawn
from targets import rotated

if TYPE_CHECKING:
    from session import Bench


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


async def _check_manifest(bench: Bench, url: str) -> str | None:
    """One GET: 200 and the image's bytes, or what was wrong."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": ACCEPT, "User-Agent": USER_AGENT}) as response,
    ):
        body = await response.read()
    if response.status != 200:
        return f"HTTP {response.status}: {body[:200]!r}"
    if f"sha256:{hashlib.sha256(body).hexdigest()}" != bench.content.image:
        return "manifest bytes do not match the digest"
    return None


async def _wrk(bench: Bench, url: str) -> WrkResult:
    o = bench.o
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


async def run(bench: Bench) -> None:
    references = {"digest": bench.content.image, "tag": TAG}
    broken: set[tuple[str, str]] = set()
    for key in bench.targets.all_targets:  # warm every cache, check what it serves
        for kind, reference in references.items():
            problem = await _check_manifest(bench, bench.targets[key].manifest(reference))
            if problem is not None:
                broken.add((key, kind))
                bench.error(f"manifest {key} by {kind}", problem)
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(bench.o.repeat):
        for key in rotated(bench.targets.all_targets, r):
            for kind, reference in references.items():
                if (key, kind) in broken:
                    continue
                mark = bench.targets.mirror_log.mark()
                result = await _wrk(bench, bench.targets[key].manifest(reference))
                # Lines from the bench's own clients (lagging ones from a mirror-direct
                # run included) are not upstream requests.
                entries = await bench.targets.mirror_log.settle(mark)
                if key != "mirror":
                    result.upstream_requests = sum(
                        1 for e in entries if not e.agent.startswith(USER_AGENT)
                    )
                    per_request = result.upstream_requests / max(1, result.requests)
                    bench.record(f"manifest_{kind}_upstream", key, per_request)
                bench.record(f"manifest_{kind}_rps", key, result.rps)
                if result.p99_ms is not None:
                    bench.record(f"manifest_{kind}_p99_ms", key, result.p99_ms)
                runs.setdefault(f"{key} {kind}", []).append(asdict(result))
                if result.non_2xx or result.socket_errors:
                    bench.error(
                        f"manifest {key} by {kind} #{r}",
                        f"{result.non_2xx} non-2xx, {result.socket_errors} socket errors "
                        f"of {result.requests} requests",
                    )
                log(
                    f"wrk {key} by {kind} #{r}: {result.rps:.0f} req/s, "
                    f"p99 {result.p99_ms} ms, upstream {result.upstream_requests}"
                )
    bench.details["wrk_runs"] = runs
