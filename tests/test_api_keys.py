"""API keys (SPEC §1 `sandgate keys`, `db migrate`; §2.2 apiKeyAuth; §6 Secrets).

The command runs as a real subprocess against both stores (an SQLite file in --data-dir and a
fresh PostgreSQL database via SANDGATE_DATABASE_URL); the gateway runs in-process on loopback
with an apiKeyAuth SecurityPolicy in front of a recording echo upstream.

Keys used by the gateway tests are minted here, not by gateway code: `sgk_<id>_<secret>`, stored
as SHA-256(pepper + key) — so a gateway that hashed differently from the documented format (and
from the command, which other tests use) would fail them.
"""

from __future__ import annotations

import asyncio
import base64
import os
import hashlib
import re
import secrets
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from gateway.server.app import StartupError
from gateway.store import SQLITE_FILE, open_store
from tests.support.fixtures import recording_echo  # noqa: F401 (fixture)
from tests.support.harness import access_records, echo_routes, running_gateway, url
from tests.support.policy_harness import (
    assert_denied,
    assert_missing,
    assert_refused,
    call,
    security_policy,
)
from tests.support.postgres import fresh_database
from tests.support.rawhttp import send
from tests.support.store_gateway import sandgate_cli

KEY = re.compile(r"sgk_(?P<id>[a-z2-7]{8})_(?P<secret>[A-Za-z0-9_-]{43})")
REVOCATION_WINDOW = 3.0  # SPEC/brief: a revoked key stops working within ~3 s (2 s cache)
STORE_REF = {"group": "sandgate.dev", "kind": "ApiKeyStore", "name": "default"}


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def pepper_file(tmp_path):
    path = tmp_path / "pepper"
    while True:  # the pepper is read with surrounding whitespace stripped: keep all 32 bytes
        value = secrets.token_bytes(32)
        if value == value.strip():
            break
    path.write_bytes(value)
    return path


@pytest.fixture(params=["sqlite", "postgres"])
async def store_env(request, tmp_path):
    """(--data-dir, SANDGATE_DATABASE_URL or None): the command's store."""
    data_dir = str(tmp_path / "data")
    if request.param == "sqlite":
        yield data_dir, None
    else:
        async with fresh_database() as database_url:
            yield data_dir, database_url


async def keys(store_env, pepper_file, *args: str) -> tuple[int, str, str]:
    data_dir, database_url = store_env
    return await sandgate_cli("keys", "--data-dir", data_dir, *args,
                              SANDGATE_API_KEY_PEPPER_FILE=str(pepper_file), SANDGATE_DATABASE_URL=database_url)


def created(stdout: str) -> tuple[str, str]:
    """(id, key) from the output of `keys create`."""
    fields = dict(line.split(":", 1) for line in stdout.splitlines() if ":" in line)
    key = fields["key"].strip()
    assert KEY.fullmatch(key), f"key not in sgk_<id>_<secret> form: {key!r}"
    assert KEY.fullmatch(key)["id"] == fields["id"].strip()
    return fields["id"].strip(), key


def list_rows(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    assert lines and lines[0].split()[:2] == ["ID", "OWNER"], stdout
    return {line.split()[0]: line for line in lines[1:] if line.strip()}


async def stored_key_rows(store_env) -> list[dict]:
    """Every api_keys row, every column, as the database holds it."""
    data_dir, database_url = store_env
    if database_url is None:
        with sqlite3.connect(f"{data_dir}/{SQLITE_FILE}") as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM api_keys")]
    conn = await asyncpg.connect(database_url)
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM api_keys")]
    finally:
        await conn.close()


# --- the command ---------------------------------------------------------------------------------

async def test_create_shows_the_key_once_and_list_never_shows_it(store_env, pepper_file):
    code, out, err = await keys(store_env, pepper_file, "create", "--owner", "alice",
                                "--scope", "echo:read", "--scope", "echo:write", "--expires", "30d")
    assert code == 0, err
    key_id, key = created(out)
    secret = KEY.fullmatch(key)["secret"]
    assert (out + err).count(secret) == 1, "the secret is printed exactly once"
    expires = datetime.fromisoformat(dict(line.split(":", 1) for line in out.splitlines())["expires"].strip())
    assert abs(expires - (datetime.now(timezone.utc) + timedelta(days=30))) < timedelta(minutes=5)

    code, out, err = await keys(store_env, pepper_file, "list")
    assert code == 0, err
    row = list_rows(out)[key_id]
    assert row.split()[1] == "alice" and "echo:read echo:write" in row and row.split()[-1] == "active", row
    digest = hashlib.sha256(pepper_file.read_bytes() + key.encode()).hexdigest()
    for leaked in (secret, key, digest, hashlib.sha256(key.encode()).hexdigest()):
        assert leaked not in out + err, "keys list shows the key or its hash"

    code, out, err = await keys(store_env, pepper_file, "revoke", key_id)
    assert (code, out.strip()) == (0, f"revoked {key_id}"), err
    code, out, _ = await keys(store_env, pepper_file, "list")
    assert list_rows(out)[key_id].split()[-1] == "revoked"
    code, _, err = await keys(store_env, pepper_file, "revoke", key_id)
    assert code == 1 and key_id in err, "revoking twice is reported"


async def test_the_store_holds_only_a_sha256_of_the_key(store_env, pepper_file):
    code, out, err = await keys(store_env, pepper_file, "create", "--owner", "bob", "--scope", "s")
    assert code == 0, err
    key_id, key = created(out)
    secret = KEY.fullmatch(key)["secret"]
    rows = await stored_key_rows(store_env)
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == key_id and row["owner"] == "bob"
    assert re.fullmatch(r"[0-9a-f]{64}", row["key_hash"]), row["key_hash"]
    assert row["key_hash"] == hashlib.sha256(pepper_file.read_bytes() + key.encode()).hexdigest(), \
        "key_hash is not SHA-256(pepper + key)"
    assert not any(secret in str(v) for v in row.values()), f"a column holds the secret: {row}"
    data_dir, database_url = store_env
    if database_url is None:  # every byte on disk, WAL included
        for path in Path(data_dir).iterdir():
            assert secret.encode() not in path.read_bytes(), f"{path.name} holds the secret"


@pytest.mark.parametrize("problem", ["missing", "empty"])
async def test_create_without_a_pepper_exits_1_with_one_line_naming_the_file(store_env, tmp_path, problem):
    pepper = tmp_path / "no-such-pepper"
    if problem == "empty":
        pepper.write_bytes(b"")
    code, out, err = await keys(store_env, pepper, "create", "--owner", "carol")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (code, out, err)
    assert len(lines) == 1 and str(pepper) in lines[0], err
    assert "sgk_" not in out
    code, out, _ = await keys(store_env, pepper, "list")
    assert code == 0 and list_rows(out) == {}, "a failed create left a key behind"


async def test_db_migrate_twice_succeeds(store_env, tmp_path):
    data_dir, database_url = store_env
    for _ in range(2):
        code, out, err = await sandgate_cli("db", "--data-dir", data_dir, "migrate", SANDGATE_DATABASE_URL=database_url)
        assert code == 0, err
    store = await open_store(database_url, data_dir=data_dir)
    try:
        assert await store.list_api_keys() == [] and await store.count_audit() == 0
    finally:
        await store.close()


# --- through a running gateway ---------------------------------------------------------------------

def mint() -> tuple[str, str]:
    """(id, key) in the documented format, made without gateway code."""
    key_id = base64.b32encode(secrets.token_bytes(5)).decode().lower()
    return key_id, f"sgk_{key_id}_{secrets.token_urlsafe(32)}"


async def add_key(running, pepper_file, owner: str, scopes: tuple[str, ...], expires_at=None) -> tuple[str, str]:
    key_id, key = mint()
    digest = hashlib.sha256(pepper_file.read_bytes() + key.encode()).hexdigest()
    await running.store.create_api_key(key_id, digest, owner, scopes, expires_at)
    return key_id, key


POLICY = security_policy("api-keys", {
    "apiKeyAuth": {
        "credentialRefs": [STORE_REF],
        "extractFrom": [{"headers": ["X-API-Key"]}],
        "forwardClientIDHeader": "X-Client-Id",
        "sanitize": True,
    },
    "authorization": {
        "defaultAction": "Deny",
        "rules": [
            {"name": "writers", "action": "Allow", "operation": {"methods": ["POST"]},
             "principal": {"jwt": {"provider": "api-key", "scopes": ["echo:write"]}}},
            {"name": "readers", "action": "Allow", "operation": {"methods": ["GET"]},
             "principal": {"jwt": {"provider": "api-key", "scopes": ["echo:read"]}}},
            # the key holds echo:read, but this rule is for another provider's tokens
            {"name": "other-provider", "action": "Allow", "operation": {"methods": ["DELETE"]},
             "principal": {"jwt": {"provider": "idp", "scopes": ["echo:read"]}}},
        ],
    },
})


@pytest.fixture
async def gateway(tmp_path, pepper_file, upstream, monkeypatch):
    monkeypatch.setenv("SANDGATE_API_KEY_PEPPER_FILE", str(pepper_file))
    async with running_gateway(tmp_path, echo_routes(upstream.port), policies_yaml=POLICY) as running:
        yield running


async def with_key(running, key: str, method: str = "GET", path: str = "/", **headers: str):
    return await call(running, path, method=method, headers={"X-API-Key": key, **headers})


async def test_a_key_from_the_command_reaches_the_upstream_as_its_id(gateway, tmp_path, pepper_file, upstream):
    code, out, err = await sandgate_cli(
        "keys", "--data-dir", str(tmp_path / "data"), "create", "--owner", "alice", "--scope", "echo:read",
        SANDGATE_API_KEY_PEPPER_FILE=str(pepper_file))
    assert code == 0, err
    key_id, key = created(out)
    async with aiohttp.ClientSession() as session:
        # a client-sent copy of the client-id header, twice, must not survive
        headers = [("X-API-Key", key), ("X-Client-Id", "spoofed"), ("x-client-id", "spoofed-2")]
        async with session.get(url(gateway, "/hello"), headers=headers) as response:
            assert response.status == 200, await response.text()
    assert upstream.headers(0, "X-Client-Id") == [key_id]
    assert upstream.headers(0, "X-API-Key") == [], "sanitize: the key header must not be forwarded"
    assert not any(key in v or KEY.fullmatch(key)["secret"] in v for _, v in upstream.requests[0][2])
    decisions = [r for r in access_records(gateway) if "decision" in r]
    # An API key's principal is its owner under the API-key issuer, never a JWT user "alice".
    assert [(d["decision"], d["principal"]) for d in decisions] == [("allow", "api-key#alice")]
    assert KEY.fullmatch(key)["secret"] not in gateway.log_buffer.getvalue(), "the key is in the logs"


async def test_a_bad_key_is_401_and_never_reaches_the_upstream(gateway, pepper_file, upstream):
    key_id, key = await add_key(gateway, pepper_file, "alice", ("echo:read",))
    other_id, _ = mint()
    bad = {
        "wrong secret": f"sgk_{key_id}_{secrets.token_urlsafe(32)}",
        "unknown key": mint()[1],
        "another id": key.replace(key_id, other_id, 1),
        "one char more": key + "x",
        "one char less": key[:-1],
        "malformed": "hello",
        "prefix only": "sgk_",
        "no id": f"sgk__{secrets.token_urlsafe(32)}",
        "huge": f"sgk_{key_id}_" + "A" * 16_000,
        "bearer-style": "Bearer " + key,
    }
    for name, value in bad.items():
        result = await with_key(gateway, value)
        assert result[0] == 401, (name, result[0], result[2])
        assert_refused(result, "api-key-invalid", upstream)
    assert_missing(await call(gateway, "/"), upstream)
    # bytes that are not UTF-8, which aiohttp's client cannot send
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-API-Key: sgk_" + key_id.encode() + b"_\xff\xfe\r\n\r\n"
    [response] = await send(gateway, raw)
    assert response.status == 401 and response.json()["violations"][0]["code"] == "api-key-invalid", response
    assert_missing(await call(gateway, "/"), upstream)
    assert (await with_key(gateway, key))[0] == 200, "the right key still works after the bad ones"


async def test_scopes_and_the_provider_are_honoured(gateway, pepper_file, upstream):
    _, reader = await add_key(gateway, pepper_file, "r", ("echo:read",))
    _, nobody = await add_key(gateway, pepper_file, "n", ())
    _, writer = await add_key(gateway, pepper_file, "w", ("echo:read", "echo:write"))
    assert_denied(await with_key(gateway, reader, "POST"), "insufficient-scope", upstream)
    assert_denied(await with_key(gateway, nobody, "GET"), "insufficient-scope", upstream)
    status, _, body = await with_key(gateway, reader, "DELETE")
    assert status == 403 and upstream.requests == [], "a rule for provider idp allowed an API key"
    assert (await with_key(gateway, reader, "GET"))[0] == 200
    assert (await with_key(gateway, writer, "POST"))[0] == 200
    assert len(upstream.requests) == 2


async def test_an_expired_key_is_refused(gateway, pepper_file, upstream):
    now = datetime.now(timezone.utc)
    _, stale = await add_key(gateway, pepper_file, "a", ("echo:read",), expires_at=now - timedelta(seconds=1))
    assert_refused(await with_key(gateway, stale), "api-key-invalid", upstream)
    _, short = await add_key(gateway, pepper_file, "a", ("echo:read",), expires_at=now + timedelta(seconds=1.5))
    assert (await with_key(gateway, short))[0] == 200
    deadline = now + timedelta(seconds=1.5 + REVOCATION_WINDOW)
    while (status := (await with_key(gateway, short))[0]) == 200 and datetime.now(timezone.utc) < deadline:
        await asyncio.sleep(0.1)
    assert status == 401, "a key kept working more than 3 s after it expired"


async def refused_within(running, key: str, window: float) -> float:
    """Seconds until `key` is refused; fails if it still works after `window`."""
    started = time.monotonic()
    while (await with_key(running, key))[0] == 200:
        assert time.monotonic() - started < window, f"a revoked key still works after {window} s"
        await asyncio.sleep(0.05)
    assert (await with_key(running, key))[0] == 401
    return time.monotonic() - started


async def test_a_revoked_key_stops_working_within_3_seconds(gateway, tmp_path, pepper_file):
    code, out, err = await sandgate_cli(
        "keys", "--data-dir", str(tmp_path / "data"), "create", "--owner", "alice", "--scope", "echo:read",
        SANDGATE_API_KEY_PEPPER_FILE=str(pepper_file))
    assert code == 0, err
    by_cli_id, by_cli = created(out)
    by_api_id, by_api = await add_key(gateway, pepper_file, "bob", ("echo:read",))
    for key in (by_cli, by_api):  # cached as valid right before the revocation: the worst case
        assert (await with_key(gateway, key))[0] == 200

    code, _, err = await sandgate_cli("keys", "--data-dir", str(tmp_path / "data"), "revoke", by_cli_id,
                                      SANDGATE_API_KEY_PEPPER_FILE=str(pepper_file))
    assert code == 0, err
    await refused_within(gateway, by_cli, REVOCATION_WINDOW)

    assert await gateway.store.revoke_api_key(by_api_id)
    await refused_within(gateway, by_api, REVOCATION_WINDOW)


@pytest.mark.parametrize("pepper", ["missing", "unset"])
async def test_an_api_key_policy_without_a_pepper_stops_startup_naming_the_file(tmp_path, upstream, monkeypatch, pepper):
    if pepper == "missing":
        expected = str(tmp_path / "secrets" / "no-pepper")
        monkeypatch.setenv("SANDGATE_API_KEY_PEPPER_FILE", expected)
    else:
        from gateway.auth.apikeys import DEFAULT_PEPPER_FILE

        expected = DEFAULT_PEPPER_FILE
        monkeypatch.delenv("SANDGATE_API_KEY_PEPPER_FILE", raising=False)
        if os.path.exists(expected):
            pytest.skip(f"{expected} exists on this machine")
    with pytest.raises(StartupError) as failure:
        async with running_gateway(tmp_path, echo_routes(upstream.port), policies_yaml=POLICY):
            pass
    message = str(failure.value)
    assert len(message.splitlines()) == 1 and expected in message, message
