"""The benchmark's cases and the processes they start. A new case is one row in CASES: a
name, a setup that starts (or reuses, through `Bench.shared`) what it needs and returns the
URL to load (or a `Target`: the URL and headers), the load that measures it, and one line
for `--help`. RATIOS lists the comparisons the report prints."""

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cluster import (NAMESPACE, SANDBOX, ZONE, KubeWorld, kube_api, kube_args, preview_policies_yaml,
                     preview_routes_yaml, sandbox_routes_yaml)
from harness import (BENCH_DIR, Bench, BearerToken, CaseError, RouterSecret, Skip, Target, WsEcho, Wrk, accepts,
                     answers_200, checkout_env, find_tool, free_port, http_get)

BODY_BYTES = 200
ORIGIN_BODY = b"x" * BODY_BYTES
SANDGATE_READY_TIMEOUT = 20.0
# Listing 10,000 preview HTTPRoutes from the double takes a few seconds more than a plain start.
SANDGATE_CLUSTER_READY_TIMEOUT = 120.0


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Bench], "str | Target"]  # starts or reuses its processes; returns what to load
    load: Wrk | WsEcho
    about: str = ""  # one line for --help


@dataclass(frozen=True)
class Ratio:
    """numerator's metric / denominator's, from the medians: `rps` (higher is better) or
    `proxy_us_per_request` (lower is better; meaningful even when the load side limited)."""
    numerator: str
    denominator: str
    target: float | None = None  # the ratio must be at least this
    metric: str = "rps"
    head_to_head: bool = False  # also measured head to head without a target (for information)

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


@dataclass(frozen=True)
class Sandgate:
    url: str  # the public listener
    admin: str  # /readyz, /metrics


def start_sandgate(bench: Bench, name: str, routes: str, policies_yaml: str | None = None, *,
                   args: tuple[str, ...] = (), ready_timeout: float = SANDGATE_READY_TIMEOUT,
                   launcher: tuple[str, ...] = ("-m", "gateway"), env: dict[str, str] | None = None) -> Sandgate:
    """`sandgate serve` on the proxy CPU with `routes` as its routes file and `policies_yaml` in
    its --policies directory (empty without it), ready once /readyz answers 200 (with a
    Kubernetes connection: once sandboxes and previews are listed). `launcher` runs the gateway
    module (gc_probe.py wraps it), `env` is added to the checkout's environment."""
    run_dir = bench.workdir / name
    policies = run_dir / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    if policies_yaml:
        (policies / "policies.yaml").write_text(policies_yaml)
    routes_file = run_dir / "routes.yaml"
    routes_file.write_text(routes)
    port, admin = free_port(), free_port()
    # The access log (stdout) goes to a file: writing it is part of the measured cost. The
    # embedded store (the audit log of policy decisions) lives in the run's scratch directory.
    bench.procs.start_python(
        name, [*launcher, "serve", f"--routes={routes_file}", f"--policies={policies}",
               f"--listen=127.0.0.1:{port}", f"--admin=127.0.0.1:{admin}", f"--data-dir={run_dir / 'data'}", *args],
        bench.cpus.proxy, stdout=run_dir / "access.log", cwd=run_dir, env=checkout_env() | (env or {}))
    bench.procs.wait_ready(name, lambda: answers_200(f"http://127.0.0.1:{admin}/readyz"), ready_timeout)
    return Sandgate(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")


def sandgate(bench: Bench, name: str, extra_routes: int, policies_yaml: str | None = None,
             args: tuple[str, ...] = ()) -> str:
    """`sandgate serve ARGS` on a generated routes file: `/` goes to the HTTP origin, `/ws` to
    the echo origin, plus `extra_routes` routes that the benchmarked requests never match."""
    def start() -> Sandgate:
        routes = routes_yaml(urlsplit(origin(bench)).port, urlsplit(aiohttp_origin(bench)).port, extra_routes)
        return start_sandgate(bench, name, routes, policies_yaml, args=args)
    return bench.shared(name, start).url


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


def sandgate_jwt(bench: Bench, name: str = "sandgate-jwt", audit_allowed: str = "rollup") -> str:
    """sandgate with a SecurityPolicy on the `main` route: a JWT provider whose inline JWKS
    holds BEARER's key, and an authorization rule that allows its `read` scope only. A request
    without the token must be refused, so that the case cannot pass by not checking at all.
    `audit_allowed`: serve's --audit-allowed (rollup, the default, or every: one record per request)."""
    policy = JWT_POLICY.format(issuer=BEARER.issuer, audience=BEARER.audience, scope=BEARER.scope,
                               jwks=BEARER.jwks)
    url = sandgate(bench, name, extra_routes=0, policies_yaml=policy, args=(f"--audit-allowed={audit_allowed}",)) + "/"
    expect(url, {}, 401, "without a token", "the policy is not enforced")
    return url


def expect(url: str, headers: dict[str, str], status: int, what: str, otherwise: str) -> bytes:
    """A GET that must answer `status` (before a case is measured); its body."""
    try:
        answered, body = http_get(url, timeout=5, headers=headers)
    except OSError as e:
        raise CaseError(f"GET {url} {what} failed: {e}") from None
    if answered != status:
        raise CaseError(f"GET {url} {what} answered {answered}, not {status}: {otherwise}")
    return body


def expect_origin(url: str, headers: dict[str, str], what: str) -> None:
    """A 200 with the origin's body: the request reached the origin, not some other answer."""
    if expect(url, headers, 200, what, "not routed to the origin") != ORIGIN_BODY:
        raise CaseError(f"GET {url} {what} answered 200, but not with the origin's body")


# --- the Kubernetes cases: a SandboxRouter and a PreviewZone against the API double ----------

ROUTER_SECRET = RouterSecret()


def sandgate_sandbox(bench: Bench) -> Target:
    """sandgate with one SandboxRouter (Cluster resolution, routerTokenFile) behind the
    header-routed rule; the API double's sandbox `sandboxes/bench` has the origin as its pod.
    Without the router token a request must get 401, with it the origin's 200."""
    origin_port = urlsplit(origin(bench)).port
    world = kube_api(bench, previews=0, origin_port=origin_port)

    def start() -> Sandgate:
        token_file = bench.workdir / "sandgate-sandbox" / "router-token"
        token_file.parent.mkdir(parents=True)
        token_file.touch(mode=0o600)
        token_file.write_text(ROUTER_SECRET.token + "\n")
        return start_sandgate(bench, "sandgate-sandbox", sandbox_routes_yaml(token_file), args=kube_args(world),
                              ready_timeout=SANDGATE_CLUSTER_READY_TIMEOUT)

    url = bench.shared("sandgate-sandbox", start).url + "/"
    headers = (("X-Sandbox-ID", SANDBOX), ("X-Sandbox-Port", str(origin_port)))
    expect(url, dict(headers), 401, "without the router token", "the router token is not checked")
    expect_origin(url, ROUTER_SECRET.headers | dict(headers), f"to sandbox {NAMESPACE}/{SANDBOX}")
    return Target(url, headers)


def sandgate_preview(bench: Bench, name: str, previews: int) -> Target:
    """sandgate with a PreviewZone whose namespace holds `previews` previews of the origin's
    port (created in the API double before the gateway starts, so its watch lists them all);
    the load goes to one of them by its host. The gateway must report `previews` active
    previews, serve that host from the origin, and answer 404 for another token's host."""
    world = kube_api(bench, previews=previews, origin_port=urlsplit(origin(bench)).port)
    gateway = bench.shared(name, lambda: start_sandgate(
        bench, name, preview_routes_yaml(), preview_policies_yaml(BEARER), args=kube_args(world),
        ready_timeout=SANDGATE_CLUSTER_READY_TIMEOUT))
    check_previews_active(gateway, world)
    url = gateway.url + "/"
    expect(url, {"Host": f"{'a' * 26}-preview.{ZONE}"}, 404, "for an unknown preview host", "previews not served")
    host = world.hosts[0]
    expect_origin(url, {"Host": host}, "for a preview host")
    return Target(url, (("Host", host),))


def check_previews_active(gateway: Sandgate, world: KubeWorld) -> None:
    body = expect(gateway.admin + "/metrics", {}, 200, "(metrics)", "no metrics")
    for line in body.decode().splitlines():
        if line.startswith("sandgate_previews_active "):
            active = float(line.split()[1])
            if active != world.previews:
                raise CaseError(f"the gateway serves {active:.0f} previews, the API double holds {world.previews}")
            return
    raise CaseError("the gateway reports no sandgate_previews_active")


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://", 1) + "/ws"


HTTP = Wrk(connections=64)
HTTP_JWT = Wrk(connections=64, bearer=BEARER)
HTTP_ROUTER_TOKEN = Wrk(connections=64, bearer=ROUTER_SECRET)
WS = WsEcho(connections=16)

CASES = (
    Case("direct", lambda b: origin(b) + "/", HTTP, "wrk -> origin"),
    Case("nginx", lambda b: nginx_proxy(b) + "/", HTTP, "wrk -> nginx proxy -> origin"),
    Case("bare", lambda b: bare_proxy(b, "bare", origin(b)) + "/", HTTP, "wrk -> bare aiohttp proxy -> origin"),
    Case("sandgate", lambda b: sandgate(b, "sandgate", extra_routes=0) + "/", HTTP,
         "wrk -> sandgate serve (plain route) -> origin"),
    Case("sandgate-10k", lambda b: sandgate(b, "sandgate-10k", extra_routes=10_000) + "/", HTTP,
         "sandgate with 10,000 extra routes the requests never match"),
    Case("sandgate-bearer", lambda b: sandgate(b, "sandgate", extra_routes=0) + "/", HTTP_JWT,
         "sandgate's plain route (no policy) with sandgate-jwt's request stream: the token on every request"),
    Case("sandgate-jwt", sandgate_jwt, HTTP_JWT,
         "sandgate with a JWT SecurityPolicy; every request has the token (audit: rollup, the default)"),
    Case("sandgate-jwt-every", lambda b: sandgate_jwt(b, "sandgate-jwt-every", "every"), HTTP_JWT,
         "sandgate-jwt with --audit-allowed every: one audit record per request"),
    Case("sandgate-sandbox", sandgate_sandbox, HTTP_ROUTER_TOKEN,
         "X-Sandbox-ID/-Port + router token -> SandboxRouter (Cluster, API double) -> origin as the pod"),
    Case("sandgate-preview-10", lambda b: sandgate_preview(b, "sandgate-preview-10", previews=10), HTTP,
         "Host: one of 10 active previews -> PreviewZone -> origin as the pod"),
    Case("sandgate-preview-10k", lambda b: sandgate_preview(b, "sandgate-preview-10k", previews=10_000), HTTP,
         "the same with 10,000 active previews"),
    Case("ws-direct", lambda b: ws_url(aiohttp_origin(b)), WS, "WebSocket echo, directly"),
    Case("ws-bare", lambda b: ws_url(bare_proxy(b, "bare-ws", aiohttp_origin(b))), WS,
         "WebSocket echo through the bare proxy"),
    Case("ws-sandgate", lambda b: ws_url(sandgate(b, "sandgate", extra_routes=0)), WS,
         "WebSocket echo through sandgate"),
)

RATIOS = (
    Ratio("nginx", "direct"),
    Ratio("bare", "direct"),
    Ratio("sandgate", "direct"),
    Ratio("sandgate-10k", "direct"),
    Ratio("sandgate", "nginx"),
    Ratio("sandgate", "bare", target=1.0),
    Ratio("sandgate-10k", "sandgate", target=0.9),
    Ratio("sandgate-jwt", "sandgate-bearer", target=0.9),
    Ratio("sandgate-jwt-every", "sandgate-bearer", head_to_head=True),
    Ratio("sandgate-jwt", "sandgate"),
    Ratio("sandgate-bearer", "sandgate"),
    Ratio("sandgate-sandbox", "direct"),
    Ratio("sandgate-sandbox", "sandgate", target=0.9),
    Ratio("sandgate-preview-10k", "sandgate-preview-10", target=0.9),
    Ratio("sandgate-preview-10", "sandgate"),
    Ratio("ws-bare", "ws-direct"),
    Ratio("ws-sandgate", "ws-direct"),
    Ratio("ws-sandgate", "ws-bare"),
    Ratio("sandgate", "bare", metric="proxy_us_per_request"),
    Ratio("sandgate-10k", "sandgate", metric="proxy_us_per_request"),
    Ratio("sandgate-jwt", "sandgate-bearer", metric="proxy_us_per_request"),
    Ratio("sandgate-jwt-every", "sandgate-bearer", metric="proxy_us_per_request"),
    Ratio("sandgate-sandbox", "sandgate", metric="proxy_us_per_request"),
    Ratio("sandgate-preview-10k", "sandgate-preview-10", metric="proxy_us_per_request"),
    Ratio("sandgate-preview-10", "sandgate", metric="proxy_us_per_request"),
    Ratio("ws-sandgate", "ws-bare", metric="proxy_us_per_request"),
)

# Printed after the targets, for information: (case, median metric).
SHOWN = (
    ("sandgate-jwt", "p99_ms"),
)
