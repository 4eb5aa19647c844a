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

This is the entry point: the options and the run's frame (start, measure, report, clean up).
The parts: ``targets`` starts the servers measured, ``mirror`` fills the mirror and reads its
access log, ``clients`` are the blob clients, ``phases/`` the measurements, ``report`` the
table and the JSON, ``session`` the run that ties them together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common import log
from environment import environment
from phases import PHASES
from processes import kill_children
from report import json_report, report
from session import Bench, Options


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
    parser.add_argument(
        "--slow-disk",
        type=int,
        metavar="BYTES_PER_S",
        help="each cache's storage on a disk whose writes are held to this rate (a loop "
        "device throttled by the block layer, tests/slow_disk.py; needs root)",
    )
    parser.add_argument(
        "--uplink-mbit",
        type=float,
        metavar="MBIT",
        help="what the mirror sends, to the caches and the bench alike, held to this rate: an "
        "edge site's link to its registry (htb on lo, bench/uplink.py; needs root)",
    )
    parser.add_argument(
        "--backed-memory",
        action="store_true",
        help="on a VM that gives free memory back to its host, switch that off for the run and "
        "write free memory once, so new page cache costs what it does on hardware "
        "(bench/guest_memory.py; needs root)",
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
        slow_disk=args.slow_disk,
        uplink_mbit=args.uplink_mbit,
        backed_memory=args.backed_memory,
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
            data = json_report(bench, env, options, text)
            json_path.write_text(json.dumps(data, indent=2, default=str))
            log(f"wrote {json_path}")
        code = 1 if bench.details["errors"] else 0
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    except Exception as exc:
        log(f"failed: {type(exc).__name__}: {exc}")
        for service in bench.targets.services:
            if service.log_path.exists():
                log(f"{service.name} log tail:\n{service.log_tail(15)}")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        kill_children()
        bench.targets.stop()
        if options.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
