"""Azure Key Vault and a managed-identity token endpoint on loopback, for the real Azure SDK.

The token endpoint answers as App Service's managed identity does (IDENTITY_ENDPOINT and
IDENTITY_HEADER), so azure-identity's DefaultAzureCredential gets its tokens here. The vault
serves `GET /secrets/{name}` over HTTPS with Key Vault's challenge: a request without the token is
answered 401 with the `WWW-Authenticate` that tells the client which resource to ask a token for.
Its host name is VAULT_HOST (a subdomain of the challenge's resource, as the SDK checks), which
`resolve_vault_host()` maps to 127.0.0.1 in this process.

Run as a module, it is the scenario of tests/test_secrets.py's Key Vault test: meant to run in a
network namespace of its own (`unshare -n`), so that a credential falling back to another source
could not send anything off the machine. It prints one JSON object of what it saw.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import os
import secrets
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VAULT_HOST = "kv-test.vault.sandgate.test"
RESOURCE_HOST = "vault.sandgate.test"
ACCESS_TOKEN = "loopback-access-token"


class KeyVaultDouble:
    def __init__(self, directory: str):
        self.dir = directory
        self.secrets: dict[str, str] = {}
        self.token_requests: list[dict] = []
        self.secret_requests: list[tuple[str, bool]] = []  # (name, with the token)
        self._runner: web.AppRunner | None = None
        self.token_url = ""
        self.vault_port = 0

    async def start(self) -> KeyVaultDouble:
        cert = self._certificate()
        app = web.Application()
        app.router.add_get("/msi/token", self._token)
        app.router.add_get("/secrets/{name}", self._secret)
        app.router.add_get("/secrets/{name}/", self._secret)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        plain = web.TCPSite(self._runner, "127.0.0.1", 0)
        await plain.start()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*cert)
        tls = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await tls.start()
        self.token_url = f"http://127.0.0.1:{plain._server.sockets[0].getsockname()[1]}/msi/token"
        self.vault_port = tls._server.sockets[0].getsockname()[1]
        return self

    def ref(self, name: str = "") -> str:
        """kv://VAULT/NAME of a secret here; without a name, kv://VAULT (a --tls-dir)."""
        return f"kv://{VAULT_HOST}:{self.vault_port}" + (f"/{name}" if name else "")

    @property
    def ca_file(self) -> str:
        return os.path.join(self.dir, "vault.pem")

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        if request.headers.get("X-IDENTITY-HEADER") != "loopback-identity":
            return web.json_response({"error": "no identity header"}, status=400)
        self.token_requests.append(dict(request.query))
        return web.json_response({"access_token": ACCESS_TOKEN, "expires_on": str(int(time.time()) + 3600),
                                  "resource": request.query.get("resource"), "token_type": "Bearer"})

    async def _secret(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        authorized = request.headers.get("Authorization") == f"Bearer {ACCESS_TOKEN}"
        self.secret_requests.append((name, authorized))
        if not authorized:
            challenge = (f'Bearer authorization="https://login.microsoftonline.com/tenant", '
                         f'resource="https://{RESOURCE_HOST}:{self.vault_port}"')
            return web.json_response({"error": {"code": "Unauthorized", "message": "no token"}}, status=401,
                                     headers={"WWW-Authenticate": challenge})
        if name not in self.secrets:
            return web.json_response({"error": {"code": "SecretNotFound", "message": f"A secret with (name/id) {name} was not found in this key vault."}}, status=404)
        return web.json_response({"value": self.secrets[name], "attributes": {"enabled": True},
                                  "id": f"https://{VAULT_HOST}:{self.vault_port}/secrets/{name}/1"})

    def _certificate(self) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, VAULT_HOST)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(VAULT_HOST)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        key_file = os.path.join(self.dir, "vault.key")
        with open(self.ca_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_file, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return self.ca_file, key_file


def resolve_vault_host() -> None:
    """VAULT_HOST resolves to 127.0.0.1 in this process; every other name as before."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        return real("127.0.0.1" if host == VAULT_HOST else host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo


# --- the scenario (python -m tests.support.keyvault) -------------------------------------------------

API_KEY_POLICY = """\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: api-keys, namespace: infra}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: echo}]
  apiKeyAuth:
    credentialRefs: [{group: sandgate.dev, kind: ApiKeyStore, name: default}]
    extractFrom: [{headers: [X-API-Key]}]
"""


async def scenario(workdir: str) -> dict:
    import aiohttp

    from gateway.server.app import StartupError
    from tests.support.echo import make_echo_app
    from tests.support.harness import echo_routes, running_gateway, url

    report: dict = {}
    vault = await KeyVaultDouble(workdir).start()
    echo = web.AppRunner(make_echo_app("echo"))
    await echo.setup()
    site = web.TCPSite(echo, "127.0.0.1", 0)
    await site.start()
    echo_port = site._server.sockets[0].getsockname()[1]
    first, second = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    vault.secrets["api-key-pepper"] = first
    os.environ.update(IDENTITY_ENDPOINT=vault.token_url, IDENTITY_HEADER="loopback-identity",
                      SSL_CERT_FILE=vault.ca_file, SANDGATE_KEYVAULT_REFRESH_SECONDS="0.5",
                      SANDGATE_API_KEY_PEPPER_FILE=vault.ref("api-key-pepper"))

    async def status(gw, key: str) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(url(gw, "/"), headers={"X-API-Key": key}) as response:
                return response.status

    async def add_key(gw, pepper: str) -> str:
        key_id = base64.b32encode(secrets.token_bytes(5)).decode().lower()
        key = f"sgk_{key_id}_{secrets.token_urlsafe(32)}"
        await gw.store.create_api_key(key_id, hashlib.sha256(pepper.encode() + key.encode()).hexdigest(), "alice", (), None)
        return key

    async with running_gateway(Path(tempfile.mkdtemp(dir=workdir)), echo_routes(echo_port), policies_yaml=API_KEY_POLICY) as gw:
        old_key, new_key = await add_key(gw, first), await add_key(gw, second)
        report["before_rotation"] = [await status(gw, old_key), await status(gw, new_key)]
        vault.secrets["api-key-pepper"] = second
        deadline = time.monotonic() + 5
        while await status(gw, new_key) != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        report["after_rotation"] = [await status(gw, old_key), await status(gw, new_key)]
        del vault.secrets["api-key-pepper"]  # a failed refresh keeps the last value
        await asyncio.sleep(1.2)
        report["after_secret_deleted"] = await status(gw, new_key)

    os.environ["SANDGATE_API_KEY_PEPPER_FILE"] = vault.ref("no-such-secret")
    try:
        async with running_gateway(Path(tempfile.mkdtemp(dir=workdir)), echo_routes(echo_port), policies_yaml=API_KEY_POLICY):
            report["missing_secret"] = "started"
    except StartupError as e:
        report["missing_secret"] = str(e)
    del os.environ["SANDGATE_API_KEY_PEPPER_FILE"]  # the TLS part has no API keys
    report["tls"] = await tls_scenario(vault, echo_port, workdir)
    report["token_resources"] = sorted({q.get("resource", "") for q in vault.token_requests})
    report["secret_requests"] = {"with_token": sum(1 for _, ok in vault.secret_requests if ok),
                                 "challenged": sum(1 for _, ok in vault.secret_requests if not ok)}
    report["vault_ref"] = vault.ref("api-key-pepper")
    await echo.cleanup()
    await vault.stop()
    return report


async def served_certificate(gw, ca) -> bytes:
    """The DER certificate a new TLS handshake with the gateway gets (SNI edge.example.test)."""
    from tests.support.certs import client_context

    host, port = next(iter(gw.addresses.values()))
    _, writer = await asyncio.open_connection(host, port, ssl=client_context(ca), server_hostname="edge.example.test")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


async def tls_scenario(vault: KeyVaultDouble, echo_port: int, workdir: str) -> dict:
    """--tls-dir kv://VAULT: an HTTPS listener's certificate `edge-cert` is the vault's secret
    edge-cert, first PEM (key and certificate), then rotated to a base64 PKCS#12, then replaced
    by garbage (the last good one stays); a certificate missing from the vault stops startup."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs12

    from gateway.server.app import StartupError
    from tests.support.certs import https_routes, issue, make_authority
    from tests.support.harness import running_gateway

    report: dict = {}
    ca = make_authority()
    first_pem, first_key, first_der = issue(ca, "edge.example.test")
    second_pem, second_key, second_der = issue(ca, "edge.example.test")
    vault.secrets["edge-cert"] = (first_key + first_pem).decode()
    routes = https_routes(echo_port, [("https", None, "edge-cert")])
    async with running_gateway(Path(tempfile.mkdtemp(dir=workdir)), routes, tls_dir=vault.ref(),
                               reload_interval=0.2) as gw:
        report["first"] = await served_certificate(gw, ca) == first_der
        pfx = pkcs12.serialize_key_and_certificates(
            b"edge", load_pem_private_key(second_key, None), x509.load_pem_x509_certificate(second_pem), None,
            serialization.NoEncryption())
        vault.secrets["edge-cert"] = base64.b64encode(pfx).decode()
        deadline = time.monotonic() + 10
        while await served_certificate(gw, ca) != second_der and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        report["rotated_to_pkcs12"] = await served_certificate(gw, ca) == second_der
        vault.secrets["edge-cert"] = "not a certificate"
        await asyncio.sleep(2.0)  # a refresh (0.5 s) and a certificate check (1 s) later
        report["after_garbage"] = await served_certificate(gw, ca) == second_der
    missing = https_routes(echo_port, [("https", None, "no-such-cert")])
    try:
        async with running_gateway(Path(tempfile.mkdtemp(dir=workdir)), missing, tls_dir=vault.ref()):
            report["missing"] = "started"
    except StartupError as e:
        report["missing"] = str(e)
    return report


if __name__ == "__main__":
    resolve_vault_host()
    with tempfile.TemporaryDirectory() as directory:
        print(json.dumps(asyncio.run(scenario(directory))))
    sys.exit(0)
