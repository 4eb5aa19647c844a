"""Streaming RSS: clients on a cold blob and as many on a cached one, at once, all verified;
the peak RSS from VmHWM after resetting it (clear_refs), or sampled VmRSS where that fails."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from common import GB, log
from processes import Service

if TYPE_CHECKING:
    from session import Bench


async def _sample_rss(service: Service, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, service.status_kib("VmRSS") or 0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    return peak


async def run(bench: Bench) -> None:
    """``rss_clients`` clients on a cold blob plus as many on a cached one, at once."""
    assert bench.client is not None
    client = bench.client
    size = bench.o.blob_size
    phase: dict[str, Any] = {}
    for key in bench.targets.caches:
        service = bench.targets.service(key)
        cold, warm = bench.content.rss_cold[key], bench.content.rss_warm[key]
        first = await client.fetch(bench.targets[key].blob(warm), verify=False)
        if not first.ok(size):
            bench.error(f"rss warm-up {key}", first.problem(size))
            continue
        await bench.targets.wait_cached(key, warm)
        before = service.status_kib("VmRSS")
        reset = service.reset_peak_rss()
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(service, stop))
        started = time.perf_counter()
        urls = [bench.targets[key].blob(cold)] * bench.o.rss_clients
        urls += [bench.targets[key].blob(warm)] * bench.o.rss_clients
        digests = [cold] * bench.o.rss_clients + [warm] * bench.o.rss_clients
        results = await asyncio.gather(*(client.fetch(u, verify=True) for u in urls))
        wall = time.perf_counter() - started
        stop.set()
        sampled = await sampler
        hwm = service.status_kib("VmHWM") if reset else None
        peak_kib = hwm if hwm is not None else sampled
        problems = [
            r.problem(size, d) for r, d in zip(results, digests, strict=True) if not r.ok(size, d)
        ]
        for problem in sorted(set(problems)):
            bench.error(f"rss {key}", f"{problems.count(problem)} client(s): {problem}")
        bench.record("rss_peak_mib", key, peak_kib / 1024)
        bench.record("rss_aggregate_gbps", key, len(urls) * size / wall / GB)
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
    bench.details["rss_phase"] = phase
