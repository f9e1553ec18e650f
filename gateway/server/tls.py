"""TLS for HTTPS listeners: certificates from `<tls-dir>/<name>/tls.{crt,key}`, re-read on change.

With `--tls-dir kv://VAULT`, certificate `<name>` is instead the Key Vault secret `<name>` (what
Key Vault keeps for a certificate of that name: PEM with the private key and the chain, or a
base64 PKCS#12 without password), fetched before start and refreshed like every kv:// secret.
Python's ssl loads keys from files only: the PEM goes through an anonymous in-memory file
(memfd), never the disk.

Each listener port gets one server SSLContext. With several certificates (several HTTPS
listeners on one port, or several certificateRefs), SNI picks the context whose listener
hostname matches; the first certificate is the default. A changed file is loaded into the same
SSLContext objects, so new handshakes use it without a restart and open connections continue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12

from gateway.routing.attach import wildcard_covers
from gateway.secrets import KEY_VAULT, KEY_VAULT_SCHEME, MissingSecret

log = logging.getLogger("sandgate.tls")


@dataclass
class _Certificate:
    name: str
    cert_file: str
    key_file: str
    context: ssl.SSLContext
    hostnames: list[str] = field(default_factory=list)  # listener hostnames served with it
    stamp: tuple = ()
    vault_ref: str | None = None  # kv://VAULT/NAME when the certificate comes from Key Vault
    loaded: bytes = b""  # the Key Vault secret's value last loaded


def _stamp(*paths: str) -> tuple:
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def vault_certificate_refs(tls_dir: str, listeners) -> dict[str, str]:
    """kv://VAULT/NAME -> certificate name, for the HTTPS listeners' certificates when `tls_dir`
    is kv://VAULT (none otherwise)."""
    return {ref: name for listener in listeners if listener.protocol == "HTTPS"
            for name in listener.certificate_names if (ref := _vault_ref(tls_dir, name))}


def _vault_ref(tls_dir: str, name: str) -> str | None:
    return f"{tls_dir.rstrip('/')}/{name}" if tls_dir.startswith(KEY_VAULT_SCHEME) else None


def pem_of(secret: bytes) -> bytes:
    """A Key Vault certificate's secret as PEM: as it is, or converted from base64 PKCS#12."""
    if secret.lstrip().startswith(b"-----BEGIN"):
        return secret
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(base64.b64decode(secret, validate=True), None)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"neither PEM nor base64 PKCS#12 without a password ({e})") from None
    if key is None or cert is None:
        raise ValueError("the PKCS#12 holds no private key or no certificate")
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()) + b"".join(
        c.public_bytes(Encoding.PEM) for c in (cert, *chain))


def _load_pem(context: ssl.SSLContext, pem: bytes) -> None:
    """load_cert_chain from memory: an anonymous in-memory file where Linux has one."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sandgate-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile() as f:  # pragma: no cover - elsewhere: a private (0600) file, removed at once
        f.write(pem)
        f.flush()
        context.load_cert_chain(f.name)


class CertificateStore:
    def __init__(self, tls_dir: str):
        self.tls_dir = tls_dir
        self._certs: dict[str, _Certificate] = {}

    def _load(self, name: str) -> _Certificate:
        cert = self._certs.get(name)
        if cert is None:
            ref = _vault_ref(self.tls_dir, name)
            cert = self._certs[name] = self._from_vault(name, ref) if ref is not None else self._from_files(name)
        return cert

    def _from_files(self, name: str) -> _Certificate:
        base = os.path.join(self.tls_dir, name)
        cert = _Certificate(name, os.path.join(base, "tls.crt"), os.path.join(base, "tls.key"), _server_context())
        for path in (cert.cert_file, cert.key_file):
            if not os.path.isfile(path):
                # ssl's own error does not say which file is missing
                raise FileNotFoundError(errno.ENOENT, f"certificate {name}: no such file {path}", path)
        cert.context.load_cert_chain(cert.cert_file, cert.key_file)
        cert.stamp = _stamp(cert.cert_file, cert.key_file)
        return cert

    @staticmethod
    def _from_vault(name: str, ref: str) -> _Certificate:
        cert = _Certificate(name, "", "", _server_context(), vault_ref=ref)
        try:
            cert.loaded = KEY_VAULT.get(ref, f"TLS certificate {name}").value()
        except MissingSecret as e:
            raise ValueError(str(e)) from None
        _load_pem(cert.context, pem_of(cert.loaded))
        return cert

    def context_for(self, listeners) -> ssl.SSLContext:
        """One server context for the HTTPS listeners sharing a port; raises on unreadable files."""
        by_host: list[tuple[str | None, ssl.SSLContext]] = []
        default: ssl.SSLContext | None = None
        for listener in listeners:
            for name in listener.certificate_names:
                cert = self._load(name)
                by_host.append((listener.hostname, cert.context))
                default = default or cert.context
        if len(by_host) <= 1:
            return default

        def choose(ssl_socket, server_name, _context):
            if not server_name:
                return None
            server_name = server_name.lower()
            for hostname, context in by_host:
                if hostname == server_name:
                    ssl_socket.context = context
                    return None
            for hostname, context in by_host:
                if hostname and hostname.startswith("*.") and wildcard_covers(hostname, server_name):
                    ssl_socket.context = context
                    return None
            return None

        default.sni_callback = choose
        return default

    def reload_changed(self) -> list[str]:
        """Re-read certificates whose files changed; returns the names reloaded."""
        reloaded = []
        for cert in self._certs.values():
            if cert.vault_ref is not None:
                if self._reload_from_vault(cert):
                    reloaded.append(cert.name)
                continue
            try:
                stamp = _stamp(cert.cert_file, cert.key_file)
                if stamp == cert.stamp:
                    continue
                cert.context.load_cert_chain(cert.cert_file, cert.key_file)
                cert.stamp = stamp
                reloaded.append(cert.name)
                log.info("reloaded certificate %s", cert.name)
            except (OSError, ssl.SSLError) as e:
                # A half-written pair (crt updated, key not yet) fails here; the next poll retries.
                log.warning("certificate %s not reloaded: %s", cert.name, e)
        return reloaded

    def _reload_from_vault(self, cert: _Certificate) -> bool:
        value = KEY_VAULT.get(cert.vault_ref, f"TLS certificate {cert.name}").value()
        if value == cert.loaded:
            return False
        try:
            _load_pem(cert.context, pem_of(value))
        except (OSError, ValueError, ssl.SSLError) as e:
            log.warning("certificate %s not reloaded from Key Vault: %s", cert.name, e)
            cert.loaded = value  # not again until the vault holds another value
            return False
        cert.loaded = value
        log.info("reloaded certificate %s from Key Vault", cert.name)
        return True

    async def watch(self, interval: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_changed()
