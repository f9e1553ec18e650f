"""JWT at the edge (SPEC §2.2, §3.3): hostile tokens against a running gateway and a real JWKS issuer.

Every refused token must get 401 with an RFC 6750 `invalid_token` challenge and a stable reason
code, and must never reach the upstream (a recording echo). The issuer (tests.support.issuer)
is a real HTTP server on loopback whose key set can go down, turn to garbage or rotate.

Timing: an unknown `kid` may trigger one refetch per few seconds per provider (5 s in
gateway/auth/jwks.py); the tests that need a refetch wait that long, so the file takes ~40 s.
Token size: one header line holds at most 16 KiB (SPEC §3.1), so a token over 16 KiB in
`Authorization` is refused while the headers are read (431), before the verifier sees it.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import asynccontextmanager

import aiohttp
import pytest

from tests.support.fixtures import issuer, recording_echo  # noqa: F401 (fixtures)
from tests.support.harness import GATEWAY, access_records, backend, echo_routes, running_gateway
from tests.support.issuer import ISSUER, Issuer, claims, forge_hs256, forge_none, unsigned
from tests.support.policy_harness import (
    assert_missing,
    assert_refused,
    call,
    metric_value,
    prefix_route,
    provider,
    readiness,
    route_target,
    security_policy,
    wait_for,
    wait_ready,
)
from tests.support.rawhttp import send

REFETCH_INTERVAL = 5.0  # "at most one refetch per few seconds per provider"
CLAIM_HEADERS = [{"claim": "sub", "header": "X-User-Sub"}, {"claim": "org.team", "header": "X-User-Team"},
                 {"claim": "email", "header": "X-User-Email"}]


@asynccontextmanager
async def jwt_gateway(tmp_path, issuer, upstream, *, ready: bool = True, **provider_fields):
    fields = {"claimToHeaders": CLAIM_HEADERS, **provider_fields}
    policy = security_policy("jwt", {"jwt": {"providers": [provider(issuer, **fields)]}})
    async with running_gateway(tmp_path, echo_routes(upstream.port), policies_yaml=policy) as running:
        if ready:
            assert await wait_ready(running), "the gateway never became ready with a working JWKS"
        yield running


# --- the hostile token table -----------------------------------------------------------------

def _now() -> int:
    return int(time.time())


def _tampered(issuer: Issuer) -> str:
    head, _, sig = issuer.mint().split(".")
    forged = unsigned({"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}, claims(sub="admin")).split(".")[1]
    return f"{head}.{forged}.{sig}"


HOSTILE = {
    "alg-none": (lambda i: forge_none(claims(), kid="rsa-1"), "token-algorithm-refused"),
    "alg-none-no-signature-dot": (lambda i: forge_none(claims())[:-1], "token-malformed"),
    "hs256-with-rsa-public-pem": (lambda i: forge_hs256(i.key("rsa-1").public_pem(), claims(), kid="rsa-1"),
                                  "token-algorithm-refused"),
    "alg-with-quote-injection": (lambda i: unsigned({"alg": 'x", error="none'}, claims()) + ".c2ln",
                                 "token-algorithm-refused"),
    "alg-non-ascii": (lambda i: unsigned({"alg": "\u2603"}, claims()) + ".c2ln", "token-algorithm-refused"),
    "expired": (lambda i: i.mint(claims(iat=_now() - 7200, exp=_now() - 3600)), "token-expired"),
    "nbf-in-future": (lambda i: i.mint(claims(nbf=_now() + 3600)), "token-not-yet-valid"),
    "iat-in-future": (lambda i: i.mint(claims(iat=_now() + 3600, exp=_now() + 7200)), "token-not-yet-valid"),
    "wrong-issuer": (lambda i: i.mint(claims(iss="https://evil.example.test")), "token-issuer-mismatch"),
    "wrong-audience": (lambda i: i.mint(claims(aud="other-api")), "token-audience-mismatch"),
    "missing-audience": (lambda i: i.mint(claims(aud=None)), "token-claim-missing"),
    "missing-exp": (lambda i: i.mint(claims(exp=None)), "token-claim-missing"),
    "kid-path-traversal": (lambda i: i.mint(kid="../../etc/passwd", key=i.key("rsa-1")), "token-key-unknown"),
    "kid-url": (lambda i: i.mint(kid=i.attacker_uri(), key=i.attacker), "token-key-unknown"),
    "kid-very-long": (lambda i: i.mint(kid="k" * 5000, key=i.key("rsa-1")), "token-malformed"),
    "kid-not-a-string": (lambda i: unsigned({"alg": "RS256", "kid": 123}, claims()) + ".c2ln", "token-malformed"),
    "embedded-jwk-attacker-kid": (lambda i: i.mint(key=i.attacker, kid="attacker", headers={"jwk": i.attacker.jwk()}),
                                  "token-key-unknown"),
    "embedded-jwk-issuer-kid": (lambda i: i.mint(key=i.attacker, kid="rsa-1", headers={"jwk": i.attacker.jwk()}),
                                "token-signature-invalid"),
    "jku-to-attacker": (lambda i: i.mint(key=i.attacker, kid="attacker", headers={"jku": i.attacker_uri()}),
                        "token-key-unknown"),
    "x5u-to-attacker": (lambda i: i.mint(key=i.attacker, kid="attacker", headers={"x5u": i.attacker_uri()}),
                        "token-key-unknown"),
    "attacker-key-no-kid": (lambda i: i.mint(key=i.attacker, kid=None), "token-signature-invalid"),
    "es256-claiming-rsa-kid": (lambda i: i.mint(key=i.key("ec-1"), kid="rsa-1"), "token-key-unknown"),
    "rs256-claiming-ec-kid": (lambda i: i.mint(key=i.key("rsa-1"), kid="ec-1"), "token-key-unknown"),
    "signature-stripped": (lambda i: i.mint().rsplit(".", 1)[0] + ".", "token-signature-invalid"),
    "payload-tampered": (_tampered, "token-signature-invalid"),
    "not-a-jwt": (lambda i: "not.a.jwt", "token-malformed"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_token_is_refused_and_never_reaches_the_upstream(tmp_path, issuer, upstream, case):
    make, code = HOSTILE[case]
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        assert_refused(await call(gw, token=make(issuer)), code, upstream)
    # jku / x5u / kid values are never dereferenced: the issuer saw nothing but its JWKS URI
    assert set(issuer.paths) == {"/jwks.json"}, issuer.paths


@pytest.mark.parametrize("kib", [17, 40, 70])
async def test_a_token_over_the_header_line_limit_is_431_and_never_reaches_the_upstream(tmp_path, issuer, upstream, kib):
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        status, _, body = await call(gw, token=issuer.mint(claims(pad="x" * kib * 1024)))
    assert (status, body["error"]) == (431, "headers_too_large")
    assert upstream.requests == []


async def test_token_bytes_that_are_not_utf8_are_refused_on_first_and_repeated_use(tmp_path, issuer, upstream):
    """Raw non-UTF-8 bytes in the Authorization header, before any token and after a good one
    that is cached already (the repeated-decision lookup hashes what it is given)."""
    token = issuer.mint(claims()).encode()
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        for header in (b"Authorization: Bearer \xff\xfe" + token, b"Authorization: Bearer " + token):
            await raw_get(gw, header)  # the second one is the good token: cached from here on
        before = len(upstream.requests)
        for header in (b"Authorization: Bearer \xff\xfe" + token, b"Authorization: Bearer " + token + b"\xc3\x28",
                       b"Authorization: Bearer \xed\xa0\x80"):
            response = await raw_get(gw, header)
            assert response.status == 401 and response.json()["violations"][0]["code"] == "token-malformed", response
        assert len(upstream.requests) == before, "a refused request reached the upstream"
        assert (await raw_get(gw, b"Authorization: Bearer " + token)).status == 200


async def raw_get(gw, header: bytes):
    """A GET with `header` as raw bytes (aiohttp's client sends only UTF-8)."""
    [response] = await send(gw, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header + b"\r\n\r\n")
    return response


async def test_token_over_the_header_limit_gets_431(tmp_path, issuer, upstream):
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        status, _, body = await call(gw, token=issuer.mint(claims(pad="x" * 70 * 1024)))
    assert status == 431, body
    assert upstream.requests == []


# --- JWKS fetching: unknown kids, rotation, single flight, failures -------------------------------

async def test_unknown_kid_refetches_once_and_a_flood_of_forged_kids_is_rate_limited(tmp_path, issuer, upstream):
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        base = issuer.fetches
        assert base == 1
        await asyncio.sleep(REFETCH_INTERVAL + 0.3)  # past the refetch interval of the warm-up fetch
        assert_refused(await call(gw, token=issuer.mint(kid="forged-0", key=issuer.attacker)), "token-key-unknown",
                       upstream)
        assert issuer.fetches == base + 1, "an unknown kid must cause exactly one refetch"
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(
                call(gw, token=issuer.mint(kid=f"forged-{n}", key=issuer.attacker), session=session)
                for n in range(1, 201)))
        for result in results:
            assert_refused(result, "token-key-unknown", upstream)
        assert issuer.fetches - base <= 2, f"200 forged kids caused {issuer.fetches - base} JWKS fetches"


async def test_rotation_new_kid_accepted_after_one_refetch_and_old_kid_while_present(tmp_path, issuer, upstream):
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        assert (await call(gw, token=issuer.mint()))[0] == 200
        issuer.rotate("rsa-2", keep_old=True)
        await asyncio.sleep(REFETCH_INTERVAL + 0.3)
        base = issuer.fetches
        status, _, body = await call(gw, token=issuer.mint(kid="rsa-2"))
        assert status == 200, body
        assert issuer.fetches == base + 1
        assert (await call(gw, token=issuer.mint(kid="rsa-1")))[0] == 200  # a fresh token with the old kid
        assert (await call(gw, token=issuer.mint(kid="rsa-2")))[0] == 200
        assert issuer.fetches == base + 1


async def test_concurrent_requests_for_a_new_kid_share_one_fetch(tmp_path, issuer, upstream):
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        issuer.rotate("rsa-2", keep_old=True)
        issuer.delay = 0.5  # a slow issuer: the other requests arrive while the fetch is in flight
        await asyncio.sleep(REFETCH_INTERVAL + 0.3)
        base = issuer.fetches
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(call(gw, token=issuer.mint(kid="rsa-2"), session=session)
                                             for _ in range(20)))
        statuses = [status for status, _, _ in results]
        codes = [body["violations"][0]["code"] for status, _, body in results if status != 200]
        assert statuses == [200] * 20, f"{statuses.count(200)}/20 accepted; refused with {set(codes)}"
        assert issuer.fetches == base + 1


@pytest.mark.parametrize("failure", ["error", "refused"])
async def test_jwks_down_at_startup_means_not_ready_and_401(tmp_path, issuer, upstream, failure):
    if failure == "refused":
        await issuer.stop()
    else:
        issuer.mode = "error"
    async with jwt_gateway(tmp_path, issuer, upstream, ready=False) as gw:
        async def attempted():
            return await metric_value(gw, "sandgate_jwks_refresh_total", provider="idp", result="failure") >= 1

        assert await wait_for(attempted), "the warm-up fetch was never recorded as a failure"
        status, details = await readiness(gw)
        assert status == 503 and details.get("jwks_loaded") is False, details
        assert_refused(await call(gw, token=issuer.mint()), "token-key-unknown", upstream)


async def test_gateway_becomes_ready_when_the_jwks_recovers_without_any_traffic(tmp_path, issuer, upstream):
    """A pod that is not ready gets no traffic, so readiness must not wait for a request to
    trigger the refetch."""
    issuer.mode = "error"
    async with jwt_gateway(tmp_path, issuer, upstream, ready=False) as gw:
        assert await wait_for(lambda: _async(issuer.fetches >= 1))
        issuer.mode = "ok"
        assert await wait_ready(gw, timeout=REFETCH_INTERVAL + 3), "still not ready after the JWKS came back"
        assert (await call(gw, token=issuer.mint()))[0] == 200


async def _async(value):
    return value


@pytest.mark.parametrize("failure", ["garbage", "empty", "error", "oct-only", "refused"])
async def test_bad_jwks_after_good_keys_keeps_the_last_good_keys(tmp_path, issuer, upstream, failure):
    async with jwt_gateway(tmp_path, issuer, upstream, remoteJWKS={"uri": issuer.jwks_uri, "cacheDuration": "1s"}) as gw:
        assert (await call(gw, token=issuer.mint()))[0] == 200
        if failure == "refused":
            await issuer.stop()
        else:
            issuer.mode = failure
        await asyncio.sleep(1.2)  # the cache has expired: the next request refreshes
        for kid in ("rsa-1", "ec-1", "ed-1"):  # fresh tokens, so the verified-token cache cannot help
            status, _, body = await call(gw, token=issuer.mint(kid=kid))
            assert status == 200, (kid, body)
        assert await metric_value(gw, "sandgate_jwks_refresh_total", provider="idp", result="failure") >= 1
        assert (await readiness(gw))[0] == 200
    assert len(upstream.requests) == 4


# --- where tokens are read from ---------------------------------------------------------------

SOURCES = [
    # (extractFrom, how the token is sent, accepted?)
    (None, "bearer", True),
    (None, "bearer-lowercase-scheme", True),
    (None, "query-access_token", False),
    (None, "cookie-access_token", False),
    ({"cookies": ["sg_session"]}, "cookie-sg_session", True),
    ({"cookies": ["sg_session"]}, "bearer", False),
    ({"params": ["token"]}, "query-token", True),
    ({"params": ["token"]}, "query-access_token", False),
    ({"headers": [{"name": "X-Api-Token"}]}, "header-x-api-token", True),
]


def _send(how: str, token: str) -> tuple[str, dict]:
    return {
        "bearer": ("/", {"Authorization": f"Bearer {token}"}),
        "bearer-lowercase-scheme": ("/", {"Authorization": f"bearer {token}"}),
        "query-access_token": (f"/?access_token={token}", {}),
        "query-token": (f"/?token={token}", {}),
        "cookie-access_token": ("/", {"Cookie": f"access_token={token}"}),
        "cookie-sg_session": ("/", {"Cookie": f"theme=dark; sg_session={token}"}),
        "header-x-api-token": ("/", {"X-Api-Token": token}),
    }[how]


@pytest.mark.parametrize("extract_from, how, accepted", SOURCES,
                         ids=[f"{'default' if e is None else next(iter(e))}-{h}" for e, h, _ in SOURCES])
async def test_token_is_read_only_where_extract_from_says(tmp_path, issuer, upstream, extract_from, how, accepted):
    fields = {"extractFrom": extract_from} if extract_from else {}
    async with jwt_gateway(tmp_path, issuer, upstream, **fields) as gw:
        path, headers = _send(how, issuer.mint())
        result = await call(gw, path, headers=headers)
    if accepted:
        assert result[0] == 200, result[2]
        assert len(upstream.requests) == 1
    else:
        assert_missing(result, upstream)


# --- accepted tokens ------------------------------------------------------------------------

@pytest.mark.parametrize("alg, kid", [("RS256", "rsa-1"), ("PS256", "rsa-1"), ("ES256", "ec-1"), ("EdDSA", "ed-1")])
async def test_valid_token_reaches_upstream_with_claim_headers_and_client_copies_stripped(
        tmp_path, issuer, upstream, alg, kid):
    token = issuer.mint(claims(sub="alice", org={"team": "core"}), kid=kid, alg=alg)
    spoofed = {"X-User-Sub": "mallory", "x-user-team": "admins", "X-USER-EMAIL": "mallory@evil.example"}
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        status, _, body = await call(gw, token=token, headers=spoofed)
    assert status == 200, body
    assert upstream.headers(0, "X-User-Sub") == ["alice"]
    assert upstream.headers(0, "X-User-Team") == ["core"]
    assert upstream.headers(0, "X-User-Email") == []  # no such claim: the client's value is dropped too


async def test_verified_token_cache_does_not_outlive_exp(tmp_path, issuer, upstream):
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        exp = _now() + 2
        token = issuer.mint(claims(exp=exp))
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                assert (await call(gw, token=token, session=session))[0] == 200
        await asyncio.sleep(max(0.0, exp + 1.2 - time.time()))
        result = await call(gw, token=token)
    upstream.requests.clear()
    assert_refused(result, "token-expired", upstream)


async def test_verified_token_cache_is_per_policy_not_per_provider_name(tmp_path, issuer, upstream):
    """Two policies with a provider of the same name but different audiences: a token verified
    for one must not be accepted by the other."""
    policies = "".join(
        security_policy(f"p-{name}", {"jwt": {"providers": [provider(issuer, audiences=[f"api-{name}"])]}},
                        targets=[route_target(name)])
        for name in ("a", "b"))
    yaml_routes = GATEWAY + backend("echo", upstream.port) + prefix_route("a", "/a") + prefix_route("b", "/b")
    async with running_gateway(tmp_path, yaml_routes, policies_yaml=policies) as gw:
        assert await wait_ready(gw)
        token = issuer.mint(claims(aud="api-a"))
        assert (await call(gw, "/a", token=token))[0] == 200
        result = await call(gw, "/b", token=token)
    upstream.requests.clear()
    assert_refused(result, "token-audience-mismatch", upstream)


async def test_decision_is_logged_without_the_token(tmp_path, issuer, upstream):
    token = issuer.mint(claims(sub="alice"))
    async with jwt_gateway(tmp_path, issuer, upstream) as gw:
        assert (await call(gw, token=token))[0] == 200
        assert (await call(gw, f"/?access_token={token}"))[0] == 401
        records = access_records(gw)
        text = gw.log_buffer.getvalue()
    decisions = [r for r in records if "decision" in r]  # the request's line carries its decision
    assert len(decisions) == len(records) == 2
    assert [d["decision"] for d in decisions] == ["allow", "deny"]
    assert decisions[0]["principal"] == f"{ISSUER}#alice" and re.fullmatch(r"[0-9a-f]{16}", decisions[0]["credential"])
    assert decisions[1]["reasons"] == ["credentials-missing"]
    assert all(d["policy"] == "infra/jwt" and d["request_id"] and d["revision"] for d in decisions)
    assert token not in text and token.split(".")[2] not in text


@pytest.mark.parametrize("uri_host", ["keys.idp.invalid:8443", "IdP.Example.invalid:80"])
async def test_resolve_applies_to_jwks_fetches(tmp_path, issuer, upstream, uri_host):
    """`--resolve HOST:PORT=ADDR:PORT` sends the JWKS fetch of a made-up host (never resolvable:
    .invalid) to the loopback issuer, as it does for backends; the URI keeps its own host."""
    host, _, port = uri_host.rpartition(":")
    uri = f"http://{host}{'' if port == '80' else ':' + port}/jwks.json"
    policy = security_policy("jwt", {"jwt": {"providers": [provider(issuer, remoteJWKS={"uri": uri})]}})
    overrides = {uri_host.lower(): ("127.0.0.1", issuer.port)}
    async with running_gateway(tmp_path, echo_routes(upstream.port), policies_yaml=policy, overrides=overrides) as gw:
        assert await wait_ready(gw), "the JWKS of the overridden host was never fetched"
        assert (await call(gw, token=issuer.mint()))[0] == 200
    assert issuer.fetches >= 1 and "/jwks.json" in issuer.paths



@pytest.mark.parametrize("removed", ["rsa-1", "ec-1"])
async def test_a_key_removed_from_the_jwks_stops_verifying_cached_tokens(tmp_path, issuer, upstream, removed):
    """SPEC §2.2: the verified-token cache never outlives the key that verified the token. A
    token verified (and cached, with its decision) before its key left the JWKS is refused
    within cacheDuration plus one refresh; a token of a key still served keeps working."""
    kept = {"rsa-1": "ec-1", "ec-1": "rsa-1"}[removed]
    async with jwt_gateway(tmp_path, issuer, upstream, remoteJWKS={"uri": issuer.jwks_uri, "cacheDuration": "1s"}) as gw:
        doomed, survivor = issuer.mint(kid=removed), issuer.mint(kid=kept)
        async with aiohttp.ClientSession() as session:
            for _ in range(20):  # cached, and the allowed decision kept with it
                assert (await call(gw, token=doomed, session=session))[0] == 200
                assert (await call(gw, token=survivor, session=session))[0] == 200
            issuer.keys = [k for k in issuer.keys if k.kid != removed]

            async def refused():
                return (await call(gw, token=doomed, session=session))[0] == 401

            assert await wait_for(refused, timeout=8.0), "a token of a removed key still verifies from the cache"
            upstream.requests.clear()
            assert_refused(await call(gw, token=doomed, session=session), "token-key-unknown", upstream)
            assert (await call(gw, token=survivor, session=session))[0] == 200


async def test_principals_are_issuer_and_subject_not_bare_subject(tmp_path, issuer, upstream):
    """Two trusted issuers both have a user "alice": the audit record and the access log name
    each as issuer#subject, so one can never be taken for the other."""
    issuers = ("https://a.example.test", "https://b.example.test/tenant#1")
    providers = [provider(issuer, name=f"idp-{i}") | {"issuer": iss} for i, iss in enumerate(issuers)]
    policy = security_policy("jwt", {"jwt": {"providers": providers}})
    async with running_gateway(tmp_path, echo_routes(upstream.port), policies_yaml=policy) as gw:
        assert await wait_ready(gw)
        for iss in issuers:
            assert (await call(gw, token=issuer.mint(claims(iss=iss, sub="alice"))))[0] == 200
        principals = [r["principal"] for r in access_records(gw) if "decision" in r]
    assert principals == ["https://a.example.test#alice", "https://b.example.test/tenant%231#alice"]


async def test_the_verified_token_cache_is_bounded_by_bytes_and_long_paths_are_not_memoised(issuer):
    """Valid tokens are what an account holder can mint at will, up to 16 KiB each: the cache
    of verified tokens holds at most its byte budget whatever their size, and a token's memo of
    decisions never keeps a key longer than MEMO_KEY_CHARS (paths are the client's)."""
    import json as json_module

    from gateway.auth import jwt as jwt_module
    from gateway.auth.jwks import KeySet
    from gateway.policy.model import JwtProvider, TokenSource

    key_set = KeySet("idp", None, None, cache_seconds=300, inline=json_module.dumps(issuer.jwks()))
    budget = 40 * (2 * 8 * 1024 + jwt_module.MEMO_ALLOWANCE)  # room for about 40 tokens of 8 KiB
    verifier = jwt_module.JwtVerifier(lambda provider: key_set, cache_bytes=budget)
    providers = (JwtProvider("idp", None, ("api",), None, "inline", 300, (), TokenSource()),)
    for i in range(200):
        token = issuer.mint(claims(pad=f"{i}" + "x" * 8 * 1024))
        verified = await verifier.verify(token, providers)
        verified.remember(("p", "GET", "/" + "a" * 300), "long")
        verified.remember(("p", "GET", "/short"), "short")
        assert set(verified.memo.values()) == {"short"}
        assert verifier.cached_bytes <= budget
    assert 20 <= len(verifier._cache) <= 40
    assert verifier.cached(token, providers) is verified  # the latest one is still cached
