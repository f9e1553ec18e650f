"""The real command, `python -m gateway`, run as a subprocess (SPEC §1).

`check`, `routes` and `explain` on files written here and on the shipped routes.yaml; `serve`
single-process and with `--workers 2`, with signals; SANDGATE_* environment variables; startup
errors as one clear line. Upstreams are real servers in this test process, on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gated import start_gated
from tests.support.harness import GATEWAY, backend, free_port, route_to

REPO = Path(__file__).resolve().parent.parent
SHIPPED_ROUTES = REPO / "routes.yaml"
SHIPPED_POLICIES = REPO / "policies"  # loading it makes no network call; serving it would fetch JWKS
PYTHON = sys.executable  # /work/venv/bin/python when run by the venv's pytest
STARTUP = 20.0  # a cold interpreter importing aiohttp and jsonschema on a busy machine
STEP = 5.0


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SANDGATE_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def sandgate(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args], cwd=cwd, env=environment(**env), capture_output=True, text=True, timeout=60
    )


ERROR_LINE = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+): (?P<message>.+)$")


def error_lines(result: subprocess.CompletedProcess, file: str = "routes.yaml") -> list[tuple[int, str]]:
    found = []
    for text in (result.stdout + "\n" + result.stderr).splitlines():
        m = ERROR_LINE.match(text)
        if m and m["file"] == file and not text.endswith("(warning)"):
            found.append((int(m["line"]), m["message"]))
    return found


def line_of(text: str, needle: str) -> int:
    matches = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(matches) == 1, (needle, matches)
    return matches[0]


def operator_lines(stderr: str) -> list[str]:
    """What an operator reads as a problem: plain lines, and JSON log lines at warning or above."""
    out = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        if not isinstance(entry, dict) or entry.get("level") not in ("debug", "info"):
            out.append(line)
    return out


def route_file(port: int) -> str:
    return GATEWAY + backend("app", port) + route_to("app", rule_name="main")


# --- check --------------------------------------------------------------------------------------


def test_check_accepts_the_shipped_routes_with_the_shipped_policies(tmp_path):
    result = sandgate(["check", "--routes", str(SHIPPED_ROUTES), "--policies", str(SHIPPED_POLICIES)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert error_lines(result, str(SHIPPED_ROUTES)) == []


def test_check_lists_public_routes_as_warnings(tmp_path):
    result = sandgate(["check", "--routes", str(SHIPPED_ROUTES), "--policies", str(SHIPPED_POLICIES)], tmp_path)
    assert result.returncode == 0
    public = [line for line in result.stdout.splitlines() if "is public" in line]
    assert any("HTTPRoute platform/frontend is public" in line and line.endswith("(warning)") for line in public), result.stdout
    assert not any("platform/sandboxes" in line or "platform/previews" in line for line in public), result.stdout
    assert any("HTTPRoute platform/preview-hosts is public" in line for line in public), result.stdout  # a capability


def test_check_refuses_the_shipped_sandbox_router_without_the_shipped_policies(tmp_path):
    result = sandgate(["check", "--routes", str(SHIPPED_ROUTES), "--policies", str(tmp_path / "none")], tmp_path)
    assert result.returncode == 1
    (error,) = error_lines(result, str(SHIPPED_ROUTES))
    assert "SandboxRouter platform/sandboxes: no authentication" in error[1], result.stdout


SCHEMA_ERROR = GATEWAY + """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: app
  namespace: infra
spec:
  parentRefs:
  - name: gw
  rules:
  - matches:
    - headers:
      - name: X-Team
        value: blue
      path:
        type: Bogus
        value: /x
    backendRefs:
    - name: svc
      port: 80
"""


def test_check_reports_a_schema_error_with_its_line(tmp_path):
    (tmp_path / "routes.yaml").write_text(SCHEMA_ERROR)
    result = sandgate(["check", "--routes", "routes.yaml"], tmp_path)
    assert result.returncode == 1
    errors = error_lines(result)
    assert len(errors) == 1, result.stdout + result.stderr
    line, message = errors[0]
    assert line == line_of(SCHEMA_ERROR, "type: Bogus")
    assert "Bogus" in message


def test_check_reports_a_schema_error_in_a_flow_mapping_line(tmp_path):
    text = GATEWAY.replace("{name: http, port: 80, protocol: HTTP}", "{name: http, port: 80, protocol: HTTP}\n  - {name: other, port: 99999, protocol: HTTP}")
    (tmp_path / "routes.yaml").write_text(text)
    result = sandgate(["check", "--routes", "routes.yaml"], tmp_path)
    assert result.returncode == 1
    errors = error_lines(result)
    assert [line for line, _ in errors] == [line_of(text, "99999")], result.stdout + result.stderr


BACKEND_ERRORS = {
    "unknown-kind": ("{group: example.com, kind: Widget, name: w, port: 1}", "Widget"),
    "missing-backend": ("{group: gateway.envoyproxy.io, kind: Backend, name: nope}", "nope"),
}


@pytest.mark.parametrize("case", sorted(BACKEND_ERRORS))
def test_check_reports_bad_backend_refs_with_their_line(tmp_path, case):
    ref, named = BACKEND_ERRORS[case]
    text = GATEWAY + backend("real", 9) + f"""\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: app, namespace: infra}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /ok}}}}]
    backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: real}}]
  - matches: [{{path: {{type: PathPrefix, value: /bad}}}}]
    backendRefs:
    - {ref}
"""
    (tmp_path / "routes.yaml").write_text(text)
    result = sandgate(["check", "--routes", "routes.yaml"], tmp_path)
    assert result.returncode == 1
    errors = error_lines(result)
    assert len(errors) == 1, result.stdout + result.stderr
    line, message = errors[0]
    assert line == line_of(text, ref)
    assert named in message


def test_environment_variable_sandgate_routes_is_honoured(tmp_path):
    good = tmp_path / "conf" / "good.yaml"
    good.parent.mkdir()
    good.write_text(SHIPPED_ROUTES.read_text())
    bad = tmp_path / "conf" / "bad.yaml"
    bad.write_text(SCHEMA_ERROR)
    shutil.copytree(SHIPPED_POLICIES, tmp_path / "policies")  # the default --policies, as in a checkout
    # no routes.yaml in the working directory: only the variable can point at the file
    assert sandgate(["check"], tmp_path, SANDGATE_ROUTES=str(good)).returncode == 0
    failed = sandgate(["check"], tmp_path, SANDGATE_ROUTES=str(bad))
    assert failed.returncode == 1
    assert error_lines(failed, str(bad)), failed.stdout + failed.stderr
    listed = sandgate(["routes"], tmp_path, SANDGATE_ROUTES=str(good))
    assert listed.returncode == 0
    assert "platform/mcp#health" in listed.stdout
    # a flag beats the variable
    assert sandgate(["check", "--routes", str(good)], tmp_path, SANDGATE_ROUTES=str(bad)).returncode == 0


# --- routes and explain ---------------------------------------------------------------------------

MATCH = re.compile(r"\b(Exact|PathPrefix|RegularExpression) (\S+)")


def table_matches(stdout: str) -> list[tuple[str, str]]:
    rows = [MATCH.search(line) for line in stdout.splitlines()[1:]]
    return [(m[1], m[2]) for m in rows if m]


def test_routes_prints_the_table_in_precedence_order(tmp_path):
    text = GATEWAY + backend("b", 9) + """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: first, namespace: infra}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: b}]
  - matches: [{path: {type: PathPrefix, value: /a}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: b}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: second, namespace: infra}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a/b/c}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: b}]
  - matches: [{path: {type: Exact, value: /a/b}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: b}]
  - matches: [{path: {type: PathPrefix, value: /a/b}}]
    backendRefs: [{group: gateway.envoyproxy.io, kind: Backend, name: b}]
"""
    (tmp_path / "routes.yaml").write_text(text)
    result = sandgate(["routes"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert table_matches(result.stdout) == [
        ("Exact", "/a/b"),
        ("PathPrefix", "/a/b/c"),
        ("PathPrefix", "/a/b"),
        ("PathPrefix", "/a"),
        ("PathPrefix", "/"),
    ]


def test_routes_on_the_shipped_file(tmp_path):
    result = sandgate(["routes", "--routes", str(SHIPPED_ROUTES)], tmp_path)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    hosts = [row.split()[1] for row in rows]
    # The preview hosts' wildcard comes first: a hostname match beats any path of the catch-all host.
    assert hosts[0] == "*.agents-preview.example.net" and set(hosts[1:]) == {"*"}, result.stdout
    assert "PreviewZone platform/previews" in rows[0]
    matches = table_matches("\n".join([header, *rows[1:]]))
    kinds = [kind for kind, _ in matches]
    assert kinds == sorted(kinds, key=lambda k: k != "Exact"), "an Exact match listed after a PathPrefix"
    prefixes = [value for kind, value in matches if kind == "PathPrefix"]
    assert [len(p.rstrip("/")) for p in prefixes] == sorted((len(p.rstrip("/")) for p in prefixes), reverse=True)
    assert prefixes[-1] == "/"
    assert ("Exact", "/mcp/health") in matches


def test_explain_mcp_health_on_the_shipped_routes(tmp_path):
    result = sandgate(["explain", "--routes", str(SHIPPED_ROUTES), "GET", "http://host/mcp/health"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    route = next(l for l in out.splitlines() if l.startswith("route:"))
    assert re.search(r"\bplatform/mcp\b", route), out
    rule = next(l for l in out.splitlines() if l.startswith("rule:"))
    assert re.search(r"[#: ]health\b", rule), out
    upstream = next(l for l in out.splitlines() if l.startswith("upstream:"))
    assert re.search(r"http://mcp\.platform\.svc\.cluster\.local:8000/healthz\b", upstream), out


def test_explain_describes_the_backend_traffic_policy(tmp_path):
    (tmp_path / "routes.yaml").write_text(GATEWAY + backend("app", 9) + route_to("app"))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "traffic.yaml").write_text("""\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: retries, namespace: infra}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}]
  timeout: {http: {requestTimeout: 10s}}
  retry:
    numRetries: 3
    retryOn: {triggers: [connect-failure, retriable-status-codes], httpStatusCodes: [502, 503]}
    perRetry: {timeout: 2s}
""")
    result = sandgate(["explain", "--routes", "routes.yaml", "--policies", "policies", "GET", "http://h/"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert explained(result)["traffic"] == ("BackendTrafficPolicy infra/retries (0 rate-limit rules; request timeout 10s;"
                                            " 3 retries of idempotent requests on connect-failure, status 502/503,"
                                            " 2s per try)")


def explained(result: subprocess.CompletedProcess) -> dict[str, str]:
    """`explain` output as {"route": ..., "policy": ..., ...}: the first line of each field."""
    fields: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, colon, value = line.partition(":")
        if colon and name.isalpha():
            fields.setdefault(name, value.strip())
    return fields


@pytest.mark.parametrize(("url", "route", "backend"), [
    ("http://agents.example.com/gateway/v1/previews", "platform/previews", None),
    ("http://agents.example.com/gateway/v1/approvals/1", "platform/previews", None),
    (f"http://{'a' * 26}-preview.agents-preview.example.net/api/hello", "platform/preview-hosts",
     "PreviewZone platform/previews"),
    ("http://agents.example.com/", "platform/frontend", None),  # the platform's host is not in the zone
])
def test_explain_previews_on_the_shipped_routes(tmp_path, url, route, backend):
    args = ["explain", "--routes", str(SHIPPED_ROUTES), "--policies", str(SHIPPED_POLICIES), "GET", url]
    result = sandgate(args, tmp_path)  # no token: nothing to verify, so no JWKS fetch
    assert result.returncode == 0, result.stderr
    fields = explained(result)
    assert fields["route"].startswith(f"HTTPRoute {route} "), result.stdout
    if route == "platform/previews":  # the API needs the sandboxes' JWT
        assert fields["policy"].startswith("SecurityPolicy platform/sandboxes "), result.stdout
        assert fields["decision"].startswith("deny (401)"), result.stdout
    if backend:
        assert backend in fields["backend"], result.stdout


# --- serve ----------------------------------------------------------------------------------------


@pytest.fixture
async def gated(aiohttp_server):
    return await start_gated(aiohttp_server)


class Served:
    """A running `sandgate serve`: stderr parsed as JSON log lines as they come."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.logs: list[dict] = []
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        self._changed = asyncio.Event()
        self._readers = [
            asyncio.ensure_future(self._read(proc.stderr, self.stderr, parse=True)),
            asyncio.ensure_future(self._read(proc.stdout, self.stdout, parse=False)),
        ]

    @classmethod
    async def start(cls, args: list[str], cwd: Path, **env: str) -> "Served":
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "gateway", "serve", *args, cwd=cwd, env=environment(**env),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def _read(self, stream, into: list[str], parse: bool) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\n")
            into.append(text)
            if parse:
                try:
                    self.logs.append(json.loads(text))
                except ValueError:
                    pass
            self._changed.set()
        self._changed.set()

    async def log(self, msg: str, timeout: float = STARTUP) -> dict:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for entry in self.logs:
                if entry.get("msg") == msg:
                    return entry
            if self.proc.returncode is not None or all(r.done() for r in self._readers):
                raise AssertionError(f"exited before logging {msg!r}: {self.stderr}")
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"no {msg!r} log line: {self.stderr}"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def address(self, msg: str) -> tuple[str, int]:
        host, _, port = (await self.log(msg))["address"].rpartition(":")
        return host, int(port)

    async def wait(self, timeout: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code

    async def stop_for_good(self, also: list[int] = ()) -> None:
        """Test cleanup: kill what is still running (only the processes this test started)."""
        for pid in also:
            _kill(pid)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def test_serve_serves_and_drains_on_sigterm(gated, tmp_path):
    upstream, port = gated
    (tmp_path / "routes.yaml").write_text(route_file(port))  # the default --routes
    served = await Served.start(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"], tmp_path)
    try:
        host, public = await served.address("listening")
        admin = await served.address("admin listening")
        async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as slow_session:
            async with session.get(f"http://{host}:{public}/hello?x=1") as resp:
                assert resp.status == 200
                assert (await resp.json())["path"] == "/hello?x=1"
            async with session.get(f"http://{admin[0]}:{admin[1]}/readyz") as resp:
                assert resp.status == 200

            slow = asyncio.ensure_future(slow_session.get(f"http://{host}:{public}/gate"))
            await asyncio.wait_for(upstream.arrived.wait(), STEP)
            served.proc.send_signal(signal.SIGTERM)
            await served.log("draining", timeout=STEP)
            assert served.proc.returncode is None, "exited with a request in flight"
            upstream.release.set()
            async with await asyncio.wait_for(slow, STEP) as resp:
                assert resp.status == 200
                assert (await resp.json())["path"] == "/gate"
        assert await served.wait(timeout=STEP) == 0
        # the access log (stdout) has the requests, flushed before exit
        records = [json.loads(line) for line in served.stdout if line.startswith("{")]
        assert sorted(r["path"] for r in records) == ["/gate", "/hello"]
    finally:
        await served.stop_for_good()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry))
    return out


def _owner_of_connection(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which process holds the accepted end of a loopback TCP connection (Linux /proc)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except OSError:
            continue
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading and /proc are Linux")
async def test_serve_with_two_workers_shares_the_port(gated, tmp_path):
    _, upstream_port = gated
    (tmp_path / "conf.yaml").write_text(route_file(upstream_port))
    public, admin = free_port(), free_port()
    served = await Served.start(
        ["--workers", "2", "--routes", "conf.yaml", "--listen", f"127.0.0.1:{public}", "--admin", f"127.0.0.1:{admin}"],
        tmp_path,
    )
    workers: list[int] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP
        async with aiohttp.ClientSession() as session:
            while True:
                assert served.proc.returncode is None, served.stderr
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        body = await resp.json()
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert loop.time() < deadline, f"never ready: {served.stderr}"
                await asyncio.sleep(0.1)
            assert body["workers_ready"] == 2

            workers = _children(served.proc.pid)
            assert len(workers) == 2, workers

            # Many fresh connections: the kernel spreads them over both workers.
            connections = []
            try:
                for n in range(24):
                    reader, writer = await asyncio.open_connection("127.0.0.1", public)
                    connections.append(writer)
                    writer.write(f"GET /c/{n} HTTP/1.1\r\nHost: app\r\n\r\n".encode())
                    await writer.drain()
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP)
                    assert head.startswith(b"HTTP/1.1 200"), head
                owners = {
                    _owner_of_connection(public, w.get_extra_info("sockname")[1], workers) for w in connections
                }
            finally:
                for writer in connections:
                    writer.close()
            assert owners == set(workers), owners

            # The supervisor's /metrics adds up every worker's requests.
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                text = await resp.text()
            total = sum(
                s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "sandgate_requests_total" and s.labels.get("route") == "infra/app"
            )
            assert total == 24

        served.proc.send_signal(signal.SIGTERM)
        assert await served.wait(timeout=10) == 0
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and _alive(pid)], "workers left running"
    finally:
        await served.stop_for_good(also=workers)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- startup errors ---------------------------------------------------------------------------


def test_serve_with_a_missing_routes_file_exits_1_with_one_line(tmp_path):
    result = sandgate(["serve", "--routes", "missing.yaml", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"], tmp_path)
    assert result.returncode == 1
    problems = operator_lines(result.stderr)
    assert len(problems) == 1, result.stderr
    assert "missing.yaml" in problems[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "127.0.0.1:http"])
def test_serve_with_a_bad_listen_address_exits_1_with_one_line(tmp_path, listen):
    (tmp_path / "routes.yaml").write_text(route_file(9))
    result = sandgate(["serve", "--listen", listen, "--admin", "127.0.0.1:0"], tmp_path)
    assert result.returncode == 1
    problems = operator_lines(result.stderr)
    assert len(problems) == 1, result.stderr
    assert listen in problems[0]
    assert "Traceback" not in result.stderr


# --- flags after the subcommand -----------------------------------------------------------------

STORE_ORDERS = {
    "before": lambda group, sub, data: [group, "--data-dir", data, *sub],
    "after": lambda group, sub, data: [group, *sub, "--data-dir", data],
}


@pytest.mark.parametrize("order", list(STORE_ORDERS))
def test_store_commands_take_data_dir_before_or_after_the_subcommand(tmp_path, order):
    """`keys create ... --data-dir D` is the same command as `keys --data-dir D create ...`;
    each acts on the store in D, never on the default /tmp/sandgate."""
    place = STORE_ORDERS[order]
    data = tmp_path / f"store-{order}"
    pepper = tmp_path / "pepper"
    pepper.write_text("p" * 32)
    env = {"SANDGATE_API_KEY_PEPPER_FILE": str(pepper)}

    migrated = sandgate(place("db", ["migrate"], str(data)), tmp_path, **env)
    assert migrated.returncode == 0, migrated.stderr
    assert any(data.iterdir()), "db migrate did not create the store in --data-dir"

    created = sandgate(place("keys", ["create", "--owner", f"owner-{order}"], str(data)), tmp_path, **env)
    assert created.returncode == 0, created.stderr
    listed = sandgate(place("keys", ["list"], str(data)), tmp_path, **env)
    assert listed.returncode == 0 and f"owner-{order}" in listed.stdout, listed
    key_id = next(line.split()[0] for line in listed.stdout.splitlines() if f"owner-{order}" in line)
    revoked = sandgate(place("keys", ["revoke", key_id], str(data)), tmp_path, **env)
    assert revoked.returncode == 0, revoked.stderr

    # Given on both sides, the value after the subcommand wins (argparse: the later one).
    other = tmp_path / "other"
    both = sandgate(["keys", "--data-dir", str(data), "list", "--data-dir", str(other)], tmp_path, **env)
    assert both.returncode == 0 and f"owner-{order}" not in both.stdout, both


# --- MCP routes need a public URL or explicit audiences ----------------------------------------


def mcp_files(tmp_path: Path, route_name: str, *, audiences: list[str] | None) -> tuple[Path, Path]:
    from tests.support.harness import mcp_routes
    from tests.support.policy_harness import route_target, security_policy

    routes = tmp_path / "routes.yaml"
    routes.write_text(mcp_routes(9).replace("  name: mcp\n", f"  name: {route_name}\n"))
    provider = {"name": "idp", "issuer": "https://idp.example.test", "remoteJWKS": {"uri": "http://127.0.0.1:9/jwks"}}
    if audiences is not None:
        provider["audiences"] = audiences
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "mcp.yaml").write_text(security_policy("tools", {"jwt": {"providers": [provider]}},
                                                       targets=[route_target(route_name)]))
    return routes, policies


@pytest.mark.parametrize("route_name", ["mcp", "agent-tools"])
def test_an_mcp_route_without_public_url_or_audiences_is_refused_by_check_and_serve_naming_it(tmp_path, route_name):
    routes, policies = mcp_files(tmp_path, route_name, audiences=None)
    assert f"  name: {route_name}\n" in routes.read_text()
    checked = sandgate(["check", "--routes", str(routes), "--policies", str(policies)], tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    (error,) = error_lines(checked, str(routes))
    assert f"HTTPRoute infra/{route_name} is an MCP route" in error[1] and "--public-url" in error[1], error

    served = sandgate(["serve", "--routes", str(routes), "--policies", str(policies), "--listen", "127.0.0.1:0",
                       "--admin", "off", "--data-dir", str(tmp_path / "data")], tmp_path)
    assert served.returncode == 1
    (line,) = operator_lines(served.stderr)
    assert f"HTTPRoute infra/{route_name} is an MCP route" in line and "Traceback" not in served.stderr


@pytest.mark.parametrize("how", ["flag", "environment", "audiences"])
def test_an_mcp_route_with_a_public_url_or_explicit_audiences_passes_check(tmp_path, how):
    routes, policies = mcp_files(tmp_path, "mcp", audiences=["https://agents.example.test/mcp"] if how == "audiences" else None)
    args = ["check", "--routes", str(routes), "--policies", str(policies)]
    env = {}
    if how == "flag":
        args += ["--public-url", "https://agents.example.test"]
    elif how == "environment":
        env["SANDGATE_PUBLIC_URL"] = "https://agents.example.test"
    result = sandgate(args, tmp_path, **env)
    assert result.returncode == 0, result.stdout + result.stderr


# --- routes to sandboxes and previews that take any token of their issuer ------------------------


def permissive(shipped: str, change: str) -> str:
    """The shipped sandbox policies with their audience requirement, their scope requirement, or
    both, taken out."""
    import yaml

    security, sandbox = yaml.safe_load_all(shipped)
    if change in ("no-audience", "neither"):
        del security["spec"]["jwt"]["providers"][0]["audiences"]
    if change in ("no-scope", "neither"):
        del security["spec"]["authorization"]["rules"][0]["principal"]["jwt"]["scopes"]
    if change == "allow-by-default":
        security["spec"]["authorization"]["defaultAction"] = "Allow"
    return yaml.safe_dump_all([security, sandbox])


def open_token_warnings(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if "accepts tokens with" in line]


def test_check_does_not_warn_about_the_shipped_sandbox_policy(tmp_path):
    result = sandgate(["check", "--routes", str(SHIPPED_ROUTES), "--policies", str(SHIPPED_POLICIES)], tmp_path)
    assert result.returncode == 0 and open_token_warnings(result) == [], result.stdout


@pytest.mark.parametrize("change, missing", [
    ("no-audience", ["no audience requirement"]),
    ("no-scope", ["no scope requirement"]),
    ("allow-by-default", ["no scope requirement"]),
    ("neither", ["no audience requirement", "no scope requirement"]),
])
def test_check_warns_when_a_sandbox_or_preview_route_accepts_any_token_of_its_issuer(tmp_path, change, missing):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "sandboxes.yaml").write_text(permissive((SHIPPED_POLICIES / "sandboxes.yaml").read_text(), change))
    result = sandgate(["check", "--routes", str(SHIPPED_ROUTES), "--policies", str(policies)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr  # a warning, not an error
    warnings = open_token_warnings(result)
    covered = {"platform/sandboxes rule header-routed", "platform/sandboxes rule sandbox-api", "platform/previews rule preview-api"}
    assert {w.split("HTTPRoute ", 1)[1].split(" (")[0] for w in warnings} == covered, result.stdout
    for line in warnings:
        assert line.endswith("(warning)") and "SecurityPolicy platform/sandboxes" in line
        assert ("SandboxRouter platform/sandboxes" in line) or ("PreviewZone platform/previews" in line)
        assert all(m in line for m in missing) and line.count("requirement") == len(missing), line
        assert ERROR_LINE.match(line[: -len(" (warning)")]), line
