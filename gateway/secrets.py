"""Secrets from files (SPEC §6): the router token, the API-key pepper, the database password.

Each is a file's content (a mounted Secret, or a file the Key Vault CSI driver writes), re-read
when the file changes so that a rotated Secret takes effect without a restart. A change is seen
within RECHECK_SECONDS: callers ask for the value per request, and at most one stat() a second
looks at the file. Kubernetes swaps a Secret's files through a symlink, so the file's identity
(inode, mtime, size) tells a new version. While running, a file that disappears or is emptied
keeps the last good value (a Secret being swapped, like a failed JWKS fetch keeping its keys);
at startup a missing or unusable secret stops the gateway with one line naming it.

Where a file path is configured, `kv://VAULT/NAME` reads the secret from Azure Key Vault at run
time instead (KeyVault below).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from time import monotonic

RECHECK_SECONDS = 1.0

log = logging.getLogger("sandgate.secrets")


class MissingSecret(Exception):
    """A required secret is missing or unusable; the message names it and its file."""


class SecretFile:
    def __init__(self, path: str, what: str, *, min_bytes: int = 1):
        self.path = path
        self.what = what  # e.g. "API key pepper", as messages name it
        self._min_bytes = min_bytes
        self._value = b""
        self._stamp: tuple | None = None
        self._checked = monotonic()
        self._load()

    def value(self) -> bytes:
        """The current content, surrounding whitespace stripped."""
        now = monotonic()
        if now - self._checked > RECHECK_SECONDS:
            self._checked = now
            try:
                self._load()
            except MissingSecret:
                pass  # keep the last good value until a usable file is back
        return self._value

    def text(self) -> str:
        return self.value().decode()

    def _load(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, "rb") as f:
                value = f.read().strip()
        except OSError:
            raise MissingSecret(f"missing secret: {self.what} file {self.path}") from None
        if not value:
            raise MissingSecret(f"empty secret: {self.what} file {self.path}")
        if len(value) < self._min_bytes:
            raise MissingSecret(f"secret too short: {self.what} file {self.path} needs at least {self._min_bytes} bytes")
        self._value, self._stamp = value, stamp


# --- Azure Key Vault at run time (kv://VAULT/NAME) -------------------------------------------------

KEY_VAULT_SCHEME = "kv://"
REFRESH_SECONDS = 300.0  # a rotation in the vault is seen within 5 minutes
_VAULT_NAME = re.compile(r"[0-9A-Za-z-]{3,24}")
_VAULT_HOST = re.compile(r"[0-9A-Za-z.-]+(:[0-9]{1,5})?")  # a full host, for other clouds
_SECRET_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")


def open_secret(ref: str, what: str, *, min_bytes: int = 1) -> SecretFile | VaultSecret:
    """The secret `ref` names: a file path, or kv://VAULT/NAME, which KEY_VAULT must have loaded
    (the gateway loads every reference it is configured with before it starts)."""
    if ref.startswith(KEY_VAULT_SCHEME):
        return KEY_VAULT.get(ref, what)
    return SecretFile(ref, what, min_bytes=min_bytes)


def vault_location(ref: str) -> tuple[str, str]:
    """(vault URL, secret name) of kv://VAULT/NAME: VAULT is a vault's name (Azure's public
    cloud, VAULT.vault.azure.net) or a full host such as myvault.vault.azure.cn."""
    vault, _, name = ref[len(KEY_VAULT_SCHEME):].partition("/")
    if not _SECRET_NAME.fullmatch(name):
        raise MissingSecret(f"invalid Key Vault reference {ref}: the secret name must be 1-127 letters, digits or '-'")
    if "." not in vault and _VAULT_NAME.fullmatch(vault):
        return f"https://{vault}.vault.azure.net", name
    if "." in vault and _VAULT_HOST.fullmatch(vault):
        return f"https://{vault}", name
    raise MissingSecret(f"invalid Key Vault reference {ref}: expected kv://VAULT/NAME")


class VaultSecret:
    """A secret's current value as read from Key Vault (KeyVault keeps it fresh)."""

    def __init__(self, ref: str, what: str, min_bytes: int):
        self.ref, self.what, self.min_bytes = ref, what, min_bytes
        self._value = b""

    def value(self) -> bytes:
        return self._value

    def text(self) -> str:
        return self._value.decode()

    def update(self, value: bytes) -> None:
        if not value:
            raise MissingSecret(f"empty secret: {self.what} {self.ref}")
        if len(value) < self.min_bytes:
            raise MissingSecret(f"secret too short: {self.what} {self.ref} needs at least {self.min_bytes} bytes")
        self._value = value


class KeyVault:
    """The process's Key Vault secrets: fetched once before use (load), then re-read every
    REFRESH_SECONDS or SANDGATE_KEYVAULT_REFRESH_SECONDS (refresh_forever); a failed refresh keeps
    the last value, as a failed JWKS fetch keeps its keys. Credentials come from azure-identity's DefaultAzureCredential
    (workload identity, managed identity, environment, ...); requests trust the system's CAs, or
    the bundle SSL_CERT_FILE names."""

    def __init__(self):
        self._secrets: dict[str, VaultSecret] = {}
        self._clients: dict[str, object] = {}
        self._credential = None

    def get(self, ref: str, what: str) -> VaultSecret:
        secret = self._secrets.get(ref)
        if secret is None:
            raise MissingSecret(f"missing secret: {what} {ref} was not loaded from Key Vault")
        return secret

    async def load(self, wanted: dict[str, tuple[str, int]]) -> None:
        """Fetch the references in `wanted` (ref -> (what, min_bytes)) not loaded yet; the first
        that cannot be read raises MissingSecret naming it, with the reason in a few words."""
        for ref, (what, min_bytes) in wanted.items():
            if ref in self._secrets:
                continue
            secret = VaultSecret(ref, what, min_bytes)
            secret.update(await self._fetch(secret))
            self._secrets[ref] = secret

    async def refresh_forever(self) -> None:
        interval = float(os.environ.get("SANDGATE_KEYVAULT_REFRESH_SECONDS") or REFRESH_SECONDS)
        while True:
            await asyncio.sleep(interval)
            for secret in list(self._secrets.values()):
                try:
                    secret.update(await self._fetch(secret))
                except MissingSecret as e:
                    log.warning("Key Vault refresh failed, keeping the last value: %s", e)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        if self._credential is not None:
            await self._credential.close()
        self._clients.clear()
        self._credential = None
        self._secrets.clear()

    async def _fetch(self, secret: VaultSecret) -> bytes:
        url, name = vault_location(secret.ref)
        try:
            bundle = await self._client(url).get_secret(name)
        except Exception as e:  # noqa: BLE001 - any failure is one line naming the secret
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise MissingSecret(f"missing secret: {secret.what} {secret.ref}: {reason}") from None
        return (bundle.value or "").strip().encode()

    def _client(self, url: str):
        client = self._clients.get(url)
        if client is None:
            # Imported here: a gateway without kv:// references never loads the Azure SDK.
            from azure.identity.aio import DefaultAzureCredential
            from azure.keyvault.secrets.aio import SecretClient

            if self._credential is None:
                self._credential = DefaultAzureCredential()
            client = self._clients[url] = SecretClient(
                url, self._credential, connection_verify=os.environ.get("SSL_CERT_FILE") or True)
        return client


KEY_VAULT = KeyVault()
