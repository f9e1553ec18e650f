"""A real JWKS issuer for tests: an aiohttp app on loopback serving /jwks.json, and token minting.

Keys are made with `cryptography` (RSA 2048, EC P-256, Ed25519) and published as a JWKS. The
server counts fetches and can misbehave on request (`mode`): "ok", "error" (500), "garbage"
(not JSON), "empty" ({"keys": []}), "oct-only" (a symmetric key, which no verifier may use),
with an optional `delay` before answering; `stop()` closes the port (connection refused).
`/attacker.json` serves the attacker's key, so a test can prove a `jku`/`x5u` was never followed.
Tokens are signed with pyjwt, or by hand where pyjwt refuses to forge (alg none, HS256 with a
public key as the secret).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from functools import cache

import jwt as pyjwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://issuer.example.test"
AUDIENCE = "api"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str  # the default algorithm for this key
    private: object

    @property
    def public(self):
        return self.private.public_key()

    def jwk(self) -> dict:
        if isinstance(self.private, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(self.public, as_dict=True)
        elif isinstance(self.private, ec.EllipticCurvePrivateKey):
            jwk = ECAlgorithm.to_jwk(self.public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(self.public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@cache
def _rsa(n: int) -> rsa.RSAPrivateKey:
    """RSA generation is slow; keys are made once per test process and reused by index."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_key(kind: str, kid: str, index: int = 0) -> SigningKey:
    if kind == "rsa":
        return SigningKey(kid, "RS256", _rsa(index))
    if kind == "ec":
        return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))
    if kind == "ed":
        return SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())
    raise ValueError(kind)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides) -> dict:
    """Valid claims for ISSUER/AUDIENCE, expiring in 5 minutes; a value None removes the claim."""
    now = int(time.time())
    out = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def unsigned(header: dict, payload: dict) -> str:
    return b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())


def forge_none(payload: dict, kid: str | None = None) -> str:
    header = {"alg": "none", "typ": "JWT", **({"kid": kid} if kid else {})}
    return unsigned(header, payload) + "."


def forge_hs256(secret: bytes, payload: dict, kid: str | None = None) -> str:
    """HMAC-signed with `secret` — e.g. the issuer's public key PEM (key confusion)."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = unsigned(header, payload)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


class Issuer:
    """Serves the JWKS of its current keys; `keys` may be replaced at any time (rotation)."""

    def __init__(self):
        self.keys: list[SigningKey] = [make_key("rsa", "rsa-1", 0), make_key("ec", "ec-1"), make_key("ed", "ed-1")]
        self.attacker = make_key("rsa", "attacker", 1)
        self.mode = "ok"
        self.delay = 0.0
        self.fetches = 0
        self.paths: list[str] = []  # every path asked for, in order
        self._runner: web.AppRunner | None = None
        self.port = 0

    def key(self, kid: str) -> SigningKey:
        return next(k for k in self.keys if k.kid == kid)

    @property
    def jwks_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def attacker_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/attacker.json"

    def jwks(self) -> dict:
        return {"keys": [k.jwk() for k in self.keys]}

    def rotate(self, kid: str = "rsa-2", *, keep_old: bool = True) -> SigningKey:
        new = make_key("rsa", kid, 2)
        self.keys = ([*self.keys] if keep_old else []) + [new]
        return new

    def mint(self, payload: dict | None = None, *, kid: str | None = "rsa-1", alg: str | None = None,
             key: SigningKey | None = None, headers: dict | None = None) -> str:
        """A token signed by `key` (default: the issuer's key named `kid`), header kid = `kid`."""
        signer = key or self.key(kid)
        extra = dict(headers or {})
        if kid is not None:
            extra["kid"] = kid
        return pyjwt.encode(payload if payload is not None else claims(), signer.private,
                            algorithm=alg or signer.alg, headers=extra)

    async def _handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.path == "/attacker.json":
            return web.json_response({"keys": [self.attacker.jwk()]})
        if request.path != "/jwks.json":
            return web.Response(status=404)
        self.fetches += 1
        if self.mode == "error":
            return web.Response(status=500, text="down")
        if self.mode == "garbage":
            return web.Response(body=b"\x00<html>not a key set", content_type="application/json")
        if self.mode == "empty":
            return web.json_response({"keys": []})
        if self.mode == "oct-only":
            return web.json_response({"keys": [{"kty": "oct", "kid": "rsa-1", "k": b64url(b"secret" * 6)}]})
        return web.json_response(self.jwks())

    async def start(self) -> "Issuer":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the port: later fetches get connection refused."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
