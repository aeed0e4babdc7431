"""Throwaway certificates for the TLS tests (cryptography): a certificate authority that
issues server and client certificates, and a `pki` fixture with every file the tests use."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC)


class Authority:
    """A throwaway certificate authority."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(NOW - dt.timedelta(days=1))
                     .not_valid_after(NOW + dt.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, *, client: bool = False, expired: bool = False
              ) -> tuple[bytes, bytes]:
        """Return (certificate PEM, key PEM) for a server (localhost) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = ((NOW - dt.timedelta(days=10), NOW - dt.timedelta(days=1)) if expired
                      else (NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=10)))
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.CLIENT_AUTH if client
                        else ExtendedKeyUsageOID.SERVER_AUTH]), False))
        if not client:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False)
        cert = builder.sign(self.key, hashes.SHA256())
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path | Authority]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other, clients = Authority("axguard test CA"), Authority("someone else"), Authority(
        "clients CA")
    cert, key = ca.issue("localhost")
    client_cert, client_key = clients.issue("pipeline-7", client=True)
    stranger_cert, stranger_key = other.issue("stranger", client=True)
    expired_cert, expired_key = ca.issue("localhost", expired=True)
    return {
        "ca": ca, "ca_pem": write(folder, "ca.pem", ca.pem()),
        "other_pem": write(folder, "other.pem", other.pem()),
        "clients_pem": write(folder, "clients.pem", clients.pem()),
        "cert": write(folder, "server.pem", cert), "key": write(folder, "server.key", key),
        "client_cert": write(folder, "client.pem", client_cert),
        "client_key": write(folder, "client.key", client_key),
        "stranger_cert": write(folder, "stranger.pem", stranger_cert),
        "stranger_key": write(folder, "stranger.key", stranger_key),
        "expired_cert": write(folder, "expired.pem", expired_cert),
        "expired_key": write(folder, "expired.key", expired_key),
        "folder": folder,
    }
