"""The memory formula in docs/caching.md ("Memory is a function of the settings") is the code's
own arithmetic: each number the page gives is computed here from proxy/memory.py, where the
sizes of Detour's buffers live, so a buffer that changes without the page changing (or the other
way round) fails here, before an operator sizes a pod by a formula that is no longer true."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from proxy import memory
from proxy.memory import MiB
from proxy.settings import CacheSettings, UpstreamSettings
from tests.support import ROOT

CACHING = ROOT / "docs" / "caching.md"
DAEMONSET = ROOT / "deploy" / "kubernetes" / "base" / "proxy-daemonset.yaml"
HELM_VALUES = ROOT / "deploy" / "helm" / "detour" / "values.yaml"
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}

FORMULA = re.compile(  # \u00d7: the page's multiplication sign
    r"`base \+ max_fetches \u00d7 (?P<per_fetch>\d+) MiB \+ (?P<fast_bodies>\d+) MiB"
    r" \+ write_buffer \+ hits being sent \u00d7 (?P<per_hit>\d+) MiB`, with a base of about"
    r" (?P<base>\d+) MiB:"
    r" (?P<defaults>\d+) MiB with the defaults before any hit, inside the DaemonSet's"
    r" (?P<limit>\d+) MiB limit"
)


def bullet() -> str:
    """The page's memory bullet, its lines joined by single spaces."""
    text = CACHING.read_text()
    start = text.index("- **Memory is a function of the settings**")
    end = text.find("\n- ", start + 1)
    return " ".join(text[start : end if end != -1 else None].split())


def mib(number: str) -> int:
    return int(number.replace(",", "")) * MiB


def said(pattern: str) -> tuple[str, ...]:
    """The numbers the bullet gives where ``pattern`` matches it (once)."""
    found = re.findall(pattern, bullet())
    assert len(found) == 1, f"docs/caching.md's memory bullet no longer says {pattern!r}"
    return found[0] if isinstance(found[0], tuple) else (found[0],)


def formula() -> dict[str, int]:
    match = FORMULA.search(bullet())
    assert match is not None, "docs/caching.md's memory formula is not worded as this test reads"
    return {name: mib(value) for name, value in match.groupdict().items()}


def default_max_fetches() -> int:
    return UpstreamSettings().max_fetches


def test_the_formula_is_the_codes_arithmetic() -> None:
    """The formula an operator sizes the pod by (per fetch, the fast bodies, per hit, and the
    total with the defaults) is what proxy/memory.py computes from the buffers' sizes."""
    page = formula()
    assert page["per_fetch"] == memory.per_fetch_bytes()
    assert page["fast_bodies"] == memory.fast_bodies_extra_bytes()
    assert page["per_hit"] == memory.per_hit_bytes()
    assert page["base"] == memory.BASE_BYTES
    assert page["defaults"] == memory.peak_bytes(default_max_fetches(), hits=0)
    write_buffer = CacheSettings().write_buffer
    assert mib(said(r"is at most `cache.write_buffer` \((\d+) MiB")[0]) == write_buffer
    assert page["defaults"] == (
        page["base"]
        + default_max_fetches() * page["per_fetch"]
        + page["fast_bodies"]
        + write_buffer
    )


def test_each_part_the_page_names_is_a_size_of_the_code() -> None:
    """Each buffer the page itemizes is the size the code gives it, and the parts add up to the
    per-fetch and fast-body figures the page gives: an operator reading why a fetch takes
    8 MiB reads what it holds."""
    half, read, buffer = said(
        r"aiohttp pauses reading at twice its (\d+) KiB, and one read brings at most"
        r" (\d+) MiB: (\d+) MiB"
    )
    assert int(half) * memory.KiB == memory.READ_BUFFER_BYTES
    assert mib(read) == memory.CHUNK_BYTES
    assert mib(buffer) == memory.read_buffer_bytes()

    batches, batch, threads, gathered = said(
        r"at most (\w+) (\d+) MiB batches handed to each of its (\w+) threads and (\d+) MiB"
        r" being gathered, the same chunks for both"
    )
    assert WORDS[batches] == memory.PIPELINE_BATCHES
    assert WORDS[threads] == 2  # the hashing and the writing (proxy/cache/sink.py)
    assert mib(batch) == mib(gathered) == memory.HANDOFF_BYTES
    assert mib(said(r"and the last (\d+) MiB, kept for the clients that keep up")[0]) == (
        memory.WINDOW_BYTES
    )
    assert mib(said(r"and the (\d+) MiB aligned buffer its `O_DIRECT` writes go through")[0]) == (
        memory.DIRECT_BUFFER_BYTES
    )
    per_fetch = mib(said(r"at most about (\d+) MiB\. A fast body")[0])
    parts = memory.per_fetch_parts()
    assert parts == {
        "read buffer": mib(buffer),
        "not yet hashed and written": memory.PIPELINE_BATCHES * mib(batch) + mib(gathered),
        "window": memory.WINDOW_BYTES,
        "aligned buffer": memory.DIRECT_BUFFER_BYTES,
    }
    assert sum(parts.values()) == per_fetch == memory.per_fetch_bytes()

    blocks, block, fast_body = said(
        r"holds up to (\w+) (\d+) MiB blocks instead \(one being received or waiting, two"
        r" handed to its threads\) and the aligned buffer, about (\d+) MiB"
    )
    assert WORDS[blocks] == 1 + memory.PIPELINE_BATCHES
    assert mib(block) == memory.BLOCK_BYTES
    assert mib(fast_body) == memory.fast_body_bytes()
    bodies, fast_bodies = said(r"at most (\d+) such bodies at once .*?add at most (\d+) MiB")
    assert int(bodies) == memory.MAX_BODIES
    assert mib(fast_bodies) == memory.MAX_BODIES * (mib(fast_body) - per_fetch)

    assert mib(said(r"Each client is sent at most (\d+) MiB per write")[0]) == memory.SEND_BYTES
    chunk = mib(said(r"A hit being sent holds its (\d+) MiB chunk")[0])
    assert chunk == memory.CHECKED_CHUNK_BYTES
    assert memory.per_hit_bytes() == 2 * chunk  # "and ... at most as much again"


def test_the_base_holds_what_is_kept() -> None:
    """What the base keeps whatever the traffic (the manifests and tag records last read, the
    heap glibc keeps, the free blocks) is what the code keeps, and fits inside the base."""
    manifests, tags = said(r"at most (\d+) MiB of manifests and ([\d,]+) tag records")
    assert mib(manifests) == memory.RECENT_MANIFEST_BYTES
    assert int(tags.replace(",", "")) == memory.RECENT_TAGS
    assert mib(said(r"up to (\d+) MiB of freed heap that glibc keeps")[0]) == (
        memory.KEEP_FREE_BYTES
    )
    free, block = said(r"up to (\d+) free (\d+) MiB blocks kept for the next fast body")
    assert int(free) == memory.FREE_BLOCKS
    assert mib(block) == memory.BLOCK_BYTES
    assert memory.kept_bytes() < memory.BASE_BYTES


def memory_limit(resources: dict[str, Any]) -> int:
    """A Kubernetes quantity in Mi or Gi, in bytes."""
    quantity = str(resources["limits"]["memory"])
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match is not None, f"a memory limit this test does not read: {quantity}"
    return int(match[1]) << (20 if match[2] == "Mi" else 30)


def daemonset_limit() -> int:
    (daemonset,) = [
        doc for doc in yaml.safe_load_all(DAEMONSET.read_text()) if doc["kind"] == "DaemonSet"
    ]
    containers = daemonset["spec"]["template"]["spec"]["containers"]
    (proxy,) = [container for container in containers if container["name"] == "proxy"]
    return memory_limit(proxy["resources"])


@pytest.mark.parametrize("source", ["kustomize", "helm"])
def test_the_pods_limit_holds_the_default_peak(source: str) -> None:
    """The DaemonSet's memory limit, as shipped (kustomize base and Helm chart), is the one the
    page names and is above the peak with the defaults: a pod is not OOM-killed at its busiest
    by the fetches Detour allows itself."""
    if source == "kustomize":
        limit = daemonset_limit()
    else:
        limit = memory_limit(yaml.safe_load(HELM_VALUES.read_text())["proxy"]["resources"])
    assert limit == formula()["limit"]
    assert limit > memory.peak_bytes(default_max_fetches(), hits=0)
