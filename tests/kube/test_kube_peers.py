"""The proxies' peer set in the cluster's DNS form: ``dns:detour-peers.<namespace>.svc:7439``.

The headless Service ``detour-peers`` selects the DaemonSet's pods; its EndpointSlice (made by
the real controller-manager) lists the ready ones' pod IPs, which is what the cluster's DNS
answers for ``detour-peers.<namespace>.svc.cluster.local``. There is no CoreDNS among the
binaries here, so the node's name server (``tests.dns_server``, the kubelet's ``clusterDNS``)
is given those records from the EndpointSlice, as CoreDNS's kubernetes plugin would serve them.
What is real: the Service and its EndpointSlice, the pod's resolv.conf (search path, ndots)
written by the kubelet, and Detour resolving its ``DETOUR_CLUSTER__PEERS`` through it and
finding itself (its ``advertise``, the pod IP) a member. With one node the set has one proxy.
"""

from __future__ import annotations

import json

from tests.kube.cluster import CLUSTER_DOMAIN, Cluster, wait_for
from tests.kube.detour import NAMESPACE, Deployed
from tests.kube.pods import ready_endpoints

PROXY = "app.kubernetes.io/component=proxy"


def _peer_sets(cluster: Cluster) -> list[list[str]]:
    """Every peer set the running proxy logged (``peers_changed``), in order."""
    log = cluster.kubectl("-n", NAMESPACE, "logs", "daemonset/detour-proxy", "-c", "proxy")
    sets = []
    for line in log.stdout.splitlines():
        if '"peers_changed"' in line:
            sets.append(json.loads(line)["peers"])
    return sets


def test_the_peers_service_resolves_to_the_daemonset_pod_ips(
    cluster: Cluster, detour: Deployed
) -> None:
    proxies = cluster.get("pods", "-n", NAMESPACE, "-l", PROXY)["items"]
    pod_ips = sorted(p["status"]["podIP"] for p in proxies)
    assert len(pod_ips) == 1  # one node, one proxy

    # Only ready pods, and every one of them (publishNotReadyAddresses: false).
    wait_for(
        "the peers' EndpointSlice",
        lambda: ready_endpoints(cluster, NAMESPACE, "detour-peers") == pod_ips,
        60,
    )
    name = f"detour-peers.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"
    cluster.set_dns({name: ready_endpoints(cluster, NAMESPACE, "detour-peers")})
    try:
        # The proxy resolves its peers every cluster.refresh (10s in the DaemonSet).
        wait_for(
            "the proxy's peer set",
            lambda: [f"{ip}:7439" for ip in pod_ips] in _peer_sets(cluster),
            60,
            interval=1,
        )
    finally:
        cluster.set_dns({})
