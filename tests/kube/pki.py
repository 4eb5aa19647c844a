"""The certificates a small Kubernetes control plane needs, and kubeconfigs that use them.

One private CA (ECDSA P-256) signs the API server's serving certificate and a client
certificate for each component; the API server trusts the CA for client certificates
(``--client-ca-file``), and a certificate's common name is the user, its organizations the
groups, as Kubernetes reads them:

* ``admin``: group ``system:masters`` (the tests' kubectl);
* ``system:node:<node>`` in ``system:nodes`` (the kubelet, for the Node authorizer);
* ``system:kube-controller-manager`` and ``system:kube-scheduler`` (their own RBAC roles).

The service-account signing key is a separate key pair (``sa.key`` / ``sa.pub``).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True, slots=True)
class KeyPair:
    cert: Path
    key: Path


class ClusterPki:
    """A CA in ``directory`` that issues the cluster's certificates as files beside it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "detour test cluster CA")])
        self._ca_name = name
        now = datetime.datetime.now(datetime.UTC)
        self._ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 2 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca_pem = self._ca.public_bytes(serialization.Encoding.PEM)
        self.ca = self.dir / "ca.crt"
        self.ca.write_bytes(self.ca_pem)
        sa_key = ec.generate_private_key(ec.SECP256R1())
        self.sa_key = self.dir / "sa.key"
        self.sa_key.write_bytes(_key_pem(sa_key))
        self.sa_pub = self.dir / "sa.pub"
        self.sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def issue(
        self,
        file_name: str,
        common_name: str,
        *,
        groups: Sequence[str] = (),
        sans: Sequence[str] = (),
        server: bool = False,
    ) -> KeyPair:
        """A certificate signed by the CA: a client one, or a server one for ``sans``."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            names: list[x509.GeneralName] = []
            for san in sans:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(san)))
                except ValueError:
                    names.append(x509.DNSName(san))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        pair = KeyPair(self.dir / f"{file_name}.crt", self.dir / f"{file_name}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(_key_pem(key))
        pair.key.chmod(0o600)
        return pair

    def kubeconfig(self, file_name: str, server: str, user: KeyPair) -> Path:
        """A kubeconfig for ``server`` authenticating with ``user``'s certificate."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": server, "certificate-authority": str(self.ca)},
                }
            ],
            "users": [
                {
                    "name": "user",
                    "user": {
                        "client-certificate": str(user.cert),
                        "client-key": str(user.key),
                    },
                }
            ],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
            "current-context": "test",
        }
        path = self.dir / f"{file_name}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path
