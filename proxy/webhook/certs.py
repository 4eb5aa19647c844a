"""``detour webhook-certs``: a CA and a serving certificate for the webhook, without cert-manager.

The API server calls the webhook at ``https://<service>.<namespace>.svc:443/mutate`` and checks
its certificate against the ``caBundle`` of the MutatingWebhookConfiguration. This module makes
a private CA (ECDSA P-256, CA:TRUE, path length 0) and a certificate it signs for the Service,
with every name the Service is reached by::

    <service>, <service>.<namespace>, <service>.<namespace>.svc,
    <service>.<namespace>.svc.cluster.local

and any IP address given (``--ip``), for a webhook the API server reaches by
``clientConfig.url`` at an address (say ``https://127.0.0.1:8443/mutate``, a webhook run beside
the API server): TLS checks an IP against the certificate's IP SANs only, never its DNS names.

It writes ``ca.crt``, ``tls.crt`` and ``tls.key`` (the key mode 0600), each atomically: a temp
file beside it, fsynced, then ``os.replace``. The CA's key is never written: to renew, run the
command again and replace both the Secret and the ``caBundle``. The webhook picks up a rotated
Secret without a restart (see :mod:`proxy.webhook.tls`).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.files import write_atomic

DEFAULT_DAYS = 365
CA_DAYS = 3650
# Clocks on nodes and the API server drift; a certificate valid from "now" can look early.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class WebhookCertificates:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    not_after: datetime.datetime

    @property
    def ca_bundle(self) -> str:
        """``caBundle`` of the MutatingWebhookConfiguration: base64 of the CA's PEM."""
        return base64.b64encode(self.ca_pem).decode("ascii")


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def service_names(service: str, namespace: str) -> list[str]:
    """The DNS names a Service is reached by, short to fully qualified."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def _check_dns_label(value: str, what: str) -> str:
    # Service and namespace names are RFC 1123 labels.
    ok = (
        0 < len(value) <= 63
        and value[0].isalnum()
        and value[-1].isalnum()
        and all(c.isdigit() or ("a" <= c <= "z") or c == "-" for c in value)
    )
    if not ok:
        raise ValueError(f"{what} {value!r} is not a DNS label (lower-case letters, digits, '-')")
    return value


def generate(
    namespace: str,
    service: str,
    *,
    days: int = DEFAULT_DAYS,
    ips: Sequence[str] = (),
    now: datetime.datetime | None = None,
) -> WebhookCertificates:
    """A new CA and a serving certificate for ``service`` in ``namespace`` and the IP addresses
    ``ips`` (IP SANs), valid ``days``."""
    _check_dns_label(namespace, "namespace")
    _check_dns_label(service, "service")
    if days < 1:
        raise ValueError("days must be at least 1")
    addresses = []
    for ip in ips:
        try:
            addresses.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            raise ValueError(f"--ip {ip!r} is not an IP address") from None
    names = [*service_names(service, namespace), *addresses]
    return issue(f"{service}.{namespace} webhook CA", names, days=days, now=now, common=names[2])


def issue(
    ca_name: str,
    names: Sequence[str],
    *,
    days: int,
    now: datetime.datetime | None = None,
    common: str | None = None,
) -> WebhookCertificates:
    """A new CA called ``ca_name`` and a serving certificate it signs for ``names`` (host names,
    or IP addresses), valid ``days``, its common name ``common`` (default: the first name)."""
    now = now or datetime.datetime.now(datetime.UTC)
    start = now - _BACKDATE
    ca_key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(issuer)
        .issuer_name(issuer)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=max(days, CA_DAYS)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = now + datetime.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common or names[0])]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return WebhookCertificates(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        not_after=not_after,
    )


def write(certs: WebhookCertificates, out_dir: Path) -> list[Path]:
    """Write ``ca.crt``, ``tls.crt`` and ``tls.key`` into ``out_dir`` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [
        (out_dir / "ca.crt", certs.ca_pem, 0o644),
        (out_dir / "tls.crt", certs.cert_pem, 0o644),
        (out_dir / "tls.key", certs.key_pem, 0o600),
    ]
    for path, data, mode in files:
        write_atomic(path, data, mode=mode)
    return [path for path, _, _ in files]
