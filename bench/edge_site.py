"""The edge site's namespaces and links, for ``bench/edge.py`` (see its docstring): the mirror's
``wan`` namespace, the WAN link (tbf), the router with the LAN bridge, K node namespaces, each
node's link optionally held to a rate in both directions, and the WAN cut (a black hole: every
packet between the mirror and the site dropped, no connection reset)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path

from common import log

PORT = 7439  # every node's cache, as the DaemonSet's
MIRROR_PORT = 5000
MIRROR_ADDRESS = "10.0.9.1"  # the mirror's end of the WAN link
ROUTER_WAN = "10.0.9.2"  # the site's end of it
ROUTER_LAN = "10.0.1.1"
WAN_DEV = "wan0"  # in the wan namespace: the shaped egress, its tx_bytes are the WAN bytes
NODE_DEV = "eth0"  # in each node's namespace: its tx_bytes are the node's upload


def node_address(index: int) -> str:
    """LAN address of node ``index`` (1-based): 10.0.1.2 for node 1."""
    return f"10.0.1.{index + 1}"


class CommandError(RuntimeError):
    pass


def sh(command: str) -> str:
    """Run ``command`` (words split on spaces, none of them quoted); its stdout."""
    done = subprocess.run(command.split(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CommandError(f"{command}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def remove_stale_namespaces() -> None:
    """Namespaces left by a run that could not clean up (SIGKILLed): its pid is gone."""
    for line in sh("ip netns list").splitlines():
        match = re.match(r"(dedge(\d+)-\S+)", line)
        if match is None or Path(f"/proc/{match[2]}").exists():
            continue
        log(f"removing stale namespace {match[1]}")
        with contextlib.suppress(CommandError):
            sh(f"ip netns del {match[1]}")


def _tbf(mbit: float) -> str:
    """tbf's arguments for ``mbit``: the bucket holds 1 ms at that rate but never less than
    64 KiB (a GSO packet on veth can be that large), the queue 50 ms."""
    burst = max(64 * 1024, int(mbit * 1e6 / 8 / 1000))
    return f"tbf rate {mbit:g}mbit burst {burst} latency 50ms"


# What a WAN cut adds in the mirror's namespace: nothing in, nothing out on the WAN link.
# DROP, not REJECT: the site sees silence, as when a line goes dead somewhere upstream.
_CUT_RULES = (f"INPUT -i {WAN_DEV} -j DROP", f"OUTPUT -o {WAN_DEV} -j DROP")


class Site:
    """The namespaces and links of one edge site (see ``bench/edge.py``'s docstring).

    ``node_mbit``: each node's link held to that rate in both directions (tbf on the node's
    ``eth0``, its upload, and on the bridge-side end ``n<i>``, its download); None: unshaped.
    """

    def __init__(self, nodes: int, wan_mbit: float, node_mbit: float | None = None) -> None:
        prefix = f"dedge{os.getpid()}"
        self.wan = f"{prefix}-wan"
        self.lan = f"{prefix}-lan"
        self.nodes = [f"{prefix}-n{i}" for i in range(1, nodes + 1)]
        self.wan_mbit = wan_mbit
        self.node_mbit = node_mbit
        self.created: list[str] = []
        self.cut = False

    def _netns(self, name: str) -> None:
        sh(f"ip netns add {name}")
        self.created.append(name)
        sh(f"ip -n {name} link set lo up")

    def build(self) -> None:
        for name in (self.wan, self.lan, *self.nodes):
            self._netns(name)
        wan, lan = self.wan, self.lan
        # The WAN link: created straight in its namespaces, so no name is used in the root one.
        sh(f"ip link add {WAN_DEV} netns {wan} type veth peer uplink netns {lan}")
        sh(f"ip -n {wan} addr add {MIRROR_ADDRESS}/30 dev {WAN_DEV}")
        sh(f"ip -n {wan} link set {WAN_DEV} up")
        sh(f"ip -n {lan} addr add {ROUTER_WAN}/30 dev uplink")
        sh(f"ip -n {lan} link set uplink up")
        sh(f"ip -n {wan} route add 10.0.1.0/24 via {ROUTER_WAN}")
        sh(f"tc -n {wan} qdisc add dev {WAN_DEV} root {_tbf(self.wan_mbit)}")  # mirror -> site
        # The LAN: a bridge in the router's namespace, one veth pair per node.
        sh(f"ip -n {lan} link add br0 type bridge")
        sh(f"ip -n {lan} addr add {ROUTER_LAN}/24 dev br0")
        sh(f"ip -n {lan} link set br0 up")
        sh(f"ip netns exec {lan} sysctl -qw net.ipv4.ip_forward=1")
        for index, node in enumerate(self.nodes, 1):
            sh(f"ip link add n{index} netns {lan} type veth peer {NODE_DEV} netns {node}")
            sh(f"ip -n {lan} link set n{index} master br0")
            sh(f"ip -n {lan} link set n{index} up")
            sh(f"ip -n {node} addr add {node_address(index)}/24 dev {NODE_DEV}")
            sh(f"ip -n {node} link set {NODE_DEV} up")
            sh(f"ip -n {node} route add default via {ROUTER_LAN}")
            if self.node_mbit is not None:
                sh(f"tc -n {node} qdisc add dev {NODE_DEV} root {_tbf(self.node_mbit)}")
                sh(f"tc -n {lan} qdisc add dev n{index} root {_tbf(self.node_mbit)}")

    @staticmethod
    def _tx_bytes(netns: str, dev: str) -> int:
        links = json.loads(sh(f"ip -n {netns} -j -s link show dev {dev}"))
        return int(links[0]["stats64"]["tx"]["bytes"])

    def wan_bytes(self) -> int:
        """Bytes the mirror's end of the WAN link has sent (mirror -> site)."""
        return self._tx_bytes(self.wan, WAN_DEV)

    def upload_bytes(self) -> list[int]:
        """Bytes each node has sent on its LAN link (node 1 first)."""
        return [self._tx_bytes(node, NODE_DEV) for node in self.nodes]

    def qdisc(self) -> str:
        return sh(f"tc -n {self.wan} qdisc show dev {WAN_DEV}").strip()

    def cut_wan(self) -> None:
        """The WAN goes dead: every packet either way dropped in the mirror's namespace."""
        if not self.cut:
            for rule in _CUT_RULES:
                sh(f"ip netns exec {self.wan} iptables -I {rule}")
            self.cut = True

    def restore_wan(self) -> None:
        if self.cut:
            for rule in _CUT_RULES:
                sh(f"ip netns exec {self.wan} iptables -D {rule}")
            self.cut = False

    def destroy(self) -> None:
        for name in reversed(self.created):
            with contextlib.suppress(CommandError):
                sh(f"ip netns del {name}")
        self.created.clear()
        self.cut = False
