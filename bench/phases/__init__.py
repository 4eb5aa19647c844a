"""The bench's phases, each measuring one thing on every target (see bench/README.md), run in
this order; ``--only`` picks some."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from phases import blob, herd, image, manifest, rss

if TYPE_CHECKING:
    from session import Bench

RUNNERS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "blob": blob.run,
    "image": image.run,
    "herd": herd.run,
    "manifest": manifest.run,
    "rss": rss.run,
}
PHASES = tuple(RUNNERS)
