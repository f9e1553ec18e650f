"""`sandgate serve`: one process, or a supervisor with N workers sharing the port.

With `--workers N` the supervisor owns the admin listener and the metrics (Prometheus
multiprocess mode, one file set per worker) and starts N copies of itself that bind the public
ports with SO_REUSEPORT; the kernel spreads connections across them. A worker that dies is
started again. SIGTERM makes the supervisor unready, then drains every worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile

from gateway.config.loader import LoadOptions
from gateway.server.logs import event, setup_logging

log = logging.getLogger("sandgate")
_WORKER_ENV = "SANDGATE_WORKER_READY_FD"
_SLOT_ENV = "SANDGATE_WORKER_SLOT"


def _use_fast_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_serve(args, load_options: LoadOptions) -> int:
    setup_logging()
    _use_fast_loop()
    if args.workers > 1:
        return asyncio.run(_supervise(args))
    from gateway.audit import AuditSettings
    from gateway.server.app import ServeOptions, StartupError, serve
    from gateway.server.handler import Settings

    if args.watch_httproutes:
        event(log, "--watch-httproutes is not available yet: serving the routes file only", logging.WARNING)
    ready_fd = os.environ.pop(_WORKER_ENV, None)
    options = ServeOptions(
        routes=args.routes,
        policies=args.policies,
        listen=args.listen,
        admin=None if ready_fd is not None or args.admin == "off" else args.admin,
        tls_dir=args.tls_dir,
        reuse_port=args.reuse_port or ready_fd is not None,
        drain_seconds=args.drain_seconds,
        load=load_options,
        database_url=os.environ.get("SANDGATE_DATABASE_URL") or None,
        database_password_file=os.environ.get("SANDGATE_DATABASE_PASSWORD_FILE") or None,
        data_dir=args.data_dir,
        # Workers share the store but not a spool file: a worker slot replays its own leftovers.
        spool_dir=os.path.join(args.data_dir, f"worker-{slot}") if (slot := os.environ.pop(_SLOT_ENV, None)) else None,
        settings=Settings(max_body_bytes=args.max_body_bytes, public_url=args.public_url,
                          allow_loopback_sandboxes=args.allow_loopback_sandboxes,
                          connection_limit=args.connection_limit),
        kubeconfig=args.kubeconfig,
        audit=AuditSettings(allowed=args.audit_allowed, retention=args.audit_retention,
                            spool_max_bytes=args.audit_spool_max),
    )

    def on_ready(_running) -> None:
        if ready_fd is not None:
            os.write(int(ready_fd), b"R")
            os.close(int(ready_fd))

    try:
        asyncio.run(serve(options, on_ready))
    except StartupError as e:
        for line in str(e).splitlines():
            print(line, file=sys.stderr)
        return 1
    return 0


async def _supervise(args) -> int:
    from gateway.server.admin import make_admin_app
    from gateway.server.app import parse_address
    from gateway.server.metrics import Metrics
    from aiohttp import web
    from prometheus_client import multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="sandgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    argv = [sys.executable, "-m", "gateway", *_worker_argv()]
    workers: dict[int, _Worker] = {}
    stopping = asyncio.Event()

    def readiness() -> tuple[bool, dict]:
        if stopping.is_set():
            return False, {"reason": "draining"}
        ready = sum(1 for w in workers.values() if w.ready)
        return ready == args.workers, {"workers": args.workers, "workers_ready": ready}

    runner = None
    if args.admin != "off":
        runner = web.AppRunner(make_admin_app(Metrics(), readiness), access_log=None)
        await runner.setup()
        host, port = parse_address(args.admin)
        await web.TCPSite(runner, host, port).start()
        event(log, "admin listening", address=args.admin)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def keep_running(slot: int) -> None:
        failures = 0
        while not stopping.is_set():
            worker = _Worker(argv, slot)
            workers[slot] = worker
            code = await worker.run()
            multiprocess.mark_process_dead(worker.pid)
            if stopping.is_set():
                return
            failures = failures + 1 if not worker.ready else 0
            event(log, "worker exited; starting another", logging.WARNING, slot=slot, code=code)
            if failures >= 3:
                event(log, "worker keeps failing at startup; giving up", logging.ERROR, slot=slot)
                stopping.set()
                return
            await asyncio.sleep(min(5.0, 0.2 * 2**failures))

    slots = [asyncio.ensure_future(keep_running(i)) for i in range(args.workers)]
    await stopping.wait()
    for worker in workers.values():
        worker.terminate()
    await asyncio.gather(*slots, return_exceptions=True)
    if runner is not None:
        await runner.cleanup()
    return 0


def _worker_argv() -> list[str]:
    """This command line with --workers removed (each worker is a plain single process)."""
    out: list[str] = []
    skip = False
    for item in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if item == "--workers":
            skip = True
            continue
        if item.startswith("--workers="):
            continue
        out.append(item)
    return out


class _Worker:
    def __init__(self, argv: list[str], slot: int):
        self.argv = argv
        self.slot = slot
        self.ready = False
        self.pid = 0
        self._process: asyncio.subprocess.Process | None = None

    async def run(self) -> int:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, **{_WORKER_ENV: str(write_fd), _SLOT_ENV: str(self.slot), "SANDGATE_WORKERS": "1"})
        self._process = await asyncio.create_subprocess_exec(*self.argv, env=env, pass_fds=(write_fd,))
        self.pid = self._process.pid
        os.close(write_fd)
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, os.read, read_fd, 1)
        os.close(read_fd)
        self.ready = ready == b"R"
        return await self._process.wait()

    def terminate(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
