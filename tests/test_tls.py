"""HTTPS listeners (SPEC §2.1): certificates from `<tls-dir>/<name>/tls.{crt,key}`, re-read when
the files change without a restart, chosen by SNI, and a clear startup error when one is missing.

Certificates come from tests/support/certs.py: one test CA, leaf certificates signed by it, and a
client that verifies against that CA with a server name set (no DNS: we dial 127.0.0.1).
Certificates from Key Vault (`--tls-dir kv://VAULT`) are tested with the vault double, in
tests/test_secrets.py.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest

from gateway.server.app import StartupError
from tests.support.certs import Authority, client_context, https_routes as routes, install, issue, make_authority
from tests.support.fixtures import upstream_port  # noqa: F401 (fixture)
from tests.support.harness import running_gateway, url
from tests.support.rawhttp import KeptConnection

STEP = 5.0


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
