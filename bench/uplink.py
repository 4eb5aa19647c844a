"""An edge site's uplink on one machine: everything the mirror sends, to every cache and to the
bench's own clients, held to a rate by an ``htb`` class on the loopback device, matched by the
mirror's port. What the caches send their clients is not held: only the WAN is slow, as at an
edge site whose nodes have a LAN and memory faster than their link to the registry. Needs root
and ``tc``; removed on :meth:`Uplink.remove` (the bench's exit, Ctrl-C included).
"""

from __future__ import annotations

import subprocess

DEVICE = "lo"
CLASS = "1:20"


def _tc(*args: str, check: bool = True) -> None:
    done = subprocess.run(["tc", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(
            f"tc {' '.join(args)}: {done.stderr.strip()} (a run killed before it could clean up "
            f"leaves its qdisc on {DEVICE}: tc qdisc del dev {DEVICE} root)"
        )


class Uplink:
    """What the mirror on ``port`` sends held to ``mbit`` Mbit/s, all its connections together
    (one link, shared by whoever fetches over it); other loopback traffic is not shaped."""

    def __init__(self, port: int, mbit: float) -> None:
        self.port = port
        self.mbit = mbit
        self.applied = False

    def apply(self) -> None:
        # No default class: what no filter matches is sent unshaped (htb's direct queue). The
        # bucket holds a few of loopback's 64 KiB packets.
        _tc("qdisc", "add", "dev", DEVICE, "root", "handle", "1:", "htb")
        self.applied = True
        try:
            rate = f"{self.mbit:g}mbit"
            _tc(
                "class", "add", "dev", DEVICE, "parent", "1:", "classid", CLASS, "htb",
                "rate", rate, "ceil", rate, "burst", "256k", "cburst", "256k", "quantum", "65536",
            )  # fmt: skip
            _tc(
                "filter", "add", "dev", DEVICE, "parent", "1:", "protocol", "ip", "prio", "1",
                "u32", "match", "ip", "sport", str(self.port), "0xffff", "flowid", CLASS,
            )  # fmt: skip
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        if self.applied:
            self.applied = False
            _tc("qdisc", "del", "dev", DEVICE, "root", check=False)
