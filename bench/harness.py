"""The machinery of bench/run.py: pinned child processes that always die with the run, free
loopback ports, readiness probes, and the two load generators (wrk for HTTP, ws_client.py for
WebSocket echo), both reporting a Measurement."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import cpustat

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WARMUP_SECONDS = 1
STOP_GRACE_SECONDS = 5.0


class Skip(Exception):
    """The case cannot run on this machine (a tool is missing): reported, not an error."""


class CaseError(Exception):
    """The case could not be measured: a process did not start or the load did not run."""


def find_tool(name: str) -> str | None:
    # nginx lives in /usr/sbin, which a non-root PATH may lack.
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def http_status(url: str, timeout: float) -> int:
    """Status of a GET, redirects not followed."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def answers_200(url: str) -> bool:
    try:
        return http_status(url, timeout=1) == 200
    except OSError:
        return False


@dataclass(frozen=True)
class Cpus:
    """Load generators and upstreams share `load`; the proxy under test has `proxy` alone."""
    load: int
    proxy: int

    @classmethod
    def pick(cls) -> "Cpus":
        cpus = sorted(os.sched_getaffinity(0))
        return cls(load=cpus[0], proxy=cpus[-1])


class Processes:
    """Child processes, each pinned to one CPU and in its own process group, so that the
    group (nginx's workers included) is ended on exit, Ctrl-C and errors alike."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._running: dict[str, subprocess.Popen] = {}
        self._python: set[str] = set()
        self._stdout: dict[str, Path] = {}

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str], cpu: int, *, stdout: Path | None = None,
              cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        with open(self.logdir / f"{name}.stderr", "wb") as err, open(stdout or os.devnull, "wb") as out:
            self._running[name] = subprocess.Popen(
                pinned(cpu, argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=cwd, env=env, start_new_session=True)
        if stdout:
            self._stdout[name] = stdout

    def start_python(self, name: str, args: list[str], cpu: int, **options) -> None:
        self.start(name, [sys.executable, *args], cpu, **options)
        self._python.add(name)

    def wait_ready(self, name: str, ready: Callable[[], bool], timeout: float = 20.0) -> None:
        proc = self._running[name]
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise CaseError(self.start_failure(name, f"exit {proc.returncode}"))
            if time.monotonic() > deadline:
                self.stop(name)  # so that it does not load the CPU of the cases measured next
                raise CaseError(self.start_failure(name, f"not ready after {timeout:.0f} s"))
            time.sleep(0.05)

    def start_failure(self, name: str, reason: str, lines: int = 15) -> str:
        """One line with the last line of stderr (usually the error), then stderr's tail."""
        tail = (self.logdir / f"{name}.stderr").read_text(errors="replace").strip().splitlines()[-lines:]
        return "\n    ".join([f"{name} failed to start: {reason}: {tail[-1] if tail else '(no stderr)'}", *tail])

    def alive(self, name: str) -> bool:
        return name in self._running and self._running[name].poll() is None

    def event_loops(self) -> dict[str, str]:
        return {name: event_loop_of(self._running[name].pid) for name in sorted(self._python) if self.alive(name)}

    def stdout_lines(self) -> dict[str, int]:
        return {name: count_lines(path) for name, path in self._stdout.items() if self.alive(name)}

    def stop(self, *names: str) -> None:
        """SIGTERM to each process group, SIGKILL to what is left after the grace time."""
        procs = [self._running.pop(name) for name in names]
        for proc in procs:
            signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            signal_group(proc, signal.SIGKILL)  # stragglers in the group, even if the leader left
            proc.wait()

    def stop_all(self) -> None:
        self.stop(*self._running)


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def event_loop_of(session_id: int) -> str:
    """'uvloop' when a process of the session (a gateway may fork workers) has uvloop's
    extension mapped, else 'asyncio'."""
    for proc_dir in Path("/proc").iterdir():
        try:
            if (proc_dir.name.isdigit() and os.getsid(int(proc_dir.name)) == session_id
                    and "uvloop" in (proc_dir / "maps").read_text()):
                return "uvloop"
        except OSError:  # the process left while we looked
            continue
    return "asyncio"


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


@dataclass(frozen=True)
class Measurement:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    cpu_busy: dict[str, float]  # cpu number -> busy share during the measured time

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def run_load(name: str, argv: list[str], timeout: float) -> dict:
    """Runs a load generator; returns the last JSON line it printed."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CaseError(f"{name} did not finish within {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise CaseError(f"{name} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


@dataclass(frozen=True)
class Wrk:
    """HTTP load: wrk, one thread, `connections` keep-alive connections."""
    connections: int = 64
    script: Path = BENCH_DIR / "wrk_report.lua"

    def check(self, url: str) -> None:
        try:
            status = http_status(url, timeout=5)
        except OSError as e:
            raise CaseError(f"GET {url} failed: {e}") from None
        if not 200 <= status < 300:
            raise CaseError(f"GET {url} answered {status}")

    def measure(self, url: str, seconds: int, cpu: int) -> Measurement:
        """Errors count from the start of the warm-up, as in ws_client.py; the rest only after it."""
        warmup = self._wrk(url, WARMUP_SECONDS, cpu)
        measured = self._wrk(url, seconds, cpu)
        return replace(measured, errors={kind: n + warmup.errors[kind] for kind, n in measured.errors.items()})

    def _wrk(self, url: str, seconds: int, cpu: int) -> Measurement:
        argv = ["wrk", "-t1", f"-c{self.connections}", f"-d{seconds}s", "--latency", "-s", str(self.script), url]
        before = cpustat.read()
        summary = run_load("wrk", pinned(cpu, argv), timeout=seconds + 30)
        return Measurement(**summary, cpu_busy=cpustat.busy_since(before))


@dataclass(frozen=True)
class WsEcho:
    """WebSocket load: ws_client.py, `connections` connections doing send→receive."""
    connections: int = 16

    def check(self, url: str) -> None:
        probe = self._client(url, connections=1, warmup=0, seconds=0.3, cpu=None)
        if probe.error_count or not probe.requests:
            raise CaseError(f"no WebSocket echo through {url}: errors {probe.errors}")

    def measure(self, url: str, seconds: int, cpu: int) -> Measurement:
        return self._client(url, self.connections, WARMUP_SECONDS, seconds, cpu)

    def _client(self, url: str, connections: int, warmup: float, seconds: float, cpu: int | None) -> Measurement:
        argv = [sys.executable, str(BENCH_DIR / "ws_client.py"), url,
                f"--connections={connections}", f"--warmup={warmup}", f"--duration={seconds}"]
        return Measurement(**run_load("ws_client.py", pinned(cpu, argv), timeout=warmup + seconds + 30))


class Bench:
    """What case setups share: the processes, the CPUs and a scratch directory. A process
    that several cases use is started once, by the first of them, through `shared`."""

    def __init__(self, procs: Processes, cpus: Cpus, workdir: Path) -> None:
        self.procs = procs
        self.cpus = cpus
        self.workdir = workdir
        self._shared: dict[str, str | Exception] = {}

    def shared(self, key: str, start: Callable[[], str]) -> str:
        if key not in self._shared:
            try:
                self._shared[key] = start()
            except (Skip, CaseError) as e:
                self._shared[key] = e  # the next case that needs it fails the same way, at once
        result = self._shared[key]
        if isinstance(result, Exception):
            raise result
        return result
