"""Certificates for TLS tests, made with `cryptography`: one test CA, leaf certificates signed by
it, a client context that verifies against that CA, and routes with HTTPS listeners."""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.harness import backend, gateway_with, route_to


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_authority() -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Sandgate test CA"))
        .issuer_name(_name("Sandgate test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert, cert.public_bytes(serialization.Encoding.PEM))


def issue(ca: Authority, *hostnames: str) -> tuple[bytes, bytes, bytes]:
    """(certificate PEM, key PEM, certificate DER) for the given DNS names."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, cert.public_bytes(serialization.Encoding.DER)


def install(tls_dir: Path, name: str, cert_pem: bytes, key_pem: bytes) -> None:
    """Write a pair the way a rotation should: each file replaced atomically, key first."""
    folder = tls_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    for filename, data in (("tls.key", key_pem), ("tls.crt", cert_pem)):
        tmp = folder / f".{filename}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / filename)


def client_context(ca: Authority) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.check_hostname = True
    return context


def https_routes(port: int, listeners: list[tuple[str, str | None, str]]) -> str:
    """listeners: (listener name, hostname or None, certificate name); all on port 443."""
    lines = []
    for name, hostname, cert in listeners:
        host = f", hostname: {hostname}" if hostname else ""
        lines.append(
            f"{{name: {name}, port: 443, protocol: HTTPS{host}, "
            f"tls: {{mode: Terminate, certificateRefs: [{{name: {cert}}}]}}}}"
        )
    return gateway_with(*lines) + backend("echo", port) + route_to("echo")
