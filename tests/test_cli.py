"""The ``detour`` command's start-up: every configuration or start-up error is one line per
problem, ``detour: <file>:<line>: <key>: ...``, and exit 2, never a traceback; ``--version``;
warnings for ``DETOUR_*`` variables that set nothing; the start-up log line; and
``detour resolve`` naming the owner of a tag among the peers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import proxy.tools.cache_commands
import proxy.upstream.rules
import proxy.webhook
from proxy import __version__
from proxy.cluster.peering import manifest_key, rendezvous, tag_key
from proxy.reference import ImageName
from proxy.tools.cli import main
from tests.proxy import Proxy

REPO_ROOT = Path(__file__).resolve().parent.parent
StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port on 127.0.0.1 that something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def detour(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m proxy ARGS`` with no DETOUR_* variables but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DETOUR_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# Each case: the config file's text (format fields: {tmp}, {port}), DETOUR_* variables, and
# the exact stderr lines expected (format fields: {config}, {tmp}, {port}).
SERVE_ERRORS: dict[str, tuple[str, dict[str, str], list[str]]] = {
    "yaml syntax": (
        "listen: 127.0.0.1:{port}\ncache:\n  dir: {tmp}/cache\n max_size: 1GiB\n",
        {},
        ["detour: {config}:4: expected <block end>, but found '<block mapping start>'"],
    ),
    "a tab": (
        "cache:\n\tdir: {tmp}/cache\n",
        {},
        [
            "detour: {config}:2: found character '\\t' that cannot start any token "
            "(YAML is indented with spaces, not tabs)"
        ],
    ),
    "a top-level list": (
        "- listen: 127.0.0.1:7439\n",
        {},
        ["detour: {config}:1: expected settings (key: value) at the top level, not a list"],
    ),
    "unknown keys": (
        "listen: 127.0.0.1:{port}\ncache:\n  dirr: {tmp}/cache\nredirect: []\n",
        {},
        [
            "detour: {config}:3: cache.dirr: unknown setting; did you mean 'dir'?",
            "detour: {config}:4: redirect: unknown setting; did you mean 'redirects'?",
        ],
    ),
    "a bad value": (
        "cache:\n  dir: {tmp}/cache\n  max_size: lots\n",
        {},
        ["detour: {config}:3: cache.max_size: expected a size such as 20GiB or 500MB"],
    ),
    "bad JSON in the environment": (
        "cache:\n  dir: {tmp}/cache\n",
        {"DETOUR_REDIRECTS": "[{"},
        [
            "detour: environment DETOUR_REDIRECTS: not valid JSON: Expecting property name "
            "enclosed in double quotes: line 1 column 3 (char 2)"
        ],
    ),
    "a variable that sets nothing, then a bad value": (
        "cache:\n  dir: {tmp}/cache\n",
        {"DETOUR_CACHE_DIR": "/data", "DETOUR_CACHE__TAG_TTL": "forever"},
        [
            "detour: warning: environment DETOUR_CACHE_DIR sets no setting; "
            "did you mean DETOUR_CACHE__DIR?",
            "detour: environment DETOUR_CACHE__TAG_TTL: cache.tag_ttl: expected a duration "
            "such as 30s, 5m or 1h",
        ],
    ),
    "the port in use": (
        "listen: 127.0.0.1:{port}\ncache:\n  dir: {tmp}/cache\n",
        {},
        ["detour: cannot listen on 127.0.0.1:{port}: Address already in use"],
    ),
    # Tests run as root, whom permissions don't stop: a path under a regular file does.
    "a cache directory that can't be one": (
        "listen: 127.0.0.1:{port}\ncache:\n  dir: {tmp}/a-file/cache\n",
        {},
        ["detour: cache directory {tmp}/a-file/cache: Not a directory ({tmp}/a-file/cache/blobs)"],
    ),
    "no such config file": (
        "",
        {},
        ["detour: {tmp}/nowhere.yaml: no such file"],
    ),
}


@pytest.mark.parametrize("case", SERVE_ERRORS)
def test_serve_refuses_bad_input_in_one_line_each_with_exit_2(
    case: str, tmp_path: Path, listening: int
) -> None:
    text, env, expected = SERVE_ERRORS[case]
    (tmp_path / "a-file").write_text("not a directory")
    config = tmp_path / "detour.yaml"
    if text:
        config.write_text(text.format(tmp=tmp_path, port=listening))
    else:
        config = tmp_path / "nowhere.yaml"
    done = detour("serve", "--config", str(config), env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        line.format(config=config, tmp=tmp_path, port=listening) for line in expected
    ]


def test_version() -> None:
    done = detour("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"detour {__version__}\n", "")


def test_a_bug_is_not_reported_as_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only configuration errors and bad image references exit 2; any other ValueError is a
    bug in Detour and keeps its traceback."""

    def broken(*_: object, **__: object) -> str:
        raise ValueError("a bug")

    monkeypatch.setattr(proxy.upstream.rules, "describe_resolution", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["resolve", "nats:2.10"])


def test_a_bug_in_resolve_s_path_form_is_not_read_as_an_ipv6_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a rewritten form that is no reference prints "(none: ...)"; another error raises."""

    def broken(*_: object, **__: object) -> str:
        raise ValueError("a bug")

    monkeypatch.setattr(proxy.webhook, "rewrite_image", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["resolve", "nats:2.10"])


@pytest.mark.parametrize(
    "command",
    [["ls"], ["rm", "nats:2.10", "--dir"], ["prune", "--older-than", "30d"]],
    ids=["ls", "rm", "prune"],
)
def test_a_bug_in_a_cache_command_is_not_reported_as_bad_input(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    free_port: Callable[[], int],
) -> None:
    """``detour cache ls|rm|prune`` exit 2 for a bad argument; a ValueError from reading the
    cache (a bug) is not one, and keeps its traceback."""
    (tmp_path / "blobs").mkdir()

    def broken(*_: object, **__: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setenv("DETOUR_LISTEN", f"127.0.0.1:{free_port()}")  # no proxy serves it
    monkeypatch.setattr(proxy.tools.cache_commands, "scan", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["cache", *command, str(tmp_path)])


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["ls", "/nonexistent"], "/nonexistent is not a cache directory"),
        (["ls", "--dir", "/nonexistent"], "/nonexistent is not a cache directory"),
        (["rm", "nats:2.10", "--dir", "/nonexistent"], "/nonexistent is not a cache directory"),
        (["prune", "--older-than", "1d", "--dir", "/nonexistent"], "/nonexistent is not a"),
        (["verify", "--dir", "/nonexistent"], "/nonexistent is not a cache directory"),
        (["ls", "/a", "--dir", "/b"], "give DIR or --dir, not both"),
        (["verify"], "cache verify: name the cache directory: --dir DIR"),
        (["rm", "Nats:2.10"], "invalid repository name"),
        (["rm", "nats:2.10", "--endpoint", "127.0.0.1:7439"], "invalid endpoint"),
        (["prune", "--older-than", "soon", "--endpoint", "http://127.0.0.1:1"], "soon"),
    ],
    ids=[
        "directory",
        "ls-dir",
        "rm-dir",
        "prune-dir",
        "verify-dir",
        "both",
        "verify-no-dir",
        "reference",
        "endpoint",
        "age",
    ],
)
def test_a_cache_command_s_bad_argument_exits_2_in_one_line(
    command: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cache", *command]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("detour: ")
    assert message in line


@pytest.mark.parametrize("command", ["resolve", "webhook", "warm"])
def test_other_commands_warn_of_variables_that_set_nothing(command: str, tmp_path: Path) -> None:
    """Each command that reads the settings; here they stop at a bad file just after."""
    config = tmp_path / "detour.yaml"
    config.write_text("listn: 127.0.0.1:7439\n")
    env = {"DETOUR_WEBHOOK_PREFIX": "x"}
    images = [] if command == "webhook" else ["nats:2.10"]
    done = detour(command, "--config", str(config), *images, env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "detour: warning: environment DETOUR_WEBHOOK_PREFIX sets no setting; "
        "did you mean DETOUR_WEBHOOK__PREFIX?",
        f"detour: {config}:1: listn: unknown setting; did you mean 'listen'?",
    ]


async def test_serve_starts_with_a_line_saying_what_it_serves(
    detour_process: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETOUR_CACHE_DIR", "/data")  # sets nothing: warned of, also in JSON
    cache = tmp_path / "cache"
    proxy = await detour_process(
        {
            "cache": {"dir": str(cache), "max_size": "1GiB"},
            "redirects": [{"src": "docker.io/", "to": "mirror.local/hub/"}],
            "registries": {"registry.internal:5000": {"insecure": True}},
            "cluster": {"peers": ["10.0.1.2:7439", "10.0.1.3:7439"]},
        }
    )
    lines = proxy.log_lines()
    warning = "environment DETOUR_CACHE_DIR sets no setting; did you mean DETOUR_CACHE__DIR?"
    assert f"detour: warning: {warning}" in lines
    records = [json.loads(line) for line in lines if line.startswith("{")]
    ignored = next(r for r in records if r["event"] == "environment_ignored")
    assert (ignored["level"], ignored["problem"]) == ("warning", warning)
    starting = next(r for r in records if r["event"] == "starting")
    assert {k: v for k, v in starting.items() if k not in ("timestamp", "level", "event")} == {
        "version": __version__,
        "listen": proxy.url.removeprefix("http://"),
        "cache_dir": str(cache),
        "cache_max_size": 1024**3,
        "rules": 1,
        "registries": ["docker.io", "mirror.local", "registry.internal:5000"],
        "peers": 2,
        "advertise": None,
    }


# -- detour resolve: the owner of a tag among the peers --------------------------------------

PEERS = ["10.0.1.2:7439", "10.0.1.3:7439", "10.0.1.4:7439"]


def resolve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image: str, cluster: dict[str, Any]
) -> list[str]:
    config = tmp_path / "detour.yaml"
    config.write_text(json.dumps({"cluster": cluster}))  # JSON is YAML
    assert main(["resolve", "--config", str(config), image]) == 0
    return capsys.readouterr().out.splitlines()


def test_resolve_names_the_owner_of_the_tag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("DETOUR_")]:
        monkeypatch.delenv(key)
    nats = ImageName("docker.io", "library/nats")
    owner, following = rendezvous(PEERS, tag_key(nats, "2.10"))[:2]
    lines = resolve(tmp_path, capsys, "nats:2.10", {"peers": PEERS})
    assert lines[3:5] == [
        f"owner:  {owner}  (of this tag; next in line {following})",
        "        each blob and manifest: the peer its digest ranks first of the 3",
    ]
    assert lines[5] == "upstreams, in order:"

    # This instance, when it is the owner.
    lines = resolve(tmp_path, capsys, "nats:2.10", {"peers": PEERS, "advertise": owner})
    assert lines[3] == f"owner:  {owner}  (of this tag; this instance; next in line {following})"

    # By digest: the manifest's owner.
    digest = "sha256:" + "a" * 64
    owner = rendezvous(PEERS, manifest_key(digest))[0]
    lines = resolve(tmp_path, capsys, f"nats@{digest}", {"peers": PEERS})
    assert lines[3].startswith(f"owner:  {owner}  (of this manifest; ")

    # No peers, no owner.
    lines = resolve(tmp_path, capsys, "nats:2.10", {})
    assert not [line for line in lines if line.startswith("owner:")]


def test_resolve_resolves_a_dns_peer_set_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("DETOUR_")]:
        monkeypatch.delenv(key)
    lines = resolve(tmp_path, capsys, "nats:2.10", {"peers": "dns:localhost:7439"})
    assert lines[3].split()[1] in ("127.0.0.1:7439", "[::1]:7439")
    lines = resolve(tmp_path, capsys, "nats:2.10", {"peers": "dns:detour-peers.invalid:7439"})
    assert lines[3] == "owner:  (dns:detour-peers.invalid:7439 not resolved here)"


def test_the_webhook_with_its_port_in_use_is_one_line_with_exit_2(
    tmp_path: Path, listening: int
) -> None:
    pki = tmp_path / "tls"
    made = detour("webhook-certs", "--out", str(pki))
    assert made.returncode == 0, made.stderr
    config = tmp_path / "detour.yaml"
    config.write_text(
        f"webhook:\n  listen: 127.0.0.1:{listening}\n"
        f"  tls_cert: {pki}/tls.crt\n  tls_key: {pki}/tls.key\n  namespace: detour\n"
    )
    done = detour("webhook", "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"detour: cannot listen on 127.0.0.1:{listening}: Address already in use"
    ]


def test_cache_ls_with_no_cache_here_says_how_to_name_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``detour cache ls`` on a machine whose cache.dir holds no cache (the proxy runs in a pod,
    or elsewhere): one line naming --dir and --endpoint."""
    monkeypatch.setenv("DETOUR_CACHE__DIR", "/nonexistent")
    assert main(["cache", "ls"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "detour: /nonexistent (cache.dir) is not a cache directory (no blobs/ or manifests/); "
        "name one with --dir DIR, or ask the running proxy: --endpoint http://127.0.0.1:7439"
    ]
