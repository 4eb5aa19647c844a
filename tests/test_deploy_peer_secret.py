"""The peers' shared secret as deploy/kubernetes mounts it: in every layout, every workload
whose pods are peers (the proxies, or the hub pods and their clients) finds the same Secret
where its settings' cluster.secret_dir points, read-only, and optional, so an install without
it still starts (and says so: docs/security.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.settings import load_settings
from tests.kustomize import COMBINATIONS, OVERLAYS, embedded_config, pod_env, pod_spec

SECRET = "detour-peer-secret"


@pytest.mark.parametrize("variant", ["default", *OVERLAYS, "all-components", *COMBINATIONS])
def test_every_peer_reads_the_same_secret(
    renders: dict[str, list[dict[str, Any]]],
    variant: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = renders[variant]
    peered = [
        o
        for o in objects
        if o["kind"] in ("DaemonSet", "StatefulSet") and "DETOUR_CLUSTER__PEERS" in pod_env(o)
    ]
    if variant in ("default", "hub", "base+hub"):
        assert len(peered) == (2 if "hub" in variant else 1)
    for workload in peered:
        with monkeypatch.context() as env:
            for name, value in pod_env(workload).items():
                if name.startswith("DETOUR_"):
                    env.setenv(name, value)
            settings = load_settings(embedded_config(objects, tmp_path))
        assert settings.cluster.secret_dir is not None
        spec = pod_spec([workload], workload["kind"])
        (mount,) = [
            m
            for m in spec["containers"][0]["volumeMounts"]
            if m["mountPath"] == str(settings.cluster.secret_dir)
        ]
        assert mount["readOnly"] is True
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"] == {"secretName": SECRET, "optional": True}
