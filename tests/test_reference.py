"""Reference parsing and normalization: what a pod spec or a /v2/ path names."""

from __future__ import annotations

import pytest

from proxy.errors import DigestInvalid, NameInvalid, TagInvalid
from proxy.reference import Digest, ImageName, Reference, decode_port, encode_port

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
        ("registry.local-5000/team/app", None, "registry.local:5000/team/app"),
        ("registry.local:5000/team/app", None, "registry.local:5000/team/app"),
        ("localhost-5000/app", None, "localhost:5000/app"),
        ("localhost/app", None, "localhost/app"),
        ("127.0.0.1-5000/x/y", None, "127.0.0.1:5000/x/y"),
        ("my-org/app-2", None, "docker.io/my-org/app-2"),
        # containerd mirror mode
        ("library/nats", "docker.io", "docker.io/library/nats"),
        ("nats", "docker.io", "docker.io/library/nats"),
        ("nats-io/nack", "ghcr.io", "ghcr.io/nats-io/nack"),
        ("team/app", "registry.local:5000", "registry.local:5000/team/app"),
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
    ],
)
def test_hostile_path_names_are_refused(path_name: str, ns: str | None) -> None:
    with pytest.raises(NameInvalid):
        ImageName.from_path(path_name, ns)


@pytest.mark.parametrize(
    ("host", "encoded"),
    [
        ("registry.local:5000", "registry.local-5000"),
        ("localhost:7439", "localhost-7439"),
        ("ghcr.io", "ghcr.io"),
        ("127.0.0.1:5000", "127.0.0.1-5000"),
    ],
)
def test_port_encoding_round_trips(host: str, encoded: str) -> None:
    assert encode_port(host) == encoded
    assert decode_port(encoded) == host


def test_port_suffix_only_decoded_on_registry_like_hosts() -> None:
    assert decode_port("my-app-2") == "my-app-2"


def test_digest_of_content() -> None:
    digest = Digest.of(b"hello")
    assert str(digest) == (
        "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )
    assert Digest.parse(str(digest)) == digest
