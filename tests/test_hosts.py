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

from proxy.settings import Settings
from proxy.tools.cli import main
from proxy.tools.hosts import (
    APPEND_BEGIN,
    APPEND_END,
    HEADER,
    MARKER,
    FileResult,
    HostsFile,
    Mode,
    append_host,
    check_endpoint,
    hosts_files,
    hosts_toml,
    remove_hosts_files,
    strip_host,
    write_hosts_files,
)
from tests.containerd import Containerd
from tests.images import push_image, unique_repo
from tests.proxy import Proxy, parse_metrics
from tests.registry import Registry
from tests.support import free_port

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
        # A registry the settings say how to reach is one whose pulls Detour caches ...
        (
            [],
            {"registry.internal:5000": {"insecure": True}, "Quay.io": {}},
            [
                ("quay.io", "https://quay.io"),
                ("registry.internal:5000", "http://registry.internal:5000"),
            ],
        ),
        # ... unless it is only a rule's mirror: Detour's upstream, not an origin to redirect.
        (
            [{"src": "docker.io/", "to": "mirror.local:5000/hub/"}],
            {"mirror.local:5000": {"insecure": True}, "registry.internal": {}},
            [
                ("docker.io", "https://registry-1.docker.io"),
                ("registry.internal", "https://registry.internal"),
            ],
        ),
        # A mirror that is also a rule's src is redirected as a src.
        (
            [
                {"src": "ghcr.io/", "to": "mirror.local/ghcr/"},
                {"src": "mirror.local/old/", "to": "mirror2.local/old/"},
            ],
            {"mirror.local": {}},
            [("ghcr.io", "https://ghcr.io"), ("mirror.local", "https://mirror.local")],
        ),
        # No rules and no registries, no files.
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
    paths = [out / "docker.io" / "hosts.toml", out / "ghcr.io" / "hosts.toml"]
    assert first == [FileResult(path, "wrote") for path in paths]
    for f, path in zip(files, paths, strict=True):
        assert path.read_text() == f.text
        assert path.read_text().startswith(MARKER)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    mtime = paths[0].stat().st_mtime_ns
    assert write_hosts_files(files, out) == [FileResult(path, "unchanged") for path in paths]
    assert paths[0].stat().st_mtime_ns == mtime  # untouched: containerd sees no change
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["hosts.toml", "hosts.toml"]


DOCKER_HUB = HostsFile(
    "docker.io",
    "https://registry-1.docker.io",
    "http://127.0.0.1:7439",
    hosts_toml("https://registry-1.docker.io", "http://127.0.0.1:7439"),
)
NODES_OWN = (
    'server = "https://registry-1.docker.io"\n'
    "\n"
    "# the site's pull-through cache\n"
    '[host."https://cache.site.example"]\n'
    '  capabilities = ["pull", "resolve"]\n'
    '  ca = "/etc/containerd/certs.d/docker.io/site-ca.crt"\n'
)


def test_writer_keeps_a_file_it_did_not_write_unless_told(tmp_path: Path) -> None:
    path = tmp_path / "docker.io" / "hosts.toml"
    path.parent.mkdir()
    path.write_text(NODES_OWN)
    path.chmod(0o600)
    kept = write_hosts_files([DOCKER_HUB], tmp_path)
    assert kept == [FileResult(path, "kept", "not written by Detour")]
    assert path.read_text() == NODES_OWN

    assert write_hosts_files([DOCKER_HUB], tmp_path, Mode.APPEND) == [FileResult(path, "appended")]
    appended = path.read_text()
    assert appended == append_host(NODES_OWN, DOCKER_HUB.endpoint)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the node's file keeps its mode
    assert write_hosts_files([DOCKER_HUB], tmp_path, Mode.APPEND) == [FileResult(path, "unchanged")]

    assert write_hosts_files([DOCKER_HUB], tmp_path, Mode.OVERWRITE) == [
        FileResult(path, "replaced")
    ]
    assert path.read_text() == DOCKER_HUB.text
    assert os.listdir(path.parent) == ["hosts.toml"]


def test_writer_rewrites_its_own_older_file(tmp_path: Path) -> None:
    """A file of an earlier version, or for another endpoint: Detour's, so rewritten."""
    path = tmp_path / "docker.io" / "hosts.toml"
    path.parent.mkdir()
    older = "# Written by `detour containerd-hosts`; edits are overwritten on the next run.\n"
    path.write_text(older + 'server = "https://registry-1.docker.io"\n')
    assert write_hosts_files([DOCKER_HUB], tmp_path) == [FileResult(path, "wrote")]
    assert path.read_text() == DOCKER_HUB.text


# -- --append and --remove ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        NODES_OWN,
        'server = "https://registry-1.docker.io"\n',  # no hosts of its own
        'server = "https://registry-1.docker.io"',  # no newline at the end
        "",  # an empty file: containerd's defaults
        # several hosts, a [header] table, and a comment on top
        "# managed by hand\n"
        'server = "https://registry-1.docker.io"\n'
        "skip_verify = false\n"
        "\n"
        "[header]\n"
        '  x-site = "edge-1"\n'
        "\n"
        '[host."https://a.example"]\n'
        '  capabilities = ["pull"]\n'
        '[host."https://b.example"]\n'
        '  capabilities = ["pull", "resolve"]\n',
    ],
)
def test_append_puts_detour_first_and_keeps_the_rest(text: str) -> None:
    endpoint = "http://127.0.0.1:7439"
    appended = append_host(text, endpoint)
    before, after = tomllib.loads(text), tomllib.loads(appended)
    assert next(iter(after["host"])) == endpoint  # containerd tries hosts in file order
    assert after["host"][endpoint] == {"capabilities": ["pull", "resolve"]}
    rest = {k: v for k, v in after["host"].items() if k != endpoint}
    assert {**after, "host": rest} == {**before, "host": before.get("host", {})}
    assert APPEND_BEGIN in appended
    assert APPEND_END in appended
    assert append_host(appended, endpoint) == appended
    # Another endpoint replaces Detour's block; it is never there twice.
    moved = append_host(appended, "http://127.0.0.1:7440")
    assert moved.count(APPEND_BEGIN) == 1
    assert next(iter(tomllib.loads(moved)["host"])) == "http://127.0.0.1:7440"
    assert endpoint not in tomllib.loads(moved)["host"]
    # Taking it out gives back the file as it was, byte for byte (but a missing last newline).
    assert strip_host(appended) == (text if text.endswith("\n") or not text else text + "\n")
    assert strip_host(text) == text


def test_append_leaves_a_file_that_already_lists_the_endpoint() -> None:
    text = 'server = "https://registry-1.docker.io"\n\n[host."http://127.0.0.1:7439"]\n'
    assert append_host(text, "http://127.0.0.1:7439/") == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = \n", "not valid TOML"),
        # hosts as an inline table: a [host."..."] table can't be added to it
        ('host = { "https://a.example" = { capabilities = ["pull"] } }\n', "table of its own"),
    ],
)
def test_append_refuses_what_it_cannot_add_to_safely(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        append_host(text, "http://127.0.0.1:7439")


def test_remove_undoes_write_and_append_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "certs.d"
    ours = out / "docker.io" / "hosts.toml"
    appended = out / "ghcr.io" / "hosts.toml"
    beside = out / "quay.io" / "hosts.toml"  # a file of the node's, never touched
    for path, text in ((appended, NODES_OWN), (beside, NODES_OWN)):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    (out / "ghcr.io" / "ca.crt").write_text("certificate")
    files = [
        DOCKER_HUB,
        HostsFile("ghcr.io", "https://ghcr.io", DOCKER_HUB.endpoint, "unused"),
    ]
    assert [o.action for o in write_hosts_files(files, out, Mode.APPEND)] == ["wrote", "appended"]
    assert remove_hosts_files(out) == [
        FileResult(ours, "removed"),
        FileResult(appended, "restored"),
    ]
    assert not ours.parent.exists()  # the directory Detour made for it is gone too
    assert appended.read_text() == NODES_OWN
    assert (out / "ghcr.io" / "ca.crt").exists()
    assert beside.read_text() == NODES_OWN
    assert remove_hosts_files(out) == []
    assert remove_hosts_files(tmp_path / "nowhere") == []


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


def test_command_without_rules_or_registries_says_so_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The containerd-mirror overlay with the base's ``redirects: []`` would otherwise send
    nothing to Detour, silently."""
    out = tmp_path / "certs.d"
    config = _config(tmp_path, [])
    assert main(["containerd-hosts", "-c", str(config), "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"detour: {config}: no redirect rules and no registries, so no registry for containerd "
        "to send to Detour: no hosts.toml written\n"
    )
    assert not out.exists()


def test_command_keeps_appends_overwrites_and_removes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(
        tmp_path,
        [{"src": "docker.io/", "to": "m.local/hub/"}, {"src": "ghcr.io/", "to": "m.local/g/"}],
    )
    out = tmp_path / "certs.d"
    nodes = out / "docker.io" / "hosts.toml"
    nodes.parent.mkdir(parents=True)
    nodes.write_text(NODES_OWN)
    argv = ["containerd-hosts", "-c", str(config), "--out", str(out)]

    assert main(argv) == 1  # the node's file is kept, and that is said
    captured = capsys.readouterr()
    assert captured.err == (
        f"detour: kept {nodes}: not written by Detour; --append adds Detour to it, "
        "--overwrite replaces it\n"
    )
    assert captured.out.startswith(f"wrote {out}/ghcr.io/hosts.toml")
    assert nodes.read_text() == NODES_OWN

    assert main([*argv, "--append"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"appended {nodes}: docker.io -> http://127.0.0.1:7439, then https://registry-1.docker.io",
        f"unchanged {out}/ghcr.io/hosts.toml: ghcr.io -> http://127.0.0.1:7439, "
        "then https://ghcr.io",
    ]
    assert list(tomllib.loads(nodes.read_text())["host"]) == [
        "http://127.0.0.1:7439",
        "https://cache.site.example",
    ]

    assert main(["containerd-hosts", "--remove", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"restored {nodes}",
        f"removed {out}/ghcr.io/hosts.toml",
    ]
    assert nodes.read_text() == NODES_OWN
    assert sorted(p.name for p in out.iterdir()) == ["docker.io"]

    assert main([*argv, "--overwrite"]) == 0
    assert capsys.readouterr().out.startswith(f"replaced {nodes}")
    assert nodes.read_text().startswith(MARKER)

    with pytest.raises(SystemExit):
        main([*argv, "--append", "--overwrite"])
    assert "not allowed with" in capsys.readouterr().err


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


async def test_containerd_pulls_through_detour_appended_to_the_nodes_own_file(
    registry: Registry,
    containerd: Containerd,
    detour_process: StartProxy,
    tmp_path: Path,
) -> None:
    """The node has a docker.io/hosts.toml of its own (its server and a host of its own, both
    dead here). ``--append`` puts Detour in front and keeps them; containerd pulls through
    Detour with that file; ``--remove`` gives the node its file back as it was."""
    repo = unique_repo("docker-mirror/library")
    name = repo.rsplit("/", 1)[1]
    image = push_image(registry, repo, "1.0", layers=1)
    proxy = await detour_process(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "redirects": [{"src": "docker.io/", "to": f"{registry.host}/docker-mirror/"}],
            "registries": {registry.host: {"insecure": True}},
        }
    )
    hosts_dir = tmp_path / "certs.d"
    nodes_file = hosts_dir / "docker.io" / "hosts.toml"
    nodes_file.parent.mkdir(parents=True)
    dead_server, dead_host = f"http://127.0.0.1:{free_port()}", "http://127.0.0.2:9"
    own = (
        f'server = "{dead_server}"\n\n[host."{dead_host}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    nodes_file.write_text(own)
    config = _config(tmp_path, [{"src": "docker.io/", "to": "mirror.invalid/x/"}])
    argv = ["containerd-hosts", "-c", str(config), "--endpoint", proxy.url, "--out", str(hosts_dir)]
    assert main(argv) == 1  # kept: not Detour's
    assert nodes_file.read_text() == own
    assert main([*argv, "--append"]) == 0
    parsed = tomllib.loads(nodes_file.read_text())
    assert parsed["server"] == dead_server
    assert list(parsed["host"]) == [proxy.url, dead_host]

    ref = f"docker.io/library/{name}:1.0"
    mark = registry.mark()
    (await containerd.pull(ref, hosts_dir=hosts_dir)).check()
    assert await containerd.image_digest(ref) == image.digest
    paths = await registry.wait_paths(mark, at_least=2)
    assert all(p.startswith(f"/v2/{repo}/") for p in paths), paths
    assert await proxy.metric("detour_cache_requests_total", kind="blob", result="miss") >= 2

    assert main(["containerd-hosts", "--remove", "--out", str(hosts_dir)]) == 0
    assert nodes_file.read_text() == own


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
