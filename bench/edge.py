#!/usr/bin/env python3
"""Edge-site benchmark (issues 11, 29, 30): K nodes of one site pull one image at once over a
slow WAN, undisturbed, with an owner hung, through a WAN cut, and offline with a node lost.

One machine plays a whole edge site, built with ``ip netns``, veth pairs, a bridge and ``tbf``
(so it needs root, ``iproute2``, ``tc`` and ``iptables``; ``bench/edge_site.py``)::

    ns wan                          ns lan (router)                 ns node1 .. nodeK
    mirror 10.0.9.1:5000 --wan0===uplink-- 10.0.9.2  br0 10.0.1.1 --nK===eth0-- 10.0.1.(K+1)
    (docker-registry)     tbf 200mbit,               (bridge, forwards)         cache on :7439
                          mirror -> site                                         + pull client

* the MIRROR is the real distribution registry (``docker-registry``), holding one image: a
  config and ``--layers`` layers of ``--layer-mb`` MB of random bytes (4 x 10 MB by default);
* the WAN is the veth pair between the mirror and the site's router, its mirror -> site
  direction held to ``--wan-mbit`` with ``tc qdisc ... root tbf``; the site -> mirror direction
  (requests, acks) is not shaped. **WAN bytes** are ``tx_bytes`` of the mirror's end, read
  before the rollout and again once it has been still for a second after the last pull (so a
  cache's background fetches count too), divided by the image's bytes. A **WAN cut** drops
  every packet either way in the mirror's namespace (iptables DROP: silence, no reset);
* each NODE is a namespace with its own loopback and LAN address, a cache listening on
  ``0.0.0.0:7439`` (as a DaemonSet pod with ``hostNetwork``) and a pull client
  (``bench/edge_agent.py``) that asks ``127.0.0.1:7439`` for the manifest by tag and then every
  blob (3 at a time, as containerd), checking each blob's sha256 and size and the manifest's
  digest; with ``--retries`` it retries a failed request as the kubelet and containerd do
  (back-off 1, 2, 4 ... s, at most 10 s; a blob resumed by Range from the bytes it holds). The
  LAN is not shaped unless ``--node-mbit``: then tbf holds each node's link to that rate both
  ways (on its ``eth0`` and on the bridge's end), so an owner's uplink is the limit, as on a
  real LAN. **Upload** is each node's ``eth0`` ``tx_bytes`` over the rollout.

A rollout: fresh caches (new dirs, new processes) on every node, then all K clients are told to
pull at the same moment; the wall time runs from then until the last client has its image.
Modes (``--modes``):

* ``one``: Detour, no cluster settings, one node pulls alone (the baseline of one pull);
* ``solo``: Detour, no cluster settings, every node pulls;
* ``central``: one Detour on the router (10.0.1.1:7439), every node pulls through it;
* ``peers``: Detour with ``cluster.peers`` = every node's ``10.0.1.x:7439`` and
  ``cluster.advertise`` = its own, every node pulls: the only difference from ``solo`` is the
  ``cluster`` section (plus ``cluster.fan_out`` with ``--fan-out``);
* ``kill``: as ``peers``, and one node's Detour is SIGKILLed ``--kill-after`` (1 s) into the
  rollout; the other nodes must still get a verified image. The node is the one that owns the
  most image bytes (rendezvous order, from ``proxy.cluster.peering``), so that fetches are
  under way through it when it dies; ``--kill-node N`` picks one;
* ``hung``: as ``kill``, but the node's Detour is SIGSTOPped (a hung owner: its connections
  stay open and silent) and continued after the rollout; it does not pull itself;
* ``cut``, ``cut-solo``, ``cut-central``: ``peers``, ``solo``, ``central`` with the WAN cut
  ``--cut-after`` (2 s) into the rollout for each of ``--cut-seconds`` (10,40), then back;
* ``lost``: ``peers``; node 1 pulls the image alone, the WAN goes down for good, the node
  owning the most bytes (not node 1) is SIGKILLed, then every other node pulls: all must
  finish, since node 1 holds a full copy;
* ``distribution``: distribution's proxy mode per node (``docker-registry`` with
  ``proxy.remoteurl`` = the mirror) on ``:7439`` instead of Detour.

``--detour-tree`` runs Detour (``python -m proxy``) from a source tree instead of this one: a
directory holding ``proxy/``, or a git revision, exported with ``git archive <rev> proxy`` into
the temp dir, so nobody's uncommitted edits get into the figures; several, comma-separated,
run side by side in one site. ``--fan-out`` likewise takes several values.

Each variant (mode x cut x fan-out x tree) runs ``--repeat`` times (3) and the median is
reported, as a markdown table, with the mirror's blob GETs (from its access log), every pull's
check, the clients' retries and the nodes' uploads. Detour's warnings and errors during each
rollout are counted and the first few printed.

    .venv/bin/python bench/edge.py                          # the issue-11 modes, 3 runs each
    .venv/bin/python bench/edge.py --modes peers,hung,cut,cut-solo,cut-central,lost \\
        --detour-tree HEAD --repeat 1
    .venv/bin/python bench/edge.py --modes one,peers --node-mbit 200 --layers 8 \\
        --layer-mb 128 --nodes 12 --fan-out 3,64 --repeat 1
    .venv/bin/python bench/edge.py --json edge.json --keep  # keep the temp dir with every log

Namespaces are named ``dedge<pid>-*``; every process, namespace and temp dir is removed on exit,
Ctrl-C and errors included, and namespaces left by a run that was SIGKILLed are removed at the
next start. Exit status 1 when a pull that should have succeeded did not or a service failed.

The script is also its own helper: ``edge.py agent``, started in each namespace with
``ip netns exec``, runs ``edge_agent.agent_main``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from common import DETOUR_NAME, MIRROR_REPO, REPO_ROOT, TAG, first_line, log
from configs import detour_config, registry_config, write_config
from edge_agent import agent_main
from edge_site import (
    MIRROR_ADDRESS,
    MIRROR_PORT,
    PORT,
    ROUTER_LAN,
    Site,
    node_address,
    remove_stale_namespaces,
)
from mirror import AccessLog, blob_requests
from processes import Service

__all__ = ["Site", "main", "node_address"]

MB = 1_000_000

Mode = Literal[
    "one",
    "solo",
    "central",
    "peers",
    "kill",
    "hung",
    "cut-solo",
    "cut-central",
    "cut",
    "lost",
    "distribution",
]
MODES: tuple[Mode, ...] = (
    "one",
    "solo",
    "central",
    "peers",
    "kill",
    "hung",
    "cut-solo",
    "cut-central",
    "cut",
    "lost",
    "distribution",
)
DEFAULT_MODES: tuple[Mode, ...] = ("one", "solo", "peers", "kill", "distribution")
LABELS: dict[Mode, str] = {
    "one": "Detour, one node alone",
    "solo": "Detour solo",
    "central": "one central Detour on the router",
    "peers": "Detour with peers",
    "kill": "Detour with peers, top owner killed {after:g} s in",
    "hung": "Detour with peers, top owner hung (SIGSTOP) {after:g} s in",
    "cut-solo": "Detour solo, WAN cut {cut:g} s",
    "cut-central": "one central Detour, WAN cut {cut:g} s",
    "cut": "Detour with peers, WAN cut {cut:g} s",
    "lost": "peers offline (WAN down) after node 1 pulled, top owner killed",
    "distribution": "distribution proxy per node",
}
Topology = Literal["solo", "central", "peers", "distribution"]
TOPOLOGY: dict[Mode, Topology] = {
    "one": "solo",
    "solo": "solo",
    "central": "central",
    "peers": "peers",
    "kill": "peers",
    "hung": "peers",
    "cut-solo": "solo",
    "cut-central": "central",
    "cut": "peers",
    "lost": "peers",
    "distribution": "distribution",
}
CUT_MODES = ("cut-solo", "cut-central", "cut")


# ------------------------------------------------------------------------------- agents


class Agent:
    """``edge.py agent`` in a namespace; one request at a time."""

    def __init__(self, netns: str, log_path: Path) -> None:
        self.netns = netns
        with log_path.open("ab") as errors:
            self._proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, str(Path(__file__).resolve()),
                 "agent"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                cwd=REPO_ROOT,
                start_new_session=True,
                text=True,
            )  # fmt: skip

    def send(self, request: dict[str, Any]) -> None:
        stdin = self._stdin()
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the agent in {self.netns} exited ({self._proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        return self.receive()

    def _stdin(self) -> IO[str]:
        assert self._proc.stdin is not None
        return self._proc.stdin

    def stop(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._stdin().close()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()


# ------------------------------------------------------------------------------- the bench


@dataclass(frozen=True, slots=True)
class Tree:
    """Where Detour runs from: ``path`` None is this work tree (the ``detour`` script)."""

    label: str
    path: Path | None

    def knows(self, setting: str) -> bool:
        """Whether this tree's settings declare ``setting`` (an older one refuses it)."""
        settings = (self.path or REPO_ROOT) / "proxy" / "settings.py"
        return f"    {setting}:" in settings.read_text()


@dataclass(frozen=True, slots=True)
class Options:
    nodes: int
    wan_mbit: float
    node_mbit: float | None
    layers: int
    layer_size: int
    repeat: int
    modes: tuple[Mode, ...]
    kill_after: float
    kill_node: int | None
    cut_after: float
    cut_seconds: tuple[float, ...]
    fan_outs: tuple[int | None, ...]
    trees: tuple[str, ...]  # as given: directories or git revisions, "" for this tree
    retries: int
    silence: float
    timeout: float
    json_path: Path | None
    keep: bool


@dataclass(frozen=True, slots=True)
class Variant:
    mode: Mode
    cut: float | None  # seconds of WAN cut
    fan_out: int | None  # cluster.fan_out, None: not set
    tree: Tree

    @property
    def slug(self) -> str:
        parts: list[str] = [self.mode]
        if self.cut is not None:
            parts.append(f"c{self.cut:g}")
        if self.fan_out is not None:
            parts.append(f"f{self.fan_out}")
        parts.append(re.sub(r"[^A-Za-z0-9]", "", self.tree.label)[:12] or "wt")
        return "-".join(parts)

    def label(self, options: Options, trees: int, fan_outs: int) -> str:
        text = LABELS[self.mode].format(after=options.kill_after, cut=self.cut or 0)
        if self.fan_out is not None and fan_outs > 1:
            text += f", fan_out {self.fan_out}"
        if trees > 1:
            text = f"{self.tree.label}: {text}"
        return text


@dataclass(slots=True)
class Run:
    variant: Variant
    wall: float  # from "pull" to the last expected client done
    wan_bytes: int
    mirror_blob_gets: int
    pulls: int  # expected to succeed
    verified: int
    target: int | None = None  # node killed or hung (1-based)
    retries: int = 0  # the clients' retried requests, all nodes
    per_node: list[float | None] = field(default_factory=list)  # seconds, None: failed
    uploads: list[int] = field(default_factory=list)  # bytes each node sent on the LAN
    errors: list[str] = field(default_factory=list)
    detour_problems: list[str] = field(default_factory=list)  # warning/error log lines
    peer_requests: dict[str, float] = field(default_factory=dict)


_LEVEL = re.compile(r'"level":\s*"(warning|error|critical)"|\b(WARNING|ERROR|CRITICAL)\b')


def export_tree(spec: str, workdir: Path) -> Tree:
    """``spec``: "" (this work tree), a directory holding ``proxy/``, or a git revision,
    exported with ``git archive <rev> proxy`` into ``workdir``."""
    if not spec:
        return Tree("work tree", None)
    path = Path(spec)
    if (path / "proxy").is_dir():
        return Tree(path.name, path.resolve())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{spec}^{{commit}}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = workdir / f"tree-{commit}"
    target.mkdir()
    archive = subprocess.Popen(
        ["git", "archive", commit, "proxy"], cwd=REPO_ROOT, stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {commit} proxy failed")
    return Tree(commit, target)


class EdgeBench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.o = options
        self.dir = workdir
        self.site = Site(options.nodes, options.wan_mbit, options.node_mbit)
        self.mirror = Service(
            "mirror",
            ["ip", "netns", "exec", self.site.wan, "docker-registry", "serve",
             str(self._registry_config("mirror", MIRROR_PORT, None))],
            workdir / "mirror.log",
        )  # fmt: skip
        self.mirror_log = AccessLog(self.mirror.log_path)
        self.agents: list[Agent] = []
        self.wan_agent: Agent | None = None
        self.caches: list[Service] = []
        self.stopped: int | None = None  # pid of a SIGSTOPped cache, continued on the way out
        self.trees: list[Tree] = []
        self.image_bytes = 0
        self.blobs: dict[str, int] = {}
        self.runs: list[Run] = []
        self.failures: list[str] = []

    # --------------------------------------------------------------------- setup

    def _registry_config(self, name: str, port: int, remote: str | None) -> Path:
        """registry:2's default config (as bench/run.py's), storage in our temp dir; with
        ``remote``, distribution's proxy mode (``proxy.remoteurl``)."""
        return registry_config(self.dir, name, f"0.0.0.0:{port}", remote)

    def _detour_config(self, name: str, index: int, variant: Variant) -> Path:
        mirror = f"{MIRROR_ADDRESS}:{MIRROR_PORT}"
        # Listening on 0.0.0.0: the peers reach it on the LAN, the node on 127.0.0.1.
        config = detour_config(mirror, f"0.0.0.0:{PORT}", self.dir / f"{name}-cache")
        if TOPOLOGY[variant.mode] == "peers":
            config["cluster"] = {
                "peers": [f"{node_address(i)}:{PORT}" for i in range(1, self.o.nodes + 1)],
                "advertise": f"{node_address(index)}:{PORT}",
            }
            if variant.fan_out is not None:
                config["cluster"]["fan_out"] = variant.fan_out
        return write_config(self.dir / f"{name}.yml", config)

    def variants(self) -> list[Variant]:
        out = []
        for tree in self.trees:
            for mode in self.o.modes:
                if mode == "distribution" and tree is not self.trees[0]:
                    continue  # no Detour in it
                cuts: Sequence[float | None] = self.o.cut_seconds if mode in CUT_MODES else [None]
                fan_outs = self.o.fan_outs
                if TOPOLOGY[mode] != "peers" or not tree.knows("fan_out"):
                    fan_outs = (None,)
                out += [Variant(mode, c, f, tree) for c in cuts for f in fan_outs]
        return out

    def start(self) -> None:
        remove_stale_namespaces()
        self.trees = [export_tree(spec, self.dir) for spec in self.o.trees]
        for tree in self.trees:
            log(f"Detour from {tree.path or REPO_ROOT} ({tree.label})")
        self.site.build()
        log(
            f"site: {self.o.nodes} nodes, WAN {self.site.qdisc()}"
            + (f", node links {self.o.node_mbit:g} Mbit/s" if self.o.node_mbit else "")
        )
        self.wan_agent = Agent(self.site.wan, self.dir / "agent-wan.log")
        self.agents = [
            Agent(ns, self.dir / f"agent-node{i}.log") for i, ns in enumerate(self.site.nodes, 1)
        ]
        self.mirror.start()
        self._ready([self.wan_agent], [self.mirror], f"http://127.0.0.1:{MIRROR_PORT}/v2/")
        started = time.perf_counter()
        pushed = self.wan_agent.call(
            {
                "op": "push",
                "port": MIRROR_PORT,
                "layers": self.o.layers,
                "layer_size": self.o.layer_size,
            }
        )
        if "error" in pushed:
            raise RuntimeError(f"push: {pushed['error']}")
        self.image_bytes = pushed["bytes"]
        self.blobs = pushed["blobs"]
        log(
            f"pushed a {self.image_bytes / MB:.1f} MB image ({self.o.layers} layers) "
            f"in {time.perf_counter() - started:.1f}s"
        )

    def _ready(self, agents: Sequence[Agent], services: Sequence[Service], url: str) -> None:
        for agent in agents:
            agent.send({"op": "wait", "url": url, "timeout": 60})
        replies = [agent.receive() for agent in agents]
        for reply, service in zip(replies, services, strict=True):
            if not reply.get("ok"):
                code = service.exit_code()
                raise RuntimeError(
                    f"{service.name} not ready ({reply.get('error')}, exit {code}):\n"
                    f"{service.log_tail()}"
                )

    def _detour_argv(self, tree: Tree, config: Path) -> list[str]:
        if tree.path is None:
            return [detour_command(), "serve", "--config", str(config)]
        return [
            "env", f"PYTHONPATH={tree.path}", sys.executable, "-m", "proxy", "serve",
            "--config", str(config),
        ]  # fmt: skip

    def start_caches(self, variant: Variant, repeat: int) -> None:
        self.caches = []
        topology = TOPOLOGY[variant.mode]
        if topology == "central":
            name = f"{variant.slug}{repeat}-router"
            config = self._detour_config(name, 0, variant)
            argv = ["ip", "netns", "exec", self.site.lan, *self._detour_argv(variant.tree, config)]
            service = Service(name, argv, self.dir / f"{name}.log", cwd=variant.tree.path)
            service.start()
            self.caches.append(service)
            self._ready(self.agents[:1], self.caches, f"http://{ROUTER_LAN}:{PORT}/healthz")
            return
        for index, netns in enumerate(self.site.nodes, 1):
            name = f"{variant.slug}{repeat}-node{index}"
            if topology == "distribution":
                config = self._registry_config(name, PORT, f"http://{MIRROR_ADDRESS}:{MIRROR_PORT}")
                argv = ["docker-registry", "serve", str(config)]
            else:
                config = self._detour_config(name, index, variant)
                argv = self._detour_argv(variant.tree, config)
            service = Service(
                name,
                ["ip", "netns", "exec", netns, *argv],
                self.dir / f"{name}.log",
                cwd=variant.tree.path or REPO_ROOT,
            )
            service.start()
            self.caches.append(service)
        ready = "/v2/" if topology == "distribution" else "/healthz"
        self._ready(self.agents, self.caches, f"http://127.0.0.1:{PORT}{ready}")

    def stop_caches(self) -> None:
        if self.stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.stopped, signal.SIGCONT)
            self.stopped = None
        for service in self.caches:
            service.stop()
            if not self.o.keep:  # a 1 GB image on 12 nodes is 12 GB a rollout
                shutil.rmtree(self.dir / f"{service.name}-cache", ignore_errors=True)
        self.caches = []

    # --------------------------------------------------------------------- one rollout

    def top_owner(self, exclude: int | None = None) -> int:
        """The node owning the most image bytes (rendezvous order of each blob's digest, from
        ``proxy.cluster.peering``), ``exclude`` left out; ``--kill-node`` if given."""
        if self.o.kill_node is not None and self.o.kill_node != exclude:
            return self.o.kill_node
        peers = [f"{node_address(i)}:{PORT}" for i in range(1, self.o.nodes + 1)]
        owned = dict.fromkeys(peers, 0)
        try:  # looked up when run: the bench follows the feature's own hashing
            cluster = importlib.import_module("proxy.cluster.peering")
            ranked = [cluster.rendezvous(peers, cluster.blob_key(d)) for d in self.blobs]
        except (ImportError, AttributeError):
            return self.o.nodes
        for ranking, size in zip(ranked, self.blobs.values(), strict=True):
            owned[ranking[0]] += size
        if exclude is not None:
            owned.pop(peers[exclude - 1])
        best = max(owned, key=lambda p: (owned[p], -peers.index(p)))
        return peers.index(best) + 1

    def settle_wan(self, limit: float = 60.0) -> int:
        """WAN tx bytes once they have not moved for a second."""
        deadline = time.monotonic() + limit
        last = self.site.wan_bytes()
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.site.wan_bytes()
            if now != last:
                last, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= 1.0:
                break
        return last

    def _events(self, variant: Variant, target: int | None) -> list[tuple[float, str]]:
        """What happens when during the rollout: (seconds in, what)."""
        events: list[tuple[float, str]] = []
        if variant.mode == "kill":
            events.append((self.o.kill_after, "kill"))
        elif variant.mode == "hung":
            events.append((self.o.kill_after, "stop"))
        if variant.cut is not None:
            events += [(self.o.cut_after, "cut"), (self.o.cut_after + variant.cut, "restore")]
        return sorted(events) if target is not None or variant.cut is not None else []

    def _act(self, what: str, target: int | None, started: float) -> None:
        at = f"{time.time() - started:.2f}s"
        if what == "kill" and target is not None:
            os.kill(self.caches[target - 1].pid, signal.SIGKILL)
            log(f"  killed node{target}'s Detour at {at}")
        elif what == "stop" and target is not None:
            self.stopped = self.caches[target - 1].pid
            os.killpg(self.stopped, signal.SIGSTOP)
            log(f"  stopped node{target}'s Detour at {at}")
        elif what == "cut":
            self.site.cut_wan()
            log(f"  WAN cut at {at}")
        elif what == "restore":
            self.site.restore_wan()
            log(f"  WAN back at {at}")

    def _pull_request(self, variant: Variant) -> dict[str, Any]:
        topology = TOPOLOGY[variant.mode]
        host = ROUTER_LAN if topology == "central" else "127.0.0.1"
        name = MIRROR_REPO if topology == "distribution" else DETOUR_NAME
        return {
            "op": "pull",
            "base": f"http://{host}:{PORT}/v2/{name}",
            "reference": TAG,
            "timeout": self.o.timeout,
            "retries": self.o.retries,
            "silence": self.o.silence,
        }

    def rollout(self, variant: Variant, repeat: int) -> Run:
        mode = variant.mode
        self.start_caches(variant, repeat)
        everyone = list(range(1, self.o.nodes + 1))
        target: int | None = None
        if mode in ("kill", "hung"):
            target = self.top_owner()
        elif mode == "lost":
            target = self.top_owner(exclude=1)
        pulling = [1] if mode == "one" else everyone
        if mode == "hung":
            pulling = [i for i in everyone if i != target]
        mark = self.mirror_log.mark()
        problems_from = {s.name: _log_size(s.log_path) for s in self.caches}
        before = self.site.wan_bytes()
        uploads_before = self.site.upload_bytes()
        request = self._pull_request(variant)
        run = Run(variant=variant, wall=0.0, wan_bytes=0, mirror_blob_gets=0, pulls=0, verified=0)
        run.target = target
        if mode == "lost":  # node 1 first, then the WAN down and the owner gone
            first = self.agents[0].call(request)
            if not first.get("ok"):
                run.errors.append(f"node1 (first, WAN up): {first.get('error')}")
            self.site.cut_wan()
            assert target is not None
            os.kill(self.caches[target - 1].pid, signal.SIGKILL)
            log(f"  node1 pulled alone; WAN down, node{target}'s Detour killed")
            pulling = [i for i in everyone if i not in (1, target)]
        started = time.time()
        for index in pulling:
            self.agents[index - 1].send(request)
        for at, what in self._events(variant, target):
            time.sleep(max(0.0, started + at - time.time()))
            self._act(what, target, started)
        replies = {index: self.agents[index - 1].receive() for index in pulling}
        self.site.restore_wan()
        after = self.settle_wan()
        run.wan_bytes = after - before
        run.uploads = [
            now - then for now, then in zip(self.site.upload_bytes(), uploads_before, strict=True)
        ]
        entries = self.mirror_log.entries()[mark:]
        run.mirror_blob_gets = sum(blob_requests(entries, d)[0] for d in self.blobs)
        counted = [i for i in pulling if not (mode == "kill" and i == target)]
        run.pulls = len(counted)
        ends = []
        for index in everyone:
            reply = replies.get(index)
            ok = reply is not None and bool(reply.get("ok"))
            run.per_node.append(reply["end"] - started if reply is not None and ok else None)
            if reply is None or index not in counted:
                continue
            run.retries += int(reply.get("retries", 0))
            if ok:
                run.verified += 1
                ends.append(reply["end"])
            else:
                run.errors.append(f"node{index}: {reply.get('error')}")
            for line in reply.get("retried", [])[:2]:
                run.detour_problems.append(f"node{index} client retried: {line}")
        run.wall = max(ends) - started if ends else float("nan")
        if TOPOLOGY[mode] == "peers":
            run.peer_requests = self._peer_requests(target)
        for service_index, service in enumerate(self.caches, 1):
            gone = mode in ("kill", "lost") and service_index == target
            if service.exit_code() is not None and not gone:
                run.errors.append(f"{service.name} exited with {service.exit_code()}")
            run.detour_problems += [
                f"{service.name}: {line}"
                for line in _log_lines(service.log_path, problems_from[service.name])
                if TOPOLOGY[mode] != "distribution" and _LEVEL.search(line)
            ]
        self.stop_caches()
        return run

    def _peer_requests(self, killed: int | None) -> dict[str, float]:
        """``detour_peer_requests_total`` by result, summed over the nodes still up."""
        totals: dict[str, float] = {}
        for index, agent in enumerate(self.agents, 1):
            if index == killed:
                continue
            reply = agent.call({"op": "get", "url": f"http://127.0.0.1:{PORT}/metrics"})
            for match in re.finditer(
                r'^detour_peer_requests_total\{result="([^"]+)"\} ([0-9.e+]+)$',
                reply.get("text", ""),
                re.MULTILINE,
            ):
                totals[match[1]] = totals.get(match[1], 0.0) + float(match[2])
        return totals

    def run(self) -> None:
        variants = self.variants()
        for repeat in range(1, self.o.repeat + 1):
            for variant in variants:
                run = self.rollout(variant, repeat)
                self.runs.append(run)
                nodes = " ".join("x" if t is None else f"{t:.1f}" for t in run.per_node)
                wan = run.wan_bytes / self.image_bytes
                up = max(run.uploads, default=0) / self.image_bytes
                log(
                    f"{variant.slug} #{repeat}: {run.wall:.2f}s, WAN {wan:.2f}x"
                    f" ({run.mirror_blob_gets} blob GETs at the mirror), verified "
                    f"{run.verified}/{run.pulls}, {run.retries} client retries, max upload "
                    f"{up:.2f}x; per node {nodes}"
                    + (f"; peer requests {run.peer_requests}" if run.peer_requests else "")
                )
                for line in run.errors:
                    self.failures.append(f"{variant.slug} #{repeat}: {line}")
                    log(f"  ERROR {line}")
                if run.detour_problems:
                    log(f"  {len(run.detour_problems)} warning/error lines (Detour, clients):")
                    for line in run.detour_problems[:5]:
                        log(f"    {line[:400]}")

    def stop(self) -> None:
        self.stop_caches()
        for agent in [*self.agents, *([self.wan_agent] if self.wan_agent else [])]:
            agent.stop()
        self.mirror.stop()
        self.site.destroy()


def detour_command() -> str:
    script = Path(sys.executable).parent / "detour"
    return str(script) if script.exists() else "detour"


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_lines(path: Path, offset: int) -> list[str]:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace").splitlines()
    except OSError:
        return []


# ------------------------------------------------------------------------------- report


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _target(bench: EdgeBench, variant: Variant, runs: list[Run]) -> str:
    """The must-shows of issues 11, 29 and 30 that a row answers."""
    mode = variant.mode
    wall = _median([r.wall for r in runs])
    wan = _median([r.wan_bytes / bench.image_bytes for r in runs])
    every = all(r.verified == r.pulls for r in runs)

    def wall_of(other: Mode) -> float | None:
        same = [
            r.wall
            for r in bench.runs
            if r.variant.mode == other
            and r.variant.tree == variant.tree
            and r.variant.fan_out in (variant.fan_out, None)
        ]
        return _median(same) if same else None

    if mode == "peers":
        text = f"WAN ≤ 1.05{TIMES}: {_met(wan <= 1.05)}"
        one = wall_of("one")
        if bench.o.node_mbit is not None and one is not None:
            text += f"; ≤ 1.5{TIMES} one pull ({wall / one:.2f}{TIMES}): {_met(wall <= 1.5 * one)}"
        return text
    if mode == "kill":
        return f"the others finish, WAN < 2{TIMES}: {_met(wan < 2 and every)}"
    if mode == "hung":
        peers = wall_of("peers")
        if peers is None:
            return f"the others finish: {_met(every)}"
        ratio = wall / peers
        return f"≤ 1.5{TIMES} peers' wall ({ratio:.2f}{TIMES}): {_met(every and ratio <= 1.5)}"
    if mode == "cut":
        return f"every pull, WAN ≤ 1.1{TIMES}: {_met(every and wan <= 1.1)}"
    if mode in ("cut-solo", "cut-central", "lost"):
        return f"every pull: {_met(every)}"
    return ""


def table(bench: EdgeBench) -> str:
    o = bench.o
    rows = [
        f"| variant (median of {o.repeat}) | wall time, s | WAN / image | mirror blob GETs "
        "| pulls verified | client retries | max node upload / image | LAN upload / image "
        "| target |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    trees = len(bench.trees)
    fan_outs = len(o.fan_outs)
    for variant in bench.variants():
        runs = [r for r in bench.runs if r.variant == variant]
        if not runs:
            continue
        wall = _median([r.wall for r in runs])
        wan = _median([r.wan_bytes / bench.image_bytes for r in runs])
        gets = _median([float(r.mirror_blob_gets) for r in runs])
        up = _median([max(r.uploads, default=0) / bench.image_bytes for r in runs])
        lan = _median([sum(r.uploads) / bench.image_bytes for r in runs])
        retries = _median([float(r.retries) for r in runs])
        check = f"{sum(r.verified for r in runs)}/{sum(r.pulls for r in runs)}"
        targets = sorted({r.target for r in runs if r.target is not None})
        if targets:
            verb = {"kill": "killed", "hung": "hung", "lost": "killed"}[variant.mode]
            check += f" (node {', '.join(map(str, targets))} {verb})"
        spread = f" ({min(r.wall for r in runs):.1f}{DASH}{max(r.wall for r in runs):.1f})"
        rows.append(
            f"| {variant.label(o, trees, fan_outs)} | {wall:.1f}"
            f"{spread if len(runs) > 1 else ''} | {wan:.2f}{TIMES} | {gets:g} | {check} | "
            f"{retries:g} | {up:.2f}{TIMES} | {lan:.2f}{TIMES} | "
            f"{_target(bench, variant, runs)} |"
        )
    return "\n".join(rows)


def report(bench: EdgeBench) -> str:
    o = bench.o
    trees = ", ".join(f"{t.label}" for t in bench.trees)
    node_links = (
        f"each node's link held to {o.node_mbit:g} Mbit/s both ways with tbf"
        if o.node_mbit is not None
        else "the LAN unshaped"
    )
    header = (
        f"{o.nodes} nodes, each in its own network namespace with its cache on :{PORT}, one LAN "
        f"bridge, {node_links}, the mirror (distribution "
        f"{first_line(['docker-registry', '--version'])}) behind a WAN link held to "
        f"{o.wan_mbit:g} Mbit/s with tbf; a {bench.image_bytes / MB:.1f} MB image ({o.layers} "
        f"layers of {o.layer_size / MB:g} MB and a config); every node pulls it at once, 3 blobs "
        f"at a time, each blob's sha256 checked, up to {o.retries} retries per pull (back-off "
        f"1, 2, 4 ... 10 s, blobs resumed by Range; a request silent for {o.silence:g} s "
        f"fails). Detour from: {trees}. Wall time: until the "
        f"last node has its image (range in brackets). WAN / image: bytes the mirror's end of "
        f"the WAN link sent, over the image's bytes. Upload: bytes a node's LAN link sent (max "
        f"over nodes; all nodes' sum). Machine: {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}."
    )
    return f"{header}\n\n{table(bench)}\n"


# ------------------------------------------------------------------------------- main


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=6, help="K, nodes of the site (6)")
    parser.add_argument("--wan-mbit", type=float, default=200, help="WAN rate, Mbit/s (200)")
    parser.add_argument(
        "--node-mbit", type=float, help="each node's link rate both ways, Mbit/s (unshaped)"
    )
    parser.add_argument("--layers", type=int, default=4, help="layers of the image (4)")
    parser.add_argument("--layer-mb", type=float, default=10, help="MB per layer (10)")
    parser.add_argument("--repeat", type=int, default=3, help="rollouts per variant (3)")
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated, from {','.join(MODES)} ({','.join(DEFAULT_MODES)})",
    )
    parser.add_argument("--kill-after", type=float, default=1.0, help="kill, hung: seconds (1)")
    parser.add_argument(
        "--kill-node", type=int, help="node to kill or hang (1-based; default: the top owner)"
    )
    parser.add_argument("--cut-after", type=float, default=2.0, help="cut modes: seconds (2)")
    parser.add_argument(
        "--cut-seconds", default="10,40", help="cut modes: cut lengths, comma-separated (10,40)"
    )
    parser.add_argument(
        "--fan-out",
        default="",
        help="cluster.fan_out values for the peer modes, comma-separated (unset)",
    )
    parser.add_argument(
        "--detour-tree",
        default="",
        help="Detour's source: directories holding proxy/ or git revisions, comma-separated "
        "(this work tree)",
    )
    parser.add_argument(
        "--retries", type=int, default=10, help="failed requests a pull retries (10)"
    )
    parser.add_argument(
        "--client-silence",
        type=float,
        default=30,
        help="seconds a pull client waits for a byte before it fails the request (30; "
        "containerd's image_pull_progress_timeout is 300 for a whole pull)",
    )
    parser.add_argument("--timeout", type=float, default=180, help="per pull, seconds (180)")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, caches)")
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")
    if args.nodes < 2 or args.nodes > 200:
        parser.error("--nodes: 2..200")
    if args.kill_node is not None and not 1 <= args.kill_node <= args.nodes:
        parser.error("--kill-node: 1..nodes")
    fan_outs: tuple[int | None, ...] = tuple(int(x) for x in _floats(args.fan_out)) or (None,)
    return Options(
        nodes=args.nodes,
        wan_mbit=args.wan_mbit,
        node_mbit=args.node_mbit,
        layers=args.layers,
        layer_size=int(args.layer_mb * MB),
        repeat=args.repeat,
        modes=tuple(m for m in MODES if m in modes),
        kill_after=args.kill_after,
        kill_node=args.kill_node,
        cut_after=args.cut_after,
        cut_seconds=_floats(args.cut_seconds) or (10.0,),
        fan_outs=fan_outs,
        trees=tuple(t.strip() for t in args.detour_tree.split(",")) or ("",),
        retries=args.retries,
        silence=args.client_silence,
        timeout=args.timeout,
        json_path=args.json,
        keep=args.keep,
    )


def _raise_interrupt(signum: int, _: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run_json(run: Run) -> dict[str, Any]:
    data = asdict(run)
    data["variant"]["tree"] = run.variant.tree.label
    return data


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if os.geteuid() != 0:
        log("needs root (ip netns, tc, iptables)")
        return 2
    tools = ("ip", "tc", "iptables", "docker-registry")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        log(f"missing: {', '.join(missing)}")
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="detour-edge-"))
    bench = EdgeBench(options, workdir)
    code = 0
    try:
        bench.start()
        if bench.trees[0].path is not None:  # the owners as that tree computes them
            sys.path.insert(0, str(bench.trees[0].path))
        bench.run()
        text = report(bench)
        print(text)
        if options.json_path is not None:
            options.json_path.write_text(
                json.dumps(
                    {
                        "image_bytes": bench.image_bytes,
                        "options": {k: str(v) for k, v in asdict(options).items()},
                        "runs": [_run_json(r) for r in bench.runs],
                    },
                    indent=2,
                )
            )
        if bench.failures:
            log(f"{len(bench.failures)} failures:\n" + "\n".join(bench.failures))
            code = 1
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    except Exception as exc:
        log(f"failed: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        bench.stop()
        if options.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        sys.exit(agent_main())
    sys.exit(main())
