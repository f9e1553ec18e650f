"""The benchmark's cases and the processes they start. A new case is one row in CASES: a
name, a setup that starts (or reuses, through `Bench.shared`) what it needs and returns the
URL to load, and the load that measures it. RATIOS lists the comparisons the report prints."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from harness import (BENCH_DIR, REPO_DIR, Bench, BearerToken, CaseError, Skip, WsEcho, Wrk, accepts, answers_200,
                     find_tool, free_port, http_status)

BODY_BYTES = 200
SANDGATE_READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Bench], str]  # starts or reuses its processes; returns the URL to load
    load: Wrk | WsEcho


@dataclass(frozen=True)
class Ratio:
    """numerator's metric / denominator's, from the medians: `rps` (higher is better) or
    `proxy_us_per_request` (lower is better; meaningful even when the load side limited)."""
    numerator: str
    denominator: str
    target: float | None = None  # the ratio must be at least this
    metric: str = "rps"

    @property
    def name(self) -> str:
        return f"{self.numerator}/{self.denominator} {self.metric}"


# --- upstreams: on the load CPU, next to the load generator ---------------------------------

def aiohttp_origin(bench: Bench) -> str:
    """upstream.py: the WebSocket echo origin, and the HTTP origin when nginx is missing."""
    def start() -> str:
        port = free_port()
        bench.procs.start_python("aiohttp-origin", [str(BENCH_DIR / "upstream.py"), f"--port={port}",
                                                    f"--body-bytes={BODY_BYTES}"], bench.cpus.load)
        bench.procs.wait_ready("aiohttp-origin", lambda: accepts(port))
        return f"http://127.0.0.1:{port}"
    return bench.shared("aiohttp-origin", start)


def origin(bench: Bench) -> str:
    """The HTTP origin: nginx returning a fixed body, far faster than any proxy under test."""
    if not find_tool("nginx"):
        return aiohttp_origin(bench)
    body = "x" * BODY_BYTES
    return bench.shared("nginx-origin", lambda: start_nginx(bench, "nginx-origin", bench.cpus.load, f"""
    access_log off;
    server {{
        listen 127.0.0.1:{{port}};
        location / {{ default_type text/plain; return 200 "{body}"; }}
    }}"""))


# --- proxies under test: alone on the proxy CPU ---------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {workdir}/{name}.pid;
events {{ worker_connections 4096; }}
http {{
    keepalive_requests 1000000;
{http}
}}
"""


def start_nginx(bench: Bench, name: str, cpu: int, http: str) -> str:
    """Starts nginx with `http` as its http block body (`{port}` is filled in); returns its URL."""
    nginx = find_tool("nginx")
    if not nginx:
        raise Skip("nginx not installed")
    port = free_port()
    conf = bench.workdir / f"{name}.conf"
    conf.write_text(NGINX_CONF.format(workdir=bench.workdir, name=name, http=http.replace("{port}", str(port))))
    bench.procs.start(name, [nginx, "-p", str(bench.workdir), "-e", str(bench.workdir / f"{name}.error.log"),
                             "-c", str(conf)], cpu)
    bench.procs.wait_ready(name, lambda: accepts(port))
    return f"http://127.0.0.1:{port}"


def nginx_proxy(bench: Bench) -> str:
    upstream = urlsplit(origin(bench)).netloc
    return bench.shared("nginx-proxy", lambda: start_nginx(bench, "nginx-proxy", bench.cpus.proxy, f"""
    access_log {bench.workdir}/nginx-proxy.access.log;
    upstream origin {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{{port}};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""))


def bare_proxy(bench: Bench, name: str, upstream: str) -> str:
    def start() -> str:
        port = free_port()
        bench.procs.start_python(name, [str(BENCH_DIR / "bare_proxy.py"), f"--port={port}",
                                        f"--upstream={upstream}"], bench.cpus.proxy)
        bench.procs.wait_ready(name, lambda: accepts(port))
        return f"http://127.0.0.1:{port}"
    return bench.shared(name, start)


def sandgate(bench: Bench, name: str, extra_routes: int, policies_yaml: str | None = None) -> str:
    """`sandgate serve` on a generated routes file: `/` goes to the HTTP origin, `/ws` to the
    echo origin, plus `extra_routes` routes that the benchmarked requests never match; its
    --policies directory holds `policies_yaml` (empty without it)."""
    def start() -> str:
        run_dir = bench.workdir / name
        policies = run_dir / "policies"
        policies.mkdir(parents=True)
        if policies_yaml:
            (policies / "policies.yaml").write_text(policies_yaml)
        routes = run_dir / "routes.yaml"
        routes.write_text(routes_yaml(urlsplit(origin(bench)).port, urlsplit(aiohttp_origin(bench)).port,
                                      extra_routes))
        port, admin = free_port(), free_port()
        # The access log (stdout) goes to a file: writing it is part of the measured cost. The
        # embedded store (the audit log of policy decisions) lives in the run's scratch directory.
        bench.procs.start_python(
            name, ["-m", "gateway", "serve", f"--routes={routes}", f"--policies={policies}",
                   f"--listen=127.0.0.1:{port}", f"--admin=127.0.0.1:{admin}", f"--data-dir={run_dir / 'data'}"],
            bench.cpus.proxy, stdout=run_dir / "access.log", cwd=run_dir, env=sandgate_env())
        bench.procs.wait_ready(name, lambda: answers_200(f"http://127.0.0.1:{admin}/readyz"),
                               SANDGATE_READY_TIMEOUT)
        return f"http://127.0.0.1:{port}"
    return bench.shared(name, start)


def sandgate_env() -> dict[str, str]:
    """This checkout's gateway, configured by its flags alone (no SANDGATE_* from the shell)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDGATE_")}
    return env | {"PYTHONPATH": str(REPO_DIR)}


GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bench, namespace: bench}
spec:
  gatewayClassName: sandgate
  listeners:
  - {name: http, port: 8080, protocol: HTTP}
"""

BACKEND = """\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {{name: {name}, namespace: bench}}
spec:
  endpoints:
  - ip: {{address: 127.0.0.1, port: {port}}}
"""

HTTP_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: bench}}
spec:
  parentRefs: [{{name: bench}}]
{hostnames}  rules:
  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    backendRefs: [{{group: gateway.envoyproxy.io, kind: Backend, name: {backend}}}]
"""


def http_route(name: str, prefix: str, backend: str, hostname: str | None = None) -> str:
    hostnames = f"  hostnames: [{hostname}]\n" if hostname else ""
    return HTTP_ROUTE.format(name=name, prefix=prefix, backend=backend, hostnames=hostnames)


def routes_yaml(origin_port: int, echo_port: int, extra_routes: int) -> str:
    """Half the extra routes are on other hosts (r{i}.bench.example), half are path prefixes
    (/r{i}) on the benchmarked host, one HTTPRoute each, all to the origin."""
    documents = [
        GATEWAY,
        BACKEND.format(name="origin", port=origin_port),
        BACKEND.format(name="echo", port=echo_port),
        http_route("main", "/", "origin"),
        http_route("ws", "/ws", "echo"),
    ]
    for i in range(extra_routes // 2):
        documents.append(http_route(f"host-{i}", "/", "origin", hostname=f"r{i}.bench.example"))
        documents.append(http_route(f"path-{i}", f"/r{i}", "origin"))
    return "---\n".join(documents)


JWT_POLICY = """\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {{name: jwt, namespace: bench}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: main}}]
  jwt:
    providers:
    - name: bench
      issuer: {issuer}
      audiences: [{audience}]
      localJWKS: {{type: Inline, inline: '{jwks}'}}
  authorization:
    defaultAction: Deny
    rules:
    - name: bench-users
      action: Allow
      principal:
        jwt:
          provider: bench
          scopes: [{scope}]
"""

BEARER = BearerToken()


def sandgate_jwt(bench: Bench) -> str:
    """sandgate with a SecurityPolicy on the `main` route: a JWT provider whose inline JWKS
    holds BEARER's key, and an authorization rule that allows its `read` scope only. A request
    without the token must be refused, so that the case cannot pass by not checking at all."""
    policy = JWT_POLICY.format(issuer=BEARER.issuer, audience=BEARER.audience, scope=BEARER.scope,
                               jwks=BEARER.jwks)
    url = sandgate(bench, "sandgate-jwt", extra_routes=0, policies_yaml=policy) + "/"
    try:
        status = http_status(url, timeout=5)
    except OSError as e:
        raise CaseError(f"GET {url} without a token failed: {e}") from None
    if status != 401:
        raise CaseError(f"GET {url} without a token answered {status}, not 401: the policy is not enforced")
    return url


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://", 1) + "/ws"


HTTP = Wrk(connections=64)
HTTP_JWT = Wrk(connections=64, bearer=BEARER)
WS = WsEcho(connections=16)

CASES = (
    Case("direct", lambda b: origin(b) + "/", HTTP),
    Case("nginx", lambda b: nginx_proxy(b) + "/", HTTP),
    Case("bare", lambda b: bare_proxy(b, "bare", origin(b)) + "/", HTTP),
    Case("sandgate", lambda b: sandgate(b, "sandgate", extra_routes=0) + "/", HTTP),
    Case("sandgate-10k", lambda b: sandgate(b, "sandgate-10k", extra_routes=10_000) + "/", HTTP),
    Case("sandgate-jwt", sandgate_jwt, HTTP_JWT),
    Case("ws-direct", lambda b: ws_url(aiohttp_origin(b)), WS),
    Case("ws-bare", lambda b: ws_url(bare_proxy(b, "bare-ws", aiohttp_origin(b))), WS),
    Case("ws-sandgate", lambda b: ws_url(sandgate(b, "sandgate", extra_routes=0)), WS),
)

RATIOS = (
    Ratio("nginx", "direct"),
    Ratio("bare", "direct"),
    Ratio("sandgate", "direct"),
    Ratio("sandgate-10k", "direct"),
    Ratio("sandgate", "nginx"),
    Ratio("sandgate", "bare", target=0.9),
    Ratio("sandgate-10k", "sandgate", target=0.9),
    Ratio("sandgate-jwt", "sandgate", target=0.9),
    Ratio("ws-bare", "ws-direct"),
    Ratio("ws-sandgate", "ws-direct"),
    Ratio("ws-sandgate", "ws-bare"),
    Ratio("sandgate", "bare", metric="proxy_us_per_request"),
    Ratio("sandgate-10k", "sandgate", metric="proxy_us_per_request"),
    Ratio("sandgate-jwt", "sandgate", metric="proxy_us_per_request"),
    Ratio("ws-sandgate", "ws-bare", metric="proxy_us_per_request"),
)

# Printed after the targets, for information: (case, median metric).
SHOWN = (
    ("sandgate-jwt", "p99_ms"),
)
