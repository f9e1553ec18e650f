"""Start, run, reload and drain one gateway process.

`start_gateway` binds everything and returns a RunningGateway (tests use it directly);
`serve` adds signal handling: SIGTERM → readiness 503, stop accepting, WebSockets get 1001,
in-flight requests finish within the drain time, logs are flushed, exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from functools import partial
from typing import TextIO

from aiohttp import web

from gateway.config.loader import LoadOptions, load_routes
from gateway.audit import AuditLog, AuditSettings
from gateway.auth.fetch import JwksFetcher
from gateway.config.model import Config, Listener, SandboxRouter
from gateway.policy.loader import load_policies
from gateway.policy.audience import mcp_audience_errors
from gateway.policy.runtime import PolicyRuntime
from gateway.routing.table import RouteTable, compile_table
from gateway.sandbox.readiness import needs_cluster_state
from gateway.sandbox.router import router_errors
from gateway.sandbox.terminal import TerminalSettings
from gateway.secrets import KEY_VAULT, KEY_VAULT_SCHEME, MissingSecret
from gateway.server.accesslog import AccessLog
from gateway.server.admin import make_admin_app
from gateway.server.cluster import ClusterFeatures
from gateway.server import gc_tuning
from gateway.server.handler import Gateway, Settings
from gateway.server.logs import event
from gateway.server.metrics import Metrics
from gateway.server.protocol import make_server
from gateway.server.tls import CertificateStore, vault_certificate_refs
from gateway.store import Store, open_store

log = logging.getLogger("sandgate")


class StartupError(Exception):
    """Configuration that cannot be served; the message lines are shown to the operator."""


@dataclass
class ServeOptions:
    routes: str = "routes.yaml"
    policies: str = "policies"
    listen: list[str] = field(default_factory=list)
    admin: str | None = "127.0.0.1:9901"
    tls_dir: str = "/etc/sandgate/tls"
    reuse_port: bool = False
    reload_interval: float = 1.0
    drain_seconds: float = 30.0
    load: LoadOptions = field(default_factory=LoadOptions)
    database_url: str | None = None  # PostgreSQL; None = the embedded store in data_dir
    database_password_file: str | None = None  # its password's secret file, re-read per connection
    data_dir: str = "/tmp/sandgate"  # embedded store and audit spool: mount a volume to keep them
    spool_dir: str | None = None  # default data_dir; each --workers process gets its own
    audit: AuditSettings = field(default_factory=AuditSettings)  # --audit-allowed, -retention, -spool-max
    settings: Settings = field(default_factory=Settings)
    access_log: TextIO | None = None  # default stdout
    kubeconfig: str | None = None  # default: in-cluster, else $KUBECONFIG or ~/.kube/config
    terminal: TerminalSettings = field(default_factory=TerminalSettings)
    preview_timing: dict | None = None  # Previews(reap_interval=..., touch_interval=...): tests shorten them


def parse_address(text: str, default_host: str | None = None) -> tuple[str | None, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise StartupError(f"invalid address {text!r} (expected HOST:PORT)")
    host = host.strip("[]") or default_host
    return (None if host in ("", "*") else host), int(port)


def bind_plan(listeners: tuple[Listener, ...], listen: list[str]) -> dict[int, tuple[str | None, int]]:
    """Declared listener port → address to bind. `--listen` values override in port order,
    or by listener name with NAME=HOST:PORT."""
    ports = list(dict.fromkeys(l.port for l in listeners))
    plan: dict[int, tuple[str | None, int]] = {p: (None, p) for p in ports}
    by_name = {l.name: l.port for l in listeners}
    positional = iter(ports)
    for value in listen:
        name, eq, address = value.partition("=")
        if eq:
            if name not in by_name:
                raise StartupError(f"--listen {value}: no listener named {name!r}")
            plan[by_name[name]] = parse_address(address)
            continue
        port = next(positional, None)
        if port is None:
            raise StartupError(f"--listen {value}: more addresses than listener ports ({len(ports)})")
        plan[port] = parse_address(value)
    return plan


class RunningGateway:
    def __init__(self, options: ServeOptions, gateway: Gateway, certificates: CertificateStore):
        self.options = options
        self.gateway = gateway
        self.certificates = certificates
        self.addresses: dict[str, tuple[str, int]] = {}  # listener name → bound address
        self.admin_address: tuple[str, int] | None = None
        self._runners: list[web.BaseRunner] = []
        self._admin_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._bound_ports: set[int] = set()
        self.ready = False
        self.jwks_fetcher: JwksFetcher | None = None
        self.store: Store | None = None
        self.store_ok = True  # the audit spool covers outages; readiness still reports them
        self.cluster: ClusterFeatures | None = None  # sandboxes and previews, when configured
        self.cluster_needed = False  # whether readiness waits for it (needs_cluster_state)

    @property
    def table(self) -> RouteTable:
        return self.gateway.table

    def readiness(self) -> tuple[bool, dict]:
        if self.gateway.draining:
            return False, {"reason": "draining"}
        keys = self.gateway.policies.keys_loaded()
        details = {"routes": len(self.table.config.routes), "jwks_loaded": keys, "store_reachable": self.store_ok}
        kube_ok = True
        if self.cluster is not None:
            kube_ok, details["kubernetes"] = self.cluster.readiness()
            kube_ok = kube_ok or not self.cluster_needed  # e.g. only DNS SandboxRouters: shown, not awaited
            details["kubernetes_needed"] = self.cluster_needed
        return self.ready and keys and self.store_ok and kube_ok, details

    async def _watch_store(self, interval: float = 2.0) -> None:
        while True:
            self.store_ok = await self.store.ping()
            await asyncio.sleep(interval)

    async def _bind(self, listeners: tuple[Listener, ...]) -> None:
        plan = bind_plan(listeners, self.options.listen)
        for port, (host, bind_port) in plan.items():
            group = [l for l in listeners if l.port == port]
            https = [l for l in group if l.protocol == "HTTPS"]
            if https and len(https) != len(group):
                raise StartupError(f"port {port}: HTTP and HTTPS listeners cannot share a port")
            try:
                ssl_context = self.certificates.context_for(https) if https else None
            except (OSError, ValueError) as e:
                raise StartupError(f"port {port}: cannot load TLS certificate from {self.options.tls_dir}: {e}") from e
            settings = self.gateway.settings
            server = make_server(self.gateway.handler_for_port(port), partial(self.gateway.listener_limits, port),
                                 self.gateway.metrics.connections_rejected.labels(str(port)).inc,
                                 max_header_bytes=settings.max_header_bytes,
                                 max_header_line_bytes=settings.max_header_line_bytes)
            runner = web.ServerRunner(server, handle_signals=False,
                                      shutdown_timeout=self.options.drain_seconds)
            await runner.setup()
            site = web.TCPSite(runner, host, bind_port, ssl_context=ssl_context, reuse_port=self.options.reuse_port or None,
                               backlog=1024)
            try:
                await site.start()
            except OSError as e:
                await runner.cleanup()
                raise StartupError(f"cannot listen on {host or '*'}:{bind_port}: {e.strerror or e}") from e
            self._runners.append(runner)
            self._bound_ports.add(port)
            bound = _bound_address(site)
            for listener in group:
                self.addresses[listener.name] = bound
                event(log, "listening", listener=listener.name, protocol=listener.protocol, address=f"{bound[0]}:{bound[1]}")

    async def _start_admin(self) -> None:
        if not self.options.admin:
            return
        host, port = parse_address(self.options.admin)
        runner = web.AppRunner(make_admin_app(self.gateway.metrics, self.readiness), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise StartupError(f"cannot listen on admin address {self.options.admin}: {e.strerror or e}") from e
        self._admin_runner = runner
        self.admin_address = _bound_address(site)
        event(log, "admin listening", address=f"{self.admin_address[0]}:{self.admin_address[1]}")

    def _config_stamp(self) -> tuple:
        return _file_stamp(self.options.routes), _directory_stamp(self.options.policies)

    async def _watch_routes(self) -> None:
        last = self._config_stamp()
        while True:
            await asyncio.sleep(self.options.reload_interval)
            stamp = self._config_stamp()
            if stamp == last:
                continue
            last = stamp
            try:  # Key Vault references the new files name, before reload() builds with them
                await KEY_VAULT.load(vault_references(load_routes(self.options.routes, self.options.load), None,
                                                      self.options.tls_dir))
            except MissingSecret:
                pass  # reload() refuses the files, naming the secret
            self.reload()

    def reload(self) -> bool:
        """Load routes and policies again; swap them only when both are valid."""
        config = load_routes(self.options.routes, self.options.load)
        policies = load_policies(self.options.policies, config) if not config.errors else None
        errors = list(config.errors) + (policies.errors if policies else [])
        if not errors:
            errors = router_errors(config, _secured(policies))
            errors += mcp_audience_errors(config, policies, self.options.settings.public_url)
        if errors:
            for line in errors:
                event(log, "routes not reloaded", logging.ERROR, error=line)
            return False
        for line in config.problems:
            event(log, "route problem", logging.WARNING, problem=line)
        new_ports = {l.port for l in config.listeners}
        if not new_ports <= self._bound_ports:
            event(log, "new listener ports need a restart", logging.WARNING,
                  ports=sorted(new_ports - self._bound_ports))
        table = compile_table(config)
        previous = self.gateway.policies
        try:
            runtime = PolicyRuntime(policies, config, self.jwks_fetcher, previous=previous,
                                    on_refresh=self.gateway.metrics.observe_jwks_refresh,
                                    api_key_lookup=self.store.find_api_key)
        except MissingSecret as e:
            event(log, "routes not reloaded", logging.ERROR, error=str(e))
            return False
        self.gateway.table, self.gateway.policies = table, runtime  # no await between: one swap
        if self.cluster is not None:
            self.cluster.configure(config)
        self.cluster_needed = needs_cluster_state(config, _secured(policies))
        _freeze_long_lived()
        event(log, "routes reloaded", routes=len(config.routes))
        return True

    async def _keep_keys_loaded(self) -> None:
        """Fetch JWKS key sets until every provider has keys, and again after each reload.

        A replica that is unready gets no traffic, so it must not wait for a request to retry.
        The key sets' own back-off bounds how often this really fetches.
        """
        while True:
            await self.gateway.policies.warm_up()
            await asyncio.sleep(1.0)

    async def drain(self) -> None:
        """Readiness 503, stop accepting, close WebSockets with 1001, finish in-flight requests."""
        self.gateway.draining = True
        for runner in self._runners:
            runner.server.start_draining()  # what is answered from now on says Connection: close
        if self.ready:
            event(log, "draining", in_flight_websockets=len(self.gateway.sockets))
        for task in self._tasks:
            task.cancel()
        await self.gateway.sockets.close_all()
        await asyncio.gather(*(runner.cleanup() for runner in self._runners), return_exceptions=True)
        self._runners.clear()
        await self.gateway.close()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.jwks_fetcher.close()
        await self.gateway.audit.stop()  # to the store, or to the spool if it is down
        await self.store.close()
        await KEY_VAULT.close()
        await self.gateway.access_log.stop()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None

    stop = drain


async def start_gateway(options: ServeOptions, config: Config | None = None) -> RunningGateway:
    if config is None:
        config = load_routes(options.routes, options.load)
    if config.errors:
        raise StartupError("\n".join(config.errors))
    if not config.listeners:
        raise StartupError(f"{options.routes}: no Gateway listener to serve")
    for line in config.problems:
        event(log, "route problem", logging.WARNING, problem=line)
    policies = load_policies(options.policies, config)
    if policies.errors:
        raise StartupError("\n".join(policies.errors))
    for line in policies.problems:
        event(log, "policy problem", logging.WARNING, problem=line)
    try:
        await KEY_VAULT.load(vault_references(config, options.database_password_file, options.tls_dir))
    except MissingSecret as e:
        raise StartupError(str(e)) from e
    sandbox_errors = router_errors(config, _secured(policies))
    sandbox_errors += mcp_audience_errors(config, policies, options.settings.public_url)
    if sandbox_errors:
        raise StartupError("\n".join(sandbox_errors))
    access_log = AccessLog(options.access_log)
    metrics = Metrics()
    try:
        store = await open_store(options.database_url, data_dir=options.data_dir,
                                 password_file=options.database_password_file)
        await store.migrate()
    except Exception as e:  # noqa: BLE001 - one clear line for the operator
        raise StartupError(f"cannot open the store ({'PostgreSQL' if options.database_url else options.data_dir}): {e}") from e
    audit = AuditLog(store, options.spool_dir or options.data_dir,
                     on_depth=metrics.audit_queue_depth.set, on_spooled=metrics.audit_spooled.inc,
                     on_dropped=metrics.audit_dropped.inc, **options.audit.arguments())
    fetcher = JwksFetcher(overrides=options.load.overrides)  # --resolve: every address dialled
    try:
        runtime = PolicyRuntime(policies, config, fetcher, on_refresh=metrics.observe_jwks_refresh,
                                api_key_lookup=store.find_api_key)
    except MissingSecret as e:
        await store.close()
        raise StartupError(str(e)) from e
    gateway = Gateway(compile_table(config), runtime, options.settings, metrics, access_log, audit)
    running = RunningGateway(options, gateway, CertificateStore(options.tls_dir))
    running.jwks_fetcher = fetcher
    running.store = store
    audit.start()
    try:
        running.cluster = await ClusterFeatures.start(
            config, gateway, audit, store, kubeconfig=options.kubeconfig, terminal=options.terminal,
            allow_loopback=options.settings.allow_loopback_sandboxes, overrides=options.load.overrides,
            preview_timing=options.preview_timing,
        )
        running.cluster_needed = needs_cluster_state(config, _secured(policies))
        await running._bind(config.listeners)
        await running._start_admin()
    except BaseException:
        await running.drain()
        raise
    access_log.start()
    _freeze_long_lived()
    running._tasks.append(asyncio.ensure_future(gc_tuning.keep_old_objects_frozen()))  # open connections' objects
    running._tasks.append(asyncio.ensure_future(running._keep_keys_loaded()))
    running._tasks.append(asyncio.ensure_future(running._watch_store()))
    running._tasks.append(asyncio.ensure_future(KEY_VAULT.refresh_forever()))
    if options.reload_interval > 0:
        running._tasks.append(asyncio.ensure_future(running._watch_routes()))
        running._tasks.append(asyncio.ensure_future(running.certificates.watch(max(options.reload_interval, 1.0))))
    running.ready = True
    return running


def vault_references(config: Config | None, database_password_file: str | None,
                     tls_dir: str = "") -> dict[str, tuple[str, int]]:
    """The kv:// secrets this configuration (routes, if any, the TLS source and the environment)
    reads: ref -> (what, minimum bytes), so that they can be fetched before anything that reads
    them is built."""
    routers = config.served(SandboxRouter).values() if config is not None else ()
    refs = {router.router_token_file: ("router token", 1) for router in routers if router.router_token_file}
    if config is not None:
        refs |= {ref: (f"TLS certificate {name}", 1)
                 for ref, name in vault_certificate_refs(tls_dir, config.listeners).items()}
    refs[os.environ.get("SANDGATE_API_KEY_PEPPER_FILE", "")] = ("API key pepper", 16)
    refs[database_password_file or ""] = ("database password", 1)
    return {ref: wanted for ref, wanted in refs.items() if ref.startswith(KEY_VAULT_SCHEME)}


def _secured(policies):
    return lambda route_key, rule_index, gateway: policies.security_for(route_key, rule_index, gateway) is not None


async def serve(options: ServeOptions, on_ready=None) -> None:
    running = await start_gateway(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(running)
    await stop.wait()
    await running.drain()
    event(log, "stopped")


def _freeze_long_lived() -> None:
    """Move the route table and everything else alive now out of the garbage collector's view.

    A table of 10,000 routes is hundreds of thousands of objects that live until the next
    reload; without this every full collection walks them all and shows up as p99 latency.
    The sweep first collects what the previous table left in cycles.
    """
    gc_tuning.sweep()


def _bound_address(site: web.TCPSite) -> tuple[str, int]:
    server = site._server  # aiohttp exposes bound sockets only here
    sock: socket.socket = server.sockets[0]
    address = sock.getsockname()
    return address[0], address[1]


def _directory_stamp(path: str | None) -> tuple:
    if not path or not os.path.isdir(path):
        return ()
    return tuple(sorted((name, _file_stamp(os.path.join(path, name))) for name in os.listdir(path)))


def _file_stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
