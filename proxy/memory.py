"""The sizes Detour's memory rests on, each in one place, and the peak they add up to.

Memory is a function of the settings, not of the traffic (docs/caching.md, "Memory is a
function of the settings"): each buffer a fetch, a fast body or a hit holds is bounded by one
of the sizes below, and the peak is at most about
``base + max_fetches * per_fetch + fast_bodies_extra + hits being sent * per_hit``
(:func:`peak_bytes`). The modules that use a size import it from here, and
tests/test_memory_budget.py computes the page's numbers from these, so a buffer that changes
without the formula changing fails there.
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20

# A fetch read through aiohttp.
READ_BUFFER_BYTES = 512 * KiB  # aiohttp's read_bufsize per connection; it pauses at twice this
# The most one read from the upstream's socket gives: larger than asyncio's 256 KiB, for fewer
# trips through the event loop per blob.
CHUNK_BYTES = 1 * MiB
# Chunks are handed to a fetch's hashing and writing threads this many bytes at a time (and at
# the end): a thread woken per chunk would cost a context switch, and a turn of the GIL, each.
HANDOFF_BYTES = 1 * MiB
# Batches handed to a thread and not yet done: the one it works on and the next, so it goes on
# without waiting for the loop; past this the loop waits.
PIPELINE_BATCHES = 2
# The last bytes a fetch received, kept in memory for the clients that keep up (and, after a
# spill, for every client): a fetch holds at most this, plus the chunks not yet on disk.
WINDOW_BYTES = 2 * MiB
# The most one write to a client takes from the window: its connection holds at most this
# beyond what the kernel took.
SEND_BYTES = 1 * MiB

# The disk.
# cache.write_buffer's default: what the fetches' writing threads may fall behind by, every
# fetch's together, beyond the batches each holds anyway (unsent_bytes), kept in memory.
WRITE_BUFFER_BYTES = 64 * MiB
# O_DIRECT: buffer address, length and file offset, multiples of this. A fast body's block
# places each byte at an address congruent to its file offset modulo this, so the blob writer
# writes whole blocks from the chunks themselves.
ALIGN = 4096
DIRECT_BUFFER_BYTES = 1 * MiB  # a blob writer's aligned buffer: the most one write sends

# A fast body, read by Detour itself into page-aligned blocks (proxy.upstream.socket_body).
# What each block costs (a receive, a hand-over to each thread, a write, a turn of the GIL for
# each) is paid a quarter as often as with 1 MiB blocks; 8 MiB saved no more (bench/README.md,
# "The cold path", says how that was measured).
BLOCK_BYTES = 4 * MiB
# Fast bodies read at once: each holds up to three blocks (one received, two handed to its
# threads), fast_body_bytes() - per_fetch_bytes() more than a body read through aiohttp; past
# this many, the next stay with aiohttp.
MAX_BODIES = 4
FREE_BLOCKS = 4  # free blocks kept for the next fast body; the rest are unmapped

# A hit: a cached blob is checked on its way out, and sent, in chunks of this. Its stored
# checksums name the chunk size they cover, so a change passes over those already stored.
CHECKED_CHUNK_BYTES = 2 * MiB

# Kept whatever the traffic: part of the base. What was last read from the disk, so a hit by
# digest, or by a tag within its tag_ttl, needs no disk at all:
RECENT_MANIFEST_BYTES = 16 * MiB  # manifests, by their bodies' bytes
RECENT_TAGS = 16384  # tag records, by count (a few MiB)
LAYER_PLACES = 4096  # each layer's place in its image, for its peer tree (about 1 MiB)
# glibc's allocator (proxy.api.allocator): buffers up to MMAP_ABOVE_BYTES come from the heap, and
# up to KEEP_FREE_BYTES of it, freed, is kept for the next buffers instead of each one being a
# fresh mmap, page-faulted in anew.
MMAP_ABOVE_BYTES = 4 * MiB
KEEP_FREE_BYTES = 32 * MiB

# The process before any fetch or hit: the interpreter and Detour's modules (an estimate, not a
# bound), the tag records and layer places, and what kept_bytes() counts.
BASE_BYTES = 106 * MiB


def read_buffer_bytes() -> int:
    """A connection's read buffer: aiohttp pauses reading at twice ``read_bufsize``, and one
    read past that brings at most a chunk."""
    return 2 * READ_BUFFER_BYTES + CHUNK_BYTES


def unsent_bytes() -> int:
    """The chunks a fetch received and has not yet hashed and written: the batches handed to
    each thread and one being gathered (the same chunks for both threads)."""
    return PIPELINE_BATCHES * HANDOFF_BYTES + HANDOFF_BYTES


def per_fetch_parts() -> dict[str, int]:
    """What a running fetch read through aiohttp holds at most, part by part."""
    return {
        "read buffer": read_buffer_bytes(),
        "not yet hashed and written": unsent_bytes(),
        "window": WINDOW_BYTES,
        "aligned buffer": DIRECT_BUFFER_BYTES,
    }


def per_fetch_bytes() -> int:
    """The most one running fetch holds (the window mostly holds the unsent chunks again, so
    this is a bound, not what a fetch usually takes)."""
    return sum(per_fetch_parts().values())


def fast_body_bytes() -> int:
    """What a fast body holds instead: a block being received or waiting, one handed to each
    thread's batches, and the aligned buffer."""
    return (1 + PIPELINE_BATCHES) * BLOCK_BYTES + DIRECT_BUFFER_BYTES


def fast_bodies_extra_bytes() -> int:
    """What the fast bodies read at once add beyond the fetches they are."""
    return MAX_BODIES * (fast_body_bytes() - per_fetch_bytes())


def per_hit_bytes() -> int:
    """A hit being sent: its checked chunk, and as much again in a slow client's send buffer."""
    return 2 * CHECKED_CHUNK_BYTES


def kept_bytes() -> int:
    """The parts of the base that are bounded here: the manifests kept, the freed heap kept,
    and the free blocks kept (the tag records are counted, not weighed)."""
    return RECENT_MANIFEST_BYTES + KEEP_FREE_BYTES + FREE_BLOCKS * BLOCK_BYTES


def peak_bytes(
    max_fetches: int,
    hits: int = 0,
    base: int = BASE_BYTES,
    write_buffer: int = WRITE_BUFFER_BYTES,
) -> int:
    """The most Detour holds with ``max_fetches`` fetches running, ``write_buffer`` bytes
    waiting for the disk beyond them, and ``hits`` being sent."""
    return (
        base
        + max_fetches * per_fetch_bytes()
        + fast_bodies_extra_bytes()
        + write_buffer
        + hits * per_hit_bytes()
    )
