"""Sizes and counts as the operator commands print them (``warm``, ``cache ls|rm|prune``)."""

from __future__ import annotations


def human_bytes(count: int) -> str:
    """``12345678`` → ``12.3 MB`` (powers of 1000, as registries and docker show sizes)."""
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 999.95 or unit == "TB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def counted(number: int, noun: str) -> str:
    """``1 blob``, ``3 blobs``: ``number`` and ``noun``, plural unless it is one."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
