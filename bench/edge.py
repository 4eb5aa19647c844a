#!/usr/bin/env python3
"""Edge-site benchmark (issue 11): K nodes of one site pull one image at once over a slow WAN.

One machine plays a whole edge site, built with ``ip netns``, veth pairs, a bridge and ``tbf``
(so it needs root, ``iproute2`` and ``tc``)::

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
  cache's background fetches count too), divided by the image's bytes;
* each NODE is a namespace with its own loopback and LAN address, a cache listening on
  ``0.0.0.0:7439`` (as a DaemonSet pod with ``hostNetwork``) and a pull client that asks
  ``127.0.0.1:7439`` for the manifest by tag and then every blob (3 at a time, as containerd),
  checking each blob's sha256 and size and the manifest's digest. The LAN is not shaped.

A rollout: fresh caches (new dirs, new processes) on every node, then all K clients are told to
pull at the same moment; the wall time runs from then until the last client has its image.
Modes (``--modes``):

* ``one``: Detour, no cluster settings, one node pulls alone (the baseline of one pull);
* ``solo``: Detour, no cluster settings, every node pulls;
* ``peers``: Detour with ``cluster.peers`` = every node's ``10.0.1.x:7439`` and
  ``cluster.advertise`` = its own, every node pulls: the only difference from ``solo`` is the
  ``cluster`` section;
* ``kill``: as ``peers``, and one node's Detour is SIGKILLed ``--kill-after`` (1 s) into the
  rollout; the other nodes must still get a verified image. By default the node killed is the
  one that owns the most image bytes (rendezvous order, from
  ``proxy.cluster.peering``), so that fetches are under way through it when it dies;
  ``--kill-node N`` picks one;
* ``distribution``: distribution's proxy mode per node (``docker-registry`` with
  ``proxy.remoteurl`` = the mirror) on ``:7439`` instead of Detour.

Each mode runs ``--repeat`` times (3) and the median is reported, as a markdown table in the
README's format, with the mirror's blob GETs (from its access log) and every pull's check.
Detour's warnings and errors during each rollout are counted and the first few printed.

    .venv/bin/python bench/edge.py                          # all modes, 3 runs each (~3 min)
    .venv/bin/python bench/edge.py --modes solo,distribution --repeat 1
    .venv/bin/python bench/edge.py --json edge.json --keep  # keep the temp dir with every log

Namespaces are named ``dedge<pid>-*``; every process, namespace and temp dir is removed on exit,
Ctrl-C and errors included, and namespaces left by a run that was SIGKILLed are removed at the
next start. Exit status 1 when a pull that should have succeeded did not or a service failed.

The script is also its own helper: ``edge.py agent``, started in each namespace with
``ip netns exec``, reads one JSON request per line (wait for a URL, push the image, pull it,
GET a URL) and answers one JSON line each.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlsplit

from common import (
    ACCEPT,
    DETOUR_NAME,
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    MIRROR_REPO,
    REPO_ROOT,
    TAG,
    USER_AGENT,
    first_line,
    log,
)
from configs import detour_config, registry_config, write_config
from mirror import AccessLog, Pusher, blob_requests, random_chunks
from processes import Service

MB = 1_000_000
PORT = 7439  # every node's cache, as the DaemonSet's
MIRROR_PORT = 5000
MIRROR_ADDRESS = "10.0.9.1"  # the mirror's end of the WAN link
ROUTER_WAN = "10.0.9.2"  # the site's end of it
ROUTER_LAN = "10.0.1.1"
WAN_DEV = "wan0"  # in the wan namespace: the shaped egress, its tx_bytes are the WAN bytes
PULL_PARALLEL = 3  # blobs at once per client, containerd's default max_concurrent_downloads
READ_TIMEOUT = 30.0  # longest silence a pull client accepts

Mode = Literal["one", "solo", "peers", "kill", "distribution"]
MODES: tuple[Mode, ...] = ("one", "solo", "peers", "kill", "distribution")
LABELS: dict[Mode, str] = {
    "one": "Detour, one node alone",
    "solo": "Detour solo",
    "peers": "Detour with peers",
    "kill": "Detour with peers, one node killed {after:g} s in",
    "distribution": "distribution proxy per node",
}


def node_address(index: int) -> str:
    """LAN address of node ``index`` (1-based): 10.0.1.2 for node 1."""
    return f"10.0.1.{index + 1}"


# ------------------------------------------------------------------------------- the agent
# Runs inside a namespace (``ip netns exec <ns> python bench/edge.py agent``); stdlib only on
# the pull path, so what it measures is the cache, not the client.


class PullError(Exception):
    pass


def _get(url: str, deadline: float, accept: str | None = None) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    timeout = max(0.1, min(READ_TIMEOUT, deadline - time.monotonic()))
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    headers = {"User-Agent": "edge-pull"}
    if accept is not None:
        headers["Accept"] = accept
    try:
        conn.request("GET", parts.path, headers=headers)
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise PullError(f"GET {parts.path}: {type(exc).__name__}: {exc}") from exc
    if response.status != 200:
        body = response.read(300)
        conn.close()
        raise PullError(f"GET {parts.path}: {response.status} {body!r}")
    return response


def _read_checked(url: str, digest: str, size: int | None, deadline: float) -> int:
    """GET ``url`` whole, hashing as it comes; the byte count, or PullError."""
    response = _get(url, deadline)
    hasher = hashlib.sha256()
    got = 0
    try:
        while True:
            if time.monotonic() > deadline:
                raise PullError(f"{digest[:19]}: deadline after {got} bytes")
            chunk = response.read(1 << 20)
            if not chunk:
                break
            hasher.update(chunk)
            got += len(chunk)
    except (OSError, http.client.HTTPException) as exc:
        raise PullError(f"{digest[:19]}: {type(exc).__name__} after {got} bytes: {exc}") from exc
    finally:
        response.close()
    if size is not None and got != size:
        raise PullError(f"{digest[:19]}: {got} bytes, expected {size}")
    if f"sha256:{hasher.hexdigest()}" != digest:
        raise PullError(f"{digest[:19]}: wrong sha256")
    return got


def _manifest(url: str, deadline: float) -> tuple[str, bytes]:
    response = _get(url, deadline, ACCEPT)
    try:
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise PullError(f"manifest: {type(exc).__name__}: {exc}") from exc
    finally:
        response.close()
    digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
    header = response.getheader("Docker-Content-Digest")
    if header is not None and header != digest:
        raise PullError(f"manifest: digest {digest}, header says {header}")
    return digest, body


def pull(base: str, reference: str, timeout: float) -> dict[str, Any]:
    """Pull a whole image from ``base`` (``http://host:port/v2/<name>``) and check it."""
    started = time.time()
    deadline = time.monotonic() + timeout
    result: dict[str, Any] = {"start": started, "ok": False, "bytes": 0}

    def blob(descriptor: dict[str, Any]) -> int:
        digest = descriptor["digest"]
        return _read_checked(f"{base}/blobs/{digest}", digest, descriptor["size"], deadline)

    try:
        digest, body = _manifest(f"{base}/manifests/{reference}", deadline)
        manifest = json.loads(body)
        with ThreadPoolExecutor(PULL_PARALLEL) as pool:
            sizes = list(pool.map(blob, [manifest["config"], *manifest["layers"]]))
        result.update(ok=True, bytes=len(body) + sum(sizes), manifest=digest)
    except (PullError, ValueError, KeyError, TypeError) as exc:
        result["error"] = str(exc)
    result["end"] = time.time()
    return result


def wait_ready(url: str, timeout: float) -> dict[str, Any]:
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=2)
        try:
            conn.request("GET", parts.path, headers={"User-Agent": f"{USER_AGENT}-ready"})
            if conn.getresponse().status in (200, 401):
                return {"ok": True}
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    return {"ok": False, "error": f"{url} not ready in {timeout:g}s"}


def fetch_text(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path, headers={"User-Agent": f"{USER_AGENT}-ready"})
        response = conn.getresponse()
        return {"status": response.status, "text": response.read().decode(errors="replace")}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def push_image(port: int, layers: int, layer_size: int) -> dict[str, Any]:
    """Push ``layers`` random layers and their config as one schema 2 image tagged TAG."""
    pusher = Pusher(port)
    layer_blobs = [pusher.blob(random_chunks(layer_size)) for _ in range(layers)]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layer_blobs]},
        }
    ).encode()
    config_digest, _ = pusher.blob([config])
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": DOCKER_LAYER, "digest": d, "size": s} for d, s in layer_blobs],
        },
        indent=3,
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "PUT",
            f"/v2/{MIRROR_REPO}/manifests/{TAG}",
            body=manifest,
            headers={"User-Agent": USER_AGENT, "Content-Type": DOCKER_MANIFEST},
        )
        response = conn.getresponse()
        text = response.read()
    finally:
        conn.close()
    if response.status != 201:
        raise RuntimeError(f"push: manifest PUT answered {response.status}: {text[:300]!r}")
    return {
        "manifest": f"sha256:{hashlib.sha256(manifest).hexdigest()}",
        "blobs": {config_digest: len(config), **dict(layer_blobs)},
        "bytes": len(manifest) + len(config) + sum(s for _, s in layer_blobs),
    }


def agent_main() -> int:
    """Answer one JSON request per stdin line with one JSON line on stdout."""
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        reply: dict[str, Any]
        try:
            if op == "wait":
                reply = wait_ready(request["url"], request["timeout"])
            elif op == "pull":
                reply = pull(request["base"], request["reference"], request["timeout"])
            elif op == "get":
                reply = fetch_text(request["url"])
            elif op == "push":
                reply = push_image(request["port"], request["layers"], request["layer_size"])
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # answered, so the orchestrator never waits on a dead agent
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    return 0


# ------------------------------------------------------------------------------- the site


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


class Site:
    """The namespaces and links of one edge site (see the module docstring)."""

    def __init__(self, nodes: int, wan_mbit: float) -> None:
        prefix = f"dedge{os.getpid()}"
        self.wan = f"{prefix}-wan"
        self.lan = f"{prefix}-lan"
        self.nodes = [f"{prefix}-n{i}" for i in range(1, nodes + 1)]
        self.wan_mbit = wan_mbit
        self.created: list[str] = []

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
        # Mirror -> site held to the WAN's rate. The bucket holds 1 ms at that rate but never
        # less than 64 KiB (a GSO packet on veth can be that large), the queue 50 ms.
        burst = max(64 * 1024, int(self.wan_mbit * 1e6 / 8 / 1000))
        sh(
            f"tc -n {wan} qdisc add dev {WAN_DEV} root tbf rate {self.wan_mbit:g}mbit "
            f"burst {burst} latency 50ms"
        )
        # The LAN: a bridge in the router's namespace, one veth pair per node.
        sh(f"ip -n {lan} link add br0 type bridge")
        sh(f"ip -n {lan} addr add {ROUTER_LAN}/24 dev br0")
        sh(f"ip -n {lan} link set br0 up")
        sh(f"ip netns exec {lan} sysctl -qw net.ipv4.ip_forward=1")
        for index, node in enumerate(self.nodes, 1):
            sh(f"ip link add n{index} netns {lan} type veth peer eth0 netns {node}")
            sh(f"ip -n {lan} link set n{index} master br0")
            sh(f"ip -n {lan} link set n{index} up")
            sh(f"ip -n {node} addr add {node_address(index)}/24 dev eth0")
            sh(f"ip -n {node} link set eth0 up")
            sh(f"ip -n {node} route add default via {ROUTER_LAN}")

    def wan_bytes(self) -> int:
        """Bytes the mirror's end of the WAN link has sent (mirror -> site)."""
        links = json.loads(sh(f"ip -n {self.wan} -j -s link show dev {WAN_DEV}"))
        return int(links[0]["stats64"]["tx"]["bytes"])

    def qdisc(self) -> str:
        return sh(f"tc -n {self.wan} qdisc show dev {WAN_DEV}").strip()

    def destroy(self) -> None:
        for name in reversed(self.created):
            with contextlib.suppress(CommandError):
                sh(f"ip netns del {name}")
        self.created.clear()


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
class Options:
    nodes: int
    wan_mbit: float
    layers: int
    layer_size: int
    repeat: int
    modes: tuple[Mode, ...]
    kill_after: float
    kill_node: int | None
    timeout: float
    json_path: Path | None
    keep: bool


@dataclass(slots=True)
class Run:
    mode: Mode
    wall: float  # from "pull" to the last expected client done
    wan_bytes: int
    mirror_blob_gets: int
    pulls: int  # expected to succeed
    verified: int
    killed: int | None = None  # node index
    per_node: list[float | None] = field(default_factory=list)  # seconds, None: failed
    errors: list[str] = field(default_factory=list)
    detour_problems: list[str] = field(default_factory=list)  # warning/error log lines
    peer_requests: dict[str, float] = field(default_factory=dict)


_LEVEL = re.compile(r'"level":\s*"(warning|error|critical)"|\b(WARNING|ERROR|CRITICAL)\b')


class EdgeBench:
    def __init__(self, options: Options, workdir: Path) -> None:
        self.o = options
        self.dir = workdir
        self.site = Site(options.nodes, options.wan_mbit)
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
        self.image_bytes = 0
        self.blobs: dict[str, int] = {}
        self.runs: list[Run] = []
        self.failures: list[str] = []

    # --------------------------------------------------------------------- setup

    def _registry_config(self, name: str, port: int, remote: str | None) -> Path:
        """registry:2's default config (as bench/run.py's), storage in our temp dir; with
        ``remote``, distribution's proxy mode (``proxy.remoteurl``)."""
        return registry_config(self.dir, name, f"0.0.0.0:{port}", remote)

    def _detour_config(self, name: str, index: int, peers: bool) -> Path:
        mirror = f"{MIRROR_ADDRESS}:{MIRROR_PORT}"
        # Listening on 0.0.0.0: the peers reach it on the LAN, the node on 127.0.0.1.
        config = detour_config(mirror, f"0.0.0.0:{PORT}", self.dir / f"{name}-cache")
        if peers:
            config["cluster"] = {
                "peers": [f"{node_address(i)}:{PORT}" for i in range(1, self.o.nodes + 1)],
                "advertise": f"{node_address(index)}:{PORT}",
            }
        return write_config(self.dir / f"{name}.yml", config)

    def start(self) -> None:
        remove_stale_namespaces()
        self.site.build()
        log(f"site: {self.o.nodes} nodes, WAN {self.site.qdisc()}")
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

    def start_caches(self, mode: Mode, repeat: int) -> None:
        self.caches = []
        for index, netns in enumerate(self.site.nodes, 1):
            name = f"{mode}{repeat}-node{index}"
            if mode == "distribution":
                config = self._registry_config(name, PORT, f"http://{MIRROR_ADDRESS}:{MIRROR_PORT}")
                argv = ["docker-registry", "serve", str(config)]
            else:
                config = self._detour_config(name, index, peers=mode in ("peers", "kill"))
                argv = [detour_command(), "serve", "--config", str(config)]
            service = Service(
                name, ["ip", "netns", "exec", netns, *argv], self.dir / f"{name}.log", cwd=REPO_ROOT
            )
            service.start()
            self.caches.append(service)
        ready = "/v2/" if mode == "distribution" else "/healthz"
        self._ready(self.agents, self.caches, f"http://127.0.0.1:{PORT}{ready}")

    def stop_caches(self) -> None:
        for service in self.caches:
            service.stop()
        self.caches = []

    # --------------------------------------------------------------------- one rollout

    def kill_target(self) -> int:
        """The node to kill: ``--kill-node``, else the owner of the most image bytes."""
        if self.o.kill_node is not None:
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
        best = max(peers, key=lambda p: (owned[p], peers.index(p)))
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

    def rollout(self, mode: Mode, repeat: int) -> Run:
        self.start_caches(mode, repeat)
        pulling = [1] if mode == "one" else list(range(1, self.o.nodes + 1))
        killed = self.kill_target() if mode == "kill" else None
        base = f"http://127.0.0.1:{PORT}/v2/" + (
            MIRROR_REPO if mode == "distribution" else DETOUR_NAME
        )
        mark = self.mirror_log.mark()
        problems_from = {s.name: _log_size(s.log_path) for s in self.caches}
        before = self.site.wan_bytes()
        request = {"op": "pull", "base": base, "reference": TAG, "timeout": self.o.timeout}
        started = time.time()
        for index in pulling:
            self.agents[index - 1].send(request)
        if killed is not None:
            time.sleep(max(0.0, started + self.o.kill_after - time.time()))
            os.kill(self.caches[killed - 1].pid, signal.SIGKILL)
            log(f"  killed node{killed}'s Detour at {time.time() - started:.2f}s")
        replies = {index: self.agents[index - 1].receive() for index in pulling}
        after = self.settle_wan()
        entries = self.mirror_log.entries()[mark:]
        run = Run(
            mode=mode,
            wall=0.0,
            wan_bytes=after - before,
            mirror_blob_gets=sum(blob_requests(entries, d)[0] for d in self.blobs),
            pulls=len(pulling) - (killed is not None),
            verified=0,
            killed=killed,
        )
        ends = []
        for index in pulling:
            reply = replies[index]
            ok = bool(reply.get("ok"))
            run.per_node.append(reply["end"] - started if ok else None)
            if index == killed:
                continue
            if ok:
                run.verified += 1
                ends.append(reply["end"])
            else:
                run.errors.append(f"node{index}: {reply.get('error')}")
        run.wall = max(ends) - started if ends else float("nan")
        if mode != "distribution":
            run.peer_requests = self._peer_requests(killed)
        for index, service in enumerate(self.caches, 1):
            if service.exit_code() is not None and index != killed:
                run.errors.append(f"{service.name} exited with {service.exit_code()}")
            run.detour_problems += [
                f"{service.name}: {line}"
                for line in _log_lines(service.log_path, problems_from[service.name])
                if mode != "distribution" and _LEVEL.search(line)
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
        for repeat in range(1, self.o.repeat + 1):
            for mode in self.o.modes:
                run = self.rollout(mode, repeat)
                self.runs.append(run)
                nodes = " ".join("x" if t is None else f"{t:.1f}" for t in run.per_node)
                wan = run.wan_bytes / self.image_bytes
                log(
                    f"{mode} #{repeat}: {run.wall:.2f}s, WAN {wan:.2f}x"
                    f" ({run.mirror_blob_gets} blob GETs at the mirror), verified "
                    f"{run.verified}/{run.pulls}; per node {nodes}"
                    + (f"; peer requests {run.peer_requests}" if run.peer_requests else "")
                )
                for line in run.errors:
                    self.failures.append(f"{mode} #{repeat}: {line}")
                    log(f"  ERROR {line}")
                if run.detour_problems:
                    log(f"  {len(run.detour_problems)} warning/error lines in Detour's logs:")
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


def _target(mode: Mode, wall: float, wan: float, verified: bool, solo: float | None) -> str:
    if mode == "peers":
        met = wan <= 1.1 and (solo is None or wall <= solo / 3)
        return f"WAN ≤ 1.1{TIMES}, ≤ ⅓ of solo's time: {'met' if met else '**not met**'}"
    if mode == "kill":
        met = wan < 2 and verified
        return f"the others finish, WAN < 2{TIMES}: {'met' if met else '**not met**'}"
    return ""


def table(bench: EdgeBench) -> str:
    o = bench.o
    rows = [
        f"| mode (median of {o.repeat}) | wall time, s | WAN / image | mirror blob GETs "
        "| pulls verified | target |",
        "|---|---:|---:|---:|---|---|",
    ]
    walls = {mode: _median([r.wall for r in bench.runs if r.mode == mode]) for mode in o.modes}
    for mode in o.modes:
        runs = [r for r in bench.runs if r.mode == mode]
        if not runs:
            continue
        wall = walls[mode]
        wan = _median([r.wan_bytes / bench.image_bytes for r in runs])
        gets = _median([float(r.mirror_blob_gets) for r in runs])
        verified = sum(r.verified for r in runs)
        expected = sum(r.pulls for r in runs)
        check = f"{verified}/{expected}"
        if mode == "kill":
            killed = sorted({r.killed for r in runs if r.killed is not None})
            check += f" (node {', '.join(map(str, killed))} killed)"
        spread = f" ({min(r.wall for r in runs):.1f}{DASH}{max(r.wall for r in runs):.1f})"
        rows.append(
            f"| {LABELS[mode].format(after=o.kill_after)} | {wall:.1f}"
            f"{spread if len(runs) > 1 else ''} | {wan:.2f}{TIMES} | {gets:g} | {check} | "
            f"{_target(mode, wall, wan, verified == expected, walls.get('solo'))} |"
        )
    return "\n".join(rows)


def report(bench: EdgeBench) -> str:
    o = bench.o
    header = (
        f"{o.nodes} nodes, each in its own network namespace with its cache on :{PORT}, one LAN "
        f"bridge, the mirror (distribution {first_line(['docker-registry', '--version'])}) "
        f"behind a WAN link held to {o.wan_mbit:g} Mbit/s with tbf; a "
        f"{bench.image_bytes / MB:.1f} MB image ({o.layers} layers of {o.layer_size / MB:g} MB "
        f"and a config); every node pulls it at once from 127.0.0.1:{PORT}, 3 blobs at a time, "
        f"each blob's sha256 checked. Wall time: until the last node has its image (range in "
        f"brackets). WAN / image: bytes the mirror's end of the WAN link sent, over the image's "
        f"bytes. Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}."
    )
    return f"{header}\n\n{table(bench)}\n"


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=6, help="K, nodes of the site (6)")
    parser.add_argument("--wan-mbit", type=float, default=200, help="WAN rate, Mbit/s (200)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the image (4)")
    parser.add_argument("--layer-mb", type=float, default=10, help="MB per layer (10)")
    parser.add_argument("--repeat", type=int, default=3, help="rollouts per mode (3)")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, in this order: {','.join(MODES)} (all)",
    )
    parser.add_argument("--kill-after", type=float, default=1.0, help="seconds (1)")
    parser.add_argument(
        "--kill-node", type=int, help="node to kill (1-based; default: the top owner)"
    )
    parser.add_argument("--timeout", type=float, default=180, help="per pull, seconds (180)")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")
    if args.nodes < 2 or args.nodes > 200:
        parser.error("--nodes: 2..200")
    if args.kill_node is not None and not 1 <= args.kill_node <= args.nodes:
        parser.error("--kill-node: 1..nodes")
    return Options(
        nodes=args.nodes,
        wan_mbit=args.wan_mbit,
        layers=args.layers,
        layer_size=int(args.layer_mb * MB),
        repeat=args.repeat,
        modes=tuple(m for m in MODES if m in modes),
        kill_after=args.kill_after,
        kill_node=args.kill_node,
        timeout=args.timeout,
        json_path=args.json,
        keep=args.keep,
    )


def _raise_interrupt(signum: int, _: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if os.geteuid() != 0:
        log("needs root (ip netns, tc)")
        return 2
    missing = [tool for tool in ("ip", "tc", "docker-registry") if shutil.which(tool) is None]
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
        bench.run()
        text = report(bench)
        print(text)
        if options.json_path is not None:
            options.json_path.write_text(
                json.dumps(
                    {"image_bytes": bench.image_bytes, "runs": [asdict(r) for r in bench.runs]},
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
