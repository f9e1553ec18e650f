"""TLS for HTTPS listeners: certificates from `<tls-dir>/<name>/tls.{crt,key}`, re-read on change.

Each listener port gets one server SSLContext. With several certificates (several HTTPS
listeners on one port, or several certificateRefs), SNI picks the context whose listener
hostname matches; the first certificate is the default. A changed file is loaded into the same
SSLContext objects, so new handshakes use it without a restart and open connections continue.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import ssl
from dataclasses import dataclass, field

from gateway.routing.attach import wildcard_covers

log = logging.getLogger("sandgate.tls")


@dataclass
class _Certificate:
    name: str
    cert_file: str
    key_file: str
    context: ssl.SSLContext
    hostnames: list[str] = field(default_factory=list)  # listener hostnames served with it
    stamp: tuple = ()


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


class CertificateStore:
    def __init__(self, tls_dir: str):
        self.tls_dir = tls_dir
        self._certs: dict[str, _Certificate] = {}

    def _load(self, name: str) -> _Certificate:
        cert = self._certs.get(name)
        if cert is None:
            base = os.path.join(self.tls_dir, name)
            cert = _Certificate(name, os.path.join(base, "tls.crt"), os.path.join(base, "tls.key"), _server_context())
            for path in (cert.cert_file, cert.key_file):
                if not os.path.isfile(path):
                    # ssl's own error does not say which file is missing
                    raise FileNotFoundError(errno.ENOENT, f"certificate {name}: no such file {path}", path)
            cert.context.load_cert_chain(cert.cert_file, cert.key_file)
            cert.stamp = _stamp(cert.cert_file, cert.key_file)
            self._certs[name] = cert
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

    async def watch(self, interval: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_changed()
