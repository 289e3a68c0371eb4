"""A throw-away certificate authority for TLS tests: a CA, server and client certificates as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, written as PEM files."""

    cert_file: str
    key_file: str


class TestCA:
    """A CA whose certificate is at ``ca_file``; :meth:`issue` signs server and client certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "shopfleet test CA") -> None:
        self.directory = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._sign(name, self.key.public_key(), ca=True, usage=None)
        self.ca_file = self._write(directory / f"{_slug(name)}.pem", self.cert)

    def issue(self, common_name: str, *, server: bool) -> Issued:
        """Return a certificate for ``common_name`` (a server certificate also names 127.0.0.1)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = self._sign(common_name, key.public_key(), ca=False, usage=usage, ip="127.0.0.1" if server else None)
        stem = self.directory / _slug(common_name)
        return Issued(self._write(stem.with_suffix(".pem"), cert), self._write(stem.with_suffix(".key"), key))

    def _sign(self, subject: str, public_key: ec.EllipticCurvePublicKey, *, ca: bool, usage: x509.ObjectIdentifier | None, ip: str | None = None) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if ip is not None:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        return b.sign(self.key, hashes.SHA256())

    @staticmethod
    def _write(path: Path, obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> str:
        if isinstance(obj, x509.Certificate):
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        path.chmod(0o644)  # Mosquitto may run as another user
        return str(path)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")
