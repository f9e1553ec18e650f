"""The machinery of bench/run.py: pinned child processes that always die with the run, free
loopback ports, readiness probes, the two load generators (wrk for HTTP, ws_client.py for
WebSocket echo), what they are aimed at (`Target`) and `measure`, which runs one of them and
records where the CPU went."""

import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

import cpustat

T = TypeVar("T")
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WARMUP_SECONDS = 1
STOP_GRACE_SECONDS = 5.0


class Skip(Exception):
    """The case cannot run on this machine (a tool is missing): reported, not an error."""


class CaseError(Exception):
    """The case could not be measured: a process did not start or the load did not run."""


def run_main(main: Callable[[], int]) -> None:
    """Exits with main()'s code. SIGTERM unwinds like Ctrl-C, so that every started process is
    stopped (Processes.__exit__) either way."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; all benchmark processes stopped", file=sys.stderr)
        sys.exit(130)


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


def http_get(url: str, timeout: float, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Status and body of a GET, redirects not followed; a `Host` in `headers` replaces the URL's."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/", headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_status(url: str, timeout: float, headers: dict[str, str] | None = None) -> int:
    """Status of a GET, redirects not followed."""
    return http_get(url, timeout, headers)[0]


def checkout_env() -> dict[str, str]:
    """For a child that imports this checkout (the gateway, the API double): its PYTHONPATH,
    and no SANDGATE_* from the shell, so that the gateway is configured by its flags alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDGATE_")}
    return env | {"PYTHONPATH": str(REPO_DIR)}


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
        self._cpu: dict[str, int] = {}
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
        self._cpu[name] = cpu
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
        """'uvloop' for each Python process one of whose processes (a gateway may fork
        workers) has uvloop's extension mapped, else 'asyncio'."""
        loops = {}
        for name in sorted(self._python):
            if self.alive(name):
                maps = (proc_dir / "maps" for proc_dir in session_members({self._running[name].pid}))
                loops[name] = "uvloop" if any("uvloop" in read_proc(path) for path in maps) else "asyncio"
        return loops

    def cpu_seconds(self, cpu: int) -> float:
        """CPU time used so far by the running processes started on `cpu`, children included."""
        sessions = {proc.pid for name, proc in self._running.items() if self._cpu[name] == cpu}
        ticks = 0
        for proc_dir in session_members(sessions):
            fields = read_proc(proc_dir / "stat").rpartition(")")[2].split()
            if fields:
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

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


def session_members(sessions: set[int]) -> list[Path]:
    """/proc directories of the processes in these sessions (our children lead one each)."""
    members = []
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                if os.getsid(int(proc_dir.name)) in sessions:
                    members.append(proc_dir)
            except ProcessLookupError:
                pass
    return members


def read_proc(path: Path) -> str:
    """A /proc file, or "" when its process left meanwhile."""
    try:
        return path.read_text()
    except OSError:
        return ""


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def run_load(name: str, argv: list[str], timeout: float) -> dict:
    """Runs a load generator; returns the last JSON line it printed: requests, rps, p50_ms,
    p99_ms and errors by kind."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CaseError(f"{name} did not finish within {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise CaseError(f"{name} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


@dataclass(frozen=True)
class BearerToken:
    """One RS256 token and the JWKS (one RSA public key) that verifies it, both made at first
    use from an RSA key generated then. The fields are the claims (and what the report shows);
    the key and the token themselves are never written anywhere but to wrk's command line."""
    issuer: str = "https://issuer.bench"
    audience: str = "bench"
    scope: str = "read"
    kid: str = "bench"
    expires_at: int = 4_102_444_800  # 2100-01-01

    @cached_property
    def _private_key(self) -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @cached_property
    def jwks(self) -> str:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._private_key.public_key()))
        return json.dumps({"keys": [jwk | {"kid": self.kid, "alg": "RS256", "use": "sig"}]})

    @cached_property
    def token(self) -> str:
        claims = {"iss": self.issuer, "aud": self.audience, "scope": self.scope, "sub": "bench",
                  "iat": int(time.time()), "exp": self.expires_at}
        return jwt.encode(claims, self._private_key, algorithm="RS256", headers={"kid": self.kid})

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass(frozen=True)
class RouterSecret:
    """A random static bearer token, made at first use: what a SandboxRouter's
    `routerTokenFile` holds. Like BearerToken's, the token is written only to that file (in the
    run's scratch directory) and to wrk's command line, never to the results."""
    kind: str = "routerTokenFile"

    @cached_property
    def token(self) -> str:
        return secrets.token_urlsafe(32)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass(frozen=True)
class Target:
    """Where a case's load goes: a URL, and headers that every request carries besides the
    load's own (a preview host as `Host`, `X-Sandbox-*`). The results show the URL and the
    headers' names only: a preview host is a capability."""
    url: str
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, value: "str | Target") -> "Target":
        return value if isinstance(value, Target) else cls(value)


@dataclass(frozen=True)
class Wrk:
    """HTTP load: wrk, one thread, `connections` keep-alive connections, every request with
    `bearer`'s token when there is one and the target's headers."""
    connections: int = 64
    script: Path = BENCH_DIR / "wrk_report.lua"
    bearer: BearerToken | RouterSecret | None = None

    def headers(self, target: Target) -> dict[str, str]:
        return (self.bearer.headers if self.bearer else {}) | dict(target.headers)

    def check(self, target: Target) -> None:
        try:
            status = http_status(target.url, timeout=5, headers=self.headers(target))
        except OSError as e:
            raise CaseError(f"GET {target.url} failed: {e}") from None
        if status != 200:
            raise CaseError(f"GET {target.url} answered {status}")

    def run(self, target: Target, seconds: int, cpu: int) -> dict:
        argv = ["wrk", "-t1", f"-c{self.connections}", f"-d{seconds}s", "--latency", "-s", str(self.script)]
        for name, value in self.headers(target).items():
            argv += ["-H", f"{name}: {value}"]
        return run_load("wrk", pinned(cpu, argv + [target.url]), timeout=seconds + 30)


@dataclass(frozen=True)
class WsEcho:
    """WebSocket load: ws_client.py, `connections` connections doing send→receive."""
    connections: int = 16

    def check(self, target: Target) -> None:
        probe = self._client(target.url, connections=1, seconds=0.3, cpu=None)
        if sum(probe["errors"].values()) or not probe["requests"]:
            raise CaseError(f"no WebSocket echo through {target.url}: errors {probe['errors']}")

    def run(self, target: Target, seconds: int, cpu: int) -> dict:
        return self._client(target.url, self.connections, seconds, cpu)

    def _client(self, url: str, connections: int, seconds: float, cpu: int | None) -> dict:
        argv = [sys.executable, str(BENCH_DIR / "ws_client.py"), url,
                f"--connections={connections}", f"--duration={seconds}"]
        return run_load("ws_client.py", pinned(cpu, argv), timeout=seconds + 30)


@dataclass(frozen=True)
class Measurement:
    """One case in one round. CPU shares are of the measured time: `proxy_cpu` is what the
    processes this run started on the proxy CPU used, `other_cpu` what anything else used
    there (noise), `proxy_us_per_request` the former per request."""
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    load_cpu: float
    proxy_cpu: float
    other_cpu: float
    proxy_us_per_request: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def measure(bench: "Bench", load: Wrk | WsEcho, target: Target, seconds: int) -> Measurement:
    """A warm-up run that is not measured (its errors count all the same), then the measured run."""
    cpus = bench.cpus
    warmup = load.run(target, WARMUP_SECONDS, cpus.load)
    busy_before, proxy_before, start = cpustat.read(), bench.procs.cpu_seconds(cpus.proxy), time.monotonic()
    report = load.run(target, seconds, cpus.load)
    proxy_seconds = bench.procs.cpu_seconds(cpus.proxy) - proxy_before
    busy = cpustat.busy_since(busy_before)
    proxy_share = proxy_seconds / (time.monotonic() - start)
    return Measurement(
        **report | {"errors": {kind: n + warmup["errors"][kind] for kind, n in report["errors"].items()}},
        load_cpu=busy[cpus.load],
        proxy_cpu=round(proxy_share, 3),
        other_cpu=round(max(0.0, busy[cpus.proxy] - proxy_share), 3),
        proxy_us_per_request=round(proxy_seconds * 1e6 / report["requests"], 1) if report["requests"] else 0.0,
    )


def measure_together(bench: "Bench", a: tuple[Wrk | WsEcho, Target], b: tuple[Wrk | WsEcho, Target],
                     seconds: int) -> tuple[dict, dict]:
    """Two loads at once, each against its own target, for `seconds`: the wrk reports (requests,
    rps, p50_ms, p99_ms, errors), in the order given."""
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(load.run, target, seconds, bench.cpus.load) for load, target in (a, b)]
        return running[0].result(), running[1].result()


class Bench:
    """What case setups share: the processes, the CPUs and a scratch directory. A process
    that several cases use is started once, by the first of them, through `shared`."""

    def __init__(self, procs: Processes, cpus: Cpus, workdir: Path) -> None:
        self.procs = procs
        self.cpus = cpus
        self.workdir = workdir
        self._shared: dict[str, object] = {}

    def shared(self, key: str, start: Callable[[], T]) -> T:
        if key not in self._shared:
            try:
                self._shared[key] = start()
            except (Skip, CaseError) as e:
                self._shared[key] = e  # the next case that needs it fails the same way, at once
        result = self._shared[key]
        if isinstance(result, Exception):
            raise result
        return result
