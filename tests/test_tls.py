"""HTTPS listeners (SPEC §2.1): certificates from `<tls-dir>/<name>/tls.{crt,key}`, re-read when
the files change without a restart, chosen by SNI, and a clear startup error when one is missing.

Certificates are made here with `cryptography`: one test CA, leaf certificates signed by it, and a
client that verifies against that CA with a server name set (no DNS: we dial 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.server.app import StartupError
from tests.support.fixtures import upstream_port  # noqa: F401 (fixture)
from tests.support.harness import backend, gateway_with, route_to, running_gateway, url
from tests.support.rawhttp import KeptConnection

STEP = 5.0


# --- certificates -----------------------------------------------------------------------------


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


# --- routes -------------------------------------------------------------------------------------


def routes(port: int, listeners: list[tuple[str, str | None, str]]) -> str:
    """listeners: (listener name, hostname or None, certificate name); all on port 443."""
    lines = []
    for name, hostname, cert in listeners:
        host = f", hostname: {hostname}" if hostname else ""
        lines.append(
            f"{{name: {name}, port: 443, protocol: HTTPS{host}, "
            f"tls: {{mode: Terminate, certificateRefs: [{{name: {cert}}}]}}}}"
        )
    return gateway_with(*lines) + backend("echo", port) + route_to("echo")


@pytest.fixture
def ca() -> Authority:
    return make_authority()


# --- tests --------------------------------------------------------------------------------------


async def test_https_listener_serves_with_the_configured_certificate(upstream_port, ca, tmp_path):
    cert_pem, key_pem, cert_der = issue(ca, "site.example.test")
    install(tmp_path / "tls", "site", cert_pem, key_pem)
    yaml_text = routes(upstream_port, [("https", None, "site")])
    async with running_gateway(tmp_path, yaml_text) as gw:
        context = client_context(ca)
        async with aiohttp.ClientSession() as session:
            async with session.get(
                url(gw, "/hello", scheme="https"), ssl=context, server_hostname="site.example.test",
                headers={"Host": "site.example.test"},
            ) as resp:
                assert resp.status == 200
                echo = await resp.json()
                assert echo["backend"] == "echo"
                proto = [v for k, v in echo["headers"] if k.lower() == "x-forwarded-proto"]
                assert proto == ["https"]
        conn = await KeptConnection.open(gw.addresses["https"], "site.example.test", tls=context)
        try:
            assert conn.peer_certificate() == cert_der
        finally:
            await conn.close()
        # A client that does not trust the test CA is refused by its own verification.
        with pytest.raises(ssl.SSLCertVerificationError):
            await KeptConnection.open(gw.addresses["https"], "site.example.test", tls=ssl.create_default_context())


async def _rotation(gw, ca: Authority, tls_dir: Path, wait_for_reload) -> None:
    context = client_context(ca)
    address = gw.addresses["https"]
    old = await KeptConnection.open(address, "site.example.test", tls=context)
    try:
        assert (await old.get("/before")).status == 200
        new_pem, new_key, new_der = issue(ca, "site.example.test")
        install(tls_dir, "site", new_pem, new_key)
        await wait_for_reload()

        deadline = asyncio.get_running_loop().time() + 6.0
        while True:
            fresh = await KeptConnection.open(address, "site.example.test", tls=context)
            try:
                served = fresh.peer_certificate()
                if served == new_der:
                    assert (await fresh.get("/after")).status == 200
                    break
            finally:
                await fresh.close()
            assert asyncio.get_running_loop().time() < deadline, "new certificate not served without a restart"
            await asyncio.sleep(0.1)
        # The connection opened before the rotation keeps working on its old session.
        still_open = await old.get("/still-open")
        assert still_open.status == 200
        assert b'"/still-open"' in still_open.body
    finally:
        await old.close()


async def test_replaced_certificate_is_served_after_reload_and_open_connections_continue(upstream_port, ca, tmp_path):
    cert_pem, key_pem, old_der = issue(ca, "site.example.test")
    tls_dir = tmp_path / "tls"
    install(tls_dir, "site", cert_pem, key_pem)
    async with running_gateway(tmp_path, routes(upstream_port, [("https", None, "site")])) as gw:

        async def reload_now():
            assert gw.certificates.reload_changed() == ["site"]
            assert gw.certificates.reload_changed() == []  # unchanged files are not re-read

        await _rotation(gw, ca, tls_dir, reload_now)


async def test_certificate_watcher_picks_up_replaced_files(upstream_port, ca, tmp_path):
    cert_pem, key_pem, _ = issue(ca, "site.example.test")
    tls_dir = tmp_path / "tls"
    install(tls_dir, "site", cert_pem, key_pem)
    yaml_text = routes(upstream_port, [("https", None, "site")])
    async with running_gateway(tmp_path, yaml_text, reload_interval=0.2) as gw:

        async def nothing():
            return None

        await _rotation(gw, ca, tls_dir, nothing)


async def test_two_https_listeners_on_one_port_choose_certificates_by_sni(upstream_port, ca, tmp_path):
    a_pem, a_key, a_der = issue(ca, "a.example.test")
    b_pem, b_key, b_der = issue(ca, "b.example.test")
    tls_dir = tmp_path / "tls"
    install(tls_dir, "cert-a", a_pem, a_key)
    install(tls_dir, "cert-b", b_pem, b_key)
    yaml_text = routes(
        upstream_port, [("https-a", "a.example.test", "cert-a"), ("https-b", "b.example.test", "cert-b")]
    )
    async with running_gateway(tmp_path, yaml_text) as gw:
        assert gw.addresses["https-a"] == gw.addresses["https-b"]
        context = client_context(ca)
        for hostname, expected in (("a.example.test", a_der), ("b.example.test", b_der), ("a.example.test", a_der)):
            conn = await KeptConnection.open(gw.addresses["https-a"], hostname, tls=context)
            try:
                assert conn.peer_certificate() == expected, hostname
                assert (await conn.get(f"/via/{hostname}")).status == 200
            finally:
                await conn.close()


@pytest.mark.parametrize("missing", ["tls.crt", "tls.key"])
async def test_missing_certificate_file_fails_startup_naming_the_path(upstream_port, ca, tmp_path, missing):
    cert_pem, key_pem, _ = issue(ca, "site.example.test")
    tls_dir = tmp_path / "tls"
    install(tls_dir, "site", cert_pem, key_pem)
    (tls_dir / "site" / missing).unlink()
    with pytest.raises(StartupError) as failed:
        async with running_gateway(tmp_path, routes(upstream_port, [("https", None, "site")])):
            pass
    message = str(failed.value)
    assert str(tls_dir / "site" / missing) in message
    assert len(message.splitlines()) == 1
