"""The bench's results: the markdown table (one row per metric, a column per target, Detour's
ratios to the others), the notes on what was checked, every sample, and the JSON file."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from session import Bench, Options, Samples
from targets import ALL_TARGETS, LABELS, TargetKey


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
    Row("hit blob GET: the server's CPU-s", "blob_hit_cpu_s", ".2f", "lower"),
    Row("cold blob: the cache's CPU-s, until stored", "blob_cold_cpu_s", ".2f", "lower", CACHE_ROW),
    Row("cold blob: the mirror's CPU-s", "blob_cold_mirror_cpu_s", ".2f", "lower", CACHE_ROW),
    Row("cold blob: pages the cache faulted in", "blob_cold_faults", ".0f", "lower", CACHE_ROW),
    Row(
        "image pull (6 layers, 3 at a time), cold GB/s",
        "image_cold_gbps",
        ".2f",
        "higher",
        CACHE_ROW,
    ),
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


def report(bench: Bench, env: dict[str, str], options: Options) -> str:
    d = bench.details
    out = ["# Detour benchmark", ""]
    out.append(
        f"Machine: {env['nproc']} CPUs ({env['cpu']}), {env['memory']} RAM "
        f"({env['page_reporting']}), Linux "
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
    if options.slow_disk is not None:
        out.append(f"Each cache's storage on a disk written at {options.slow_disk / 1e6:g} MB/s.")
    if options.uplink_mbit is not None:
        out.append(
            f"What the mirror sends, to the caches and the bench alike, held to "
            f"{options.uplink_mbit:g} Mbit/s ({options.uplink_mbit / 8e3:.2f} GB/s): the uplink."
        )
    if "backed_memory" in d:
        out.append(d["backed_memory"])
    if options.profile is not None:
        out.append("**Profiled run (py-spy attached to Detour): numbers are not comparable.**")
    labels = dict(LABELS)
    if options.baseline is not None:
        labels["base"] = f"Detour {d.get('baseline_revision', 'baseline')}" + (
            " (cache on ramfs: buffered)" if options.baseline_ramfs else ""
        )
        out.append(f"Baseline: {labels['base']}, from {options.baseline}.")
    out += ["", table(bench.samples, options, bench.targets.all_targets, labels), ""]
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


def json_report(bench: Bench, env: dict[str, str], options: Options, text: str) -> dict[str, Any]:
    """What ``--json`` writes: the environment, the options, each metric's medians, every
    sample and check, and the markdown report."""
    return {
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
