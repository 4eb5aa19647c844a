"""``detour webhook-certs``: the files it writes and the names it refuses, and a real
``detour webhook`` serving the pair, verified as the API server verifies it (the caBundle only,
under every Service name).
"""

from __future__ import annotations

import base64
import socket
import ssl
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.tools.cli import main
from proxy.webhook.certs import generate, service_names, write
from tests.support import Daemon, free_port, listening


def test_webhook_certs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    argv = ["webhook-certs", "--namespace", "detour", "--service", "detour-webhook"]
    assert main([*argv, "--out", str(out)]) == 0
    bundle = capsys.readouterr().out.strip()
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert base64.b64decode(bundle) == (out / "ca.crt").read_bytes()
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "detour-webhook",
        "detour-webhook.detour",
        "detour-webhook.detour.svc",
        "detour-webhook.detour.svc.cluster.local",
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 365 <= days <= 366

    # Bad names are refused in one line.
    assert main([*argv[:1], "--namespace", "Not_A_Label", "--out", str(out)]) == 2
    assert "not a DNS label" in capsys.readouterr().err


def test_webhook_certs_ip_adds_ip_sans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert main(["webhook-certs", "--out", str(out), "--ip", "127.0.0.1", "--ip", "fd00::5"]) == 0
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "fd00::5"]
    assert len(sans.get_values_for_type(x509.DNSName)) == 4  # the Service's names still
    capsys.readouterr()
    assert main(["webhook-certs", "--out", str(out), "--ip", "localhost"]) == 2
    assert "not an IP address" in capsys.readouterr().err


@pytest.fixture
def webhook_process(tmp_path: Path) -> Iterator[Callable[[Path], tuple[int, Path]]]:
    daemons: list[Daemon] = []

    def start(certs: Path) -> tuple[int, Path]:
        port = free_port()
        config = tmp_path / "webhook.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "webhook": {
                        "listen": f"127.0.0.1:{port}",
                        "tls_cert": str(certs / "tls.crt"),
                        "tls_key": str(certs / "tls.key"),
                    }
                }
            )
        )
        log = tmp_path / "webhook.log"
        daemon = Daemon(
            "detour webhook",
            [sys.executable, "-m", "proxy", "webhook", "--config", str(config)],
            log,
            grace=10,
            fresh_log=True,
            own_session=False,
            interval=0.05,
        )
        daemons.append(daemon)

        daemon.start(lambda: listening("127.0.0.1", port), 20)
        return port, log

    yield start
    for daemon in daemons:
        daemon.stop()


def https_get(port: int, ca: Path, server_name: str, path: str) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_api_server_can_verify_the_webhook(
    tmp_path: Path, webhook_process: Callable[[Path], tuple[int, Path]]
) -> None:
    """``detour webhook`` serves the generated pair; a client trusting only the caBundle, as
    the API server does, accepts it under every Service name and nothing else."""
    certs = tmp_path / "certs"
    write(generate("detour", "detour-webhook"), certs)
    port, _ = webhook_process(certs)
    for name in service_names("detour-webhook", "detour"):
        response = https_get(port, certs / "ca.crt", name, "/healthz")
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(port, certs / "ca.crt", "detour-webhook.other.svc", "/healthz")


# -- Grafana ---------------------------------------------------------------------------------

# Labels Prometheus adds when it scrapes (ServiceMonitor), and the histogram's bucket label.
