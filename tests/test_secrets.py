"""Secrets from files are re-read when the files change (SPEC §6): a rotated Secret takes effect
without a restart, a Secret being swapped keeps the last good value meanwhile, and a missing one
stops startup with one line naming it. The router token's rotation is tested with sandboxes
(test_sandbox_access); here the API-key pepper and the database password, each mounted the way
Kubernetes mounts a Secret (the file a symlink into a `..data` directory that is swapped whole).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from gateway.audit import AuditSettings
from gateway.server.app import StartupError
from tests.support.fixtures import upstream_port  # noqa: F401 (fixture)
from tests.support.harness import echo_routes, running_gateway
from tests.support.issuer import AUDIENCE, ISSUER, Issuer, claims
from tests.support.policy_harness import call, security_policy, wait_for
from tests.support.postgres import throwaway_cluster

SEEN_WITHIN = 3.0  # seconds: files are looked at once a second


class MountedSecret:
    """A Secret volume: `<dir>/<name>` -> `..data/<name>`, `..data` -> a timestamped directory."""

    def __init__(self, directory: Path, name: str):
        self.dir, self.name = directory, name
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / name
        self._version = 0

    def write(self, value: bytes) -> None:
        self._version += 1
        version = self.dir / f"..2026_11_23_{self._version:04d}"
        version.mkdir()
        (version / self.name).write_bytes(value)
        staged = self.dir / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.dir / "..data")  # the atomic swap kubelet does
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{self.name}")

    def remove(self) -> None:
        (self.dir / "..data").unlink()


def new_pepper() -> bytes:
    while True:  # read with surrounding whitespace stripped: keep all 32 bytes
        value = secrets.token_bytes(32)
        if value == value.strip():
            return value


API_KEY_POLICY = security_policy("api-keys", {
    "apiKeyAuth": {"credentialRefs": [{"group": "sandgate.dev", "kind": "ApiKeyStore", "name": "default"}],
                   "extractFrom": [{"headers": ["X-API-Key"]}]},
})


async def add_key(running, pepper: bytes) -> str:
    key_id = base64.b32encode(secrets.token_bytes(5)).decode().lower()
    key = f"sgk_{key_id}_{secrets.token_urlsafe(32)}"
    await running.store.create_api_key(key_id, hashlib.sha256(pepper + key.encode()).hexdigest(), "alice", (), None)
    return key


async def status_with(running, key: str) -> int:
    return (await call(running, "/", headers={"X-API-Key": key}))[0]


async def test_a_rotated_pepper_is_used_without_a_restart(tmp_path, upstream_port, monkeypatch):
    secret = MountedSecret(tmp_path / "secrets", "api-key-pepper")
    first, second = new_pepper(), new_pepper()
    secret.write(first)
    monkeypatch.setenv("SANDGATE_API_KEY_PEPPER_FILE", str(secret.path))
    async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=API_KEY_POLICY) as gw:
        old_key = await add_key(gw, first)
        new_key = await add_key(gw, second)
        assert (await status_with(gw, old_key), await status_with(gw, new_key)) == (200, 401)

        secret.write(second)
        assert await wait_for(lambda: _is(status_with(gw, new_key), 200), timeout=SEEN_WITHIN), \
            "a key hashed with the new pepper is still refused"
        assert await status_with(gw, old_key) == 401, "a key of the old pepper still works"

        secret.remove()  # a Secret being swapped: the last pepper stays
        await asyncio.sleep(1.1)
        assert await status_with(gw, new_key) == 200


async def test_a_missing_pepper_stops_startup_with_one_line_naming_it(tmp_path, upstream_port, monkeypatch):
    missing = tmp_path / "secrets" / "no-pepper"
    monkeypatch.setenv("SANDGATE_API_KEY_PEPPER_FILE", str(missing))
    with pytest.raises(StartupError) as raised:
        async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=API_KEY_POLICY):
            pass
    assert str(raised.value) == f"missing secret: API key pepper file {missing}"


async def _is(awaitable, expected) -> bool:
    return await awaitable == expected


# --- the database password -------------------------------------------------------------------------

def jwt_policy(issuer: Issuer) -> str:
    """Decisions that never need the database, so every request makes one audit record."""
    return security_policy("jwt-inline", {"jwt": {"providers": [{
        "name": "idp", "issuer": ISSUER, "audiences": [AUDIENCE],
        "localJWKS": {"type": "Inline", "inline": json.dumps(issuer.jwks())},
    }]}})


async def test_a_rotated_database_password_is_used_for_new_connections(tmp_path, upstream_port):
    issuer = Issuer()
    token = issuer.mint(claims())
    secret = MountedSecret(tmp_path / "secrets", "password")
    secret.write(b"first-password\n")
    with throwaway_cluster(host_auth="scram-sha-256") as cluster:
        admin = await asyncpg.connect(host=cluster.root, port=cluster.port, user="postgres", database="postgres")
        try:
            await admin.execute("CREATE ROLE gateway LOGIN SUPERUSER PASSWORD 'first-password'")
            url = f"postgresql://gateway@127.0.0.1:{cluster.port}/postgres"
            # One record per request (not rollups): each batch of requests makes writes to count
            async with running_gateway(tmp_path, echo_routes(upstream_port), policies_yaml=jwt_policy(issuer),
                                       database_url=url, database_password_file=str(secret.path),
                                       audit=AuditSettings(allowed="every")) as gw:
                for _ in range(5):
                    assert (await call(gw, "/", token=token))[0] == 200
                assert await wait_for(lambda: _stored(gw, 5))

                await admin.execute("ALTER ROLE gateway PASSWORD 'second-password'")
                secret.write(b"second-password\n")
                await asyncio.sleep(1.1)
                # Every open connection of the gateway goes: the next ones must log in afresh.
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'gateway'")
                for _ in range(5):
                    assert (await call(gw, "/", token=token))[0] == 200
                assert await wait_for(lambda: _stored(gw, 10), timeout=10), \
                    "decisions after the rotation never reached the database"
        finally:
            await admin.close()


async def test_a_missing_database_password_stops_startup_with_one_line_naming_it(tmp_path, upstream_port):
    missing = tmp_path / "secrets" / "no-password"
    with pytest.raises(StartupError) as raised:
        async with running_gateway(tmp_path, echo_routes(upstream_port), database_url="postgresql://x@127.0.0.1:1/x",
                                   database_password_file=str(missing)):
            pass
    message = str(raised.value)
    assert "\n" not in message and f"missing secret: database password file {missing}" in message


async def _stored(gw, count: int) -> bool:
    try:
        return await gw.store.count_audit(kind="decision") >= count
    except (OSError, asyncpg.PostgresError):
        return False


# --- Azure Key Vault at run time ----------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_secrets_from_key_vault_are_fetched_refreshed_and_named_when_missing():
    """kv://VAULT/NAME through the real Azure SDK (DefaultAzureCredential, SecretClient) against
    tests/support/keyvault.py's vault and managed-identity endpoint, in a network namespace with
    only loopback: nothing the credential chain might try can leave the machine."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs unshare and ip (util-linux, iproute2) for a network namespace")
    script = "ip link set lo up && ip -brief link && exec \"$0\" -m tests.support.keyvault"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_", "SANDGATE_"))}
    done = subprocess.run(["unshare", "--net", "sh", "-c", script, sys.executable], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    *links, last = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in links] == ["lo"], f"not an isolated namespace: {links}"
    report = json.loads(last)
    assert report["before_rotation"] == [200, 401], report
    assert report["after_rotation"] == [401, 200], "a rotated secret in the vault was not picked up"
    assert report["after_secret_deleted"] == 200, "a failed refresh dropped the last good pepper"
    assert report["missing_secret"].startswith("missing secret: API key pepper kv://"), report["missing_secret"]
    assert "no-such-secret" in report["missing_secret"] and "\n" not in report["missing_secret"]
    assert report["token_resources"] and all(r.startswith("https://vault.sandgate.test") for r in report["token_resources"])
    assert report["secret_requests"]["with_token"] >= 3 and report["secret_requests"]["challenged"] >= 1
    tls = report["tls"]  # --tls-dir kv://VAULT
    assert tls["first"], "the listener did not serve the vault's PEM certificate"
    assert tls["rotated_to_pkcs12"], "a certificate rotated in the vault (as PKCS#12) was not served"
    assert tls["after_garbage"], "an unusable value in the vault replaced the last good certificate"
    assert tls["missing"].startswith("missing secret: TLS certificate no-such-cert kv://"), tls["missing"]
    assert "\n" not in tls["missing"]
