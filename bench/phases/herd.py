"""The herd: many clients GET one fresh blob at once; wall time, the upstream GETs and HEADs of
that blob (one of each is the goal), and every client's sha256."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from common import log
from mirror import blob_requests
from targets import TargetKey, rotated

if TYPE_CHECKING:
    from session import Bench


async def _herd(bench: Bench, key: TargetKey, digest: str, size: int) -> dict[str, Any]:
    assert bench.client is not None
    client = bench.client
    url = bench.targets[key].blob(digest)
    mark = bench.targets.mirror_log.mark()
    started = time.perf_counter()
    results = await asyncio.gather(
        *(client.fetch(url, verify=True) for _ in range(bench.o.herd_clients))
    )
    wall = time.perf_counter() - started
    problems = [r.problem(size, digest) for r in results if not r.ok(size, digest)]
    if key != "mirror":
        await bench.targets.wait_cached(key, digest)
    gets, heads = blob_requests(await bench.targets.mirror_log.settle(mark, quiet=0.5), digest)
    return {"wall": wall, "gets": gets, "heads": heads, "problems": problems}


async def run(bench: Bench) -> None:
    size = bench.o.herd_size
    verified: dict[str, list[bool]] = {k: [] for k in bench.targets.all_targets}
    for r in range(bench.o.repeat):
        for key in rotated(bench.targets.all_targets, r):
            digest = bench.content.mirror_herd if key == "mirror" else bench.content.herd[key][r]
            outcome = await _herd(bench, key, digest, size)
            bench.record("herd_wall_s", key, outcome["wall"])
            if key != "mirror":
                bench.record("herd_upstream_gets", key, outcome["gets"])
                bench.record("herd_upstream_heads", key, outcome["heads"])
            verified[key].append(not outcome["problems"])
            for problem in sorted(set(outcome["problems"])):
                count = outcome["problems"].count(problem)
                bench.error(f"herd {key} #{r}", f"{count} client(s): {problem}")
            log(
                f"herd {key} #{r}: {outcome['wall']:.2f}s, upstream GETs {outcome['gets']}, "
                f"HEADs {outcome['heads']}, bad clients {len(outcome['problems'])}"
            )
    bench.details["checks"]["herd_all_verified"] = verified
