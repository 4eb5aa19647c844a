"""``detour containerd-hosts``: the hosts.toml text, the writer, the command, and a real
containerd pulling through a running ``detour serve`` with nothing but the generated file."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import main
from proxy.hosts import (
    HEADER,
    HostsFile,
    check_endpoint,
    hosts_files,
    hosts_toml,
    write_hosts_files,
)
from proxy.settings import Settings
from tests.containerd import Containerd
from tests.images import push_image, unique_repo
from tests.proxy import Proxy, free_port, parse_metrics
from tests.registry import Registry

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


def settings(redirects: list[dict[str, Any]], **extra: Any) -> Settings:
    return Settings.model_validate({"redirects": redirects, **extra})


# -- the text ----------------------------------------------------------------------------------


def test_hosts_toml_text_for_docker_hub() -> None:
    text = hosts_toml("https://registry-1.docker.io", "http://127.0.0.1:7439")
    assert text == (
        HEADER + 'server = "https://registry-1.docker.io"\n'
        "\n"
        '[host."http://127.0.0.1:7439"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


@pytest.mark.parametrize(
    ("redirects", "registries", "expected"),
    [
        # Docker Hub's directory is docker.io, its API host registry-1.docker.io.
        (
            [{"src": "docker.io/", "to": "mirror.local/hub/"}],
            {},
            [("docker.io", "https://registry-1.docker.io")],
        ),
        # Aliases and deeper prefixes of one registry make one file.
        (
            [
                {"src": "docker.io/library/", "to": "mirror.local/lib/"},
                {"src": "index.docker.io/bitnami", "to": "mirror.local/bitnami/"},
                {"src": "Registry-1.Docker.io/", "to": "mirror.local/hub/"},
            ],
            {},
            [("docker.io", "https://registry-1.docker.io")],
        ),
        # Sorted by registry; a port stays in the directory name, as containerd looks it up.
        (
            [
                {"src": "registry.local:5000/team/", "to": "mirror.local/team/"},
                {"src": "ghcr.io/", "to": ["m1.local/ghcr/", "m2.local/ghcr/"]},
                {"src": "quay.io/", "to": "mirror.local/quay/", "fallback_to_origin": True},
            ],
            {},
            [
                ("ghcr.io", "https://ghcr.io"),
                ("quay.io", "https://quay.io"),
                ("registry.local:5000", "https://registry.local:5000"),
            ],
        ),
        # An origin the settings mark insecure is reached over plain HTTP.
        (
            [{"src": "registry.local:5000/", "to": "mirror.local/x/"}],
            {"registry.local:5000": {"insecure": True}},
            [("registry.local:5000", "http://registry.local:5000")],
        ),
        # Insecure mirrors say nothing about the origin.
        (
            [{"src": "ghcr.io/", "to": "mirror.local:5000/ghcr/"}],
            {"mirror.local:5000": {"insecure": True}},
            [("ghcr.io", "https://ghcr.io")],
        ),
        # No rules, no files.
        ([], {}, []),
    ],
)
def test_one_file_per_redirected_registry(
    redirects: list[dict[str, Any]],
    registries: dict[str, Any],
    expected: list[tuple[str, str]],
) -> None:
    files = hosts_files(settings(redirects, registries=registries), "http://127.0.0.1:7439")
    assert [(f.registry, f.server) for f in files] == expected
    for f in files:
        parsed = tomllib.loads(f.text)
        assert parsed == {
            "server": f.server,
            "host": {"http://127.0.0.1:7439": {"capabilities": ["pull", "resolve"]}},
        }


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://127.0.0.1:7439", "http://127.0.0.1:7439"),
        ("http://127.0.0.1:7439/", "http://127.0.0.1:7439"),
        ("  https://detour.local  ", "https://detour.local"),
        ("http://[::1]:7439", "http://[::1]:7439"),
    ],
)
def test_endpoint_accepted(endpoint: str, expected: str) -> None:
    assert check_endpoint(endpoint) == expected


@pytest.mark.parametrize(
    "endpoint",
    [
        "127.0.0.1:7439",  # no scheme: containerd would not know how to talk to it
        "ftp://127.0.0.1:7439",
        "http://127.0.0.1:7439/v2",  # containerd appends /v2 itself
        "http://127.0.0.1:7439?x=1",
        "http://user:pw@127.0.0.1:7439",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:port",
        "http://",
    ],
)
def test_endpoint_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        check_endpoint(endpoint)


# -- the writer and the command -----------------------------------------------------------------


def test_writer_writes_once_and_leaves_no_temp_files(tmp_path: Path) -> None:
    files = hosts_files(
        settings(
            [{"src": "docker.io/", "to": "m.local/hub/"}, {"src": "ghcr.io/", "to": "m.local/g/"}]
        ),
        "http://127.0.0.1:7439",
    )
    out = tmp_path / "certs.d"
    first = write_hosts_files(files, out)
    assert first == [
        (out / "docker.io" / "hosts.toml", True),
        (out / "ghcr.io" / "hosts.toml", True),
    ]
    for f, (path, _) in zip(files, first, strict=True):
        assert path.read_text() == f.text
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    mtime = first[0][0].stat().st_mtime_ns
    assert write_hosts_files(files, out) == [(p, False) for p, _ in first]
    assert first[0][0].stat().st_mtime_ns == mtime  # untouched: containerd sees no change
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["hosts.toml", "hosts.toml"]


def test_writer_replaces_a_different_file(tmp_path: Path) -> None:
    path = tmp_path / "docker.io" / "hosts.toml"
    path.parent.mkdir()
    path.write_text('server = "https://registry-1.docker.io"\n')
    hosts = HostsFile(
        "docker.io",
        "https://registry-1.docker.io",
        "http://127.0.0.1:7439",
        hosts_toml("https://registry-1.docker.io", "http://127.0.0.1:7439"),
    )
    assert write_hosts_files([hosts], tmp_path) == [(path, True)]
    assert path.read_text() == hosts.text
    assert os.listdir(path.parent) == ["hosts.toml"]


def _config(tmp_path: Path, redirects: list[dict[str, Any]]) -> Path:
    path = tmp_path / "detour.yaml"
    path.write_text(yaml.safe_dump({"redirects": redirects}))
    return path


def test_command_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, [{"src": "docker.io/", "to": "m.local/hub/"}])
    out = tmp_path / "certs.d"
    argv = ["containerd-hosts", "--config", str(config), "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out == (
        f"wrote {out}/docker.io/hosts.toml: docker.io -> http://127.0.0.1:7439, "
        "then https://registry-1.docker.io\n"
    )
    assert main([*argv, "--endpoint", "http://127.0.0.1:7439"]) == 0
    assert capsys.readouterr().out.startswith(f"unchanged {out}/docker.io/hosts.toml")


def test_command_without_rules_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs.d"
    assert main(["containerd-hosts", "-c", str(_config(tmp_path, [])), "--out", str(out)]) == 0
    assert "no redirect rules" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("endpoint", "out", "message"),
    [
        ("127.0.0.1:7439", "certs.d", "endpoint '127.0.0.1:7439'"),
        ("http://127.0.0.1:7439", "detour.yaml/certs.d", "cannot write into"),
    ],
)
def test_command_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], endpoint: str, out: str, message: str
) -> None:
    config = _config(tmp_path, [{"src": "docker.io/", "to": "m.local/hub/"}])
    code = main(
        [
            "containerd-hosts",
            "-c",
            str(config),
            "--endpoint",
            endpoint,
            "--out",
            str(tmp_path / out),
        ]
    )
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert message in err
    assert "Traceback" not in err


# -- a real containerd, through a real proxy ---------------------------------------------------


async def test_containerd_pulls_through_the_proxy_with_the_generated_hosts_toml(
    registry: Registry,
    containerd: Containerd,
    detour_process: StartProxy,
    tmp_path: Path,
) -> None:
    """The mirror holds docker-mirror/library/<name>; containerd asks for
    docker.io/library/<name> with only the generated hosts.toml, whose ``server`` is rewritten to
    a dead local port: only the proxy can answer. A second pull after the image is deleted
    comes from the proxy's cache, without the mirror."""
    repo = unique_repo("docker-mirror/library")
    name = repo.rsplit("/", 1)[1]
    image = push_image(registry, repo, "1.0", layers=2)
    proxy = await detour_process(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [{"src": "docker.io/", "to": f"{registry.host}/docker-mirror/"}],
            "registries": {registry.host: {"insecure": True}},
        }
    )
    config = tmp_path / "detour.yaml"
    config.write_text(
        yaml.safe_dump({"redirects": [{"src": "docker.io/", "to": "mirror.invalid/x/"}]})
    )
    hosts_dir = tmp_path / "certs.d"
    argv = ["containerd-hosts", "-c", str(config), "--endpoint", proxy.url, "--out", str(hosts_dir)]
    assert main(argv) == 0
    hosts = hosts_dir / "docker.io" / "hosts.toml"
    generated = hosts.read_text()
    assert 'server = "https://registry-1.docker.io"' in generated
    dead = f"http://127.0.0.1:{free_port()}"
    hosts.write_text(generated.replace("https://registry-1.docker.io", dead))

    ref = f"docker.io/library/{name}:1.0"
    mark = registry.mark()
    (await containerd.pull(ref, hosts_dir=hosts_dir)).check()
    assert await containerd.image_digest(ref) == image.digest
    assert await containerd.image_status(ref) == ("complete (3/3)", True)
    paths = await registry.wait_paths(mark, at_least=3)
    assert all(p.startswith(f"/v2/{repo}/") for p in paths), paths

    async with proxy.session.get(f"{proxy.url}/metrics") as response:
        metrics = parse_metrics(await response.text())
    assert metrics[("detour_cache_requests_total", (("kind", "blob"), ("result", "miss")))] >= 3
    upstream_ok = (("registry", registry.host), ("status", "200"))
    assert metrics[("detour_upstream_requests_total", upstream_ok)] >= 3

    # Another node, or this one after image GC: the blobs come from the proxy's disk.
    (await containerd.remove_image(ref)).check()
    mark = registry.mark()
    hits_before = await proxy.metric("detour_cache_requests_total", kind="blob", result="hit")
    (await containerd.pull(ref, hosts_dir=hosts_dir)).check()
    assert await containerd.image_digest(ref) == image.digest
    hits = await proxy.metric("detour_cache_requests_total", kind="blob", result="hit")
    assert hits - hits_before >= 3
    assert not [p for p in await registry.wait_paths(mark) if "/blobs/" in p]


async def test_containerd_falls_back_to_server_when_the_proxy_is_down(
    registry: Registry, containerd: Containerd, tmp_path: Path
) -> None:
    """What a node sees before its proxy is ready: the generated file's endpoint refuses
    connections, and containerd pulls from ``server`` instead."""
    repo = unique_repo("library")
    image = push_image(registry, repo, "1.0", layers=1)
    config = tmp_path / "detour.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "redirects": [{"src": f"{registry.host}/", "to": "mirror.invalid/x/"}],
                "registries": {registry.host: {"insecure": True}},
            }
        )
    )
    hosts_dir = tmp_path / "certs.d"
    dead = f"http://127.0.0.1:{free_port()}"
    assert (
        main(["containerd-hosts", "-c", str(config), "--endpoint", dead, "--out", str(hosts_dir)])
        == 0
    )
    text = (hosts_dir / registry.host / "hosts.toml").read_text()
    assert re.search(rf'^server = "http://{re.escape(registry.host)}"$', text, re.MULTILINE)

    ref = f"{registry.host}/{repo}:1.0"
    (await containerd.pull(ref, hosts_dir=hosts_dir)).check()
    assert await containerd.image_digest(ref) == image.digest
