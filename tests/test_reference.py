"""Reference parsing and normalization: what a pod spec or a /v2/ path names."""

from __future__ import annotations

import pytest

from proxy.errors import DigestInvalid, NameInvalid, TagInvalid
from proxy.reference import (
    Digest,
    ImageName,
    Reference,
    canonical_registry,
    decode_port,
    encode_port,
    parse_json,
)

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nats:2.10.26-alpine", "docker.io/library/nats:2.10.26-alpine"),
        ("nats", "docker.io/library/nats:latest"),
        ("library/postgres:16", "docker.io/library/postgres:16"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("index.docker.io/library/nats:1", "docker.io/library/nats:1"),
        ("registry-1.docker.io/foo/bar", "docker.io/foo/bar:latest"),
        ("ghcr.io/nats-io/nack:0.17.0", "ghcr.io/nats-io/nack:0.17.0"),
        ("registry.local:5000/team/app:v1", "registry.local:5000/team/app:v1"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:7439/docker.io/library/redis:7", "localhost:7439/docker.io/library/redis:7"),
        (f"quay.io/x/y@sha256:{HEX}", f"quay.io/x/y@sha256:{HEX}"),
        (f"quay.io/x/y:1.0@sha256:{HEX}", f"quay.io/x/y:1.0@sha256:{HEX}"),
        ("Quay.IO/x/y:v", "quay.io/x/y:v"),
        ("a__b/c---d/e.f_g:T_a.g-1", "docker.io/a__b/c---d/e.f_g:T_a.g-1"),
    ],
)
def test_image_references_normalize(text: str, expected: str) -> None:
    assert str(Reference.parse(text)) == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", NameInvalid),
        ("UPPER/case", NameInvalid),
        ("nats:", TagInvalid),
        ("nats:-bad", TagInvalid),
        ("nats:" + "t" * 129, TagInvalid),
        ("nats@sha256:short", DigestInvalid),
        (f"nats@md5:{HEX}", DigestInvalid),
        (f"nats@sha256:{HEX.upper()}", DigestInvalid),
        ("../../etc/passwd", NameInvalid),
        ("a//b", NameInvalid),
        ("a/-b", NameInvalid),
        ("x" * 300, NameInvalid),
        ("registry.local:5000/" + "/".join(["abcdefghij"] * 30), NameInvalid),
        ("registry.local:70000/app", NameInvalid),
    ],
)
def test_bad_references_are_refused(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        Reference.parse(text)


@pytest.mark.parametrize(
    ("path_name", "ns", "expected"),
    [
        # path mode, as kuik does it
        ("docker.io/library/nats", None, "docker.io/library/nats"),
        ("nats", None, "docker.io/library/nats"),
        ("bitnami/redis", None, "docker.io/bitnami/redis"),
        ("ghcr.io/nats-io/nack", None, "ghcr.io/nats-io/nack"),
        ("registry.local_5000/team/app", None, "registry.local:5000/team/app"),
        ("registry.local:5000/team/app", None, "registry.local:5000/team/app"),
        ("registry_5000/app", None, "registry:5000/app"),
        ("localhost/app", None, "localhost/app"),
        ("localhost_5000/app", None, "localhost:5000/app"),
        # a host name ending in -<digits> is a host name
        ("registry.team-2/app", None, "registry.team-2/app"),
        ("registry.local-5000/team/app", None, "registry.local-5000/team/app"),
        ("mirror.corp-01/x", None, "mirror.corp-01/x"),
        ("svc.ns-2/app", None, "svc.ns-2/app"),
        # ... except where it can't be one: the older spelling of a port
        ("localhost-5000/app", None, "localhost:5000/app"),
        ("127.0.0.1-5000/x/y", None, "127.0.0.1:5000/x/y"),
        # Docker Hub, whatever the suffix
        ("my-org/app-2", None, "docker.io/my-org/app-2"),
        ("my-org-2/app", None, "docker.io/my-org-2/app"),
        ("app_2", None, "docker.io/library/app_2"),
        # containerd mirror mode
        ("library/nats", "docker.io", "docker.io/library/nats"),
        ("nats", "docker.io", "docker.io/library/nats"),
        ("nats-io/nack", "ghcr.io", "ghcr.io/nats-io/nack"),
        ("team/app", "registry.local:5000", "registry.local:5000/team/app"),
        ("app", "registry.team-2", "registry.team-2/app"),
    ],
)
def test_path_names(path_name: str, ns: str | None, expected: str) -> None:
    assert str(ImageName.from_path(path_name, ns)) == expected


@pytest.mark.parametrize(
    ("path_name", "ns"),
    [
        ("docker.io/../../etc", None),
        ("docker.io/library/..", None),
        ("..%2F..", None),
        ("a/b\x00c", None),
        ("library/nats", "evil/host"),
        ("library/nats", "../x"),
        ("docker.io/", None),
        # ports outside 1-65535, in every spelling
        ("registry.local_70000/app", None),
        ("registry.local:70000/app", None),
        ("localhost-99999/app", None),
        ("127.0.0.1_0/app", None),
        ("registry.local_123456/app", None),
        ("app", "registry.local:70000"),
        ("app", "registry.local:0"),
        ("app", "[::1]:65536"),
    ],
)
def test_hostile_path_names_are_refused(path_name: str, ns: str | None) -> None:
    with pytest.raises(NameInvalid):
        ImageName.from_path(path_name, ns)


@pytest.mark.parametrize(
    ("host", "encoded"),
    [
        ("registry.local:5000", "registry.local_5000"),
        ("localhost:7439", "localhost_7439"),
        ("127.0.0.1:5000", "127.0.0.1_5000"),
        ("registry:5000", "registry_5000"),
        ("registry.team-2:5000", "registry.team-2_5000"),
        ("ghcr.io", "ghcr.io"),
        ("registry.team-2", "registry.team-2"),
        ("mirror.corp-01", "mirror.corp-01"),
        ("svc.ns-2", "svc.ns-2"),
    ],
)
def test_port_encoding_round_trips(host: str, encoded: str) -> None:
    assert encode_port(host) == encoded
    assert decode_port(encoded) == host


@pytest.mark.parametrize(
    ("component", "decoded"),
    [
        # the older -<port>, only where no host name can be meant
        ("localhost-5000", "localhost:5000"),
        ("127.0.0.1-5000", "127.0.0.1:5000"),
        ("10.0.0.1-443", "10.0.0.1:443"),
        # elsewhere a host name
        ("registry.local-5000", "registry.local-5000"),
        ("my-app-2", "my-app-2"),
        ("999.0.0.1-5000", "999.0.0.1-5000"),
        # _<port> only after something that can be a host
        ("my_app_2", "my_app_2"),
        ("_5000", "_5000"),
        ("registry.local_", "registry.local_"),
        ("registry.local_50a", "registry.local_50a"),
    ],
)
def test_port_decoding(component: str, decoded: str) -> None:
    assert decode_port(component) == decoded


@pytest.mark.parametrize(
    "image",
    [
        "registry.team-2/app:v1",
        "mirror.corp-01/x/y:1",
        "svc.ns-2/app",
        "registry.local:5000/team/app:v1",
        "registry.team-2:5000/app",
        "registry:5000/app",
        "localhost:5000/app",
        "localhost/app",
        "127.0.0.1:5000/x/y",
        "nats:2.10",
        "my-org-2/app-2",
        "ghcr.io/nats-io/nack:0.17.0",
    ],
)
def test_path_form_round_trips(image: str) -> None:
    """What the webhook writes (``path_form``) is read back by the proxy as the same name."""
    name = Reference.parse(image).name
    assert ImageName.from_path(name.path_form()) == name


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("registry.local:1", True),
        ("registry.local:65535", True),
        ("registry.local:65536", False),
        ("registry.local:70000", False),
        ("registry.local:0", False),
        ("[::1]:65535", True),
        ("[::1]:65536", False),
        ("registry.local_5000", False),  # path mode's spelling is not a host
    ],
)
def test_registry_ports_are_in_range(host: str, valid: bool) -> None:
    if valid:
        assert canonical_registry(host) == host
    else:
        with pytest.raises(NameInvalid):
            canonical_registry(host)


def test_parse_json_refuses_deep_nesting_as_a_value_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(deep)
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json(('{"a":' * 5_000 + "1" + "}" * 5_000).encode())
    assert parse_json(b'{"a": [[1]]}') == {"a": [[1]]}
    assert parse_json("[" * 100 + "]" * 100) is not None


def test_digest_of_content() -> None:
    digest = Digest.of(b"hello")
    assert str(digest) == (
        "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )
    assert Digest.parse(str(digest)) == digest
