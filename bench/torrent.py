#!/usr/bin/env python3
"""Site fan-out (issue 30): BitTorrent (libtorrent) beside Detour's peers, on one edge site.

The site is edge.py's (:class:`edge.Site`: ``ip netns``, veth, a bridge, the real
``docker-registry`` as the mirror behind a WAN held by ``tbf``), with every node's link held too,
in both directions (``--node-mbit``, tbf on the node's ``eth0`` and on its port of the bridge).
One image of ``--layers`` random layers is pushed to the mirror; then, on the same site, in
turn (each ``--repeat`` times, modes interleaved, so the ratios come from one run):

* ``one``: Detour, no cluster settings, one node pulls the image alone (the baseline);
* ``peers``: Detour with ``cluster.peers``, every node pulls, the code of ``--detour-rev``
  (exported with ``git archive``, first on ``PYTHONPATH``): before the peer tree (cab393e),
  the owner of each blob serves all the others;
* ``tree``: the same with ``cluster.fan_out`` = each of ``--fan-out``, the code of
  ``--tree-rev``, and any ``--tree-setting``;
* ``warm``: as ``tree``, but node 1 pulls the image first (not timed), so that every blob's
  owner holds it, and then the other nodes pull: the figure to set beside ``seed``'s
  distribution alone;
* ``seed``: BitTorrent. Node 1, the owner, fetches every layer from the mirror over the WAN
  (checking its sha256), makes one torrent per layer (``create_torrent``: it needs the whole
  file; v1, ``--piece-kib`` pieces), and seeds; nodes 2..K download every torrent at once with
  sequential download, from a fixed peer list (``connect_peer`` to every other node; no
  tracker, no DHT, no LSD, no uTP), and check each layer's sha256 once it is complete.
  Reported: the distribution alone, and the total from the owner's first WAN byte;
* ``rarest``: as ``seed``, with libtorrent's rarest-first order instead of sequential;
* ``webseed``: BitTorrent with a BEP 19 web seed: every node has the torrents (made beforehand)
  with the mirror's blob URL as url seed, and the other nodes as peers; no seed on the site.

Every node pulls Detour's image as edge.py's client does (the manifest, then the blobs 3 at a
time, each sha256 checked), but waits on a silent source up to 5 minutes, as containerd's
progress timeout, where edge.py's client gives up after 30 s: a node holds a peer's blob until
it is verified (``cluster.verify_peer_blobs_first``), so its client hears nothing meanwhile.

Measured per rollout: wall time to the last node with its verified image; WAN bytes (the
mirror's ``tx_bytes``) over the image's; each node's upload (``tx_bytes`` of its ``eth0``) over
the image's, the largest reported; CPU seconds of the processes doing the work (Detour's; the
torrent agents', libtorrent's hashing and the sha256 check included; not the Detour client's);
the largest peak resident size of one node's (Detour's VmHWM; the torrent agent's VmRSS,
sampled, libtorrent's mapped files included).

libtorrent is Debian's ``python3-libtorrent``, for the system ``python3`` (``--torrent-python``):
the node agents run under it (``torrent.py agent``, one per node namespace, one JSON request
per line; they pull Detour's image too), the rest under the bench's venv. Namespaces are
edge.py's (``dedge<pid>-*``) and are removed on every exit, Ctrl-C and errors included; each
rollout's caches and downloads are deleted when it ends.

    .venv/bin/python bench/torrent.py --nodes 6 --repeat 1 --detour-rev cab393e
    .venv/bin/python bench/torrent.py --nodes 12 --modes one,peers,tree,seed,rarest \\
        --fan-out 2,3,4 --detour-rev cab393e --tree-rev HEAD --json torrent.json
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import importlib
import json
import os
import re
import resource
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
from typing import Any
from urllib.parse import urlsplit

from common import ACCEPT, DETOUR_NAME, MIRROR_REPO, REPO_ROOT, TAG, first_line, log
from configs import detour_config, registry_config, write_config
from edge import Site, node_address
from processes import Service

MB = 1_000_000
TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"
# Where edge.py's Site puts the mirror, and every node's cache (as the DaemonSet's).
MIRROR_PORT = 5000
MIRROR_HOST = f"10.0.9.1:{MIRROR_PORT}"
MIRROR = f"http://{MIRROR_HOST}"
PORT = 7439
TORRENT_PORT = 6881
ALONE = "Detour, one node alone"
TORRENT_LABELS = {
    "seed": "BitTorrent, node 1 seeds",
    "rarest": "BitTorrent, node 1 seeds, rarest first",
    "webseed": "BitTorrent, web seed",
}
SYSTEM_PYTHON = "/usr/bin/python3"
MODES = ("one", "peers", "tree", "warm", "seed", "rarest", "webseed")
POLL = 0.05  # seconds between a torrent agent's looks at its torrents
READ = 1 << 20
# The longest a pull waits on a silent source: containerd's image_pull_progress_timeout (5 min).
# A Detour that holds a peer's blob until it is verified (cluster.verify_peer_blobs_first)
# sends nothing for the whole blob's time, longer than edge.py's client waits (30 s).
SILENCE = 300.0


# ------------------------------------------------------------------------------- the agent
# Runs in a node's namespace under the system python3 (libtorrent is Debian's).


def _lt() -> Any:
    return importlib.import_module("libtorrent")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_mb(field: str, pid: int | str = "self") -> float:
    """``field`` of /proc/<pid>/status (VmRSS, VmHWM), in MB; 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return 0.0


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(READ):
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


def _get(url: str, silence: float, accept: str | None = None) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=silence)
    headers = {"User-Agent": "detour-bench-torrent", **({"Accept": accept} if accept else {})}
    conn.request("GET", parts.path, headers=headers)
    response = conn.getresponse()
    if response.status != 200:
        conn.close()
        raise RuntimeError(f"GET {parts.path}: {response.status}")
    return response


def _fetch_blob(base: str, digest: str, path: Path | None = None, silence: float = SILENCE) -> int:
    """GET ``base/blobs/digest`` (into ``path``), checking its sha256; the byte count."""
    response = _get(f"{base}/blobs/{digest}", silence)
    hasher = hashlib.sha256()
    got = 0
    with response, contextlib.ExitStack() as stack:
        file = stack.enter_context(path.open("wb")) if path is not None else None
        while chunk := response.read(READ):
            hasher.update(chunk)
            if file is not None:
                file.write(chunk)
            got += len(chunk)
    if f"sha256:{hasher.hexdigest()}" != digest:
        raise RuntimeError(f"{digest[:19]}: wrong sha256")
    return got


def pull(base: str, reference: str) -> dict[str, Any]:
    """Pull a whole image from ``base`` (``http://host:port/v2/<name>``), as edge.py's agent
    does (the manifest, then every blob 3 at a time, each sha256 checked), but waiting for a
    silent source up to :data:`SILENCE`, as containerd's progress timeout does."""
    response = _get(f"{base}/manifests/{reference}", SILENCE, ACCEPT)
    with response:
        manifest = json.loads(response.read())
    blobs = [manifest["config"], *manifest["layers"]]
    with ThreadPoolExecutor(3) as pool:
        sizes = list(pool.map(_fetch_blob, [base] * len(blobs), [b["digest"] for b in blobs]))
    if sizes != [b["size"] for b in blobs]:
        raise RuntimeError(f"sizes {sizes}")
    return {"ok": True, "end": time.time()}


class TorrentNode:
    """One node's libtorrent session and its torrents (one per layer, named by its digest)."""

    def __init__(self) -> None:
        self.session: Any = None
        self.handles: dict[str, Any] = {}
        self.peers: list[tuple[str, int]] = []
        self.cpu_mark = 0.0
        self.rss = 0.0  # the largest resident size seen while the session ran, MB

    def start(self, listen: str) -> None:
        lt = _lt()
        self.session = lt.session(
            {
                "listen_interfaces": listen,
                "enable_dht": False,
                "enable_lsd": False,
                "enable_upnp": False,
                "enable_natpmp": False,
                "enable_outgoing_utp": False,
                "enable_incoming_utp": False,
                "alert_mask": 0,
                "user_agent": "detour-bench",
            }
        )
        self.cpu_mark = _cpu()
        self.rss = 0.0

    def add(
        self, directory: str, torrents: dict[str, str], seed: bool, url: str | None, order: bool
    ) -> None:
        """``order``: sequential download (as a blob streamed to its client), else libtorrent's
        rarest first."""
        lt = _lt()
        for digest, data in torrents.items():
            params = lt.add_torrent_params()
            params.ti = lt.torrent_info(lt.bdecode(base64.b64decode(data)))
            params.save_path = directory
            # Not auto-managed: every layer at once (libtorrent would run 3 downloads, 5 seeds).
            download = lt.torrent_flags.sequential_download if order else 0
            params.flags = lt.torrent_flags.seed_mode if seed else download
            if url is not None:
                params.url_seeds = [f"{url}/{digest}"]
            self.handles[digest] = self.session.add_torrent(params)

    def connect(self) -> None:
        for handle in self.handles.values():
            for peer in self.peers:
                handle.connect_peer(peer)

    def download(self, directory: str, timeout: float) -> dict[str, Any]:
        """Until every torrent is complete and its file's sha256 checked."""
        lt = _lt()
        deadline = time.monotonic() + timeout
        done: dict[str, float] = {}
        checks = ThreadPoolExecutor(2)
        checked: dict[str, Any] = {}
        last_connect = 0.0
        try:
            while len(done) < len(self.handles):
                if time.monotonic() > deadline:
                    return {"ok": False, "error": f"{len(done)}/{len(self.handles)} in time"}
                if time.monotonic() - last_connect > 2:  # peers not yet listening are retried
                    self.connect()
                    last_connect = time.monotonic()
                for digest, handle in self.handles.items():
                    if digest in done:
                        continue
                    status = handle.status()
                    if status.errc.value() != 0:
                        return {"ok": False, "error": f"{digest[:19]}: {status.errc.message()}"}
                    if status.state == lt.torrent_status.seeding:
                        done[digest] = time.time()
                        path = Path(directory, status.name)
                        checked[digest] = checks.submit(_sha256_file, path)
                self.rss = max(self.rss, _status_mb("VmRSS"))
                time.sleep(POLL)
            wrong = [d[:19] for d, f in checked.items() if f.result() != d]
        finally:
            checks.shutdown()
        if wrong:
            return {"ok": False, "error": f"wrong sha256: {wrong}"}
        return {"ok": True, "end": time.time(), "done": done}

    def stats(self) -> dict[str, Any]:
        upload = sum(h.status().total_payload_upload for h in self.handles.values())
        self.rss = max(self.rss, _status_mb("VmRSS"))
        return {"upload": upload, "cpu": _cpu() - self.cpu_mark, "rss": self.rss}

    def close(self) -> None:
        for handle in self.handles.values():
            with contextlib.suppress(Exception):
                self.session.remove_torrent(handle)
        self.handles = {}
        self.session = None


def make_torrents(directory: str, digests: list[str], piece_kib: int) -> dict[str, str]:
    """One single-file torrent per layer file ``directory/<hex>``; base64 of each."""
    lt = _lt()
    made = {}
    for digest in digests:
        files = lt.file_storage()
        lt.add_files(files, str(Path(directory, digest.removeprefix("sha256:"))))
        creator = lt.create_torrent(files, piece_kib * 1024, flags=lt.create_torrent.v1_only)
        lt.set_piece_hashes(creator, directory)
        made[digest] = base64.b64encode(lt.bencode(creator.generate())).decode()
    return made


def agent_main() -> int:
    """Answer one JSON request per stdin line with one JSON line on stdout."""
    node = TorrentNode()
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        reply: dict[str, Any] = {"ok": True}
        try:
            if op == "fetch":  # the owner's WAN fetch, 3 blobs at a time as a pull
                Path(request["dir"]).mkdir(parents=True, exist_ok=True)
                mark = _cpu()
                base, into = f"{request['base']}/v2/{MIRROR_REPO}", request["dir"]
                with ThreadPoolExecutor(3) as pool:
                    paths = [Path(into, d.removeprefix("sha256:")) for d in request["blobs"]]
                    list(pool.map(_fetch_blob, [base] * len(paths), request["blobs"], paths))
                reply["cpu"] = _cpu() - mark
            elif op == "pull":
                reply = pull(request["base"], request["reference"])
            elif op == "make":
                mark = _cpu()
                reply["torrents"] = make_torrents(
                    request["dir"], request["blobs"], request["piece_kib"]
                )
                reply["cpu"] = _cpu() - mark
            elif op == "start":
                Path(request["dir"]).mkdir(parents=True, exist_ok=True)
                node.start(request["listen"])
                node.peers = [(host, port) for host, port in request["peers"]]
                node.add(
                    request["dir"],
                    request["torrents"],
                    request["seed"],
                    request["url"],
                    request["sequential"],
                )
            elif op == "download":
                reply = node.download(request["dir"], request["timeout"])
            elif op == "stats":
                reply.update(node.stats())
            elif op == "close":
                node.close()
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # answered, so the orchestrator never waits on a dead agent
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    return 0


# ------------------------------------------------------------------------------- the site


class Helper:
    """A JSON-lines helper process in a namespace: edge.py's agent (pulls, pushes, waits) or
    this script's (libtorrent); one request at a time."""

    def __init__(self, netns: str, argv: list[str], log_path: Path) -> None:
        self.netns = netns
        with log_path.open("ab") as errors:
            self._proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                start_new_session=True,
                text=True,
            )

    def send(self, request: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the helper in {self.netns} exited ({self._proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        return self.receive()

    def checked(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = self.call(request)
        if not reply.get("ok", "error" not in reply):
            raise RuntimeError(f"{self.netns} {request['op']}: {reply.get('error')}")
        return reply

    def close_input(self) -> None:
        """The end of its requests: it exits once it has answered the one it is on."""
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()

    def stop(self, grace: float = 5.0) -> None:
        if self._proc.poll() is None:
            self.close_input()
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()


def run(command: str) -> str:
    """Run ``command`` (words split on spaces); its stdout, or CalledProcessError."""
    return subprocess.run(command.split(), capture_output=True, text=True, check=True).stdout


def remove_stale_namespaces() -> None:
    """edge.py's namespaces (``dedge<pid>-*``) whose process is gone (a run SIGKILLed)."""
    for line in run("ip netns list").splitlines():
        match = re.match(r"(dedge(\d+)-\S+)", line)
        if match is not None and not Path(f"/proc/{match[2]}").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                run(f"ip netns del {match[1]}")


def shape_nodes(site: Site, mbit: float) -> None:
    """Every node's link held to ``mbit`` both ways: its eth0 (up), its bridge port (down)."""
    burst = max(64 * 1024, int(mbit * 1e6 / 8 / 1000))
    shape = f"root tbf rate {mbit:g}mbit burst {burst} latency 50ms"
    for index, node in enumerate(site.nodes, 1):
        run(f"tc -n {node} qdisc replace dev eth0 {shape}")
        run(f"tc -n {site.lan} qdisc replace dev n{index} {shape}")


def node_tx(site: Site) -> list[int]:
    """Bytes each node has sent on its LAN link."""
    sent = []
    for node in site.nodes:
        links = json.loads(run(f"ip -n {node} -j -s link show dev eth0"))
        sent.append(int(links[0]["stats64"]["tx"]["bytes"]))
    return sent


def process_cpu(pid: int) -> float:
    """CPU seconds of a running process (its threads and waited-for children included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def export_proxy(repo: Path, rev: str, into: Path) -> Path:
    """``proxy/`` of ``rev`` (a commit of ``repo``) unpacked under ``into``; its folder."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev, "proxy"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _log_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


_EXPECTED = "peers_known_by_address"  # the warning at start without cluster.secret_dir
_LEVEL = re.compile(r'"level":\s*"(warning|error|critical)"|\b(WARNING|ERROR|CRITICAL)\b')


# ------------------------------------------------------------------------------- the bench


@dataclass(slots=True)
class Result:
    label: str
    repeat: int
    wall: float  # to the last node with its image (the distribution alone, for seed)
    total: float  # from the first WAN byte (differs from wall for seed)
    wan: float  # WAN bytes / image bytes
    upload_max: float  # largest node upload / image bytes
    cpu: float
    rss: float  # the largest peak resident size of a node's process, MB
    verified: int
    pulls: int
    per_node: list[float | None] = field(default_factory=list)  # s from the start
    errors: list[str] = field(default_factory=list)


class TorrentBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.a = args
        self.dir = workdir
        self.site = Site(args.nodes, args.wan_mbit)
        self.mirror = Service(
            "mirror",
            ["ip", "netns", "exec", self.site.wan, "docker-registry", "serve",
             str(registry_config(workdir, "mirror", f"0.0.0.0:{MIRROR_PORT}"))],
            workdir / "mirror.log",
        )  # fmt: skip
        self.pullers: list[Helper] = []  # edge.py's agent, one per node, then the wan's
        self.tagents: list[Helper] = []
        self.caches: list[Service] = []
        self.torrents: dict[str, str] = {}
        self.layers: list[str] = []
        self.image_bytes = 0
        self.results: list[Result] = []
        self.paths: dict[str, str] = {}
        self.lt_version = ""
        self.cache_rss = 0.0

    def _helper(self, netns: str, python: str, script: Path, name: str) -> Helper:
        return Helper(netns, [python, str(script), "agent"], self.dir / f"{name}.log")

    def start(self) -> None:
        for key, rev in (("detour", self.a.detour_rev), ("tree", self.a.tree_rev)):
            self.paths[key] = str(export_proxy(self.a.repo, rev, self.dir / f"src-{key}"))
            commit = first_line(["git", "-C", str(self.a.repo), "rev-parse", "--short", rev])
            log(f"{key}: proxy/ of {rev} ({commit})")
        remove_stale_namespaces()
        self.site.build()
        shape_nodes(self.site, self.a.node_mbit)
        edge = Path(__file__).resolve().parent / "edge.py"
        venv, here = sys.executable, Path(__file__).resolve()
        self.pullers = [
            self._helper(ns, venv, edge, f"agent-node{i}")
            for i, ns in enumerate(self.site.nodes, 1)
        ]
        wan = self._helper(self.site.wan, venv, edge, "agent-wan")
        self.pullers.append(wan)
        self.tagents = [
            self._helper(ns, self.a.torrent_python, here, f"tagent-node{i}")
            for i, ns in enumerate(self.site.nodes, 1)
        ]
        self.mirror.start()
        wan.checked({"op": "wait", "url": f"http://127.0.0.1:{MIRROR_PORT}/v2/", "timeout": 60})
        size = int(self.a.layer_mb * MB)
        pushed = wan.checked(
            {"op": "push", "port": MIRROR_PORT, "layers": self.a.layers, "layer_size": size}
        )
        self.image_bytes = pushed["bytes"]
        self.layers = [d for d, s in pushed["blobs"].items() if s == size]
        log(f"pushed a {self.image_bytes / MB:.0f} MB image, {self.a.layers} layers")
        if {"webseed"} & set(self.a.modes):  # the seed mode makes its own, timed
            prep = str(self.dir / "prep")
            owner = self.tagents[0]
            owner.checked({"op": "fetch", "base": MIRROR, "blobs": self.layers, "dir": prep})
            made = owner.checked(
                {"op": "make", "dir": prep, "blobs": self.layers, "piece_kib": self.a.piece_kib}
            )
            self.torrents = made["torrents"]
            shutil.rmtree(prep, ignore_errors=True)

    def settle_wan(self, limit: float = 60.0) -> int:
        """WAN tx bytes once they have not moved for a second."""
        deadline = time.monotonic() + limit
        last, still_since = self.site.wan_bytes(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - still_since < 1.0:
            time.sleep(0.25)
            now = self.site.wan_bytes()
            if now != last:
                last, still_since = now, time.monotonic()
        return last

    # --------------------------------------------------------------------- Detour

    def _start_caches(
        self, name: str, count: int, source: str, fan_out: int | None, peers: bool
    ) -> None:
        env_path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = source  # the exported proxy/ before the installed one
        try:
            for index in range(1, count + 1):
                config = detour_config(
                    MIRROR_HOST, f"0.0.0.0:{PORT}", self.dir / f"{name}-node{index}-cache"
                )
                if peers:
                    nodes = range(1, self.a.nodes + 1)
                    config["cluster"] = {
                        "peers": [f"{node_address(i)}:{PORT}" for i in nodes],
                        "advertise": f"{node_address(index)}:{PORT}",
                    }
                    if fan_out is not None:
                        config["cluster"]["fan_out"] = fan_out
                        config["cluster"].update(self.a.tree_settings)
                path = write_config(self.dir / f"{name}-node{index}.yml", config)
                argv = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
                netns = self.site.nodes[index - 1]
                service = Service(
                    f"{name}-node{index}",
                    ["ip", "netns", "exec", netns, *argv],
                    self.dir / f"{name}-node{index}.log",
                    cwd=self.dir,
                )
                service.start()
                self.caches.append(service)
        finally:
            if env_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = env_path
        url = f"http://127.0.0.1:{PORT}/healthz"
        for index in range(count):
            self.pullers[index].send({"op": "wait", "url": url, "timeout": 60})
        for index in range(count):
            if not self.pullers[index].receive().get("ok"):
                raise RuntimeError(
                    f"{self.caches[index].name} not ready: {self.caches[index].log_tail()}"
                )

    def _stop_caches(self) -> tuple[float, list[str]]:
        live = [s for s in self.caches if s.exit_code() is None]
        cpu = sum(process_cpu(s.pid) for s in live)
        self.cache_rss = max((_status_mb("VmHWM", s.pid) for s in live), default=0.0)
        problems = []
        for service in self.caches:
            if service.exit_code() is not None:
                problems.append(f"{service.name} exited with {service.exit_code()}")
            service.stop()
            problems += [
                f"{service.name}: {line[:300]}"
                for line in _log_lines(service.log_path)
                if _LEVEL.search(line) and _EXPECTED not in line
            ]
            shutil.rmtree(self.dir / f"{service.name}-cache", ignore_errors=True)
        self.caches = []
        return cpu, problems

    def detour(
        self, label: str, repeat: int, source: str, fan_out: int | None, warm: bool = False
    ) -> Result:
        """One Detour rollout; ``warm``: node 1 pulls the image first (not timed), so every
        blob's owner holds it, then the other nodes pull (as ``seed``'s distribution)."""
        one = label == ALONE
        count = 1 if one else self.a.nodes
        name = f"r{repeat}-{'one' if one else 'peers'}-{fan_out or 0}{'-warm' if warm else ''}"
        self._start_caches(name, count, source, fan_out, peers=not one)
        base = f"http://127.0.0.1:{PORT}/v2/{DETOUR_NAME}"
        request = {"op": "pull", "base": base, "reference": TAG}
        pulling = list(range(count))
        errors = []
        if warm:
            first = self.tagents[0].call(request)
            if not first.get("ok"):
                errors.append(f"node1 (warming): {first.get('error')}")
            pulling = pulling[1:]
        wan_before = self.settle_wan()
        tx = node_tx(self.site)
        started = time.time()
        for index in pulling:
            self.tagents[index].send(request)
        replies = [self.tagents[index].receive() for index in pulling]
        wan_after = self.settle_wan()
        sent = [b - a for a, b in zip(tx, node_tx(self.site), strict=True)]
        cpu, problems = self._stop_caches()
        ends = [r["end"] for r in replies if r.get("ok")]
        errors += [
            f"node{i + 1}: {r.get('error')}"
            for i, r in zip(pulling, replies, strict=True)
            if not r.get("ok")
        ]
        last = max(ends) if ends else float("nan")
        return Result(
            label=label,
            repeat=repeat,
            wall=last - started,
            total=last - started,
            wan=(wan_after - wan_before) / self.image_bytes,
            upload_max=max(sent) / self.image_bytes,
            cpu=cpu,
            rss=self.cache_rss,
            verified=len(ends),
            pulls=len(pulling),
            per_node=[r["end"] - started if r.get("ok") else None for r in replies],
            errors=errors + problems[:3],
        )

    # --------------------------------------------------------------------- BitTorrent

    def torrent(self, mode: str, repeat: int) -> Result:
        agents = self.tagents
        nodes = len(agents)
        dirs = [str(self.dir / f"{mode}{repeat}-t{i}") for i in range(1, nodes + 1)]
        peers = [[node_address(i), TORRENT_PORT] for i in range(1, nodes + 1)]
        wan_before = self.settle_wan()
        tx = node_tx(self.site)
        started = time.time()
        cpu, rss = 0.0, 0.0
        torrents = self.torrents
        downloading = list(range(nodes))
        if mode != "webseed":  # node 1 fetches, makes the torrents, seeds
            owner = agents[0]
            fetch = {"op": "fetch", "base": MIRROR, "blobs": self.layers, "dir": dirs[0]}
            cpu += owner.checked(fetch)["cpu"]
            made = owner.checked(
                {"op": "make", "dir": dirs[0], "blobs": self.layers, "piece_kib": self.a.piece_kib}
            )
            cpu += made["cpu"]
            torrents = made["torrents"]
            downloading = list(range(1, nodes))
        url = f"{MIRROR}/v2/{MIRROR_REPO}/blobs" if mode == "webseed" else None
        for index, agent in enumerate(agents):
            agent.checked(
                {
                    "op": "start",
                    "listen": f"{node_address(index + 1)}:{TORRENT_PORT}",
                    "peers": [p for j, p in enumerate(peers) if j != index],
                    "dir": dirs[index],
                    "torrents": torrents,
                    "seed": index not in downloading,
                    "url": url,
                    "sequential": mode != "rarest",
                }
            )
        distributing = time.time()
        for index in downloading:
            agents[index].send({"op": "download", "dir": dirs[index], "timeout": self.a.timeout})
        replies = {index: agents[index].receive() for index in downloading}
        ends = [r["end"] for r in replies.values() if r.get("ok")]
        errors = [f"node{i + 1}: {r.get('error')}" for i, r in replies.items() if not r.get("ok")]
        for agent in agents:
            stats = agent.checked({"op": "stats"})
            cpu += stats["cpu"]
            rss = max(rss, stats["rss"])
            agent.checked({"op": "close"})
        wan_after = self.settle_wan()
        sent = [b - a for a, b in zip(tx, node_tx(self.site), strict=True)]
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)
        last = max(ends) if ends else float("nan")
        return Result(
            label=TORRENT_LABELS[mode],
            repeat=repeat,
            wall=last - distributing,
            total=last - started,
            wan=(wan_after - wan_before) / self.image_bytes,
            upload_max=max(sent) / self.image_bytes,
            cpu=cpu,
            rss=rss,
            verified=len(ends),
            pulls=len(downloading),
            per_node=[
                replies[i]["end"] - started if i in replies and replies[i].get("ok") else None
                for i in range(nodes)
            ],
            errors=errors,
        )

    # --------------------------------------------------------------------- runs

    def run(self) -> None:
        extra = "".join(f", {k}: {v}" for k, v in self.a.tree_settings.items())
        for repeat in range(1, self.a.repeat + 1):
            for mode in self.a.modes:
                if mode == "one":
                    runs = [self.detour(ALONE, repeat, self.paths["detour"], None)]
                elif mode == "peers":
                    runs = [self.detour("Detour, peers", repeat, self.paths["detour"], None)]
                elif mode == "tree":
                    runs = [
                        self.detour(
                            f"Detour tree, fan_out {f}{extra}", repeat, self.paths["tree"], f
                        )
                        for f in self.a.fan_out
                    ]
                elif mode == "warm":
                    runs = [
                        self.detour(
                            f"Detour tree, fan_out {f}{extra}, owners warm",
                            repeat,
                            self.paths["tree"],
                            f,
                            warm=True,
                        )
                        for f in self.a.fan_out
                    ]
                else:
                    runs = [self.torrent(mode, repeat)]
                for result in runs:
                    self.results.append(result)
                    log(
                        f"{result.label} #{repeat}: {result.wall:.1f}s "
                        f"(total {result.total:.1f}s), "
                        f"WAN {result.wan:.2f}x, upload max {result.upload_max:.2f}x, "
                        f"CPU {result.cpu:.0f}s, RSS {result.rss:.0f} MB, "
                        f"verified {result.verified}/{result.pulls}"
                    )
                    for line in result.errors:
                        log(f"  ERROR {line}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._stop_caches()
        helpers = [*self.tagents, *self.pullers]
        for helper in helpers:  # all told first, then 5 s for all of them, not 5 s each
            helper.close_input()
        deadline = time.monotonic() + 5
        for helper in helpers:
            helper.stop(max(0.1, deadline - time.monotonic()))
        self.mirror.stop()
        self.site.destroy()


# ------------------------------------------------------------------------------- report


def report(bench: TorrentBench) -> str:
    a = bench.a
    labels = list(dict.fromkeys(r.label for r in bench.results))
    one = [r.wall for r in bench.results if r.label == ALONE]
    base = statistics.median(one) if one else None
    rows = [
        f"| {a.nodes} nodes (median of {a.repeat}) | to the last node, s | total, s "
        "| / one pull | WAN / image | largest upload / image | CPU s | peak RSS, MB | verified |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label in labels:
        runs = [r for r in bench.results if r.label == label]
        wall = statistics.median(r.wall for r in runs)
        total = statistics.median(r.total for r in runs)
        spread = f" ({min(r.total for r in runs):.1f}{DASH}{max(r.total for r in runs):.1f})"
        ratio = f"{total / base:.2f}{TIMES}" if base else ""
        rows.append(
            f"| {label} | {wall:.1f} | {total:.1f}{spread if len(runs) > 1 else ''} | {ratio} "
            f"| {statistics.median(r.wan for r in runs):.2f}{TIMES} "
            f"| {statistics.median(r.upload_max for r in runs):.2f}{TIMES} "
            f"| {statistics.median(r.cpu for r in runs):.0f} "
            f"| {statistics.median(r.rss for r in runs):.0f} "
            f"| {sum(r.verified for r in runs)}/{sum(r.pulls for r in runs)} |"
        )
    header = (
        f"{a.nodes} nodes, each link held to {a.node_mbit:g} Mbit/s both ways, the WAN to "
        f"{a.wan_mbit:g} Mbit/s; a {bench.image_bytes / MB:.0f} MB image ({a.layers} layers of "
        f"{a.layer_mb:g} MB); libtorrent {bench.lt_version}, pieces of "
        f"{a.piece_kib} KiB, sequential download unless said; Detour {a.detour_rev} (one, "
        f"peers) and {a.tree_rev} (tree). Machine: {os.cpu_count()} CPUs."
    )
    return header + "\n\n" + "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=6, help="K (6)")
    parser.add_argument("--wan-mbit", type=float, default=200, help="WAN, Mbit/s (200)")
    parser.add_argument("--node-mbit", type=float, default=100, help="node links, Mbit/s (100)")
    parser.add_argument("--layers", type=int, default=8, help="layers (8)")
    parser.add_argument("--layer-mb", type=float, default=64, help="MB per layer (64)")
    parser.add_argument("--repeat", type=int, default=3, help="rollouts per mode (3)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {','.join(MODES)} (all)")
    parser.add_argument("--fan-out", default="2,4", help="cluster.fan_out of tree (2,4)")
    parser.add_argument(
        "--tree-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a cluster setting more for tree (a JSON value or a string), e.g. "
        "verify_peer_blobs_first=0",
    )
    parser.add_argument("--detour-rev", default="HEAD", help="Detour for one, peers (HEAD)")
    parser.add_argument("--tree-rev", default="HEAD", help="Detour for tree (HEAD)")
    parser.add_argument(
        "--repo", type=Path, default=REPO_ROOT, help="the git tree the revs are of (this one)"
    )
    parser.add_argument("--piece-kib", type=int, default=1024, help="torrent pieces (1024)")
    parser.add_argument("--torrent-python", default=SYSTEM_PYTHON, help="with libtorrent")
    parser.add_argument("--timeout", type=float, default=600, help="per pull, s (600)")
    parser.add_argument("--json", type=Path, help="every run's numbers")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    args.modes = [m for m in MODES if m in args.modes.split(",")]
    args.fan_out = [int(f) for f in args.fan_out.split(",") if f]
    args.tree_settings = {}
    for item in args.tree_setting:
        key, _, value = item.partition("=")
        try:
            args.tree_settings[key] = json.loads(value)
        except ValueError:
            args.tree_settings[key] = value
    return args


def _raise_interrupt(signum: int, _: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("needs root (ip netns, tc)")
        return 2
    probe = subprocess.run(
        [args.torrent_python, "-c", "import libtorrent; print(libtorrent.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        log(f"{args.torrent_python} has no libtorrent: apt-get install python3-libtorrent")
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="detour-torrent-"))
    bench = TorrentBench(args, workdir)
    bench.lt_version = probe.stdout.strip()
    code = 0
    try:
        bench.start()
        bench.run()
        print(report(bench))
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {
                        "image_bytes": bench.image_bytes,
                        "results": [asdict(r) for r in bench.results],
                    },
                    indent=2,
                )
            )
        if any(r.errors or r.verified < r.pulls for r in bench.results):
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
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        sys.exit(agent_main())
    sys.exit(main())
